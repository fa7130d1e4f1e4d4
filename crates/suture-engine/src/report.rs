//! What operations report: plain data, serialised as the CLI's JSON and
//! formatted by it as text.

use serde::Serialize;
use suture_model::{Code, Model, SiteMode};

use crate::record::Record;

#[derive(Debug, Serialize)]
pub struct FuncStatus {
    pub name: String,
    /// Shown as the kernel does: 0 as 1.
    pub sympos: u64,
    pub nop: bool,
    pub patched: bool,
    pub transition: bool,
    pub old_addr: String,
    pub new_addr: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ObjectStatus {
    pub name: Option<String>,
    pub path: String,
    pub build_id: Option<String>,
    pub patched: bool,
    pub funcs: Vec<FuncStatus>,
}

#[derive(Debug, Serialize)]
pub struct PatchStatus {
    pub name: String,
    pub enabled: bool,
    pub transition: bool,
    pub replace: bool,
    pub forced: bool,
    pub stack_order: usize,
    pub objects: Vec<ObjectStatus>,
    pub states: Vec<StateStatus>,
}

#[derive(Debug, Serialize)]
pub struct StateStatus {
    pub id: u64,
    pub version: u32,
}

#[derive(Debug, Serialize)]
pub struct TransitionStatus {
    pub patch: String,
    /// "patched" (enabling) or "unpatched" (disabling).
    pub target: String,
    /// The transition was reversed (its patch was disabled during it).
    pub reversed: bool,
    /// Threads the transition tracks, and how many reached the target.
    pub threads: usize,
    pub switched: usize,
    pub pending: Vec<PendingThread>,
    /// Each tracked thread's patch state ("patched" / "unpatched").
    pub thread_states: Vec<ThreadStatus>,
    /// Live threads the transition has not looked at yet (created since
    /// its last pass, or the threads of a child forked during it).
    pub unexamined: Vec<i32>,
    /// The worker retrying the transition, if one is running.
    pub worker: Option<i32>,
    /// Seconds since the epoch when it started.
    pub started: u64,
}

#[derive(Debug, Serialize)]
pub struct ThreadStatus {
    pub tid: i32,
    pub state: String,
}

#[derive(Debug, Serialize)]
pub struct PendingThread {
    pub tid: i32,
    pub name: String,
    /// Why it waits: the replaced function it is in, or why its stack
    /// could not be read reliably (empty if not checked yet).
    pub reason: String,
    /// Its stack as of its last check, innermost first.
    pub frames: Vec<FrameStatus>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FrameStatus {
    pub address: String,
    /// Function (or suture code) the address lies in, if known.
    pub function: Option<String>,
    pub offset: Option<u64>,
    /// Object file or patch it belongs to.
    pub object: Option<String>,
    pub file: Option<String>,
    pub line: Option<u32>,
}

/// One patched function as the site sees it.
#[derive(Debug, Serialize)]
pub struct SiteStatus {
    pub function: String,
    pub address: String,
    /// "jump" to new code, "original", or "dispatch" during a transition.
    pub mode: String,
    pub target: Option<String>,
    /// The direct calls to the function in its object, and what each calls
    /// now (the new code once a transition completed, else the entry).
    pub callers: Vec<CallerStatus>,
}

#[derive(Debug, Serialize)]
pub struct CallerStatus {
    pub address: String,
    pub calls: String,
}

#[derive(Debug, Serialize)]
pub struct StatusReport {
    pub pid: i32,
    pub patches: Vec<PatchStatus>,
    pub transition: Option<TransitionStatus>,
    pub sites: Vec<SiteStatus>,
}

fn hex(a: u64) -> String {
    format!("{a:#x}")
}

fn code(c: Code) -> Option<String> {
    match c {
        Code::Original => None,
        Code::New(a) => Some(hex(a)),
    }
}

impl StatusReport {
    pub fn from_record(pid: i32, rec: &Record) -> Self {
        let m: &Model = &rec.model;
        let transition = m.transition();
        let patches = m
            .patches()
            .iter()
            .enumerate()
            .map(|(i, p)| PatchStatus {
                name: p.name.clone(),
                enabled: p.enabled,
                transition: transition.is_some_and(|t| t.patch == p.name),
                replace: p.replace,
                forced: p.forced,
                stack_order: i + 1,
                objects: p
                    .objects
                    .iter()
                    .map(|o| ObjectStatus {
                        name: o.name.clone(),
                        path: o.path.clone(),
                        build_id: o.build_id.clone(),
                        patched: o.patched,
                        funcs: o
                            .funcs
                            .iter()
                            .map(|f| FuncStatus {
                                name: f.old_name.clone(),
                                sympos: f.old_sympos.max(1),
                                nop: f.nop,
                                patched: f.patched,
                                transition: f.transition,
                                old_addr: hex(f.old_addr),
                                new_addr: code(f.code()),
                            })
                            .collect(),
                    })
                    .collect(),
                states: p
                    .states
                    .iter()
                    .map(|s| StateStatus {
                        id: s.id,
                        version: s.version,
                    })
                    .collect(),
            })
            .collect();
        let sites = rec
            .sites
            .values()
            .map(|s| {
                let (mode, target) = match m.site_mode(s.func_addr) {
                    SiteMode::Original => ("original", None),
                    SiteMode::Jump(c) => ("jump", code(c)),
                    SiteMode::Dispatch { patched, .. } => ("dispatch", code(patched)),
                };
                SiteStatus {
                    function: s.name.clone(),
                    address: hex(s.func_addr),
                    mode: mode.into(),
                    target,
                    callers: s
                        .callers
                        .iter()
                        .map(|c| CallerStatus {
                            address: hex(c.addr),
                            calls: hex(c.to),
                        })
                        .collect(),
                }
            })
            .collect();
        StatusReport {
            pid,
            patches,
            transition: transition.map(|t| {
                let tr = rec.transition.as_ref();
                let pending: Vec<PendingThread> = t
                    .pending
                    .iter()
                    .map(|tid| {
                        let b = tr.and_then(|x| x.blockers.get(tid));
                        PendingThread {
                            tid: *tid,
                            name: String::new(),
                            reason: b.map(|b| b.reason.clone()).unwrap_or_default(),
                            frames: b
                                .map(|b| {
                                    b.frames
                                        .iter()
                                        .map(|pc| FrameStatus {
                                            address: hex(*pc),
                                            function: None,
                                            offset: None,
                                            object: None,
                                            file: None,
                                            line: None,
                                        })
                                        .collect()
                                })
                                .unwrap_or_default(),
                        }
                    })
                    .collect();
                let thread_states: Vec<ThreadStatus> = m
                    .threads()
                    .map(|(tid, st)| ThreadStatus {
                        tid,
                        state: format!("{st:?}").to_lowercase(),
                    })
                    .collect();
                TransitionStatus {
                    patch: t.patch.clone(),
                    target: format!("{:?}", t.target).to_lowercase(),
                    reversed: t.reversed,
                    threads: thread_states.len(),
                    switched: thread_states.len().saturating_sub(pending.len()),
                    pending,
                    thread_states,
                    unexamined: vec![],
                    worker: tr.and_then(|x| x.worker.as_ref()).map(|w| w.pid),
                    started: tr.map(|x| x.started).unwrap_or(0),
                }
            }),
            sites,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct FuncChange {
    pub object: Option<String>,
    pub name: String,
    pub sympos: u64,
    pub old_addr: String,
    pub new_addr: String,
    pub site: String,
}

#[derive(Debug, Serialize)]
pub struct ApplyReport {
    pub pid: i32,
    pub patch: String,
    pub replace: bool,
    pub image: String,
    pub image_size: u64,
    pub funcs: Vec<FuncChange>,
    /// Patches the new one replaced (atomic replace), once complete.
    pub replaced: Vec<String>,
    /// Threads still pending after the command's own pass (0: the
    /// transition is complete).
    pub pending: usize,
    /// What the patch's callbacks did (those run by this command).
    pub callbacks: Vec<String>,
    /// How long this command kept the target's threads from running.
    pub held: Held,
}

#[derive(Debug, Serialize)]
pub struct DisableReport {
    pub pid: i32,
    pub patch: String,
    /// The patch was in transition: its transition is being reversed.
    pub reversed: bool,
    /// Where the transition goes: "unpatched", or "patched" when a
    /// disable in progress was reversed.
    pub target: String,
    /// Threads still pending (0: the transition is complete).
    pub pending: usize,
    /// What the patch's callbacks did (those run by this command).
    pub callbacks: Vec<String>,
    /// Functions whose original bytes are back.
    pub restored: Vec<String>,
    /// Memory released now, and memory kept because a thread may still use it.
    pub freed_bytes: u64,
    pub deferred_bytes: u64,
    /// How long this command kept the target's threads from running.
    pub held: Held,
}

/// How long a command kept the target's threads from running (its own
/// stops only: a transition's worker reports in its log).
#[derive(Debug, Default, Serialize, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    /// Whole-process stops (a transition's start and end), the most threads
    /// one held, the longest any thread waited in one (µs), and the longest
    /// time all threads were stopped at once (µs).
    pub whole_stops: u32,
    pub whole_threads: usize,
    pub whole_held_us: u64,
    pub whole_all_us: u64,
    /// Stops of a single thread while the others ran (its own check, or
    /// borrowed to run system calls), and the longest (µs).
    pub thread_stops: u64,
    pub thread_held_us: u64,
    /// Of those, the stops to look at a thread (its stack check, its
    /// thread pointer, its program counter), and the longest (µs).
    pub check_stops: u64,
    pub check_held_us: u64,
    /// Of those, the stops of the thread borrowed to run system calls, and
    /// the longest (µs).
    pub borrow_stops: u64,
    pub borrow_held_us: u64,
}

impl Held {
    /// What this thread's stops cost since the last call.
    pub(crate) fn take() -> Held {
        let h = suture_process::take_hold_stats();
        Held {
            whole_stops: h.whole_stops,
            whole_threads: h.whole_threads,
            whole_held_us: h.whole_held.as_micros() as u64,
            whole_all_us: h.whole_all.as_micros() as u64,
            thread_stops: h.check_stops + h.borrow_stops,
            thread_held_us: h.check_held.max(h.borrow_held).as_micros() as u64,
            check_stops: h.check_stops,
            check_held_us: h.check_held.as_micros() as u64,
            borrow_stops: h.borrow_stops,
            borrow_held_us: h.borrow_held.as_micros() as u64,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct ForceReport {
    pub pid: i32,
    /// The patch whose transition was forced, and its target.
    pub patch: String,
    pub target: String,
    /// Threads switched without a check.
    pub switched: Vec<i32>,
    /// Patches now marked forced (their code is never freed).
    pub forced: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct CheckItem {
    pub check: String,
    pub detail: String,
}

#[derive(Debug, Serialize)]
pub struct CheckReport {
    pub pid: i32,
    pub patch: String,
    pub checks: Vec<CheckItem>,
}

#[derive(Debug, Serialize)]
pub struct ProcessEntry {
    pub pid: i32,
    pub command: String,
    pub patches: Vec<String>,
    pub error: Option<String>,
}
