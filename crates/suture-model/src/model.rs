//! The patch list, func stacks and transition (kernel: `core.c`,
//! `patch.c`, `transition.c`).

use crate::types::{
    CallbackKind, Code, Func, Object, Patch, SiteMode, Target, ThreadId, ThreadState, Transition,
};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// Why the model refused an operation. Each message is one sentence for people.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    #[error("patch '{transition}' is in transition; wait for it to complete, reverse it with `suture disable` or `suture force` it before changing '{requested}'")]
    Busy {
        transition: String,
        requested: String,
    },
    #[error("a patch named '{0}' is already applied; disable it first or give the new patch another name")]
    AlreadyApplied(String),
    #[error("no patch named '{0}' is applied")]
    NoSuchPatch(String),
    #[error(
        "patch '{patch}' is not compatible with the already installed patches: state {id} {reason}"
    )]
    Incompatible {
        patch: String,
        id: u64,
        reason: String,
    },
    #[error("patch '{patch}' replaces function '{name}' twice (two entries resolve to the same address {addr:#x})")]
    DuplicateFunc {
        patch: String,
        name: String,
        addr: u64,
    },
    #[error("patch '{0}' changes no function")]
    Empty(String),
    #[error("no transition is in progress")]
    NoTransition,
    #[error("the transition of '{patch}' still has {pending} pending thread(s)")]
    Pending { patch: String, pending: usize },
}

/// What [`Model::begin_disable`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DisableKind {
    /// An unpatching transition started.
    Started,
    /// The patch was in transition: its transition now goes the other way.
    Reversed,
}

/// The result of completing a transition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    pub patch: String,
    pub target: Target,
    /// Patches that left the list (disabled, or replaced): their code can be
    /// released once no thread can be inside it (never when `forced`).
    pub removed: Vec<Patch>,
    /// Nop entries discarded at once (the seed), by original address.
    pub nops_removed: Vec<u64>,
    /// Callbacks to run now, in order: (patch, object name, kind, address).
    pub callbacks: Vec<(String, Option<String>, CallbackKind, u64)>,
}

/// The whole livepatch state of one process.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Model {
    /// Enabled or in-transition patches, in the order they were enabled.
    patches: Vec<Patch>,
    /// Func stack per original function address: patch names, top last.
    stacks: BTreeMap<u64, Vec<String>>,
    transition: Option<Transition>,
    /// Per-thread patch state; only threads known during a transition.
    threads: BTreeMap<ThreadId, ThreadState>,
}

impl Model {
    pub fn new() -> Self {
        Self::default()
    }

    /// The patch list, in stack order (1-based position = stack order).
    pub fn patches(&self) -> &[Patch] {
        &self.patches
    }

    pub fn patch(&self, name: &str) -> Option<&Patch> {
        self.patches.iter().find(|p| p.name == name)
    }

    pub fn transition(&self) -> Option<&Transition> {
        self.transition.as_ref()
    }

    /// A thread's patch state; threads the model does not know are idle
    /// outside a transition and in the target state during one (see
    /// [`Model::add_thread`]).
    pub fn thread_state(&self, tid: ThreadId) -> ThreadState {
        match (&self.transition, self.threads.get(&tid)) {
            (_, Some(s)) => *s,
            (Some(t), None) => t.target.thread_state(),
            (None, None) => ThreadState::Idle,
        }
    }

    /// Every thread the current transition tracks, with its state.
    pub fn threads(&self) -> impl Iterator<Item = (ThreadId, ThreadState)> + '_ {
        self.threads.iter().map(|(t, s)| (*t, *s))
    }

    /// The entries on the func stack of `old_addr`, bottom first.
    pub fn stack(&self, old_addr: u64) -> Vec<(&Patch, &Func)> {
        self.stacks
            .get(&old_addr)
            .into_iter()
            .flatten()
            .filter_map(|name| {
                let p = self.patch(name)?;
                Some((p, p.func(old_addr)?))
            })
            .collect()
    }

    /// Addresses of every function with a non-empty func stack.
    pub fn sites(&self) -> Vec<u64> {
        self.stacks.keys().copied().collect()
    }

    /// The redirection rule resolved for one site.
    pub fn site_mode(&self, old_addr: u64) -> SiteMode {
        let stack = self.stack(old_addr);
        let Some((_, top)) = stack.last() else {
            return SiteMode::Original;
        };
        if top.transition {
            let below = stack
                .len()
                .checked_sub(2)
                .map(|i| stack[i].1.code())
                .unwrap_or(Code::Original);
            SiteMode::Dispatch {
                patched: top.code(),
                unpatched: below,
            }
        } else {
            SiteMode::Jump(top.code())
        }
    }

    /// Site modes of every site (an address absent from the map is `Original`).
    pub fn site_modes(&self) -> BTreeMap<u64, SiteMode> {
        self.stacks
            .keys()
            .map(|a| (*a, self.site_mode(*a)))
            .collect()
    }

    /// Which code a call of the function at `old_addr` runs for a thread in
    /// `state`: the model's redirection decision (section 2).
    pub fn code_for(&self, old_addr: u64, state: ThreadState) -> Code {
        match self.site_mode(old_addr) {
            SiteMode::Original => Code::Original,
            SiteMode::Jump(c) => c,
            SiteMode::Dispatch { patched, unpatched } => match state {
                ThreadState::Unpatched => unpatched,
                ThreadState::Patched | ThreadState::Idle => patched,
            },
        }
    }

    /// Every check `begin_enable` makes, changing nothing.
    pub fn check_enable(&self, patch: &Patch) -> Result<(), ModelError> {
        if let Some(t) = &self.transition {
            return Err(ModelError::Busy {
                transition: t.patch.clone(),
                requested: patch.name.clone(),
            });
        }
        if self.patch(&patch.name).is_some() {
            return Err(ModelError::AlreadyApplied(patch.name.clone()));
        }
        if patch.funcs().next().is_none() {
            return Err(ModelError::Empty(patch.name.clone()));
        }
        let mut seen = BTreeSet::new();
        for f in patch.funcs() {
            if !seen.insert(f.old_addr) {
                return Err(ModelError::DuplicateFunc {
                    patch: patch.name.clone(),
                    name: f.old_name.clone(),
                    addr: f.old_addr,
                });
            }
        }
        self.check_states(patch)
    }

    /// kernel: `klp_is_patch_compatible`.
    fn check_states(&self, patch: &Patch) -> Result<(), ModelError> {
        for old in &self.patches {
            for old_state in &old.states {
                let reason = match patch.state(old_state.id) {
                    None if patch.replace => Some(format!(
                        "(set by '{}') is not carried by the cumulative patch",
                        old.name
                    )),
                    Some(s) if s.version < old_state.version => Some(format!(
                        "has version {} but '{}' installed version {}",
                        s.version, old.name, old_state.version
                    )),
                    _ => None,
                };
                if let Some(reason) = reason {
                    return Err(ModelError::Incompatible {
                        patch: patch.name.clone(),
                        id: old_state.id,
                        reason,
                    });
                }
            }
        }
        Ok(())
    }

    /// Start enabling `patch` (kernel: `klp_enable_patch`): nops are added
    /// for a replace patch, every thread starts unpatched, the entries are
    /// marked in transition and only then pushed on their stacks.
    pub fn begin_enable(
        &mut self,
        mut patch: Patch,
        threads: &[ThreadId],
    ) -> Result<(), ModelError> {
        self.check_enable(&patch)?;
        for o in &mut patch.objects {
            o.patched = false;
            for f in &mut o.funcs {
                f.patched = false;
                f.transition = false;
            }
        }
        if patch.replace {
            self.add_nops(&mut patch);
        }
        self.threads = threads
            .iter()
            .map(|t| (*t, ThreadState::Unpatched))
            .collect();
        for f in patch.funcs_mut() {
            f.transition = true;
        }
        for o in &mut patch.objects {
            for f in &mut o.funcs {
                self.stacks
                    .entry(f.old_addr)
                    .or_default()
                    .push(patch.name.clone());
                f.patched = true;
            }
            o.patched = true;
        }
        patch.enabled = true;
        self.transition = Some(Transition {
            patch: patch.name.clone(),
            target: Target::Patched,
            pending: threads.iter().copied().collect(),
            reversed: false,
        });
        self.patches.push(patch);
        Ok(())
    }

    /// kernel: `klp_add_nops`: a nop entry for every function an earlier
    /// patch changes and `patch` does not.
    fn add_nops(&self, patch: &mut Patch) {
        for old in &self.patches {
            for old_obj in &old.objects {
                for old_func in &old_obj.funcs {
                    if patch.func(old_func.old_addr).is_some() {
                        continue;
                    }
                    let idx = match patch.objects.iter().position(|o| o.name == old_obj.name) {
                        Some(i) => i,
                        None => {
                            let mut o = Object::new(
                                old_obj.name.clone(),
                                old_obj.path.clone(),
                                old_obj.build_id.clone(),
                            );
                            o.dynamic = true;
                            patch.objects.push(o);
                            patch.objects.len() - 1
                        }
                    };
                    let mut nop = Func::new(
                        old_func.old_name.clone(),
                        old_func.old_sympos,
                        old_func.old_addr,
                        0,
                    );
                    nop.nop = true;
                    patch.objects[idx].funcs.push(nop);
                }
            }
        }
    }

    /// Start disabling `name`, or reverse its transition if it is the patch
    /// in transition (kernel: `enabled_store`).
    pub fn begin_disable(
        &mut self,
        name: &str,
        threads: &[ThreadId],
    ) -> Result<DisableKind, ModelError> {
        if self.patch(name).is_none() {
            return Err(ModelError::NoSuchPatch(name.to_string()));
        }
        if let Some(t) = &self.transition {
            if t.patch == name {
                self.reverse();
                return Ok(DisableKind::Reversed);
            }
            return Err(ModelError::Busy {
                transition: t.patch.clone(),
                requested: name.to_string(),
            });
        }
        self.threads = threads.iter().map(|t| (*t, ThreadState::Patched)).collect();
        let patch = self.patch_mut(name).expect("checked above");
        for f in patch.funcs_mut() {
            f.transition = true;
        }
        patch.enabled = false;
        self.transition = Some(Transition {
            patch: name.to_string(),
            target: Target::Unpatched,
            pending: threads.iter().copied().collect(),
            reversed: false,
        });
        Ok(DisableKind::Started)
    }

    /// kernel: `klp_reverse_transition`: flip the target; threads already
    /// in the new target are done.
    fn reverse(&mut self) {
        let t = self.transition.as_mut().expect("caller checked");
        t.target = t.target.flipped();
        t.reversed = true;
        let target = t.target.thread_state();
        t.pending = self
            .threads
            .iter()
            .filter(|(_, s)| **s != target)
            .map(|(t, _)| *t)
            .collect();
        let name = t.patch.clone();
        let p = self.patch_mut(&name).expect("transition patch is listed");
        p.enabled = !p.enabled;
    }

    /// The code each site of the transition replaces: a pending thread
    /// with a frame in it must wait. Pairs of (original address, code).
    pub fn replaced_code(&self) -> Vec<(u64, Code)> {
        let Some(t) = &self.transition else {
            return Vec::new();
        };
        let Some(patch) = self.patch(&t.patch) else {
            return Vec::new();
        };
        patch
            .funcs()
            .map(|f| {
                let code = match t.target {
                    Target::Unpatched => f.code(),
                    Target::Patched => {
                        let stack = self.stack(f.old_addr);
                        let pos = stack
                            .iter()
                            .position(|(p, _)| p.name == patch.name)
                            .unwrap_or(0);
                        match pos.checked_sub(1) {
                            Some(i) => stack[i].1.code(),
                            None => Code::Original,
                        }
                    }
                };
                (f.old_addr, code)
            })
            .collect()
    }

    /// Threads still pending in the transition.
    pub fn pending(&self) -> Vec<ThreadId> {
        self.transition
            .as_ref()
            .map(|t| t.pending.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Move a pending thread to the target state; false if it was not pending.
    pub fn switch_thread(&mut self, tid: ThreadId) -> bool {
        let Some(t) = self.transition.as_mut() else {
            return false;
        };
        if !t.pending.remove(&tid) {
            return false;
        }
        self.threads.insert(tid, t.target.thread_state());
        true
    }

    /// A thread created during a transition starts in the target state: it
    /// begins on a fresh stack, so no replaced function can be on it.
    pub fn add_thread(&mut self, tid: ThreadId) {
        if let Some(t) = &self.transition {
            self.threads.insert(tid, t.target.thread_state());
        }
    }

    /// A thread found still running the code of the transition's start
    /// state (e.g. a new thread that reuses the thread pointer of a pending
    /// one, so the dispatch code treats it as pending): it is pending too.
    pub fn add_pending_thread(&mut self, tid: ThreadId) {
        if let Some(t) = self.transition.as_mut() {
            t.pending.insert(tid);
            self.threads.insert(tid, t.target.flipped().thread_state());
        }
    }

    /// A thread that exited is no longer waited for.
    pub fn remove_thread(&mut self, tid: ThreadId) {
        self.threads.remove(&tid);
        if let Some(t) = self.transition.as_mut() {
            t.pending.remove(&tid);
        }
    }

    /// kernel: `klp_force_transition`: every pending thread switches now and
    /// every listed patch is marked forced (its code may still be in use).
    /// Returns the threads that were switched.
    pub fn force(&mut self) -> Result<Vec<ThreadId>, ModelError> {
        let pending = self.pending();
        if self.transition.is_none() {
            return Err(ModelError::NoTransition);
        }
        for tid in &pending {
            self.switch_thread(*tid);
        }
        for p in &mut self.patches {
            p.forced = true;
        }
        Ok(pending)
    }

    /// Finish the transition once no thread is pending (kernel:
    /// `klp_complete_transition`, with the seed's nop removal).
    pub fn complete(&mut self) -> Result<Completion, ModelError> {
        let t = self.transition.as_ref().ok_or(ModelError::NoTransition)?;
        if !t.pending.is_empty() {
            return Err(ModelError::Pending {
                patch: t.patch.clone(),
                pending: t.pending.len(),
            });
        }
        let t = self.transition.take().expect("checked");
        let name = t.patch.clone();
        let replace = self.patch(&name).map(|p| p.replace).unwrap_or(false);
        let mut nops_removed = Vec::new();
        let mut removed = Vec::new();

        if t.target == Target::Patched && replace {
            // Replaced patches leave every stack and are disabled; none of
            // their callbacks run.
            // Only the patches listed before it (kernel:
            // `klp_unpatch_replaced_patches`): patches stacked later stay.
            let others: Vec<String> = self
                .patches
                .iter()
                .take_while(|p| p.name != name)
                .map(|p| p.name.clone())
                .collect();
            for other in &others {
                self.unpatch_all(other);
                self.patch_mut(other).expect("listed").enabled = false;
            }
            // Then this patch's nops are unpatched and discarded at once.
            let patch = self.patches.iter().find(|p| p.name == name).cloned();
            for f in patch.iter().flat_map(|p| p.funcs()).filter(|f| f.nop) {
                self.pop_entry(f.old_addr, &name);
                nops_removed.push(f.old_addr);
            }
            let patch = self.patch_mut(&name).expect("listed");
            for o in &mut patch.objects {
                o.funcs.retain(|f| !f.nop);
            }
            patch.objects.retain(|o| !(o.dynamic && o.funcs.is_empty()));
        }
        if t.target == Target::Unpatched {
            self.unpatch_all(&name);
        }
        if let Some(p) = self.patch_mut(&name) {
            for f in p.funcs_mut() {
                f.transition = false;
            }
        }
        self.threads.clear();

        let kind = match t.target {
            Target::Patched => CallbackKind::PostPatch,
            Target::Unpatched => CallbackKind::PostUnpatch,
        };
        let callbacks = self
            .patch(&name)
            .map(|p| {
                p.objects
                    .iter()
                    .flat_map(|o| {
                        o.callbacks
                            .iter()
                            .filter(|(k, _)| *k == kind)
                            .map(|(k, a)| (name.clone(), o.name.clone(), *k, *a))
                    })
                    .collect()
            })
            .unwrap_or_default();

        if t.target == Target::Unpatched {
            if let Some(i) = self.patches.iter().position(|p| p.name == name) {
                removed.push(self.patches.remove(i));
            }
        } else if replace {
            let i = self
                .patches
                .iter()
                .position(|p| p.name == name)
                .unwrap_or(0);
            removed = self.patches.drain(..i).collect();
        }
        Ok(Completion {
            patch: name,
            target: t.target,
            removed,
            nops_removed,
            callbacks,
        })
    }

    fn patch_mut(&mut self, name: &str) -> Option<&mut Patch> {
        self.patches.iter_mut().find(|p| p.name == name)
    }

    /// Take every entry of `name` off its stack (kernel: `klp_unpatch_objects`).
    fn unpatch_all(&mut self, name: &str) {
        let addrs: Vec<u64> = self
            .patch(name)
            .map(|p| {
                p.funcs()
                    .filter(|f| f.patched)
                    .map(|f| f.old_addr)
                    .collect()
            })
            .unwrap_or_default();
        for a in addrs {
            self.pop_entry(a, name);
        }
        if let Some(p) = self.patch_mut(name) {
            for o in &mut p.objects {
                o.patched = false;
            }
        }
    }

    /// Remove `name`'s entry from the stack of `old_addr` (wherever it is).
    fn pop_entry(&mut self, old_addr: u64, name: &str) {
        if let Some(stack) = self.stacks.get_mut(&old_addr) {
            if let Some(i) = stack.iter().rposition(|n| n == name) {
                stack.remove(i);
            }
            if stack.is_empty() {
                self.stacks.remove(&old_addr);
            }
        }
        if let Some(f) = self
            .patch_mut(name)
            .and_then(|p| p.funcs_mut().find(|f| f.old_addr == old_addr))
        {
            f.patched = false;
        }
    }

    /// Internal consistency of the model; used by tests and by the engine
    /// after loading a state record.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut names = BTreeSet::new();
        for p in &self.patches {
            if !names.insert(&p.name) {
                return Err(format!("patch '{}' is listed twice", p.name));
            }
        }
        for (addr, stack) in &self.stacks {
            if stack.is_empty() {
                return Err(format!("empty stack kept for {addr:#x}"));
            }
            for n in stack {
                let p = self
                    .patch(n)
                    .ok_or_else(|| format!("stack {addr:#x} names unlisted patch '{n}'"))?;
                let f = p
                    .func(*addr)
                    .ok_or_else(|| format!("patch '{n}' has no entry for {addr:#x}"))?;
                if !f.patched {
                    return Err(format!("entry '{n}'/{addr:#x} on a stack but not patched"));
                }
            }
            let set: BTreeSet<_> = stack.iter().collect();
            if set.len() != stack.len() {
                return Err(format!("patch on the stack of {addr:#x} twice"));
            }
        }
        for p in &self.patches {
            for f in p.funcs() {
                let on = self
                    .stacks
                    .get(&f.old_addr)
                    .is_some_and(|s| s.contains(&p.name));
                if on != f.patched {
                    return Err(format!(
                        "entry '{}'/{} patched={} but on stack={}",
                        p.name, f.old_name, f.patched, on
                    ));
                }
                let in_transition = self.transition.as_ref().is_some_and(|t| t.patch == p.name);
                if f.transition && !in_transition {
                    return Err(format!(
                        "entry '{}'/{} in transition outside its transition",
                        p.name, f.old_name
                    ));
                }
                if f.nop && !in_transition {
                    return Err(format!(
                        "nop '{}'/{} outlived its transition",
                        p.name, f.old_name
                    ));
                }
            }
        }
        match &self.transition {
            None => {
                if !self.threads.is_empty() {
                    return Err("thread states kept outside a transition".into());
                }
            }
            Some(t) => {
                let p = self
                    .patch(&t.patch)
                    .ok_or_else(|| format!("transition names unlisted patch '{}'", t.patch))?;
                if p.funcs().any(|f| !f.transition) {
                    return Err("transition patch has an entry not in transition".into());
                }
                for tid in &t.pending {
                    if self.threads.get(tid) == Some(&t.target.thread_state()) {
                        return Err(format!("thread {tid} pending but already in the target"));
                    }
                }
                for (tid, s) in &self.threads {
                    if *s != t.target.thread_state() && !t.pending.contains(tid) {
                        return Err(format!("thread {tid} not in the target and not pending"));
                    }
                }
            }
        }
        Ok(())
    }
}
