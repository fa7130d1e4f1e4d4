//! Code writes while the process runs (kernel: `text_poke_bp`).
//!
//! Instead of stopping every thread to change a jump, suture writes an
//! `int3` on the first byte of each changing instruction, then the other
//! bytes, then the first byte, with the cores serialized between the steps
//! ([`sync`]: `membarrier(MEMBARRIER_CMD_GLOBAL_EXPEDITED)`, issued by
//! suture itself, so that no thread of the target has to run for it). A
//! thread that reaches an `int3` meanwhile takes a `SIGTRAP`, and the
//! handler suture installed in the target (`suture_x86::trap`) sends it
//! where the finished instruction would: no thread is ever stopped for the
//! write itself, and if suture dies in the middle the handler keeps the
//! target running until the next command finishes the write ([`repair`]).
//!
//! A thread that meets an `int3` pays a signal (microseconds), so the
//! `int3`s stay in place as briefly as possible, and nothing of the process
//! is traced meanwhile (a traced thread would stop for us at each one).
//! What must hold while they are in place:
//! * no thread may be between two of the instructions being replaced:
//!   [`check_torn`] reads where each sleeping thread will resume from
//!   `/proc` and stops only the running ones, one at a time (none at all
//!   when every write replaces a single instruction, e.g. one jump by
//!   another); one found there moves to the same instruction of the
//!   relocated copy. If that takes too long, the `int3`s are taken back and
//!   the whole-process stop of `write.rs` is used instead;
//! * for a transition's start, every thread that existed before must be in
//!   the pending table before any thread can take the new path: each
//!   thread is stopped once on its own to fill the table before the first
//!   `int3` (not one asleep whose pointer an earlier start read), and the dispatch stubs' quarantine keeps a thread not in the
//!   table on the old code until a short [`Window`] (tracing every thread
//!   with `PTRACE_O_TRACECLONE`, so a thread created meanwhile is seen
//!   before its first instruction) has added the threads created since.
//!
//! Not used (the whole-process stop is) when the target handles or ignores
//! `SIGTRAP` itself, when a thread blocks it (the kernel would then kill
//! the process on the `int3`), or without `membarrier`, for more than
//! [`LIVE_MAX`] writes at once, and with `SUTURE_LIVE_WRITE=0`.

use crate::memory::{self, PAGE, PROT_RW, PROT_RX};
use crate::record::{Record, Region, TrapRecord};
use crate::write::CodeWrite;
use crate::Error;
use std::ops::ControlFlow;
use std::time::{Duration, Instant};
use suture_process::{Hijack, Process, Tid, TraceEvent, Tracer};
use suture_x86::trap::{trap_handler, TrapLayout};

const SIGTRAP: i32 = 5;
const TRAP_NAME: &str = "suture-trap";
/// Entries of the handler's table (one per changing instruction).
const CAPACITY: u64 = 16 * 1024;
const MEMBARRIER_CMD_GLOBAL_EXPEDITED: i64 = 1 << 1;
const MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED: u64 = 1 << 2;
const SA_SIGINFO: u64 = 4;
const SA_RESTORER: u64 = 0x0400_0000;
const SA_ONSTACK: u64 = 0x0800_0000;
const HIJACK_TIMEOUT: Duration = Duration::from_secs(3);
/// How long one thread may take to stop for its look in a [`Window`]
/// (unless it is runnable then: see [`RUNNABLE_STOP`]).
const THREAD_STOP: Duration = Duration::from_millis(500);
/// How long a thread that is runnable (waiting for a core) may take to
/// stop: on a saturated machine that is the scheduler's round over every
/// runnable thread.
pub const RUNNABLE_STOP: Duration = Duration::from_secs(30);

/// Live writes are the default; `SUTURE_LIVE_WRITE=0` turns them off (the
/// whole-process stop of `write.rs` then writes every jump).
fn disabled() -> bool {
    std::env::var_os("SUTURE_LIVE_WRITE").is_some_and(|v| v == "0")
}

/// Most code writes (sites and direct calls) one live write takes on. Its
/// `int3`s stay in place for a few system calls per write (and, at a
/// start, while the running threads are checked), and meanwhile every call
/// of those functions pays a signal: with hundreds of busy functions the
/// target saturates, its threads are slow to stop, and the whole-process
/// stop is quicker (see BENCHMARKS.md, scale). Security fixes change a few
/// functions.
pub const LIVE_MAX: usize = 64;

/// Whether `writes` suit a live write (see [`LIVE_MAX`]).
pub fn suits(writes: &[CodeWrite]) -> bool {
    writes.len() <= LIVE_MAX
}

/// `SUTURE_DEBUG_HOLDS=1`: how long each step of a live write took.
fn debug_step(what: &str, since: Instant) {
    suture_process::debug_log(format_args!("live write: {what} {:?}", since.elapsed()));
}

/// The handler's layout in a recorded mapping.
fn layout(t: &TrapRecord) -> TrapLayout {
    let (_, l) = trap_handler(t.handler, t.capacity).expect("built before");
    l
}

/// Makes the target ready for live writes (maps the handler, installs it
/// for `SIGTRAP`, registers for `membarrier`), or says why not (`None`:
/// use the whole-process stop): [`readiness`], then
/// [`Readiness::complete`] by a thread borrowed for it. `rec.trap` is
/// updated; the caller saves the record.
pub fn prepare(proc: &Process, rec: &mut Record) -> Result<Option<TrapLayout>, Error> {
    readiness(proc, rec)?.complete(proc, rec, None)
}

/// How long [`readiness`] waits for a thread that blocks `SIGTRAP` to stop
/// blocking it: while it sleeps (a thread that blocks it for good mostly
/// does, and then every command pays this), and while it is runnable (on
/// its way to restoring its mask, or waiting for a core to do it).
const BLOCKED_SLEEPING: Duration = Duration::from_millis(5);
const BLOCKED_RUNNABLE: Duration = Duration::from_secs(1);

/// How far the target is from live writes, as [`readiness`] finds it.
pub enum Readiness {
    /// Live writes cannot be used now (see the module documentation).
    Unsuitable,
    /// Ready already: this command checked the handler.
    Ready(TrapLayout),
    /// System calls in the target are needed; `caught`: some handler is
    /// installed for `SIGTRAP` (ours, unless the program replaced it).
    NeedsThread { caught: bool },
}

/// The checks of [`prepare`] that need no thread of the target: made
/// before a thread is borrowed (they read `/proc` for every thread, which
/// a borrowed thread would wait for).
pub fn readiness(proc: &Process, rec: &Record) -> Result<Readiness, Error> {
    if disabled() {
        return Ok(Readiness::Unsuitable);
    }
    let (caught, ignored) = proc.signal_disposition(SIGTRAP)?;
    if ignored || (caught && rec.trap.is_none()) {
        return Ok(Readiness::Unsuitable);
    }
    // A thread that blocks it only for a moment (one released by the last
    // command's borrow, for instance) is waited for.
    if !proc
        .threads_blocking_for_good(SIGTRAP, BLOCKED_SLEEPING, BLOCKED_RUNNABLE)?
        .is_empty()
    {
        return Ok(Readiness::Unsuitable);
    }
    if rec.trap.as_ref().is_some_and(|t| undo_log(t).is_none()) {
        // Mapped by an older suture, without room for the undo log.
        return Ok(Readiness::Unsuitable);
    }
    let ready = rec.trap.as_ref().is_some_and(|t| t.barrier && t.verified);
    Ok(match rec.trap.as_ref() {
        Some(t) if caught && ready => Readiness::Ready(layout(t)),
        _ => Readiness::NeedsThread { caught },
    })
}

impl Readiness {
    /// Makes the system calls still needed, by `borrowed` (a thread the
    /// caller holds already: one stop of one thread fewer per command) or
    /// by a thread borrowed for them; the layout if live writes can be
    /// used.
    pub fn complete(
        self,
        proc: &Process,
        rec: &mut Record,
        borrowed: Option<&mut Hijack<'_>>,
    ) -> Result<Option<TrapLayout>, Error> {
        let t0 = Instant::now();
        let _d = Defer(move || debug_step("prepare", t0));
        let caught = match self {
            Readiness::Unsuitable => return Ok(None),
            Readiness::Ready(l) => return Ok(Some(l)),
            Readiness::NeedsThread { caught } => caught,
        };
        if let Some(h) = borrowed {
            return prepare_in(proc, rec, h, caught);
        }
        let mut h = proc.hijack(HIJACK_TIMEOUT)?;
        let result = prepare_in(proc, rec, &mut h, caught);
        let released = h.release();
        let l = result?;
        released?;
        Ok(l)
    }
}

/// The system calls of [`Readiness::complete`], made by the borrowed
/// thread `h`.
fn prepare_in(
    proc: &Process,
    rec: &mut Record,
    h: &mut Hijack<'_>,
    caught: bool,
) -> Result<Option<TrapLayout>, Error> {
    let t = match rec.trap.clone() {
        Some(t) => t,
        None => {
            let t = map_handler(proc, h)?;
            rec.trap = Some(t.clone());
            t
        }
    };
    let ours = if caught {
        handler_is_ours(proc, h, &t)?
    } else {
        install_handler(proc, h, &t)?
    };
    if !ours || (!t.barrier && !register_barrier(h)) {
        return Ok(None);
    }
    if let Some(t) = rec.trap.as_mut() {
        t.barrier = true;
        t.verified = true;
    }
    Ok(Some(layout(&t)))
}

/// Maps the handler (a page of scratch space, then the code, its table and
/// the undo log) into the target.
fn map_handler(proc: &Process, h: &mut Hijack<'_>) -> Result<TrapRecord, Error> {
    let len = PAGE + memory::page_up(TrapLayout::size_for(CAPACITY) + CAPACITY);
    let addr = memory::create_mapping(
        h,
        TRAP_NAME,
        len,
        None,
        PROT_RX,
        false,
        &[(0, PAGE, PROT_RW)],
    )?;
    let handler = addr + PAGE;
    let (code, _) = trap_handler(handler, CAPACITY).map_err(Error::Other)?;
    proc.write_mem(handler, &code)?;
    Ok(TrapRecord {
        region: Region { addr, len },
        handler,
        capacity: CAPACITY,
        barrier: false,
        verified: false,
    })
}

/// Whether the installed `SIGTRAP` handler is still ours: the program may
/// have installed its own since, which would then get our `int3`s.
fn handler_is_ours(proc: &Process, h: &mut Hijack<'_>, t: &TrapRecord) -> Result<bool, Error> {
    let l = layout(t);
    Ok(sigtrap_action(proc, h, t, None)? == l.handler)
}

/// Installs our `SIGTRAP` handler, unless the program installed one of its
/// own meanwhile (then that one stays, and `false`).
fn install_handler(proc: &Process, h: &mut Hijack<'_>, t: &TrapRecord) -> Result<bool, Error> {
    let l = layout(t);
    // struct kernel_sigaction { handler, flags, restorer, mask }
    let act = [
        l.handler,
        SA_SIGINFO | SA_RESTORER | SA_ONSTACK,
        l.restorer,
        !0u64,
    ];
    if sigtrap_action(proc, h, t, Some(act))? != 0 {
        // Someone installed a handler meanwhile: theirs goes back.
        let old = t.region.addr + 64;
        h.syscall(libc::SYS_rt_sigaction, [SIGTRAP as u64, old, 0, 8, 0, 0])?;
        return Ok(false);
    }
    Ok(true)
}

/// `rt_sigaction(SIGTRAP, act, old)` in the target, through the handler
/// mapping's scratch page (`act` at its start, `old` read back 64 bytes
/// in); returns the old handler's address (0 for the default).
fn sigtrap_action(
    proc: &Process,
    h: &mut Hijack<'_>,
    t: &TrapRecord,
    act: Option<[u64; 4]>,
) -> Result<u64, Error> {
    let scratch = t.region.addr;
    if let Some(act) = act {
        let bytes: Vec<u8> = act.iter().flat_map(|w| w.to_le_bytes()).collect();
        proc.write_mem(scratch, &bytes)?;
    }
    proc.write_mem(scratch + 64, &[0; 32])?;
    let act_addr = if act.is_some() { scratch } else { 0 };
    h.syscall(
        libc::SYS_rt_sigaction,
        [SIGTRAP as u64, act_addr, scratch + 64, 8, 0, 0],
    )?;
    let old = proc.read_mem(scratch + 64, 8)?;
    Ok(u64::from_le_bytes(old.try_into().expect("8 bytes")))
}

/// Registers the target for `membarrier(MEMBARRIER_CMD_GLOBAL_EXPEDITED)`
/// (once per process; the kernel makes the first one wait for a grace
/// period). `false` if the kernel refuses.
fn register_barrier(h: &mut Hijack<'_>) -> bool {
    h.syscall(
        libc::SYS_membarrier,
        [MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED, 0, 0, 0, 0, 0],
    )
    .is_ok()
}

/// Serializes every core running a thread of the target, from suture
/// itself: `membarrier(MEMBARRIER_CMD_GLOBAL_EXPEDITED)` interrupts each
/// core that runs a thread of a registered process ([`prepare`] registers
/// the target). A core interrupted in user mode returns to it through
/// `iret`, which is serializing; a core running a thread in the kernel has
/// none of that thread's user instructions in flight, and fetches them
/// again (coherently with our writes) when it returns. No thread of the
/// target has to run for this, so it takes microseconds even when the
/// target is saturated (by threads meeting our `int3`s, for instance);
/// the private `SYNC_CORE` command would have to be made by a thread of
/// the target, which then first waits for a core.
pub fn sync() -> Result<(), Error> {
    let t0 = Instant::now();
    let _d = Defer(move || debug_step("sync", t0));
    // SAFETY: membarrier takes no pointers.
    let r = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL_EXPEDITED, 0, 0) };
    if r < 0 {
        return Err(Error::Other(format!(
            "membarrier(GLOBAL_EXPEDITED) failed: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// Where the old first byte of each table entry's write is kept (one byte
/// per entry, after the table), if the mapping has room for it: a suture
/// killed after placing `int3`s at sites its record does not know yet
/// leaves them to [`repair`], which takes them back from here.
fn undo_log(t: &TrapRecord) -> Option<u64> {
    let at = t.handler + TrapLayout::size_for(t.capacity);
    (at + t.capacity <= t.region.addr + t.region.len).then_some(at)
}

/// Writes the handler's table for `writes` (before any of their `int3`),
/// with the undo log. `false` if one of them has no destination or they do
/// not fit.
pub fn set_table(proc: &Process, l: &TrapLayout, writes: &[CodeWrite]) -> Result<bool, Error> {
    let entries: Option<Vec<(u64, u64, u64)>> = writes
        .iter()
        .map(|w| w.trap.map(|(dest, kind)| (w.addr, dest, kind)))
        .collect();
    let Some(bytes) = entries.and_then(|e| l.table_bytes(&e)) else {
        return Ok(false);
    };
    let undo: Vec<u8> = writes.iter().map(|w| w.old[0]).collect();
    proc.write_mem(l.handler + TrapLayout::size_for(l.capacity), &undo)?;
    proc.write_mem(l.count, &bytes)?;
    Ok(true)
}

/// The first step: an `int3` on each write's first byte.
pub fn place_int3(proc: &Process, writes: &[CodeWrite]) -> Result<(), Error> {
    for w in writes {
        proc.write_mem(w.addr, &[0xCC])?;
    }
    Ok(())
}

/// Puts back each write's old first byte (nothing else was written yet):
/// the code is as before.
pub fn withdraw_int3(proc: &Process, writes: &[CodeWrite]) {
    for w in writes {
        let _ = proc.write_mem(w.addr, &w.old[..1]);
    }
}

/// Puts back the old bytes of writes that may be partly done (each
/// `int3` still in place): the other bytes, then the first ones, as
/// [`complete`] would, best effort (this runs on an error path).
pub fn undo(proc: &Process, writes: &[CodeWrite]) {
    let back: Vec<CodeWrite> = writes
        .iter()
        .map(|w| CodeWrite {
            bytes: w.old.clone(),
            old: w.bytes.clone(),
            ..w.clone()
        })
        .collect();
    for w in &back {
        let _ = proc.write_mem(w.addr, &[0xCC]);
    }
    let _ = sync();
    for w in &back {
        let _ = proc.write_mem(w.addr + 1, &w.bytes[1..]);
    }
    let _ = sync();
    for w in &back {
        let _ = proc.write_mem(w.addr, &w.bytes[..1]);
    }
}

/// The last steps, once every `int3` is in place and no thread is inside
/// the changing bytes: the cores serialized (unless `looked`: every
/// thread was stopped on its own since the `int3`s were written, which
/// serialized each), the other bytes, the cores serialized, the first
/// bytes. No serialization is needed after the first bytes (the kernel's
/// last one): a core that still meets a stale `int3` takes the trap, and
/// the handler, seeing the byte changed, runs the finished instruction.
pub fn complete(proc: &Process, writes: &[CodeWrite], looked: bool) -> Result<(), Error> {
    if writes.is_empty() {
        return Ok(());
    }
    if !looked {
        sync()?;
    }
    for w in writes {
        proc.write_mem(w.addr + 1, &w.bytes[1..])?;
    }
    sync()?;
    for w in writes {
        proc.write_mem(w.addr, &w.bytes[..1])?;
    }
    Ok(())
}

/// Finishes a live write a killed `suture` left: every recorded site or
/// direct call whose first byte is still an `int3` gets the bytes the
/// record gives it (the record is written before the `int3`s of a write
/// whose result it describes, and after those of one it does not: either
/// way it holds a state the handler's table leads to).
pub fn repair(proc: &Process, rec: &Record) -> Result<usize, Error> {
    let Some(t) = &rec.trap else {
        return Ok(0);
    };
    let mut writes = Vec::new();
    let mut known = std::collections::BTreeSet::new();
    for site in rec.sites.values() {
        let mut push = |addr: u64, bytes: Vec<u8>| -> Result<(), Error> {
            known.insert(addr);
            if proc.read_mem(addr, 1)? == [0xCC] && bytes.first() != Some(&0xCC) {
                writes.push(CodeWrite {
                    addr,
                    old: bytes.clone(),
                    bytes,
                    guard_len: 0,
                    redirect: Vec::new(),
                    trap: None,
                });
            }
            Ok(())
        };
        push(site.site_addr, site.current.clone())?;
        for c in &site.callers {
            if let Some(b) = suture_x86::call_rel32(c.addr, c.to) {
                push(c.addr, b.to_vec())?;
            }
        }
    }
    // `int3`s of the last write at addresses the record does not know
    // (new sites of a start the record was not saved for): only their
    // first byte was written, which goes back.
    let mut withdrawn = 0;
    if let Some(undo) = undo_log(t) {
        let l = layout(t);
        let count = u64::from_le_bytes(proc.read_mem(l.count, 8)?.try_into().expect("8 bytes"));
        let count = count.min(t.capacity);
        let old = proc.read_mem(undo, count as usize)?;
        let size = l.entry(1) - l.entry(0);
        let entries = proc.read_mem(l.entry(0), (count * size) as usize)?;
        for (&byte, entry) in old.iter().zip(entries.chunks_exact(size as usize)) {
            let at = u64::from_le_bytes(entry[..8].try_into().expect("8 bytes"));
            if !known.contains(&at) && byte != 0xCC && proc.read_mem(at, 1)? == [0xCC] {
                proc.write_mem(at, &[byte])?;
                withdrawn += 1;
            }
        }
    }
    let n = writes.len();
    if n > 0 {
        if !t.barrier {
            // Written by a suture that serialized the cores otherwise.
            let mut h = proc.hijack(HIJACK_TIMEOUT)?;
            let registered = register_barrier(&mut h);
            h.release()?;
            if !registered {
                return Err(Error::Other(format!(
                    "the kernel refused to register process {} for membarrier, which completing the code writes a killed suture left needs",
                    proc.pid()
                )));
            }
        }
        complete(proc, &writes, false)?;
    }
    Ok(n + withdrawn)
}

/// Every thread of the process traced (without being stopped) by a
/// thread of ours that exists only for this: `PTRACE_O_TRACECLONE` shows
/// each thread created meanwhile before its first instruction. When the
/// window closes, that thread exits and the kernel lets every tracee go at
/// once, without stopping any.
pub struct Window;

impl Window {
    /// Runs `f` with every thread of `proc` traced by a new thread of
    /// ours; threads created meanwhile are traced from birth (reported by
    /// [`Tracer::next_event`] as [`TraceEvent::Born`]).
    pub fn run<T: Send>(
        proc: &Process,
        f: impl FnOnce(&mut Tracer<'_>) -> Result<T, Error> + Send,
    ) -> Result<T, Error> {
        let t0 = Instant::now();
        let (result, stats, tid) = std::thread::scope(|sc| {
            sc.spawn(|| {
                let me = nix::unistd::gettid().as_raw();
                let mut tracer = proc.tracer();
                tracer.watch_births();
                let r = attach_all(proc, &mut tracer).and_then(|()| f(&mut tracer));
                // The kernel detaches every tracee when this thread exits,
                // without stopping them (a detach by hand would stop each).
                std::mem::forget(tracer);
                (r, suture_process::take_hold_stats(), me)
            })
            .join()
            .expect("the tracing thread does not panic")
        });
        debug_step("window", t0);
        suture_process::add_hold_stats(stats);
        let t0 = Instant::now();
        let _d = Defer(move || debug_step("window thread gone", t0));
        // The thread's exit lets its tracees go; wait until it is gone for
        // good (a join returns a little earlier).
        let gone = Instant::now() + Duration::from_secs(2);
        let path = format!("/proc/self/task/{tid}");
        while std::path::Path::new(&path).exists() && Instant::now() < gone {
            std::thread::sleep(Duration::from_micros(50));
        }
        result
    }
}

/// Traces every thread of the process (again until a listing finds none
/// new: a thread created while the others were being attached).
fn attach_all(proc: &Process, tracer: &mut Tracer<'_>) -> Result<(), Error> {
    loop {
        let traced: std::collections::BTreeSet<Tid> = tracer.traced().into_iter().collect();
        let fresh: Vec<Tid> = proc
            .threads()?
            .into_iter()
            .filter(|t| !traced.contains(t))
            .collect();
        if fresh.is_empty() {
            return Ok(());
        }
        for tid in fresh {
            match tracer.attach(tid) {
                Ok(()) | Err(suture_process::Error::ThreadExited { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// What becomes of a thread after its look in [`look_at_each`].
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum LetGo {
    /// Resumed and still traced (in a [`Window`]; births are drained
    /// after each look).
    Resume,
    /// Detached: outside a window, so that nothing of the process stays
    /// traced (a traced thread meeting an `int3` would stop for us).
    Detach,
}

/// Each of `threads` stopped once, on its own, given to `look` with its
/// registers, then let go as `let_go` says. `at_once` threads are asked
/// to stop at first, more while they are slow to stop, and each is looked
/// at as soon as it stops ([`Tracer::stop_each`]). A thread that does not
/// stop within `timeout` (default: [`THREAD_STOP`], or [`RUNNABLE_STOP`]
/// for one that waits for a core) is an [`suture_process::Error::Timeout`].
/// With [`LetGo::Resume`], threads born meanwhile are given to `born` (held
/// until it returns). Threads that exit meanwhile are skipped.
pub fn look_at_each(
    tracer: &mut Tracer<'_>,
    threads: &[Tid],
    let_go: LetGo,
    at_once: usize,
    timeout: Option<Duration>,
    look: &mut dyn FnMut(&mut Tracer<'_>, Tid, &libc::user_regs_struct) -> Result<(), Error>,
    born: &mut dyn FnMut(&mut Tracer<'_>, Tid, &libc::user_regs_struct) -> Result<(), Error>,
) -> Result<(), Error> {
    let (timeout, runnable) = timeout.map_or((THREAD_STOP, RUNNABLE_STOP), |t| (t, t));
    tracer.stop_each::<Error>(
        threads,
        at_once,
        timeout,
        runnable,
        &mut |tracer, tid, stopped| {
            let regs = match stopped {
                Ok(r) => r,
                Err(suture_process::Error::ThreadExited { .. }) => {
                    return Ok(ControlFlow::Continue(()))
                }
                Err(e) => return Err(e.into()),
            };
            let r = look(tracer, tid, &regs);
            let gone = match let_go {
                LetGo::Resume => tracer.resume(tid, suture_process::Resume::Run),
                LetGo::Detach => tracer.detach(tid),
            };
            match gone {
                Ok(()) | Err(suture_process::Error::ThreadExited { .. }) => {}
                Err(e) => return Err(e.into()),
            }
            r?;
            if let_go == LetGo::Resume {
                drain(tracer, born)?;
            }
            Ok(ControlFlow::Continue(()))
        },
    )?;
    if let_go == LetGo::Resume {
        drain(tracer, born)?;
    }
    Ok(())
}

/// How long [`check_torn`] may take before the live write is given up
/// (`SUTURE_LIVE_CHECK_MS` sets another budget).
const TORN_BUDGET: Duration = Duration::from_millis(100);

fn torn_budget() -> Duration {
    std::env::var("SUTURE_LIVE_CHECK_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(TORN_BUDGET, Duration::from_millis)
}

/// The outcome of [`check_torn`].
#[derive(Debug, PartialEq, Eq)]
pub enum Torn {
    /// No thread is between two of the instructions about to change.
    Clear,
    /// Not settled within [`TORN_BUDGET`] (threads too slow to stop, or
    /// one inside the bytes that cannot be moved): the `int3`s were taken
    /// back; use the whole-process stop, which waits for such a thread.
    GiveUp,
}

/// The addresses a thread could be stopped at, inside bytes that `w`
/// changes: the starts of the old instructions after the first. None when
/// the old bytes are one of our jumps or calls (a single instruction).
fn inner_starts(w: &CodeWrite) -> Vec<u64> {
    if matches!(w.old.first(), Some(0xE9 | 0xE8)) {
        return Vec::new();
    }
    let starts: Vec<u64> = w
        .redirect
        .iter()
        .map(|&(from, _)| from)
        .filter(|&from| w.tears(from))
        .collect();
    if starts.is_empty() && w.guard_len > 1 && w.redirect.is_empty() {
        // Boundaries unknown: every byte after the first.
        return (w.addr + 1..w.addr + w.guard_len).collect();
    }
    starts
}

/// After the `int3`s of `writes` are in place and every core serialized
/// (no thread can enter their bytes any more): each thread found at the
/// start of an instruction about to change, other than the first, is
/// moved by `inside` (stopped; it moves the thread to the relocated copy
/// or fails). A thread asleep in the kernel is judged by the pc it will
/// return to, read without stopping it; only the others are stopped, one
/// at a time, and none at all when no write replaces several
/// instructions. Threads created later cannot be inside (they would have
/// passed an `int3`).
pub fn check_torn(
    proc: &Process,
    writes: &[CodeWrite],
    inside: &mut dyn FnMut(&mut Tracer<'_>, Tid, &libc::user_regs_struct) -> Result<(), Error>,
) -> Result<Torn, Error> {
    let t0 = Instant::now();
    let _d = Defer(move || debug_step("torn check", t0));
    let starts: std::collections::BTreeSet<u64> = writes.iter().flat_map(inner_starts).collect();
    if starts.is_empty() {
        return Ok(Torn::Clear);
    }
    let running: Vec<Tid> = proc
        .threads()?
        .into_iter()
        .filter(|&tid| proc.blocked_pc(tid).is_none_or(|pc| starts.contains(&pc)))
        .collect();
    let mut tracer = proc.tracer();
    let mut look = |tr: &mut Tracer<'_>, tid: Tid, regs: &libc::user_regs_struct| {
        if starts.contains(&regs.rip) {
            inside(tr, tid, regs)
        } else {
            Ok(())
        }
    };
    // Every running thread asked at once: their `int3`s are in place, so
    // the check is over sooner, and each is let go as soon as it is seen.
    let r = look_at_each(
        &mut tracer,
        &running,
        LetGo::Detach,
        running.len(),
        Some(torn_budget()),
        &mut look,
        &mut |_, _, _| Ok(()),
    );
    match r {
        Ok(()) => Ok(Torn::Clear),
        Err(Error::SiteBusy(_)) | Err(Error::Process(suture_process::Error::Timeout { .. })) => {
            // Taken back before the threads still asked to stop are let go
            // (each as it stops): meanwhile calls would still trap.
            withdraw_int3(proc, writes);
            Ok(Torn::GiveUp)
        }
        Err(e) => Err(e),
    }
}

/// Handles the events waiting now: births are given to `born` then
/// resumed; everything else was handled by the tracer.
pub fn drain(
    tracer: &mut Tracer<'_>,
    born: &mut dyn FnMut(&mut Tracer<'_>, Tid, &libc::user_regs_struct) -> Result<(), Error>,
) -> Result<(), Error> {
    while let Some(ev) = tracer.next_event(Duration::ZERO)? {
        match ev {
            TraceEvent::Born { tid, regs } => {
                let r = born(tracer, tid, &regs);
                match tracer.resume(tid, suture_process::Resume::Run) {
                    Ok(()) | Err(suture_process::Error::ThreadExited { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
                r?;
            }
            TraceEvent::SyscallEntry { tid, .. } => {
                tracer.resume(tid, suture_process::Resume::Run)?;
            }
            TraceEvent::Exited(_) => {}
        }
    }
    Ok(())
}

/// Runs a closure when dropped.
struct Defer<F: FnMut()>(F);

impl<F: FnMut()> Drop for Defer<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}
