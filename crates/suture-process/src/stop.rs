//! Holding every thread of the target in a ptrace-stop.
//!
//! Threads are seized with `PTRACE_O_TRACECLONE`, so a thread created while
//! we work is attached (and stopped) automatically; `/proc/PID/task` is
//! listed again until a pass finds no thread we do not hold. Threads that
//! exit meanwhile are dropped (and reaped).
//!
//! Signals: a signal that reaches a thread before it stops (a
//! signal-delivery-stop) is handed straight back to the kernel, which
//! delivers it as it would have without us; a fresh interrupt (any
//! ptrace-stop consumes a pending one) then stops the thread before it runs
//! any user code (its registers then show the handler about to run). Signals sent while all threads are held stay
//! pending in the kernel and are delivered normally after the detach. So
//! each signal is delivered exactly once.

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::time::{Duration, Instant};

use nix::errno::Errno;

use crate::sys::{self, Backoff, Report};
use crate::{Error, Liveness, Process, Result, Tid};

enum ThreadState {
    /// Seized, interrupt requested, not yet stopped.
    Running,
    /// Held in an interrupt-stop or group-stop.
    Stopped(Box<libc::user_regs_struct>),
}

/// Every thread of the process held in a ptrace-stop (for the short moment
/// of a code write). Resumes and detaches on [`StoppedProcess::resume`] or
/// on drop.
///
/// `!Send`: ptrace binds the tracees to the thread that created this.
pub struct StoppedProcess<'p> {
    process: &'p Process,
    threads: BTreeMap<Tid, libc::user_regs_struct>,
    done: bool,
    /// When the first thread was asked to stop.
    first_interrupt: Instant,
    /// When the last thread was seen stopped.
    all_stopped: Instant,
    _boost: crate::boost::Boost,
    _not_send: PhantomData<*const ()>,
}

impl Process {
    /// Seizes and stops every thread of the process, waiting at most
    /// `timeout` in all. On any failure every thread is resumed and
    /// detached before the error is returned.
    pub fn stop_all(&self, timeout: Duration) -> Result<StoppedProcess<'_>> {
        sys::release_abandoned(Duration::ZERO);
        self.ensure_alive()?;
        let boost = crate::boost::Boost::new();
        let deadline = Instant::now() + timeout;
        let mut attached: BTreeMap<Tid, ThreadState> = BTreeMap::new();
        let mut first_interrupt = None;
        match self.stop_all_inner(&mut attached, &mut first_interrupt, deadline, timeout) {
            Ok(()) => {
                let threads = attached
                    .into_iter()
                    .filter_map(|(tid, st)| match st {
                        ThreadState::Stopped(regs) => Some((tid, *regs)),
                        ThreadState::Running => None,
                    })
                    .collect();
                let all_stopped = Instant::now();
                Ok(StoppedProcess {
                    process: self,
                    threads,
                    done: false,
                    first_interrupt: first_interrupt.unwrap_or(all_stopped),
                    all_stopped,
                    _boost: boost,
                    _not_send: PhantomData,
                })
            }
            Err(e) => {
                release_all(&mut attached);
                Err(e)
            }
        }
    }

    /// Seizes every listed thread first (which does not stop it), then asks
    /// them all to stop in one quick pass, so the first thread stopped
    /// waits only for the others to reach their stop, not for our seizing.
    fn stop_all_inner(
        &self,
        attached: &mut BTreeMap<Tid, ThreadState>,
        first_interrupt: &mut Option<Instant>,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<()> {
        let me = sys::gettid();
        loop {
            let mut seized = Vec::new();
            for tid in self.threads()? {
                if attached.contains_key(&tid) {
                    continue;
                }
                match sys::seize(self.pid(), tid, true) {
                    Ok(()) => {
                        attached.insert(tid, ThreadState::Running);
                        seized.push(tid);
                    }
                    // Exited since the listing.
                    Err(Errno::ESRCH) => {}
                    Err(Errno::EPERM) if self.tracer_of(tid) == Some(me) => {
                        // Auto-attached through PTRACE_O_TRACECLONE before we
                        // saw its creator's clone event (its first stop is
                        // coming on its own).
                        attached.insert(tid, ThreadState::Running);
                    }
                    Err(errno) => {
                        if self.thread_stat(tid).is_none_or(|s| s.is_dead()) {
                            continue; // a zombie or exited thread
                        }
                        return Err(self.seize_error(tid, errno));
                    }
                }
            }
            let found_new =
                !seized.is_empty() || attached.values().any(|s| matches!(s, ThreadState::Running));
            if !seized.is_empty() {
                first_interrupt.get_or_insert_with(Instant::now);
            }
            for tid in seized {
                // ESRCH here: it is dying; the wait below reaps it.
                let _ = sys::interrupt(tid);
            }
            if !found_new {
                // A pass found no thread we do not hold, and every thread we
                // hold is stopped (so none can create another).
                break;
            }
            self.wait_all_stopped(attached, deadline, timeout)?;
        }
        if attached.is_empty() || !self.is_alive() {
            return Err(Error::Exited { pid: self.pid() });
        }
        Ok(())
    }

    /// Waits until every attached thread is stopped (threads that exit are
    /// dropped; threads they create are added).
    fn wait_all_stopped(
        &self,
        attached: &mut BTreeMap<Tid, ThreadState>,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<()> {
        let mut backoff = Backoff::new();
        let mut idle_rounds = 0u32;
        loop {
            let running: Vec<Tid> = attached
                .iter()
                .filter(|(_, s)| matches!(s, ThreadState::Running))
                .map(|(&t, _)| t)
                .collect();
            if running.is_empty() {
                if attached.is_empty() {
                    return Err(Error::Exited { pid: self.pid() });
                }
                return Ok(());
            }
            let mut progressed = false;
            for tid in running {
                let Some(ev) = sys::wait_nohang(tid) else {
                    continue;
                };
                progressed = true;
                match ev {
                    Report::Gone => {
                        attached.remove(&tid);
                    }
                    Report::Interrupt | Report::GroupStop(_) => {
                        // getregs fails only if the thread was killed while
                        // stopped; the next wait then reaps it.
                        if let Ok(regs) = sys::getregs(tid) {
                            attached.insert(tid, ThreadState::Stopped(Box::new(regs)));
                        }
                    }
                    Report::Signal(sig) => {
                        // Deliver it now, as the kernel was about to. Any
                        // ptrace-stop consumes a pending PTRACE_INTERRUPT,
                        // so interrupt again: the thread stops right after
                        // the kernel has set up the delivery.
                        if sys::cont(tid, sig).is_ok() {
                            let _ = sys::interrupt(tid);
                        }
                    }
                    Report::PtraceEvent(ev) => {
                        if ev == libc::PTRACE_EVENT_CLONE {
                            if let Ok(new) = sys::event_msg(tid) {
                                // Auto-attached; it starts with a stop of its own.
                                attached.entry(new as Tid).or_insert(ThreadState::Running);
                            }
                        }
                        // Finish the clone, then stop (this event stop
                        // consumed the earlier interrupt).
                        if sys::cont(tid, 0).is_ok() {
                            let _ = sys::interrupt(tid);
                        }
                    }
                }
            }
            if progressed {
                backoff.reset();
                idle_rounds = 0;
                continue;
            }
            if Instant::now() >= deadline {
                let stuck: Vec<String> = attached
                    .iter()
                    .filter(|(_, s)| matches!(s, ThreadState::Running))
                    .map(|(t, _)| {
                        let state = self.thread_stat(*t).map_or('?', |s| s.state);
                        format!("{t} (state {state})")
                    })
                    .collect();
                return Err(Error::Timeout {
                    what: format!(
                        "stopping all threads of process {}: thread(s) {} did not stop within {timeout:?} (uninterruptible sleep?)",
                        self.pid(),
                        stuck.join(", ")
                    ),
                });
            }
            idle_rounds += 1;
            if idle_rounds % 64 == 0 {
                // A main thread that called pthread_exit is a zombie that
                // never reports; and the whole process may be gone.
                if self.liveness() != Liveness::Alive {
                    return Err(Error::Exited { pid: self.pid() });
                }
                let dead: Vec<Tid> = attached
                    .iter()
                    .filter(|(t, s)| {
                        matches!(s, ThreadState::Running)
                            && self.thread_stat(**t).is_none_or(|st| st.is_dead())
                    })
                    .map(|(&t, _)| t)
                    .collect();
                for tid in dead {
                    attached.remove(&tid);
                    sys::abandon(tid);
                }
            }
            backoff.sleep(deadline);
        }
    }
}

/// Detaches every held thread; threads still running are given a short
/// grace to reach their pending stop, then left to
/// [`Process::release_abandoned_threads`]. Returns the first error.
fn release_all(attached: &mut BTreeMap<Tid, ThreadState>) -> Option<Errno> {
    let mut first_err = None;
    let mut running = Vec::new();
    for (tid, st) in std::mem::take(attached) {
        match st {
            ThreadState::Stopped(_) => {
                if let Err(errno) = sys::detach(tid, 0) {
                    // ESRCH: it was killed while held; reap it.
                    if !sys::reap(tid, Duration::from_millis(50)) {
                        sys::abandon(tid);
                    }
                    first_err.get_or_insert(errno);
                }
            }
            ThreadState::Running => running.push(tid),
        }
    }
    // Running threads have an interrupt pending: they stop shortly (unless
    // stuck in the kernel) and are detached then.
    for tid in running {
        sys::abandon(tid);
    }
    sys::release_abandoned(Duration::from_secs(1));
    first_err
}

impl StoppedProcess<'_> {
    /// The held threads, sorted.
    pub fn threads(&self) -> Vec<Tid> {
        self.threads.keys().copied().collect()
    }

    /// The registers of a held thread, captured when it stopped.
    pub fn regs(&self, tid: Tid) -> Option<libc::user_regs_struct> {
        self.threads.get(&tid).copied()
    }

    /// Move a held thread to `pc` (the rest of its registers unchanged):
    /// used to step a thread out of bytes about to be overwritten into an
    /// equivalent copy of them.
    pub fn set_pc(&mut self, tid: Tid, pc: u64) -> Result<()> {
        let Some(regs) = self.threads.get_mut(&tid) else {
            return Err(Error::InvalidArgument {
                what: format!("thread {tid} is not held"),
            });
        };
        let mut new = *regs;
        new.rip = pc;
        sys::setregs(tid, &new).map_err(|e| {
            Error::io(
                format!("setting the registers of thread {tid}"),
                std::io::Error::from_raw_os_error(e as i32),
            )
        })?;
        *regs = new;
        Ok(())
    }

    /// The program counter of every held thread.
    pub fn pcs(&self) -> Vec<(Tid, u64)> {
        self.threads.iter().map(|(&t, r)| (t, r.rip)).collect()
    }

    /// The process these threads belong to.
    pub fn process(&self) -> &Process {
        self.process
    }

    /// Resumes and detaches every thread. Signals that arrived while they
    /// were held are delivered by the kernel as usual. Also done on drop.
    pub fn resume(mut self) -> Result<()> {
        self.resume_inner()
    }

    fn resume_inner(&mut self) -> Result<()> {
        if self.done {
            return Ok(());
        }
        self.done = true;
        let mut attached: BTreeMap<Tid, ThreadState> = std::mem::take(&mut self.threads)
            .into_iter()
            .map(|(t, r)| (t, ThreadState::Stopped(Box::new(r))))
            .collect();
        let threads = attached.len();
        let first_release = Instant::now();
        let released = release_all(&mut attached);
        crate::hold::record_whole(
            threads,
            self.first_interrupt.elapsed(),
            first_release.saturating_duration_since(self.all_stopped),
        );
        match released {
            None => Ok(()),
            Some(Errno::ESRCH) => {
                if self.process.is_alive() {
                    Ok(()) // a thread was killed; the others run on
                } else {
                    Err(Error::Exited {
                        pid: self.process.pid(),
                    })
                }
            }
            Some(errno) => Err(Error::io(
                format!(
                    "detaching from process {} (some threads may remain stopped until this thread exits)",
                    self.process.pid()
                ),
                std::io::Error::from_raw_os_error(errno as i32),
            )),
        }
    }
}

impl std::fmt::Debug for StoppedProcess<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoppedProcess")
            .field("pid", &self.process.pid())
            .field("threads", &self.threads())
            .finish_non_exhaustive()
    }
}

impl Drop for StoppedProcess<'_> {
    fn drop(&mut self) {
        let _ = self.resume_inner();
    }
}
