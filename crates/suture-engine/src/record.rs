//! The record of everything suture did to a process: the model plus the
//! memory and code it placed there. It lives inside the target (see
//! [`crate::store`]), so any later `suture` invocation can continue, and it
//! disappears with the process.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use suture_model::Model;

/// Version of the record layout; a record of another version is refused.
pub const RECORD_VERSION: u32 = 2;

/// A range of target memory suture mapped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Region {
    pub addr: u64,
    pub len: u64,
}

impl Region {
    pub fn end(&self) -> u64 {
        self.addr + self.len
    }

    pub fn contains(&self, a: u64) -> bool {
        a >= self.addr && a < self.end()
    }
}

/// One patch site: the entry of an original function that suture redirects.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Site {
    /// Address of the function (the func stack's key).
    pub func_addr: u64,
    pub func_size: u64,
    pub name: String,
    /// Where the jump is written (after `endbr64` if the function has one).
    pub site_addr: u64,
    /// The bytes the jump overwrites, as found (equal to the file's).
    pub original: Vec<u8>,
    /// The arena slot of this site. It starts with the trampoline, the
    /// relocated copy of the overwritten instructions (runs the original);
    /// the absolute-jump stub is at `SLOT_STUB` in it.
    pub slot: u64,
    /// The bytes currently written at `site_addr`.
    pub current: Vec<u8>,
    /// Each overwritten instruction's address -> the same instruction in
    /// the trampoline (where a thread stopped between them is moved when
    /// the jump is written).
    #[serde(default)]
    pub resume_map: Vec<(u64, u64)>,
    /// Direct calls to the function in its own object (see `callers.rs`):
    /// rewritten to call the new code while the site is a plain jump to it.
    #[serde(default)]
    pub callers: Vec<Caller>,
}

/// One `call rel32` to a site's function.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Caller {
    /// Address of the `call` instruction.
    pub addr: u64,
    /// What it calls now: the function's entry, or the new code.
    pub to: u64,
}

impl Site {
    pub fn overwritten_len(&self) -> usize {
        self.original.len()
    }

    /// Whether a thread's pc inside the overwritten bytes (not at their
    /// start) would be torn by a write.
    pub fn pc_inside(&self, pc: u64) -> bool {
        pc > self.site_addr && pc < self.site_addr + self.original.len() as u64
    }
}

/// A mapping near one object, cut into fixed-size slots for site code
/// (trampolines and absolute-jump stubs), so every site can reach it with a
/// rel32 jump.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Arena {
    pub region: Region,
    pub slot_size: u64,
    /// Slot index -> state.
    pub used: BTreeMap<u64, SlotUse>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SlotUse {
    /// Holds the code of a live site.
    Site,
    /// Its site is gone, but a thread may still run or return into it.
    Retired,
}

impl Arena {
    pub fn slots(&self) -> u64 {
        self.region.len / self.slot_size
    }

    pub fn slot_addr(&self, i: u64) -> u64 {
        self.region.addr + i * self.slot_size
    }

    pub fn free_slot(&self) -> Option<u64> {
        (0..self.slots()).find(|i| !self.used.contains_key(i))
    }
}

/// Memory of one loaded patch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatchMemory {
    pub image: Region,
    /// Executable part (for "is a thread still in it" checks).
    pub text: Region,
    /// The patch file it was loaded from.
    pub file: String,
    /// Each new function's code, `[start, end)`: what a thread must have
    /// left before a transition that replaces it can switch the thread.
    #[serde(default)]
    pub funcs: Vec<(u64, u64)>,
    /// The image's `.eh_frame` (address, length), for the unwinder.
    #[serde(default)]
    pub eh_frame: Option<(u64, u64)>,
    /// The patch calls suture's runtime (shadow variables).
    #[serde(default)]
    pub uses_runtime: bool,
}

/// The engine's side of a transition in progress (the model holds the
/// patch, the target and each thread's state).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransitionRecord {
    /// The pending table the dispatch stubs read (see `suture_x86::dispatch`).
    pub table: Region,
    pub bits: u32,
    /// Thread pointer (`fs_base`) of every thread the model tracks.
    pub tps: BTreeMap<i32, u64>,
    /// Dispatch stub per site in transition: function address -> stub.
    pub stubs: BTreeMap<u64, StubRecord>,
    /// The worker process retrying the transition, if one was started.
    pub worker: Option<WorkerRecord>,
    /// Why each pending thread waits, as of its last check.
    pub blockers: BTreeMap<i32, Blocker>,
    /// Seconds since the epoch when the transition started.
    pub started: u64,
    /// The dispatch stubs' quarantine is still on (a live start not
    /// finished: `transition::lift_quarantine`).
    #[serde(default)]
    pub quarantine: bool,
}

/// A dispatch stub written for a site: enough to regenerate it exactly.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StubRecord {
    pub addr: u64,
    pub target: u64,
    pub initial: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerRecord {
    pub pid: i32,
    /// Its start time (/proc/PID/stat), so a reused pid is not mistaken.
    pub start_time: u64,
    /// The target it works on: a child forked by the target inherits this
    /// record but not the worker.
    pub target: i32,
}

/// Why a thread is still pending.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Blocker {
    /// One sentence: the replaced function it is in, or why its stack
    /// could not be read reliably.
    pub reason: String,
    /// Its frames' program counters, innermost first.
    pub frames: Vec<u64>,
}

/// The whole record.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub version: u32,
    pub model: Model,
    /// Sites by function address.
    pub sites: BTreeMap<u64, Site>,
    /// Memory of listed patches by name.
    pub patches: BTreeMap<String, PatchMemory>,
    pub arenas: Vec<Arena>,
    /// Patch memory no longer used by any patch, kept until no thread can be
    /// inside it.
    pub retired: Vec<PatchMemory>,
    /// Memory of patches involved in a forced transition: never freed.
    pub kept_forced: Vec<PatchMemory>,
    /// Other memory (pending tables of finished transitions) kept until no
    /// thread can still be using it.
    #[serde(default)]
    pub retired_regions: Vec<Region>,
    /// A pending table of a finished transition that no thread can be
    /// using any more (the garbage collection proved it), kept for the
    /// next transition: one mapping fewer for the thread a command borrows.
    #[serde(default)]
    pub spare_table: Option<Region>,
    /// The transition in progress, if any.
    #[serde(default)]
    pub transition: Option<TransitionRecord>,
    /// suture's runtime, while a listed patch uses it.
    #[serde(default)]
    pub runtime: Option<crate::runtime::Loaded>,
    /// The `SIGTRAP` handler of live code writes (see `live.rs`), once
    /// mapped; it stays for the life of the process.
    #[serde(default)]
    pub trap: Option<TrapRecord>,
    /// The thread pointer of each thread suture stopped at a transition's
    /// start, with the thread's start time (a thread id can be reused): a
    /// thread's pointer never changes, so a later start need not stop it
    /// again to fill the pending table (see `LiveBegin::start`).
    #[serde(default)]
    pub thread_pointers: BTreeMap<i32, KnownThread>,
}

/// A thread's pointer, as read when it was stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KnownThread {
    /// In clock ticks since boot, from `/proc/PID/task/TID/stat`.
    pub start_time: u64,
    pub tp: u64,
}

/// The mapping that holds the handler of live code writes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrapRecord {
    /// The whole mapping: a read-write scratch page, then the handler and
    /// its table (read-execute).
    pub region: Region,
    /// The handler's address (`suture_x86::trap::trap_handler` built there).
    pub handler: u64,
    /// Entries its table holds.
    pub capacity: u64,
    /// The process registered for `MEMBARRIER_CMD_GLOBAL_EXPEDITED`, which
    /// suture then issues itself to serialize its cores (see `live.rs`).
    #[serde(default)]
    pub barrier: bool,
    /// This command found the handler installed for `SIGTRAP` to be ours
    /// (never stored: the program may install its own between commands).
    #[serde(skip)]
    pub verified: bool,
}

impl Record {
    pub fn new() -> Self {
        Record {
            version: RECORD_VERSION,
            ..Default::default()
        }
    }

    /// The arena and slot index owning `slot_addr`.
    pub fn slot_owner(&self, slot_addr: u64) -> Option<(usize, u64)> {
        self.arenas.iter().enumerate().find_map(|(i, a)| {
            a.region
                .contains(slot_addr)
                .then(|| (i, (slot_addr - a.region.addr) / a.slot_size))
        })
    }
}
