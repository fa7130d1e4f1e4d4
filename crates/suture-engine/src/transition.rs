//! Transitions thread by thread (kernel: `transition.c`).
//!
//! While a patch is in transition, each of its sites jumps to a dispatch
//! stub (`suture_x86::dispatch`) that looks the calling thread's pointer up
//! in the *pending table*: pending threads run the code of the start state,
//! every other thread the target's. The table is filled with every thread
//! in the same whole-process stop that makes the sites jump to the stubs,
//! so no thread ever sees an entry in transition without its own state
//! (the model's order: thread states first, then the entries).
//!
//! A thread switches when one look at its stack (stopped alone, unwound by
//! [`Checker`]) shows no frame in replaced code: its table entry is turned
//! into a tombstone (a one-byte write) and the model is told. The table is
//! the truth for what each thread executes; the record follows it, so a
//! command killed between the two is repaired by [`Driver::reconcile`].
//!
//! Pending threads pass through a trap (a `getpid` system call in the stub)
//! each time they call a function in transition; the worker, tracing them
//! with `PTRACE_SYSCALL`, checks them right there, so a thread that left
//! the old code is switched at its next call instead of re-entering it.

use crate::check::{regenerate_stub, Checker, Verdict};
use crate::memory::{self, SLOT_DISPATCH};
use crate::objects::Objects;
use crate::record::{KnownThread, Record, Region, Site, StubRecord, TransitionRecord};
use crate::write::{write_code_with_hook, CodeWrite};
use crate::Error;
use std::collections::{BTreeMap, BTreeSet};
use std::ops::ControlFlow;
use std::time::Duration;
use suture_model::{Code, Model, SiteMode, Target};
use suture_process::{Hijack, Process, Resume, Tid, Tracer};
use suture_x86::dispatch::{table_insert, DISPATCH_MAX_LEN, TOMBSTONE_BIT};

/// How long to wait for one thread to stop for its check.
const THREAD_STOP: Duration = Duration::from_millis(500);

/// Test-only: `SUTURE_TEST_IMMEDIATE=1` switches every thread at once
/// without looking at stacks (the behaviour the consistency tests must be
/// able to catch).
pub fn immediate() -> bool {
    std::env::var_os("SUTURE_TEST_IMMEDIATE").is_some_and(|v| v == "1")
}

/// Table size (log2) for about `threads` threads: at most half full even if
/// the process doubles its threads meanwhile.
pub fn table_bits(threads: usize) -> u32 {
    let want = (threads.max(1) * 4).next_power_of_two();
    want.trailing_zeros().clamp(8, 16)
}

/// A pending table for a transition, from [`new_table`].
pub struct NewTable {
    pub region: Region,
    pub bits: u32,
    /// It is the record's spare table: if the transition is not started
    /// after all, it goes back there (`Record::spare_table`), not unmapped
    /// (a record stored earlier may still name it as the spare).
    pub reused: bool,
}

/// A pending table for about `threads` threads: the record's spare one if
/// it is large enough (the start writes all of it that the dispatch stubs
/// read), else a new mapping (a spare too small is retired, for the
/// garbage collection to unmap).
pub fn new_table(h: &mut Hijack<'_>, rec: &mut Record, threads: usize) -> Result<NewTable, Error> {
    let bits = table_bits(threads);
    if let Some(region) = rec.spare_table.take() {
        if 8u64 << bits <= region.len {
            return Ok(NewTable {
                region,
                bits,
                reused: true,
            });
        }
        rec.retired_regions.push(region);
    }
    let len = memory::page_up(8u64 << bits);
    let addr =
        memory::create_named_mapping(h, memory::TABLE_NAME, len, None, memory::PROT_RW, false)?;
    Ok(NewTable {
        region: Region { addr, len },
        bits,
        reused: false,
    })
}

/// The code a dispatch stub sends the target state's threads to, and the
/// code pending threads still run: `(target, initial)` addresses.
fn stub_targets(mode: SiteMode, target: Target, slot: u64) -> Option<(u64, u64)> {
    let addr = |c: Code| match c {
        Code::Original => slot,
        Code::New(a) => a,
    };
    match mode {
        SiteMode::Dispatch { patched, unpatched } => Some(match target {
            Target::Patched => (addr(patched), addr(unpatched)),
            Target::Unpatched => (addr(unpatched), addr(patched)),
        }),
        _ => None,
    }
}

/// A local copy of the pending table.
#[derive(Clone, Debug)]
pub struct Mirror {
    pub slots: Vec<u64>,
    pub bits: u32,
}

impl Mirror {
    pub fn empty(bits: u32) -> Mirror {
        Mirror {
            slots: vec![0; 1 << bits],
            bits,
        }
    }

    pub fn read(proc: &Process, t: &TransitionRecord) -> Result<Mirror, Error> {
        let bytes = proc.read_mem(t.table.addr, 8 << t.bits)?;
        Ok(Mirror {
            slots: bytes
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            bits: t.bits,
        })
    }

    pub fn index_of(&self, tp: u64) -> Option<usize> {
        let mask = self.slots.len() - 1;
        let mut i = suture_x86::dispatch::table_index(tp, self.bits);
        for _ in 0..self.slots.len() {
            match self.slots[i] {
                0 => return None,
                v if v == tp => return Some(i),
                _ => i = (i + 1) & mask,
            }
        }
        None
    }

    pub fn contains(&self, tp: u64) -> bool {
        self.index_of(tp).is_some()
    }

    fn bytes(&self) -> Vec<u8> {
        self.slots.iter().flat_map(|v| v.to_le_bytes()).collect()
    }
}

/// One thread as a whole-process stop saw it.
#[derive(Clone, Copy, Debug)]
pub struct Seen {
    pub tid: i32,
    pub tp: u64,
    pub pending: bool,
    /// The thread's start time, when known (see `Record::thread_pointers`).
    pub start_time: Option<u64>,
}

/// Make the model agree with what the table says each thread runs.
fn sync_model(model: &mut Model, seen: &[Seen]) {
    let live: BTreeSet<i32> = seen.iter().map(|s| s.tid).collect();
    let known: Vec<i32> = model.threads().map(|(t, _)| t).collect();
    for t in known {
        if !live.contains(&t) {
            model.remove_thread(t);
        }
    }
    let pending: BTreeSet<i32> = model.pending().into_iter().collect();
    for s in seen {
        match (s.pending, pending.contains(&s.tid)) {
            (true, false) => model.add_pending_thread(s.tid),
            (false, true) => {
                model.switch_thread(s.tid);
            }
            (false, false) => model.add_thread(s.tid),
            (true, true) => {}
        }
    }
}

/// Gives, from the recorded sites, the jumps for the new site modes and
/// the sites as they will be once written.
pub type SiteWrites<'a> =
    dyn Fn(&BTreeMap<u64, Site>) -> Result<(Vec<CodeWrite>, BTreeMap<u64, Site>), Error> + 'a;

/// Begin (or reverse) the model's transition in the process: in one stop,
/// write the pending table (a thread is pending when `pending(tp)` says so,
/// given its thread pointer), the dispatch stubs and the site jumps, then
/// make the model agree with the table. `site_writes` gives the jumps for
/// the site modes of `model`. On return `rec.transition` describes it.
///
/// `save` is given the record and model as they are once the writes are
/// done, while every thread is still held and just before the writes: the
/// caller stores them in the target first, so that a suture killed during
/// or after the writes leaves a record that knows them (the next command
/// then finishes or reverses the transition).
///
/// With `live` (see `live.rs`; only for a start, where every thread is
/// pending) no thread is stopped for the write: the
/// jumps are written `int3` first while every thread runs, each thread is
/// looked at once on its own to fill the table, and the stubs' quarantine
/// keeps threads not in the table yet on their old code meanwhile.
#[allow(clippy::too_many_arguments)]
pub fn begin(
    proc: &Process,
    rec: &mut Record,
    model: &mut Model,
    table: (Region, u32),
    site_writes: &SiteWrites<'_>,
    pending: &dyn Fn(u64) -> bool,
    started: u64,
    save: &mut dyn FnMut(&Record, &Model) -> Result<(), Error>,
    live: Option<&suture_x86::trap::TrapLayout>,
) -> Result<(), Error> {
    let target = model
        .transition()
        .ok_or(suture_model::ModelError::NoTransition)?
        .target;
    let (region, bits) = table;
    let mut stubs = BTreeMap::new();
    let mut stub_writes = Vec::new();
    let mut quarantines = Vec::new();
    for (addr, mode) in model.site_modes() {
        let Some(site) = rec.sites.get(&addr) else {
            return Err(Error::CorruptState(format!(
                "no site recorded for {addr:#x}"
            )));
        };
        let Some((t, i)) = stub_targets(mode, target, site.slot) else {
            continue;
        };
        let s = StubRecord {
            addr: site.slot + SLOT_DISPATCH,
            target: t,
            initial: i,
        };
        let stub = regenerate_stub(region.addr, bits, &s)?;
        // The trap starts off: it is worth its system call only once the
        // worker traces the pending threads (`Driver::enable_traps`).
        let mut bytes = stub.bytes;
        bytes[(stub.trap_switch - s.addr) as usize] = 0;
        quarantines.push(stub.quarantine);
        stub_writes.push(CodeWrite {
            addr: s.addr,
            old: proc.read_mem(s.addr, bytes.len())?,
            bytes,
            guard_len: DISPATCH_MAX_LEN as u64,
            redirect: Vec::new(),
            trap: None,
        });
        stubs.insert(addr, s);
    }
    let (jumps, sites) = site_writes(&rec.sites)?;
    let after = |rec: &Record, model: &Model, seen: &[Seen]| {
        after_begin(rec, model, seen, &sites, &region, bits, &stubs, started)
    };
    if let Some(l) = live.filter(|_| crate::live::suits(&jumps)) {
        if crate::live::set_table(proc, l, &jumps)? {
            let live_begin = LiveBegin {
                region: &region,
                bits,
                pending,
                known: &rec.thread_pointers,
                stub_writes: &stub_writes,
                quarantines: &quarantines,
                jumps: &jumps,
            };
            // `None`: a thread inside the bytes to change did not stop in
            // time; the whole-process stop below waits for it.
            if let Some(mut tabled) = live_begin.start(proc)? {
                let (mut r, m) = after(rec, model, &tabled.seen);
                // Until `finish` lifts it (a later command does if we die).
                if let Some(t) = r.transition.as_mut() {
                    t.quarantine = true;
                }
                let written = save(&r, &m)
                    .and_then(|()| crate::live::complete(proc, &jumps, true))
                    .and_then(|()| live_begin.finish(proc, &mut tabled));
                if let Err(e) = written {
                    // Back to the code as it was, which the caller's error
                    // path records again.
                    crate::live::undo(proc, &jumps);
                    return Err(e);
                }
                let (r, m) = after(rec, model, &tabled.seen);
                *rec = r;
                *model = m;
                return Ok(());
            }
        }
    }
    let old_table = proc.read_mem(region.addr, 8 << bits)?;
    let seen_cell: std::cell::RefCell<Vec<Seen>> = Default::default();
    let mut make = |stopped: &suture_process::StoppedProcess<'_>| {
        let mut tabled = Tabled {
            mirror: Mirror::empty(bits),
            seen: Vec::new(),
        };
        for tid in stopped.threads() {
            let Some(regs) = stopped.regs(tid) else {
                continue;
            };
            tabled.add(proc, bits, tid, regs.fs_base, pending(regs.fs_base), None)?;
        }
        *seen_cell.borrow_mut() = tabled.seen;
        let mut writes = vec![CodeWrite {
            addr: region.addr,
            bytes: tabled.mirror.bytes(),
            old: old_table.clone(),
            guard_len: 0,
            redirect: Vec::new(),
            trap: None,
        }];
        writes.extend(stub_writes.iter().cloned());
        writes.extend(jumps.iter().cloned());
        Ok(Some(writes))
    };
    {
        let (rec_now, model_now) = (&*rec, &*model);
        let mut before_write = || {
            let (r, m) = after(rec_now, model_now, &seen_cell.borrow());
            save(&r, &m)
        };
        write_code_with_hook(proc, &mut make, &mut before_write)?;
    }
    let (r, m) = after(rec, model, &seen_cell.borrow());
    *rec = r;
    *model = m;
    Ok(())
}

/// The record and model once a transition's start is written: the model
/// agrees with what the table says of each thread `seen`.
#[allow(clippy::too_many_arguments)]
fn after_begin(
    rec: &Record,
    model: &Model,
    seen: &[Seen],
    sites: &BTreeMap<u64, Site>,
    region: &Region,
    bits: u32,
    stubs: &BTreeMap<u64, StubRecord>,
    started: u64,
) -> (Record, Model) {
    let mut m = model.clone();
    sync_model(&mut m, seen);
    let mut r = rec.clone();
    r.sites = sites.clone();
    // Every thread alive is in `seen`: the others are forgotten.
    r.thread_pointers = seen
        .iter()
        .filter_map(|s| {
            Some((
                s.tid,
                KnownThread {
                    start_time: s.start_time?,
                    tp: s.tp,
                },
            ))
        })
        .collect();
    r.transition = Some(TransitionRecord {
        table: region.clone(),
        bits,
        tps: seen.iter().map(|s| (s.tid, s.tp)).collect(),
        stubs: stubs.clone(),
        worker: None,
        blockers: BTreeMap::new(),
        started,
        quarantine: false,
    });
    (r, m)
}

/// A transition's start written while the process runs (`live.rs`).
struct LiveBegin<'a> {
    region: &'a Region,
    bits: u32,
    /// Whether a thread (by its pointer) starts pending, as in the
    /// whole-process stop's table.
    pending: &'a dyn Fn(u64) -> bool,
    /// Thread pointers read at earlier starts (`Record::thread_pointers`).
    known: &'a BTreeMap<i32, KnownThread>,
    stub_writes: &'a [CodeWrite],
    quarantines: &'a [u64],
    jumps: &'a [CodeWrite],
}

/// The threads put in the pending table so far, and the table.
struct Tabled {
    mirror: Mirror,
    seen: Vec<Seen>,
}

impl Tabled {
    /// A thread into the table if it is `pending` (at a start every thread
    /// that existed before is), and into the threads seen.
    fn add(
        &mut self,
        proc: &Process,
        bits: u32,
        tid: Tid,
        tp: u64,
        pending: bool,
        start_time: Option<u64>,
    ) -> Result<(), Error> {
        check_thread_pointer(proc, tid, tp)?;
        if pending && !table_insert(&mut self.mirror.slots, bits, tp) {
            return Err(Error::Other(format!(
                "the process has more threads than suture's table holds ({})",
                1u64 << (bits - 1)
            )));
        }
        self.seen.push(Seen {
            tid,
            tp,
            pending,
            start_time,
        });
        Ok(())
    }
}

/// Lifts the quarantine of a live transition start (see `live.rs`): the
/// threads not in `tabled` yet (created since it was filled) are added to
/// the table, in a [`crate::live::Window`] that sees each thread created
/// meanwhile before its first instruction; then the quarantine bytes are
/// cleared (a thread not in the table from then on is new, and starts in
/// the target state). On error the quarantine stays: such threads keep
/// the old code.
fn lift_quarantine_with(
    proc: &Process,
    region: &Region,
    bits: u32,
    quarantines: &[u64],
    tabled: &mut Tabled,
) -> Result<(), Error> {
    crate::live::Window::run(proc, |tracer| {
        let tabled = std::cell::RefCell::new(tabled);
        let add = |tr: &mut Tracer<'_>, tid: Tid, regs: &libc::user_regs_struct| {
            let start_time = tr.start_time(tid);
            tabled
                .borrow_mut()
                .add(proc, bits, tid, regs.fs_base, true, start_time)
        };
        let known: BTreeSet<Tid> = tabled.borrow().seen.iter().map(|s| s.tid).collect();
        let fresh: Vec<Tid> = tracer
            .traced()
            .into_iter()
            .filter(|t| !known.contains(t))
            .collect();
        let mut born =
            |tr: &mut Tracer<'_>, tid: Tid, regs: &libc::user_regs_struct| add(tr, tid, regs);
        crate::live::look_at_each(
            tracer,
            &fresh,
            crate::live::LetGo::Resume,
            1,
            None,
            &mut |tr, tid, regs| add(tr, tid, regs),
            &mut born,
        )?;
        // The table, with the threads born meanwhile (until none is).
        loop {
            let n = tabled.borrow().seen.len();
            proc.write_mem(region.addr, &tabled.borrow().mirror.bytes())?;
            crate::live::drain(tracer, &mut born)?;
            if tabled.borrow().seen.len() == n {
                break;
            }
        }
        for &q in quarantines {
            proc.write_mem(q, &[0])?;
        }
        crate::live::drain(tracer, &mut |_, _, _| Ok(()))
    })
}

/// A live transition start that a killed suture left with its quarantine
/// on (the record says so): lifted now, before any thread is switched (a
/// switched thread is no longer in the table, and the quarantine would
/// keep it on the old code). The threads added are pending.
pub fn lift_quarantine(proc: &Process, rec: &mut Record) -> Result<(), Error> {
    let Some(t) = rec.transition.as_mut().filter(|t| t.quarantine) else {
        return Ok(());
    };
    let quarantines = t
        .stubs
        .values()
        .map(|s| regenerate_stub(t.table.addr, t.bits, s).map(|stub| stub.quarantine))
        .collect::<Result<Vec<u64>, Error>>()?;
    let mut tabled = Tabled {
        mirror: Mirror::read(proc, t)?,
        seen: t
            .tps
            .iter()
            .map(|(&tid, &tp)| Seen {
                tid,
                tp,
                pending: true,
                start_time: None,
            })
            .collect(),
    };
    let known = tabled.seen.len();
    lift_quarantine_with(proc, &t.table.clone(), t.bits, &quarantines, &mut tabled)?;
    for s in &tabled.seen[known..] {
        t.tps.insert(s.tid, s.tp);
        rec.model.add_pending_thread(s.tid);
    }
    if let Some(t) = rec.transition.as_mut() {
        t.quarantine = false;
    }
    Ok(())
}

impl LiveBegin<'_> {
    /// Until the jumps are complete: each thread stopped once on its own to
    /// put its thread pointer in the table (nothing leads to the stubs yet,
    /// so this needs no `int3`), unless it is asleep and an earlier start
    /// read its pointer; the stubs written with their quarantine
    /// on; then the `int3`s, and a thread found between two of the
    /// instructions about to change moved to their relocated copy. Nothing
    /// is traced meanwhile, so a thread meeting an `int3` costs only its
    /// handler. On error the code is as before.
    fn start(&self, proc: &Process) -> Result<Option<Tabled>, Error> {
        let tabled = std::cell::RefCell::new(Tabled {
            mirror: Mirror::empty(self.bits),
            seen: Vec::new(),
        });
        // A thread still inside a stub of an earlier transition of the
        // same site (stopped there, say, since then) must not see it
        // rewritten: the whole-process stop waits for it to leave. No path
        // leads into those stubs any more, so one look suffices.
        let mut inside_stub = false;
        // A thread asleep whose pointer an earlier start read (it never
        // changes) goes into the table without being stopped; its pc comes
        // from `/proc`. The others are each stopped once, on their own:
        // first those never seen, then the known ones that were awake at
        // the first look and are not asleep at a second (e.g. the thread
        // just borrowed for system calls, on its way back to sleep).
        let mut tracer = proc.tracer();
        let mut candidates = proc.threads()?;
        for pass in 0..2 {
            let mut to_look = Vec::new();
            let mut retry = Vec::new();
            for tid in candidates {
                let Some(k) = self.known.get(&tid) else {
                    to_look.push(tid);
                    continue;
                };
                match proc.asleep(tid).filter(|a| a.start_time == k.start_time) {
                    Some(a) => {
                        inside_stub |= self.stub_writes.iter().any(|w| w.tears(a.pc));
                        let pending = (self.pending)(k.tp);
                        tabled.borrow_mut().add(
                            proc,
                            self.bits,
                            tid,
                            k.tp,
                            pending,
                            Some(k.start_time),
                        )?;
                    }
                    None if pass == 0 => retry.push(tid),
                    None => to_look.push(tid),
                }
            }
            crate::live::look_at_each(
                &mut tracer,
                &to_look,
                crate::live::LetGo::Detach,
                1,
                None,
                &mut |tr, tid, regs| {
                    inside_stub |= self.stub_writes.iter().any(|w| w.tears(regs.rip));
                    let pending = (self.pending)(regs.fs_base);
                    let start_time = tr.start_time(tid);
                    tabled
                        .borrow_mut()
                        .add(proc, self.bits, tid, regs.fs_base, pending, start_time)
                },
                &mut |_, _, _| Ok(()),
            )?;
            candidates = retry;
        }
        drop(tracer);
        if inside_stub {
            return Ok(None);
        }
        for w in self.stub_writes {
            proc.write_mem(w.addr, &w.bytes)?;
        }
        for &q in self.quarantines {
            proc.write_mem(q, &[1])?;
        }
        let tabled = tabled.into_inner();
        proc.write_mem(self.region.addr, &tabled.mirror.bytes())?;
        crate::live::place_int3(proc, self.jumps)?;
        crate::ops::test_pause("int3s");
        let checked = crate::live::sync().and_then(|()| {
            crate::live::check_torn(proc, self.jumps, &mut |tr, tid, regs| {
                self.move_out(proc, tr, tid, regs)
            })
        });
        match checked {
            Ok(crate::live::Torn::Clear) => Ok(Some(tabled)),
            Ok(crate::live::Torn::GiveUp) => Ok(None),
            Err(e) => {
                crate::live::withdraw_int3(proc, self.jumps);
                Err(e)
            }
        }
    }

    /// Once the jumps are complete: [`lift_quarantine_with`].
    fn finish(&self, proc: &Process, tabled: &mut Tabled) -> Result<(), Error> {
        lift_quarantine_with(proc, self.region, self.bits, self.quarantines, tabled)
    }

    /// A thread (stopped) found between two instructions about to change:
    /// moved to the same instruction of their relocated copy.
    fn move_out(
        &self,
        proc: &Process,
        tr: &mut Tracer<'_>,
        tid: Tid,
        regs: &libc::user_regs_struct,
    ) -> Result<(), Error> {
        let Some(w) = self.jumps.iter().find(|w| w.tears(regs.rip)) else {
            return Ok(());
        };
        // Just past one of our int3s with its SIGTRAP not delivered yet:
        // the handler sends it on (it never ran the instruction).
        if regs.rip == w.addr + 1 && proc.thread_has_pending(tid, libc::SIGTRAP) {
            return Ok(());
        }
        match w.redirect.iter().find(|(from, _)| *from == regs.rip) {
            Some((_, to)) => Ok(tr.set_pc(tid, *to)?),
            None => Err(Error::SiteBusy(format!(
                "thread {tid} is inside the bytes to be overwritten at {:#x} (pc {:#x}); try again",
                w.addr, regs.rip
            ))),
        }
    }
}

/// The dispatch stub reads `fs:0`, which the x86_64 TLS ABI (glibc, musl)
/// defines as the thread pointer itself; a thread without one (or a runtime
/// that uses `fs` otherwise) cannot be told apart, so it is refused.
fn check_thread_pointer(proc: &Process, tid: i32, fs_base: u64) -> Result<(), Error> {
    let ok = fs_base != 0
        && proc
            .read_mem(fs_base, 8)
            .is_ok_and(|b| u64::from_le_bytes(b.try_into().unwrap()) == fs_base);
    if ok {
        Ok(())
    } else {
        Err(Error::Other(format!(
            "thread {tid} has no standard thread pointer (fs base {fs_base:#x} does not point to itself), which suture's per-thread dispatch needs; this process cannot be patched with transitions"
        )))
    }
}

/// Drives a transition: checks threads, switches them, reconciles the
/// model with the threads that exist.
pub struct Driver<'a> {
    pub proc: &'a Process,
    pub rec: &'a mut Record,
    checker: Checker,
    mirror: Mirror,
    /// Whether the record changed since it was last saved.
    pub dirty: bool,
}

impl<'a> Driver<'a> {
    pub fn new(proc: &'a Process, rec: &'a mut Record) -> Result<Driver<'a>, Error> {
        let t = rec.transition.as_ref().ok_or_else(|| {
            Error::CorruptState("the record has a model transition but no pending table".into())
        })?;
        let mirror = Mirror::read(proc, t)?;
        let objects = Objects::discover(proc, &proc.maps()?)?;
        let checker = Checker::new(proc, &objects, rec)?;
        Ok(Driver {
            proc,
            rec,
            checker,
            mirror,
            dirty: false,
        })
    }

    fn trans(&mut self) -> &mut TransitionRecord {
        self.rec.transition.as_mut().expect("checked in new")
    }

    pub fn is_trap(&self, pc: u64) -> bool {
        self.checker.is_trap(pc)
    }

    pub fn pending(&self) -> Vec<i32> {
        self.rec.model.pending()
    }

    pub fn is_pending(&self, tid: i32) -> bool {
        self.rec
            .model
            .transition()
            .is_some_and(|t| t.pending.contains(&tid))
    }

    /// Turn a thread's table entry into a tombstone and tell the model.
    fn switch(&mut self, tid: i32, tp: u64) -> Result<(), Error> {
        if let Some(i) = self.mirror.index_of(tp) {
            let addr = self.rec.transition.as_ref().expect("checked").table.addr + 8 * i as u64;
            let low = (self.mirror.slots[i] as u8) | TOMBSTONE_BIT as u8;
            self.proc.write_mem(addr, &[low])?;
            self.mirror.slots[i] |= TOMBSTONE_BIT;
        }
        self.rec.model.switch_thread(tid);
        let t = self.trans();
        t.blockers.remove(&tid);
        t.tps.insert(tid, tp);
        self.dirty = true;
        Ok(())
    }

    /// Check a pending thread held stopped with registers `regs`; switch it
    /// when clean. True if it switched.
    pub fn examine(&mut self, tid: i32, regs: &libc::user_regs_struct) -> Result<bool, Error> {
        if !self.is_pending(tid) {
            return Ok(true);
        }
        match self.checker.check(self.proc, regs) {
            Verdict::Switch => {
                self.switch(tid, regs.fs_base)?;
                Ok(true)
            }
            Verdict::Wait(b) => {
                let t = self.trans();
                if t.blockers.get(&tid) != Some(&b) {
                    t.blockers.insert(tid, b);
                    self.dirty = true;
                }
                Ok(false)
            }
        }
    }

    /// Make the model agree with the threads alive now: exited ones are
    /// forgotten; a new one is stopped once to learn its thread pointer
    /// (pending if the table holds it, else in the target state from its
    /// first instruction) and, if pending, checked at once. New pending
    /// threads stay traced when `keep` is set.
    pub fn reconcile(&mut self, tracer: &mut Tracer<'_>, keep: bool) -> Result<(), Error> {
        let live: BTreeSet<i32> = self.proc.threads()?.into_iter().collect();
        let known: Vec<i32> = self.trans().tps.keys().copied().collect();
        for tid in known {
            if !live.contains(&tid) {
                self.rec.model.remove_thread(tid);
                let t = self.trans();
                t.tps.remove(&tid);
                t.blockers.remove(&tid);
                self.dirty = true;
            }
        }
        for tid in live {
            if self.trans().tps.contains_key(&tid) {
                continue;
            }
            let regs = match tracer.stop(tid, THREAD_STOP) {
                Ok(r) => r,
                Err(_) if !thread_alive(self.proc, tid) => continue,
                Err(e) => return Err(e.into()),
            };
            self.trans().tps.insert(tid, regs.fs_base);
            self.dirty = true;
            if self.mirror.contains(regs.fs_base) {
                self.rec.model.add_pending_thread(tid);
                let switched = self.examine(tid, &regs)?;
                self.release(tracer, tid, switched, keep)?;
            } else {
                self.rec.model.add_thread(tid);
                tracer.detach(tid)?;
            }
        }
        // The table is the truth: a thread the record still calls pending
        // whose entry is gone was switched by a command that was killed
        // before it could save the record.
        for tid in self.pending() {
            let tp = self.trans().tps.get(&tid).copied();
            if let Some(tp) = tp {
                if !self.mirror.contains(tp) {
                    self.rec.model.switch_thread(tid);
                    self.trans().blockers.remove(&tid);
                    self.dirty = true;
                }
            }
        }
        Ok(())
    }

    fn release(
        &mut self,
        tracer: &mut Tracer<'_>,
        tid: i32,
        switched: bool,
        keep: bool,
    ) -> Result<(), Error> {
        if switched || !keep {
            tracer.detach(tid)?;
        } else {
            tracer.resume(tid, Resume::TraceSyscalls)?;
        }
        Ok(())
    }

    /// Stop and check every pending thread once, each on its own while the
    /// others run, in the order they stop ([`Tracer::stop_each`]: more
    /// threads are asked while those asked are slow to stop, so waits for
    /// a core overlap). Pending threads stay traced (stopping at their
    /// system calls) when `keep`.
    pub fn sweep(&mut self, tracer: &mut Tracer<'_>, keep: bool) -> Result<(), Error> {
        let pending = self.pending();
        let runnable = crate::live::RUNNABLE_STOP;
        tracer.stop_each(
            &pending,
            1,
            THREAD_STOP,
            runnable,
            &mut |tracer, tid, stopped| {
                let regs = match stopped {
                    Ok(r) => r,
                    Err(_) if !thread_alive(self.proc, tid) => {
                        self.on_exit(tid);
                        return Ok(ControlFlow::Continue(()));
                    }
                    Err(e) => {
                        // Not stoppable now (e.g. the process is stopped by a
                        // signal): it stays pending, and says why.
                        let t = self.trans();
                        t.blockers.insert(
                            tid,
                            crate::record::Blocker {
                                reason: format!("it could not be stopped for its check: {e}"),
                                frames: vec![],
                            },
                        );
                        self.dirty = true;
                        return Ok(ControlFlow::Continue(()));
                    }
                };
                let switched = self.examine(tid, &regs)?;
                self.release(tracer, tid, switched, keep)?;
                Ok(ControlFlow::Continue(()))
            },
        )
    }

    /// Turns on the trap of every dispatch stub of the transition: from now
    /// on a pending thread that calls a function in transition makes the
    /// stub's system call, where the worker (tracing it) checks it.
    pub fn enable_traps(&mut self) -> Result<(), Error> {
        let Some(t) = self.rec.transition.as_ref() else {
            return Ok(());
        };
        for s in t.stubs.values() {
            let stub = regenerate_stub(t.table.addr, t.bits, s)?;
            self.proc.write_mem(stub.trap_switch, &[1])?;
        }
        Ok(())
    }

    /// A traced pending thread stopped at a system-call entry: check it
    /// (always at a dispatch trap, otherwise when `check` says so) and let
    /// it go on.
    pub fn on_syscall(
        &mut self,
        tracer: &mut Tracer<'_>,
        tid: i32,
        regs: &libc::user_regs_struct,
        check: bool,
    ) -> Result<(), Error> {
        if !self.is_pending(tid) {
            return Ok(tracer.detach(tid)?);
        }
        let switched = if check || self.is_trap(regs.rip) {
            self.examine(tid, regs)?
        } else {
            false
        };
        self.release(tracer, tid, switched, true)
    }

    /// A thread the model tracked exited.
    pub fn on_exit(&mut self, tid: i32) {
        self.rec.model.remove_thread(tid);
        let t = self.trans();
        t.tps.remove(&tid);
        t.blockers.remove(&tid);
        self.dirty = true;
    }

    pub fn mirror(&self) -> &Mirror {
        &self.mirror
    }
}

/// Whether thread `tid` of the process still exists.
pub fn thread_alive(proc: &Process, tid: i32) -> bool {
    std::path::Path::new(&format!("/proc/{}/task/{tid}", proc.pid())).exists()
}

/// Switch every thread of the model at once (the test-only immediate mode
/// and `force`).
pub fn switch_every_thread(model: &mut Model) {
    for t in model.pending() {
        model.switch_thread(t);
    }
}
