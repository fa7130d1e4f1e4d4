//! The transition worker (kernel: the delayed work that retries
//! transitions): a detached process, started by the command that began a
//! transition, that keeps the pending threads traced, checks each one when
//! it reaches a dispatch trap and all of them about every second, and
//! completes the transition. It holds the target's lock while it runs and
//! exits when the transition is over, when the target dies, or when a
//! command asks it to (SIGTERM) to take over (reverse, force).
//!
//! If the worker is killed, the kernel detaches its tracees and the target
//! runs on: pending threads keep running the old code, consistently. The
//! next command that waits on the transition starts a new worker.

use crate::lock;
use crate::ops::{finish, Intent, Session};
use crate::record::WorkerRecord;
use crate::transition::Driver;
use crate::Error;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use suture_process::{Process, TraceEvent};

/// Period of the full sweep over pending threads (kernel: one second).
const SWEEP: Duration = Duration::from_secs(1);
/// A traced pending thread is checked at an ordinary system call at most
/// this often (at a dispatch trap, always).
const SYSCALL_CHECK: Duration = Duration::from_millis(20);
/// The record is saved at most this often while threads switch.
const SAVE_EVERY: Duration = Duration::from_millis(100);
/// How long a command waits for a worker to let go.
const STOP_WAIT: Duration = Duration::from_secs(5);

static TERM: AtomicBool = AtomicBool::new(false);

extern "C" fn on_term(_: libc::c_int) {
    TERM.store(true, Ordering::SeqCst);
}

/// Whether the worker a record names is alive and working on `target`.
pub fn alive(w: &WorkerRecord, target: i32) -> bool {
    w.target == target
        && Process::open(w.pid).is_ok_and(|p| p.start_time() == w.start_time && p.is_alive())
}

/// Ask a worker to let go of its process and wait until it has exited
/// (killing it if it does not: the target is safe either way).
pub fn stop(w: &WorkerRecord) -> Result<(), Error> {
    let exits_after = |sig: libc::c_int| {
        // SAFETY: kill(2) with a pid and signal number; no memory is involved.
        unsafe { libc::kill(w.pid, sig) };
        let deadline = Instant::now() + STOP_WAIT;
        while Instant::now() < deadline {
            if !alive(w, w.target) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    };
    if exits_after(libc::SIGTERM) || exits_after(libc::SIGKILL) {
        return Ok(());
    }
    Err(Error::Other(format!(
        "the transition worker (pid {}) of process {} does not exit; try again",
        w.pid, w.target
    )))
}

/// Start a detached worker for `pid`: this same program run as
/// `suture __worker PID`, in a session of its own, its output going to a
/// log file next to the target's lock.
pub fn spawn(proc: &Process) -> Result<(), Error> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().map_err(|e| {
        Error::Other(format!(
            "cannot find the suture program to start its worker: {e}"
        ))
    })?;
    let log_path = lock::path_for(proc, "worker.log")?;
    let log = std::fs::File::create(&log_path)
        .map_err(|e| Error::Other(format!("cannot create {}: {e}", log_path.display())))?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("__worker")
        .arg(proc.pid().to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log);
    // SAFETY: setsid is async-signal-safe and touches no memory of ours;
    // it detaches the worker from the terminal of the command.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    cmd.spawn()
        .map_err(|e| Error::Other(format!("cannot start the transition worker: {e}")))?;
    Ok(())
}

/// The worker's main loop.
pub fn run(pid: i32) -> Result<(), Error> {
    // SAFETY: installs a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGTERM, on_term as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
    }
    let mut s = Session::open(pid, Intent::TakeOver)?;
    if s.rec.model.transition().is_none() {
        return Ok(());
    }
    let me = Process::open(std::process::id() as i32)?;
    let record = WorkerRecord {
        pid: me.pid(),
        start_time: me.start_time(),
        target: pid,
    };
    let done = drive(&mut s, record)?;
    if !done {
        // Asked to stop, or the target is gone: leave the record saying
        // that no worker runs.
        if let Some(t) = s.rec.transition.as_mut() {
            t.worker = None;
        }
        if s.proc.is_alive() {
            s.save()?;
        }
    }
    Ok(())
}

/// Retry until the transition completes (true) or the worker must stop.
/// The worker names itself in the record only once its first pass has put
/// every pending thread under its watch: from then on a pending thread that
/// calls a function in transition is caught at the trap.
fn drive(s: &mut Session, me: WorkerRecord) -> Result<bool, Error> {
    let mut announced = false;
    loop {
        let finished = {
            let Session {
                proc, rec, store, ..
            } = &mut *s;
            let mut tracer = proc.tracer();
            let mut d = Driver::new(proc, rec)?;
            let mut last_check: std::collections::BTreeMap<i32, Instant> = Default::default();
            let mut last_save = Instant::now();
            let mut next_sweep = Instant::now();
            let mut stop = false;
            loop {
                if TERM.load(Ordering::SeqCst) || !proc.is_alive() {
                    stop = true;
                    break;
                }
                if Instant::now() >= next_sweep {
                    d.reconcile(&mut tracer, true)?;
                    d.sweep(&mut tracer, true)?;
                    next_sweep = Instant::now() + SWEEP;
                    if !announced {
                        // The pending threads are traced now: their traps
                        // can be caught.
                        d.enable_traps()?;
                        if let Some(t) = d.rec.transition.as_mut() {
                            t.worker = Some(me.clone());
                        }
                        crate::store::write(proc, store.expect("a transition has a store"), d.rec)?;
                        d.dirty = false;
                        announced = true;
                    }
                }
                if d.pending().is_empty() {
                    break;
                }
                if d.dirty && last_save.elapsed() >= SAVE_EVERY {
                    crate::store::write(proc, store.expect("a transition has a store"), d.rec)?;
                    d.dirty = false;
                    last_save = Instant::now();
                }
                let wait = next_sweep
                    .saturating_duration_since(Instant::now())
                    .min(Duration::from_millis(50));
                match tracer.next_event(wait)? {
                    Some(TraceEvent::SyscallEntry { tid, regs }) => {
                        let due = last_check
                            .get(&tid)
                            .is_none_or(|t| t.elapsed() >= SYSCALL_CHECK);
                        if due {
                            last_check.insert(tid, Instant::now());
                        }
                        d.on_syscall(&mut tracer, tid, &regs, due)?;
                    }
                    Some(TraceEvent::Exited(tid)) => d.on_exit(tid),
                    // The worker does not watch births.
                    Some(TraceEvent::Born { tid, .. }) => tracer.detach(tid)?,
                    None => {}
                }
            }
            if d.dirty {
                crate::store::write(proc, store.expect("a transition has a store"), d.rec)?;
            }
            drop(d);
            drop(tracer);
            if stop {
                return Ok(false);
            }
            true
        };
        if finished && finish(s, false)?.is_some() {
            return Ok(true);
        }
        // A thread the completion stop found still pending (a new thread
        // reusing a pending thread pointer): go on.
    }
}
