//! Tracing single threads of a running process for a long time (the
//! transition worker): some threads stay seized, are stopped one at a time
//! for a quick check, and are caught at system-call entries.
//!
//! Threads are seized with `PTRACE_O_TRACESYSGOOD`: never
//! `PTRACE_O_EXITKILL` (if we die, even by `SIGKILL`, the kernel detaches
//! every tracee and it runs on), and `PTRACE_O_TRACECLONE` only after
//! [`Tracer::watch_births`] (then a thread a tracee creates is traced from
//! its first instruction and reported [`TraceEvent::Born`] before it runs;
//! otherwise threads a tracee creates stay untraced). Stops use `PTRACE_INTERRUPT`, never
//! `SIGSTOP`. Nothing in a tracee is changed (registers, signal mask), so a
//! detach, ours or the kernel's, leaves it as it was.
//!
//! Every stop we do not hand to the caller is left as the kernel would have
//! behaved without us:
//! * signal-delivery-stop: resumed at once with the same signal, in the
//!   thread's mode (`PTRACE_CONT` or `PTRACE_SYSCALL`), so each signal is
//!   delivered exactly once;
//! * group-stop (`SIGSTOP`, `SIGTSTP`, ... sent to the process): left with
//!   `PTRACE_LISTEN`, so the thread stays stopped with the rest of the
//!   process; after `SIGCONT` it reports an interrupt-stop and is resumed;
//! * system-call exits, interrupt-stops nobody waits for: resumed at once.
//!
//! A thread interrupted in a blocking system call (`read`, `nanosleep`)
//! restarts the call when it resumes, as after a signal without handler;
//! with [`Resume::TraceSyscalls`] the restart is a new system-call entry
//! (`orig_rax` tells which call; `restart_syscall` after `nanosleep`).
//!
//! Ends: a tracee that exits is reported [`TraceEvent::Exited`], also the
//! main thread exiting before the others (a zombie no wait reports). A
//! thread that [`Tracer::stop`], [`Tracer::resume`] or [`Tracer::detach`]
//! finds gone is reported by their error ([`Error::ThreadExited`]) instead.
//! An exec by any thread ends every other thread: each tracee is reported
//! exited; if the exec'ing thread was a tracee, it takes over the process
//! id and would stay traced: it is detached. The exec is recognised by the
//! address space the [`Process`] handle was opened on being gone (so only
//! when the handle could open `/proc/PID/mem`).

use std::collections::{BTreeMap, VecDeque};
use std::marker::PhantomData;
use std::ops::{Bound, ControlFlow};
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use nix::errno::Errno;

use crate::sys::{self, Backoff, Report, SYSCALL_STOP};
use crate::{Error, Process, Result, Tid};

/// How long [`Tracer::detach`] (and the drop) waits for a running thread to
/// stop before leaving it to [`Process::release_abandoned_threads`].
const DETACH_WAIT: Duration = Duration::from_secs(1);

/// How often [`Tracer::next_event`] looks for ends no wait reports.
const CHECK_INTERVAL: Duration = Duration::from_millis(50);

/// How long [`Tracer::stop_each`] waits for one of the threads it asked to
/// stop before it asks one more.
pub const ASK_MORE_AFTER: Duration = Duration::from_micros(200);

/// How long to wait for an exec to complete when a vanished tracee
/// suggests one is under way.
const EXEC_WAIT: Duration = Duration::from_millis(200);

/// How [`Tracer::resume`] lets a stopped thread run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// Run freely (`PTRACE_CONT`).
    Run,
    /// Run until the next system-call entry (`PTRACE_SYSCALL`), which
    /// [`Tracer::next_event`] reports.
    TraceSyscalls,
}

/// What [`Tracer::next_event`] reports.
// Events come one at a time and are not stored in bulk: the registers stay
// inline (the type stays `Copy`, matching on them needs no indirection).
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Copy)]
pub enum TraceEvent {
    /// A thread resumed with [`Resume::TraceSyscalls`] stopped at a system-call
    /// entry: `orig_rax` is the call number, `rip` points just after the
    /// `syscall` instruction. It stays stopped until [`Tracer::resume`].
    SyscallEntry {
        tid: Tid,
        regs: libc::user_regs_struct,
    },
    /// A traced thread exited (or vanished in an exec); it is no longer traced.
    Exited(Tid),
    /// A thread created by a tracee (with [`Tracer::watch_births`]), held
    /// before its first instruction until [`Tracer::resume`] or
    /// [`Tracer::detach`].
    Born {
        tid: Tid,
        regs: libc::user_regs_struct,
    },
}

impl std::fmt::Debug for TraceEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TraceEvent::SyscallEntry { tid, regs } => f
                .debug_struct("SyscallEntry")
                .field("tid", tid)
                .field("orig_rax", &(regs.orig_rax as i64))
                .field("rip", &format_args!("{:#x}", regs.rip))
                .finish_non_exhaustive(),
            TraceEvent::Exited(tid) => f.debug_tuple("Exited").field(tid).finish(),
            TraceEvent::Born { tid, .. } => f
                .debug_struct("Born")
                .field("tid", tid)
                .finish_non_exhaustive(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Resumed in its mode; its next stop is ours to handle.
    Running,
    /// In a group-stop, left with `PTRACE_LISTEN`.
    Listening,
    /// Held in a ptrace-stop for the caller; `group`: a group-stop (left
    /// with `PTRACE_LISTEN` on resume).
    Held { group: bool },
}

#[derive(Debug, Clone, Copy)]
struct Traced {
    how: Resume,
    state: State,
    /// When the thread started (clock ticks), to recognise it behind its id.
    start_time: u64,
    /// While held: since when it has been kept from running (from the
    /// interrupt, or from the reported system-call entry).
    held_since: Option<Instant>,
    /// A stop asked for by [`Tracer::request_stop`] and not collected yet
    /// (when it was asked).
    asked: Option<Instant>,
    /// Created by a tracee and not stopped yet: its first stop is its birth.
    unborn: bool,
}

/// What [`Tracer::stop_each`] gives each thread to: the tracer, the thread
/// and its registers (or why it could not be stopped); it lets the thread
/// go and says whether the walk goes on.
pub type HandOver<'f, 'p, E> = dyn FnMut(
        &mut Tracer<'p>,
        Tid,
        Result<libc::user_regs_struct>,
    ) -> std::result::Result<ControlFlow<()>, E>
    + 'f;

/// Single threads of a process traced for as long as this lives; see the
/// module documentation. Detaches every thread on drop (bounded).
///
/// `!Send`: ptrace binds the tracees to the thread that created this. Do not
/// use [`Process::hijack`] or [`Process::stop_all`] on the same process from
/// the same thread while threads are traced here.
pub struct Tracer<'p> {
    process: &'p Process,
    threads: BTreeMap<Tid, Traced>,
    /// Threads found gone while doing something else; reported first.
    exited: VecDeque<Tid>,
    /// [`Tracer::next_event`] scans from the thread after this one, so a
    /// busy thread cannot starve the others.
    cursor: Tid,
    last_check: Instant,
    /// Raised priority while some thread is held (or asked to stop).
    boost: Option<crate::boost::Boost>,
    /// Threads are seized with `PTRACE_O_TRACECLONE`.
    births: bool,
    _not_send: PhantomData<*const ()>,
}

impl Process {
    /// A tracer for single threads of this process (none traced yet).
    pub fn tracer(&self) -> Tracer<'_> {
        sys::release_abandoned(Duration::ZERO);
        Tracer {
            process: self,
            threads: BTreeMap::new(),
            exited: VecDeque::new(),
            cursor: 0,
            last_check: Instant::now(),
            boost: None,
            births: false,
            _not_send: PhantomData,
        }
    }

    /// The address space this handle was opened on is gone: the process
    /// exec'd or exited. (`/proc/PID/mem` stays bound to it: reading
    /// address 0 fails with EIO while it lives and reads nothing after.)
    fn address_space_gone(&self) -> bool {
        let Some(mem) = &self.mem else {
            return false;
        };
        let mut byte = [0u8; 1];
        matches!(mem.read_at(&mut byte, 0), Ok(0))
    }
}

impl<'p> Tracer<'p> {
    /// The traced threads, sorted.
    pub fn traced(&self) -> Vec<Tid> {
        self.threads.keys().copied().collect()
    }

    /// The start time of traced thread `tid` (read when it was seized),
    /// which tells it from a later thread with the same id.
    pub fn start_time(&self, tid: Tid) -> Option<u64> {
        self.threads.get(&tid).map(|t| t.start_time)
    }

    /// From now on, threads are seized with `PTRACE_O_TRACECLONE`: every
    /// thread one of them creates is traced from birth and reported
    /// ([`TraceEvent::Born`]) before it runs. (Threads already traced keep
    /// their options.)
    pub fn watch_births(&mut self) {
        self.births = true;
    }

    /// Seizes `tid` (if it is not traced yet) without stopping it: it runs
    /// on, its stops are handled by [`Tracer::next_event`], and the threads
    /// it creates are reported if [`Tracer::watch_births`] was called.
    pub fn attach(&mut self, tid: Tid) -> Result<()> {
        if self.threads.contains_key(&tid) {
            return Ok(());
        }
        self.seize(tid)
    }

    /// Seizes `tid` if it is not traced yet and asks it to stop, without
    /// waiting: a later [`Tracer::stop`] collects the stop. Asking several
    /// threads first lets them reach their stops in parallel (each still
    /// stops on its own, while the others run).
    pub fn request_stop(&mut self, tid: Tid) -> Result<()> {
        match self.threads.get(&tid) {
            Some(t) if matches!(t.state, State::Held { .. }) || t.asked.is_some() => return Ok(()),
            Some(_) => {}
            None => self.seize(tid)?,
        }
        // ESRCH: it is dying; the wait in `stop` reports it.
        let _ = sys::interrupt(tid);
        if let Some(t) = self.threads.get_mut(&tid) {
            t.asked = Some(Instant::now());
        }
        self.update_boost();
        Ok(())
    }

    /// Keeps the raised priority exactly while a thread waits for us.
    fn update_boost(&mut self) {
        let waiting = self
            .threads
            .values()
            .any(|t| matches!(t.state, State::Held { .. }) || t.asked.is_some());
        if waiting && self.boost.is_none() {
            self.boost = Some(crate::boost::Boost::new());
        } else if !waiting {
            self.boost = None;
        }
    }

    /// Seizes `tid` if it is not traced yet, interrupts it (unless
    /// [`Tracer::request_stop`] did) and waits (at most `timeout`) until it
    /// is in a ptrace-stop; returns its registers.
    /// It stays stopped until [`Tracer::resume`] or [`Tracer::detach`].
    ///
    /// A thread held at a reported [`TraceEvent::SyscallEntry`] is returned
    /// as is. A thread that reaches a system-call entry or exit before the
    /// interrupt is held there (at an entry `rax` is `-ENOSYS`); one
    /// interrupted in a blocking call shows `rax` = `-ERESTART...`.
    ///
    /// Errors: [`Error::ThreadExited`] (or [`Error::Exited`] for the whole
    /// process, also after an exec), [`Error::Timeout`] (the thread stays
    /// traced and running; its stop is handled later), and the diagnostics
    /// of [`Process`] when the kernel refuses to trace it
    /// ([`Error::AlreadyTraced`], [`Error::PermissionDenied`]).
    pub fn stop(&mut self, tid: Tid, timeout: Duration) -> Result<libc::user_regs_struct> {
        sys::release_abandoned(Duration::ZERO);
        if self.check_exec(Duration::ZERO) {
            return Err(Error::Exited {
                pid: self.process.pid(),
            });
        }
        let deadline = Instant::now() + timeout;
        let mut report = match self.threads.get(&tid) {
            Some(t) if matches!(t.state, State::Held { .. }) => return self.held_regs(tid),
            // Asked already: only the wait is left.
            Some(t) if t.asked.is_some() => None,
            // A stop may be waiting already (e.g. a system-call entry not
            // collected yet); then no interrupt is needed.
            Some(_) => sys::wait_nohang(tid),
            None => {
                self.seize(tid)?;
                None
            }
        };
        if report.is_none() {
            // From here the thread waits for us: run boosted before it
            // stops, so noticing its stop is not delayed either.
            self.request_stop(tid)?;
        }
        loop {
            // Checked here too: a flood of signals must not keep us past it.
            let r = match report.take() {
                Some(r) => Some(r),
                None if Instant::now() < deadline => sys::wait_until(tid, deadline),
                None => None,
            };
            let Some(r) = r else {
                return Err(self.stop_timeout(tid, timeout));
            };
            if let Some(regs) = self.on_stop_report(tid, r) {
                return regs;
            }
        }
    }

    /// Stops each of `threads` once, on its own, and hands it to `f` with
    /// its registers, or with why it could not be stopped
    /// ([`Error::ThreadExited`], [`Error::Timeout`] once `timeout` passed
    /// since it was asked, or `runnable_timeout` if it is runnable then,
    /// waiting for a core: it stays traced and asked). `f` lets the thread
    /// go ([`Tracer::resume`], [`Tracer::detach`]) and says whether the
    /// walk goes on; when it ends early, or on an error from `f`, the
    /// threads still asked stay asked.
    ///
    /// The threads are asked in order, `at_once` of them at first. A
    /// sleeping thread stops within microseconds of being asked, but one
    /// that waits for a core stops only when the scheduler next runs it
    /// (on a saturated machine, tens of milliseconds later): whenever none
    /// of the threads asked has stopped for [`ASK_MORE_AFTER`], one more is
    /// asked, so those waits overlap. Each thread is handed over as soon as
    /// it stops, in the order they stop, so a thread is held only while the
    /// threads that stopped just before it are handled.
    pub fn stop_each<E: From<Error>>(
        &mut self,
        threads: &[Tid],
        at_once: usize,
        timeout: Duration,
        runnable_timeout: Duration,
        f: &mut HandOver<'_, 'p, E>,
    ) -> std::result::Result<(), E> {
        let mut todo = threads.iter().copied();
        // Each thread asked: when, and when it times out.
        let mut asked: Vec<(Tid, Instant, Instant)> = Vec::new();
        let mut last = Instant::now();
        let mut backoff = Backoff::new();
        loop {
            sys::release_abandoned(Duration::ZERO);
            if self.check_exec(Duration::ZERO) {
                return Err(Error::Exited {
                    pid: self.process.pid(),
                }
                .into());
            }
            while asked.len() < at_once.max(1) || last.elapsed() >= ASK_MORE_AFTER {
                let Some(tid) = todo.next() else { break };
                last = Instant::now();
                match self.request_stop(tid) {
                    Ok(()) => asked.push((tid, last, last + timeout)),
                    Err(e) => {
                        if f(self, tid, Err(e))?.is_break() {
                            return Ok(());
                        }
                    }
                }
            }
            if asked.is_empty() {
                return Ok(());
            }
            let mut found = None;
            for (i, (tid, since, deadline)) in asked.iter_mut().enumerate() {
                if let Some(r) = self.collect(*tid) {
                    found = Some((i, r));
                    break;
                }
                if Instant::now() >= *deadline {
                    // A runnable thread stops as soon as it gets a core,
                    // which on a saturated machine can take longer.
                    let stat = self.process.thread_stat(*tid);
                    if stat.is_some_and(|s| s.state == 'R') && since.elapsed() < runnable_timeout {
                        *deadline += timeout;
                        continue;
                    }
                    found = Some((i, Err(self.stop_timeout(*tid, timeout))));
                    break;
                }
            }
            match found {
                Some((i, r)) => {
                    let (tid, _, _) = asked.remove(i);
                    if f(self, tid, r)?.is_break() {
                        return Ok(());
                    }
                    last = Instant::now();
                    backoff.reset();
                }
                None => {
                    let first = asked.iter().map(|&(_, _, deadline)| deadline).min();
                    let mut wake = first.unwrap_or(last);
                    if todo.len() > 0 {
                        wake = wake.min(last + ASK_MORE_AFTER);
                    }
                    backoff.sleep(wake);
                }
            }
        }
    }

    /// The stop of `tid` (asked for, or held already) if it has come,
    /// without waiting.
    fn collect(&mut self, tid: Tid) -> Option<Result<libc::user_regs_struct>> {
        match self.threads.get(&tid) {
            Some(t) if matches!(t.state, State::Held { .. }) => return Some(self.held_regs(tid)),
            Some(_) => {}
            None => return Some(Err(self.not_traced(tid))),
        }
        let r = sys::wait_nohang(tid)?;
        self.on_stop_report(tid, r)
    }

    fn stop_timeout(&self, tid: Tid, timeout: Duration) -> Error {
        // What the thread is doing says why (and, if it should have
        // stopped, helps find out why it did not).
        let doing = match self.process.thread_stat(tid).map(|s| s.state) {
            Some('D') => "it is in uninterruptible sleep".to_string(),
            Some('R') => "it is runnable, waiting for a core".to_string(),
            Some('t') => "it is in a ptrace-stop".to_string(),
            Some('T') => "it is stopped by a signal".to_string(),
            Some(c) => format!("its state is {c}"),
            None => "it is gone".to_string(),
        };
        Error::Timeout {
            what: format!(
                "stopping thread {tid} of process {}: it did not stop within {timeout:?} ({doing}); it stays traced and is resumed when it stops",
                self.process.pid()
            ),
        }
    }

    /// A report about `tid`, which was asked to stop: its registers once it
    /// is held, `None` while its stop is still to come (a signal it was
    /// about to take is delivered first, as the kernel would have, and the
    /// stop asked again).
    fn on_stop_report(&mut self, tid: Tid, r: Report) -> Option<Result<libc::user_regs_struct>> {
        let group = match r {
            Report::Gone => return Some(Err(self.gone(tid))),
            Report::GroupStop(_) => true,
            Report::Interrupt | Report::Signal(SYSCALL_STOP) => false,
            Report::PtraceEvent(ev) => {
                if ev == libc::PTRACE_EVENT_CLONE {
                    self.note_clone(tid);
                }
                false
            }
            Report::Signal(sig) => {
                // Deliver it as the kernel was about to; the stop consumed
                // our interrupt, so ask again: the thread stops once the
                // delivery is set up, before any user code.
                let how = self.threads[&tid].how;
                if restart(tid, how, sig).is_ok() {
                    let _ = sys::interrupt(tid);
                }
                return None;
            }
        };
        let asked = self.threads.get(&tid).and_then(|t| t.asked);
        self.set_state(tid, State::Held { group });
        if let Some(t) = self.threads.get_mut(&tid) {
            t.held_since = asked.or(t.held_since);
            t.asked = None;
        }
        Some(self.held_regs(tid))
    }

    /// `tid` is at the stop that reports a thread it created: that thread
    /// is traced already (births are watched) and its first stop is its
    /// birth.
    fn note_clone(&mut self, tid: Tid) {
        if let Ok(child) = sys::event_msg(tid) {
            let child = child as Tid;
            let start_time = self.process.thread_stat(child).map_or(0, |s| s.start_time);
            self.threads.entry(child).or_insert(Traced {
                how: Resume::Run,
                state: State::Running,
                start_time,
                held_since: None,
                asked: None,
                unborn: true,
            });
        }
    }

    /// Moves a held thread to `pc` (its other registers unchanged): out of
    /// bytes about to be overwritten, into an equivalent copy of them.
    pub fn set_pc(&mut self, tid: Tid, pc: u64) -> Result<()> {
        match self.threads.get(&tid) {
            Some(t) if matches!(t.state, State::Held { .. }) => {}
            _ => {
                return Err(Error::InvalidArgument {
                    what: format!("thread {tid} is not held"),
                })
            }
        }
        let mut regs = self.held_regs(tid)?;
        regs.rip = pc;
        match sys::setregs(tid, &regs) {
            Ok(()) => Ok(()),
            Err(Errno::ESRCH) => Err(self.lost(tid)),
            Err(errno) => Err(Error::ptrace("SETREGS", tid, errno)),
        }
    }

    /// Lets a thread held by [`Tracer::stop`] or at a reported
    /// [`TraceEvent::SyscallEntry`] run again in mode `how`. A thread in a
    /// group-stop stays stopped with its process (`PTRACE_LISTEN`) and runs
    /// in mode `how` after `SIGCONT`.
    ///
    /// Errors: [`Error::ThreadExited`] if it was killed while held,
    /// [`Error::InvalidArgument`] if it is not traced here or not stopped.
    pub fn resume(&mut self, tid: Tid, how: Resume) -> Result<()> {
        let Some(t) = self.threads.get_mut(&tid) else {
            return Err(self.not_traced(tid));
        };
        let State::Held { group } = t.state else {
            return Err(Error::InvalidArgument {
                what: format!("thread {tid} is not stopped (stop it first)"),
            });
        };
        t.how = how;
        let (request, result) = if group {
            ("LISTEN", sys::listen(tid))
        } else {
            (request_name(how), restart(tid, how, 0))
        };
        match result {
            Ok(()) => {
                if let Some(since) = t.held_since.take() {
                    crate::hold::record_thread(
                        crate::hold::ThreadHold::Checked,
                        tid,
                        since.elapsed(),
                    );
                }
                t.state = if group {
                    State::Listening
                } else {
                    State::Running
                };
                self.update_boost();
                Ok(())
            }
            Err(Errno::ESRCH) => Err(self.lost(tid)),
            Err(errno) => Err(Error::ptrace(request, tid, errno)),
        }
    }

    /// Stops tracing `tid` (interrupting it first if it is running); it
    /// continues as before. A running thread that does not stop within a
    /// second (uninterruptible sleep) is detached as soon as it stops (see
    /// [`Process::release_abandoned_threads`]) and [`Error::Timeout`]
    /// returned. [`Error::ThreadExited`] if it is gone.
    pub fn detach(&mut self, tid: Tid) -> Result<()> {
        let Some(t) = self.threads.get(&tid).copied() else {
            return Err(self.not_traced(tid));
        };
        if let State::Held { .. } = t.state {
            return match sys::detach(tid, 0) {
                Ok(()) => {
                    if let Some(since) = t.held_since {
                        crate::hold::record_thread(
                            crate::hold::ThreadHold::Checked,
                            tid,
                            since.elapsed(),
                        );
                    }
                    self.threads.remove(&tid);
                    self.update_boost();
                    Ok(())
                }
                Err(Errno::ESRCH) => Err(self.lost(tid)),
                Err(errno) => Err(Error::ptrace("DETACH", tid, errno)),
            };
        }
        self.threads.remove(&tid);
        let _ = sys::interrupt(tid);
        let sig = match sys::wait_until(tid, Instant::now() + DETACH_WAIT) {
            None => {
                sys::abandon(tid);
                return Err(Error::Timeout {
                    what: format!(
                        "detaching thread {tid} of process {}: it did not stop within {DETACH_WAIT:?} (uninterruptible sleep?); it is detached as soon as it stops",
                        self.process.pid()
                    ),
                });
            }
            Some(Report::Gone) => {
                self.after_gone(tid);
                return Err(self.process.vanished(tid));
            }
            // A signal-delivery-stop's signal goes along with the detach.
            Some(Report::Signal(sig)) if sig != SYSCALL_STOP => sig,
            Some(_) => 0,
        };
        match sys::detach(tid, sig) {
            Ok(()) => Ok(()),
            Err(errno) => {
                if !sys::reap(tid, Duration::from_millis(100)) {
                    sys::abandon(tid);
                }
                if errno == Errno::ESRCH {
                    Err(self.process.vanished(tid))
                } else {
                    Err(Error::ptrace("DETACH", tid, errno))
                }
            }
        }
    }

    /// Waits at most `timeout` for the next [`TraceEvent`] among all traced
    /// threads, handling every other stop (see the module documentation).
    /// `None` on timeout (also when nothing is traced: it still waits, so a
    /// polling loop does not spin).
    pub fn next_event(&mut self, timeout: Duration) -> Result<Option<TraceEvent>> {
        sys::release_abandoned(Duration::ZERO);
        // A look without waiting, with nothing to report: no scan of every
        // tracee (a caller may look after each of hundreds of threads).
        if timeout.is_zero()
            && self.exited.is_empty()
            && self.last_check.elapsed() < CHECK_INTERVAL
            && !sys::any_report()
        {
            return Ok(None);
        }
        let deadline = Instant::now() + timeout;
        let mut backoff = Backoff::new();
        loop {
            if let Some(tid) = self.exited.pop_front() {
                return Ok(Some(TraceEvent::Exited(tid)));
            }
            if self.last_check.elapsed() >= CHECK_INTERVAL {
                self.last_check = Instant::now();
                self.check_unreported_ends();
                if !self.exited.is_empty() {
                    continue;
                }
            }
            let after = self
                .threads
                .range((Bound::Excluded(self.cursor), Bound::Unbounded));
            let order: Vec<Tid> = after
                .chain(self.threads.range(..=self.cursor))
                .map(|(&t, _)| t)
                .collect();
            let mut progressed = false;
            for tid in order {
                if !self.threads.contains_key(&tid) {
                    continue; // let go after an exec
                }
                let Some(report) = sys::wait_nohang(tid) else {
                    continue;
                };
                progressed = true;
                if let Some(event) = self.handle(tid, report)? {
                    self.cursor = tid;
                    return Ok(Some(event));
                }
            }
            if Instant::now() >= deadline {
                return Ok(self.exited.pop_front().map(TraceEvent::Exited));
            }
            if progressed {
                backoff.reset();
            } else {
                backoff.sleep(deadline);
            }
        }
    }

    /// Handles one report about a traced thread; returns the event to
    /// report, if it is one.
    fn handle(&mut self, tid: Tid, report: Report) -> Result<Option<TraceEvent>> {
        // Whatever stop this is, it consumed an interrupt we asked for.
        if let Some(t) = self.threads.get_mut(&tid) {
            t.asked = None;
        }
        let t = self.threads[&tid];
        if report == Report::Gone {
            self.threads.remove(&tid);
            self.after_gone(tid);
            return Ok(Some(TraceEvent::Exited(tid)));
        }
        // A held thread cannot stop again: the thread behind this id is not
        // the one we held (after an exec the exec'ing thread takes over the
        // process id). Handle its stop as a running thread's, then look for
        // the exec, which lets it go.
        let stranger = matches!(t.state, State::Held { .. });
        let at_entry = report == Report::Signal(SYSCALL_STOP)
            && t.how == Resume::TraceSyscalls
            && !stranger
            && sys::at_syscall_entry(tid) == Ok(true);
        // These fail only if the thread was killed meanwhile: it is then
        // resumed (ESRCH) below and the next wait reports its end.
        if let Some(regs) = at_entry.then(|| sys::getregs(tid).ok()).flatten() {
            self.set_state(tid, State::Held { group: false });
            return Ok(Some(TraceEvent::SyscallEntry { tid, regs }));
        }
        // The first stop of a thread created by a tracee: its birth.
        if t.unborn && report == Report::Interrupt {
            if let Some(c) = self.threads.get_mut(&tid) {
                c.unborn = false;
            }
            if let Ok(regs) = sys::getregs(tid) {
                self.set_state(tid, State::Held { group: false });
                return Ok(Some(TraceEvent::Born { tid, regs }));
            }
        }
        if report == Report::PtraceEvent(libc::PTRACE_EVENT_CLONE) {
            self.note_clone(tid);
        }
        let (state, request, result) = match report {
            Report::Gone => unreachable!("handled above"),
            Report::GroupStop(_) => (State::Listening, "LISTEN", sys::listen(tid)),
            Report::Signal(SYSCALL_STOP) | Report::Interrupt | Report::PtraceEvent(_) => {
                (State::Running, request_name(t.how), restart(tid, t.how, 0))
            }
            // Deliver it exactly as the kernel was about to.
            Report::Signal(sig) => (
                State::Running,
                request_name(t.how),
                restart(tid, t.how, sig),
            ),
        };
        match result {
            // ESRCH: killed meanwhile; the next wait reports the end.
            Ok(()) | Err(Errno::ESRCH) => self.set_state(tid, state),
            Err(errno) => {
                let group = matches!(report, Report::GroupStop(_));
                self.set_state(tid, State::Held { group });
                return Err(Error::ptrace(request, tid, errno));
            }
        }
        if stranger {
            self.check_exec(EXEC_WAIT);
        }
        Ok(None)
    }

    fn set_state(&mut self, tid: Tid, state: State) {
        self.set_state_inner(tid, state);
        self.update_boost();
    }

    fn set_state_inner(&mut self, tid: Tid, state: State) {
        if let Some(t) = self.threads.get_mut(&tid) {
            let held = matches!(state, State::Held { .. });
            if held && t.held_since.is_none() {
                t.held_since = Some(Instant::now());
            }
            if !held {
                if let Some(since) = t.held_since.take() {
                    crate::hold::record_thread(
                        crate::hold::ThreadHold::Checked,
                        tid,
                        since.elapsed(),
                    );
                }
            }
            t.state = state;
        }
    }

    /// Seizes `tid`, reading `/proc` once (after the seize: a traced
    /// thread's id cannot be reused, so the thread read is the one seized).
    /// A `/proc` read costs tens of µs, and suture's windows seize every
    /// thread of the process.
    fn seize(&mut self, tid: Tid) -> Result<()> {
        let seize = if self.births {
            sys::seize_tracesysgood_clone
        } else {
            sys::seize_tracesysgood
        };
        let tgid = self.process.pid();
        if let Err(errno) = sys::seize_fresh(tid, |t| seize(tgid, t)) {
            if self.process.thread_stat(tid).is_none_or(|s| s.is_dead()) {
                return Err(self.process.vanished(tid));
            }
            return Err(self.process.seize_error(tid, errno));
        }
        // Read under our own process's task list: a thread id reused by
        // another process since it was listed is not found there.
        let Some(stat) = self.process.thread_stat(tid).filter(|s| !s.is_dead()) else {
            sys::abandon(tid);
            return Err(self.process.vanished(tid));
        };
        self.threads.insert(
            tid,
            Traced {
                how: Resume::Run,
                state: State::Running,
                start_time: stat.start_time,
                held_since: None,
                asked: None,
                unborn: false,
            },
        );
        Ok(())
    }

    fn held_regs(&mut self, tid: Tid) -> Result<libc::user_regs_struct> {
        match sys::getregs(tid) {
            Ok(regs) => Ok(regs),
            Err(Errno::ESRCH) => Err(self.lost(tid)),
            Err(errno) => Err(Error::ptrace("GETREGS", tid, errno)),
        }
    }

    /// A thread we held refused a request: it was killed. Reap it.
    fn lost(&mut self, tid: Tid) -> Error {
        self.threads.remove(&tid);
        if !sys::reap(tid, Duration::from_millis(100)) {
            sys::abandon(tid);
        }
        self.gone(tid)
    }

    /// `tid` is gone (and reaped): forget it and report why.
    fn gone(&mut self, tid: Tid) -> Error {
        self.threads.remove(&tid);
        self.after_gone(tid);
        self.process.vanished(tid)
    }

    /// After `tid` vanished: if that was an exec by a traced thread (it now
    /// runs under the process id, traced by us), give the exec a moment to
    /// complete so that thread is let go.
    fn after_gone(&mut self, tid: Tid) {
        let pid = self.process.pid();
        let suspect = tid != pid
            && self.process.tracer_of(pid) == Some(sys::gettid())
            && self.threads.get(&pid).is_none_or(|t| {
                self.process.thread_stat(pid).map(|s| s.start_time) != Some(t.start_time)
            });
        self.check_exec(if suspect { EXEC_WAIT } else { Duration::ZERO });
    }

    /// If the process exec'd (or exited), waiting at most `wait` for that:
    /// reports every tracee exited, lets each go, and lets go of an exec'ing
    /// tracee now running under the process id. Returns whether it did.
    fn check_exec(&mut self, wait: Duration) -> bool {
        let deadline = Instant::now() + wait;
        let mut backoff = Backoff::new();
        while !self.process.address_space_gone() {
            if Instant::now() >= deadline {
                return false;
            }
            backoff.sleep(deadline);
        }
        let pid = self.process.pid();
        let ours = self.process.tracer_of(pid) == Some(sys::gettid());
        for (tid, t) in std::mem::take(&mut self.threads) {
            self.exited.push_back(tid);
            // After an exec by an untraced thread the old main thread is
            // gone (released by the kernel) and its id names that thread.
            if tid != pid || ours {
                release(tid, t.state);
            }
        }
        if ours {
            sys::abandon(pid);
        }
        sys::release_abandoned(Duration::ZERO);
        true
    }

    /// Ends no wait reports: the main thread exiting while others live on
    /// (a zombie reports only with the last thread), an exec.
    fn check_unreported_ends(&mut self) {
        if self.check_exec(Duration::ZERO) {
            return;
        }
        let dead: Vec<Tid> = self
            .threads
            .keys()
            .copied()
            .filter(|&t| self.process.thread_stat(t).is_none_or(|s| s.is_dead()))
            .collect();
        for tid in dead {
            self.threads.remove(&tid);
            self.exited.push_back(tid);
            if self.process.tracer_of(tid) == Some(sys::gettid()) {
                // A zombie: reaped once the whole process is gone.
                sys::abandon(tid);
            }
        }
    }

    fn not_traced(&self, tid: Tid) -> Error {
        Error::InvalidArgument {
            what: format!(
                "thread {tid} of process {} is not traced by this tracer",
                self.process.pid()
            ),
        }
    }
}

/// Resumes a thread in mode `how`, delivering `sig` (0: none).
fn restart(tid: Tid, how: Resume, sig: i32) -> nix::Result<()> {
    match how {
        Resume::Run => sys::cont(tid, sig),
        Resume::TraceSyscalls => sys::syscall(tid, sig),
    }
}

fn request_name(how: Resume) -> &'static str {
    match how {
        Resume::Run => "CONT",
        Resume::TraceSyscalls => "SYSCALL",
    }
}

/// Lets go of a thread we no longer track: a held one is detached now, a
/// running one is interrupted and detached once it stops (`sys::abandon`).
fn release(tid: Tid, state: State) {
    match state {
        State::Held { .. } => {
            if sys::detach(tid, 0).is_err() && !sys::reap(tid, Duration::from_millis(50)) {
                sys::abandon(tid);
            }
        }
        State::Running | State::Listening => sys::abandon(tid),
    }
}

impl std::fmt::Debug for Tracer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracer")
            .field("pid", &self.process.pid())
            .field("threads", &self.threads)
            .finish_non_exhaustive()
    }
}

impl Drop for Tracer<'_> {
    fn drop(&mut self) {
        for (tid, t) in std::mem::take(&mut self.threads) {
            release(tid, t.state);
        }
        sys::release_abandoned(DETACH_WAIT);
    }
}
