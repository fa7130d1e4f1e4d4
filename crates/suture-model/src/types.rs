//! The objects of the model (kernel: `klp_patch`, `klp_object`, `klp_func`).

use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// A thread of the target, as the OS layer names it (on Linux: the tid).
pub type ThreadId = i32;

/// A thread's patch state (kernel: `KLP_UNDEFINED`, `KLP_UNPATCHED`, `KLP_PATCHED`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ThreadState {
    /// No transition runs.
    Idle,
    Unpatched,
    Patched,
}

/// The state a transition moves threads to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    Patched,
    Unpatched,
}

impl Target {
    /// The other target (used by a reversal).
    pub fn flipped(self) -> Target {
        match self {
            Target::Patched => Target::Unpatched,
            Target::Unpatched => Target::Patched,
        }
    }

    /// The per-thread state that means "already in this target".
    pub fn thread_state(self) -> ThreadState {
        match self {
            Target::Patched => ThreadState::Patched,
            Target::Unpatched => ThreadState::Unpatched,
        }
    }
}

/// Code a call of a patched function may run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Code {
    /// The function's own code (through the relocated copy of its first
    /// instructions while a site exists).
    Original,
    /// A replacement function at this address.
    New(u64),
}

/// What a patch site must do (the redirection rule, resolved per site).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SiteMode {
    /// No entry: the original bytes are in place and no suture code runs.
    Original,
    /// Outside a transition: one direct jump to this code.
    Jump(Code),
    /// The top entry is in transition: threads in the patched state run
    /// `patched`, the others `unpatched`.
    Dispatch { patched: Code, unpatched: Code },
}

/// One replaced function (kernel: `klp_func`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Func {
    pub old_name: String,
    /// 0: unique name; N: the N-th symbol of that name.
    pub old_sympos: u64,
    /// Address of the original function in the target: the key of its func stack.
    pub old_addr: u64,
    /// Address of the replacement; 0 for a nop.
    pub new_addr: u64,
    /// A placeholder added by a replace patch: runs the original code.
    pub nop: bool,
    /// On its func stack.
    pub patched: bool,
    /// In flight in the current transition.
    pub transition: bool,
}

impl Func {
    /// A function entry that is not yet on any stack.
    pub fn new(old_name: impl Into<String>, old_sympos: u64, old_addr: u64, new_addr: u64) -> Self {
        Func {
            old_name: old_name.into(),
            old_sympos,
            old_addr,
            new_addr,
            nop: false,
            patched: false,
            transition: false,
        }
    }

    /// The code this entry stands for.
    pub fn code(&self) -> Code {
        if self.nop {
            Code::Original
        } else {
            Code::New(self.new_addr)
        }
    }

    /// Whether `other` names the same original function (kernel: same
    /// `old_name` and `old_sympos`; sympos 0 and 1 are the same symbol).
    pub fn same_target(&self, other: &Func) -> bool {
        self.old_name == other.old_name && self.old_sympos.max(1) == other.old_sympos.max(1)
    }
}

/// Which callback of an object (kernel: `klp_callbacks`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallbackKind {
    PrePatch,
    PostPatch,
    PreUnpatch,
    PostUnpatch,
}

/// One object of the target: the main program (`name` is `None`) or a
/// shared object (kernel: `klp_object`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Object {
    pub name: Option<String>,
    /// Where the object was found in the target (a file path).
    pub path: String,
    pub build_id: Option<String>,
    pub funcs: Vec<Func>,
    /// Its functions are on their stacks.
    pub patched: bool,
    /// Created by a replace patch only to hold nops.
    pub dynamic: bool,
    /// Callback addresses in the target, by kind (absent when not set).
    pub callbacks: Vec<(CallbackKind, u64)>,
    /// Address of the patch's own description of this object in the target
    /// (the argument its callbacks receive); 0 for dynamic objects.
    #[serde(default)]
    pub desc_addr: u64,
}

impl Object {
    pub fn new(name: Option<String>, path: impl Into<String>, build_id: Option<String>) -> Self {
        Object {
            name,
            path: path.into(),
            build_id,
            funcs: Vec::new(),
            patched: false,
            dynamic: false,
            callbacks: Vec::new(),
            desc_addr: 0,
        }
    }
}

/// A system state a patch establishes (kernel: `klp_state`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub id: u64,
    pub version: u32,
    /// Address of the patch's `struct suture_state` in the target (0 when
    /// not loaded), for `suture_get_state`.
    #[serde(default)]
    pub desc_addr: u64,
}

/// A patch (kernel: `klp_patch`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Patch {
    pub name: String,
    pub replace: bool,
    /// 1 from the start of patching, 0 from the start of a disable.
    pub enabled: bool,
    /// A transition involving it was forced: its code is never freed.
    pub forced: bool,
    pub objects: Vec<Object>,
    pub states: Vec<State>,
}

impl Patch {
    pub fn new(name: impl Into<String>, replace: bool) -> Self {
        Patch {
            name: name.into(),
            replace,
            enabled: false,
            forced: false,
            objects: Vec::new(),
            states: Vec::new(),
        }
    }

    /// Every function entry of the patch.
    pub fn funcs(&self) -> impl Iterator<Item = &Func> {
        self.objects.iter().flat_map(|o| o.funcs.iter())
    }

    pub(crate) fn funcs_mut(&mut self) -> impl Iterator<Item = &mut Func> {
        self.objects.iter_mut().flat_map(|o| o.funcs.iter_mut())
    }

    /// The entry for the function at `old_addr`.
    pub fn func(&self, old_addr: u64) -> Option<&Func> {
        self.funcs().find(|f| f.old_addr == old_addr)
    }

    pub fn state(&self, id: u64) -> Option<&State> {
        self.states.iter().find(|s| s.id == id)
    }
}

/// The transition in progress (kernel: `klp_transition_patch` and friends).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    pub patch: String,
    pub target: Target,
    /// Threads not yet in the target state.
    pub pending: BTreeSet<ThreadId>,
    /// The transition was reversed at least once.
    pub reversed: bool,
}
