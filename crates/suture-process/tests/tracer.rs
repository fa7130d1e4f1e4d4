//! The per-thread tracer on real processes: system-call entries, transparent
//! restarts, signals, group-stops, exits, execs, a tracer that dies.

mod common;

use std::io::{BufRead, BufReader};
use std::ops::ControlFlow;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{Target, ANSWER_TIMEOUT};
use suture_process::{Error, Process, Resume, Tid, TraceEvent, Tracer};

const T: Duration = Duration::from_secs(10);

// Fields of `shared` in tracee.c (8 bytes each).
const LOOPS: u64 = 0;
const SLEEPS: u64 = 1;
const SLEEP_ERRORS: u64 = 2;
const USR1: u64 = 3;
const SIG_LOOPS: u64 = 4;
const PIPE_READS: u64 = 5;
const PIPE_LEN: u64 = 6;
const PIPE_ERRNO: u64 = 7;
const SPAWNED: u64 = 8;
const PIPE_DATA: u64 = 9;

const SYS_READ: u64 = libc::SYS_read as u64;
const SYS_GETPID: u64 = libc::SYS_getpid as u64;
const SYS_EXECVE: u64 = libc::SYS_execve as u64;

struct Tracee {
    target: Target,
    process: Process,
    shared: u64,
    looper: Tid,
    reader: Tid,
    sleeper: Tid,
    signalled: Tid,
    execer: Tid,
    vforker: Tid,
}

impl Tracee {
    fn start() -> Tracee {
        let target = Target::start("tracee");
        let tid = |k: &str| target.info(k).parse::<Tid>().unwrap();
        let process = Process::open(target.pid).unwrap();
        Tracee {
            shared: target.info_addr("shared"),
            looper: tid("looper"),
            reader: tid("reader"),
            sleeper: tid("sleeper"),
            signalled: tid("signalled"),
            execer: tid("execer"),
            vforker: tid("vforker"),
            process,
            target,
        }
    }

    fn pid(&self) -> i32 {
        self.target.pid
    }

    fn field(&self, i: u64) -> u64 {
        read_field(&self.process, self.shared, i)
    }

    /// Waits (bounded) until field `i` exceeds `value`.
    fn wait_past(&self, i: u64, value: u64) -> u64 {
        wait_for(&format!("field {i} to pass {value}"), || {
            let v = self.field(i);
            (v > value).then_some(v)
        })
    }

    /// The tracer (a thread id) of thread `tid`, 0 for none.
    fn tracer_pid(&self, tid: Tid) -> i32 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/task/{tid}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("TracerPid:"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    /// Every thread of the process is untraced.
    fn assert_untraced(&self) {
        for tid in self.process.threads().unwrap() {
            let path = format!("/proc/{}/task/{tid}/status", self.pid());
            if std::path::Path::new(&path).exists() {
                assert_eq!(self.tracer_pid(tid), 0, "thread {tid} is still traced");
            }
        }
    }

    /// The looper, sleeper and signal threads make progress, no sleep
    /// failed, and the command loop answers.
    fn assert_everyone_runs(&mut self) {
        for i in [LOOPS, SLEEPS, SIG_LOOPS] {
            let v = self.field(i);
            self.wait_past(i, v);
        }
        assert_eq!(self.field(SLEEP_ERRORS), 0, "a nanosleep failed");
        self.target.send("ping");
        self.target.expect("pong");
    }

    fn kill_thread(&self, tid: Tid, sig: i32) {
        // SAFETY: tgkill takes only integers.
        let r = unsafe { libc::syscall(libc::SYS_tgkill, self.pid(), tid, sig) };
        assert_eq!(r, 0, "tgkill {tid} {sig}");
    }
}

fn read_field(process: &Process, shared: u64, i: u64) -> u64 {
    let bytes = process.read_mem(shared + 8 * i, 8).unwrap();
    u64::from_le_bytes(bytes.try_into().unwrap())
}

/// Polls `f` until it returns a value; panics after [`ANSWER_TIMEOUT`].
fn wait_for<V>(what: &str, mut f: impl FnMut() -> Option<V>) -> V {
    let deadline = Instant::now() + ANSWER_TIMEOUT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Handles events until `done` holds (checked between events), resuming
/// every system-call entry with [`Resume::TraceSyscalls`]. Returns the
/// events; a thread found gone by `resume` counts as an `Exited` event.
fn serve(tracer: &mut Tracer<'_>, mut done: impl FnMut(&[TraceEvent]) -> bool) -> Vec<TraceEvent> {
    let deadline = Instant::now() + ANSWER_TIMEOUT;
    let mut events = Vec::new();
    while !done(&events) {
        assert!(
            Instant::now() < deadline,
            "still waiting; events: {events:?}"
        );
        let Some(ev) = tracer.next_event(Duration::from_millis(10)).unwrap() else {
            continue;
        };
        events.push(ev);
        if let TraceEvent::SyscallEntry { tid, .. } = ev {
            match tracer.resume(tid, Resume::TraceSyscalls) {
                Ok(()) => {}
                // Killed while held (e.g. by an exec).
                Err(Error::ThreadExited { .. } | Error::Exited { .. }) => {
                    events.push(TraceEvent::Exited(tid));
                }
                Err(e) => panic!("resume {tid}: {e}"),
            }
        }
    }
    events
}

/// The next system-call entry of `of`; entries of other threads are resumed.
fn next_entry_of(tracer: &mut Tracer<'_>, of: Tid) -> libc::user_regs_struct {
    let deadline = Instant::now() + ANSWER_TIMEOUT;
    loop {
        assert!(Instant::now() < deadline, "no entry of thread {of}");
        match tracer.next_event(Duration::from_millis(10)).unwrap() {
            Some(TraceEvent::SyscallEntry { tid, regs }) if tid == of => return regs,
            Some(TraceEvent::SyscallEntry { tid, .. }) => {
                tracer.resume(tid, Resume::TraceSyscalls).unwrap();
            }
            Some(ev) => panic!("unexpected {ev:?}"),
            None => {}
        }
    }
}

fn exited(events: &[TraceEvent], tid: Tid) -> bool {
    events
        .iter()
        .any(|e| matches!(e, TraceEvent::Exited(t) if *t == tid))
}

fn is_entry(regs: &libc::user_regs_struct) -> bool {
    regs.rax as i64 == -(libc::ENOSYS as i64)
}

fn my_tid() -> i32 {
    // SAFETY: gettid takes no arguments.
    unsafe { libc::gettid() }
}

#[test]
fn syscall_entries_of_a_getpid_loop() {
    let mut t = Tracee::start();
    let process = Process::open(t.pid()).unwrap();
    let mut tracer = process.tracer();
    tracer.stop(t.looper, T).unwrap();
    assert_eq!(tracer.traced(), [t.looper]);
    assert_eq!(t.tracer_pid(t.looper), my_tid());
    tracer.resume(t.looper, Resume::TraceSyscalls).unwrap();

    let mut last = None;
    for _ in 0..50 {
        let Some(TraceEvent::SyscallEntry { tid, regs }) = tracer.next_event(T).unwrap() else {
            panic!("expected a system-call entry");
        };
        assert_eq!(tid, t.looper);
        assert_eq!(regs.orig_rax, SYS_GETPID);
        assert!(is_entry(&regs));
        assert_eq!(process.read_mem(regs.rip - 2, 2).unwrap(), [0x0f, 0x05]);
        // Held at the entry: the counter stands still, and one loop
        // iteration lies between two entries.
        let loops = t.field(LOOPS);
        if let Some(prev) = last {
            assert_eq!(loops, prev + 1);
        }
        last = Some(loops);
        // A held thread is returned as is by stop().
        assert_eq!(tracer.stop(t.looper, T).unwrap().rip, regs.rip);
        tracer.resume(t.looper, Resume::TraceSyscalls).unwrap();
    }

    // A thread the traced thread creates is not traced.
    t.target.send("spawn");
    serve(&mut tracer, |_| t.field(SPAWNED) != 0);
    let spawned = t.field(SPAWNED) as Tid;
    assert_eq!(t.tracer_pid(spawned), 0);
    assert_eq!(tracer.traced(), [t.looper]);
    for other in [t.pid(), t.reader, t.sleeper, t.signalled] {
        assert_eq!(t.tracer_pid(other), 0);
    }

    // Detached: no more events, and the thread runs on.
    tracer.detach(t.looper).unwrap();
    assert!(tracer.traced().is_empty());
    assert!(tracer
        .next_event(Duration::from_millis(50))
        .unwrap()
        .is_none());
    assert_eq!(t.tracer_pid(t.looper), 0);
    t.assert_everyone_runs();
    drop(tracer);
    t.target.assert_no_stop_reported();
}

#[test]
fn interrupted_blocking_calls_restart_transparently() {
    let mut t = Tracee::start();
    t.target.wait_in_syscall(t.reader, libc::SYS_read);
    let process = Process::open(t.pid()).unwrap();
    let mut tracer = process.tracer();
    for i in 0..40 {
        let regs = tracer.stop(t.reader, T).unwrap();
        // In the call, or (after a plain restart) back in user mode on the
        // `syscall` instruction that re-issues it.
        let at_restart =
            regs.orig_rax == u64::MAX && process.read_mem(regs.rip, 2).unwrap() == [0x0f, 0x05];
        assert!(
            regs.orig_rax == SYS_READ || at_restart,
            "round {i}: orig_rax {:#x}",
            regs.orig_rax
        );
        let how = if i % 3 == 2 {
            Resume::Run
        } else {
            Resume::TraceSyscalls
        };
        tracer.resume(t.reader, how).unwrap();
        if how == Resume::TraceSyscalls && !is_entry(&regs) {
            // Interrupted in the call: resuming restarts it, a new entry.
            let regs = next_entry_of(&mut tracer, t.reader);
            assert_eq!(regs.orig_rax, SYS_READ);
            assert_eq!(process.read_mem(regs.rip - 2, 2).unwrap(), [0x0f, 0x05]);
            tracer.resume(t.reader, Resume::TraceSyscalls).unwrap();
        }
        // The sleeper too: nanosleep restarts through restart_syscall.
        tracer.stop(t.sleeper, T).unwrap();
        tracer.resume(t.sleeper, how).unwrap();
        while let Some(ev) = tracer.next_event(Duration::ZERO).unwrap() {
            let TraceEvent::SyscallEntry { tid, .. } = ev else {
                panic!("unexpected {ev:?}");
            };
            tracer.resume(tid, Resume::TraceSyscalls).unwrap();
        }
    }
    assert_eq!(t.field(PIPE_READS), 0, "the read returned early");

    // The data arrives: the read returns it, as if never interrupted.
    t.target.send("write hello");
    serve(&mut tracer, |_| t.field(PIPE_READS) == 1);
    assert_eq!(t.field(PIPE_LEN), 5);
    assert_eq!(t.field(PIPE_ERRNO), 0);
    let data = process.read_mem(t.shared + 8 * PIPE_DATA, 5).unwrap();
    assert_eq!(data, b"hello");
    drop(tracer);
    t.target.expect("pipe got hello");
    t.assert_untraced();
    t.assert_everyone_runs();
    t.target.assert_no_stop_reported();
}

#[test]
fn signal_storm_is_delivered_exactly_once() {
    const SIGNALS: u64 = 1000;
    let mut t = Tracee::start();
    let process = Process::open(t.pid()).unwrap();
    let mut tracer = process.tracer();
    let done = AtomicBool::new(false);
    let (pid, tid, shared) = (t.pid(), t.signalled, t.shared);
    let sender_ok = std::thread::scope(|s| {
        let sender = s.spawn(|| {
            let process = Process::open(pid).unwrap();
            let deadline = Instant::now() + ANSWER_TIMEOUT;
            let mut ok = true;
            // One at a time: a standard signal does not queue.
            'send: for i in 1..=SIGNALS {
                // SAFETY: tgkill takes only integers.
                if unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, libc::SIGUSR1) } != 0 {
                    ok = false;
                    break;
                }
                while read_field(&process, shared, USR1) < i {
                    if Instant::now() > deadline {
                        ok = false;
                        break 'send;
                    }
                    std::hint::spin_loop();
                }
            }
            done.store(true, Ordering::Release);
            ok
        });
        let mut round = 0u32;
        while !done.load(Ordering::Acquire) {
            tracer.stop(tid, T).unwrap();
            let how = if round % 3 == 0 {
                Resume::Run
            } else {
                Resume::TraceSyscalls
            };
            tracer.resume(tid, how).unwrap();
            while let Some(ev) = tracer.next_event(Duration::ZERO).unwrap() {
                let TraceEvent::SyscallEntry { tid, .. } = ev else {
                    panic!("unexpected {ev:?}");
                };
                tracer.resume(tid, Resume::TraceSyscalls).unwrap();
            }
            round += 1;
        }
        sender.join().unwrap()
    });
    assert!(sender_ok, "a signal was not delivered");
    tracer.detach(tid).unwrap();
    // A signal still pending would be handled by now.
    let loops = t.field(SIG_LOOPS);
    t.wait_past(SIG_LOOPS, loops + 2);
    assert_eq!(t.field(USR1), SIGNALS);
    t.assert_untraced();
    t.assert_everyone_runs();
}

/// The parent's view (`waitpid` on the child): stopped or continued.
fn parent_sees(pid: i32, flag: i32) -> Option<i32> {
    let mut status = 0;
    // SAFETY: waitpid writes only the status through the valid pointer.
    let r = unsafe { libc::waitpid(pid, &mut status, flag | libc::WNOHANG) };
    (r == pid).then_some(status)
}

#[test]
fn group_stop_and_continue_work_as_without_a_tracer() {
    let mut t = Tracee::start();
    let pid = t.pid();
    let process = Process::open(pid).unwrap();
    let mut tracer = process.tracer();
    tracer.stop(t.looper, T).unwrap();
    tracer.resume(t.looper, Resume::TraceSyscalls).unwrap();
    tracer.stop(t.sleeper, T).unwrap();
    tracer.resume(t.sleeper, Resume::Run).unwrap();
    let mut events = serve(&mut tracer, |ev| ev.len() >= 10);

    for round in 0..2 {
        t.target.kill(libc::SIGSTOP);
        let mut status = 0;
        events.extend(serve(&mut tracer, |_| {
            parent_sees(pid, libc::WUNTRACED)
                .map(|s| status = s)
                .is_some()
        }));
        assert!(libc::WIFSTOPPED(status) && libc::WSTOPSIG(status) == libc::SIGSTOP);
        // Every thread is stopped: the traced ones in a (listening) ptrace-stop.
        let (loops, sleeps) = (t.field(LOOPS), t.field(SLEEPS));
        assert!(tracer
            .next_event(Duration::from_millis(100))
            .unwrap()
            .is_none());
        assert_eq!(t.target.thread_state(pid), 'T');
        assert_eq!(t.target.thread_state(t.reader), 'T');
        assert_eq!(t.target.thread_state(t.looper), 't');
        assert_eq!(t.target.thread_state(t.sleeper), 't');
        // stop() and resume() keep it stopped.
        tracer.stop(t.looper, T).unwrap();
        tracer.resume(t.looper, Resume::TraceSyscalls).unwrap();
        assert!(tracer
            .next_event(Duration::from_millis(100))
            .unwrap()
            .is_none());
        assert_eq!((t.field(LOOPS), t.field(SLEEPS)), (loops, sleeps));
        if round == 1 {
            // Detached while stopped: they stay stopped, untraced.
            tracer.detach(t.looper).unwrap();
            tracer.detach(t.sleeper).unwrap();
            t.assert_untraced();
            t.target.wait_thread_state(t.looper, 'T');
            t.target.wait_thread_state(t.sleeper, 'T');
        }

        t.target.kill(libc::SIGCONT);
        events.extend(serve(&mut tracer, |_| {
            t.field(LOOPS) > loops && t.field(SLEEPS) > sleeps
        }));
        let status = wait_for("the parent to see the continue", || {
            parent_sees(pid, libc::WCONTINUED)
        });
        assert!(libc::WIFCONTINUED(status));
    }
    // Only the looper's getpid entries were reported.
    for ev in &events {
        let TraceEvent::SyscallEntry { tid, regs } = ev else {
            panic!("unexpected {ev:?}");
        };
        assert_eq!((*tid, regs.orig_rax), (t.looper, SYS_GETPID));
    }
    drop(tracer);
    t.assert_everyone_runs();
}

#[test]
fn thread_exit_is_reported_and_next_event_times_out() {
    let t = Tracee::start();
    let process = Process::open(t.pid()).unwrap();
    let mut tracer = process.tracer();
    assert!(tracer
        .next_event(Duration::from_millis(10))
        .unwrap()
        .is_none());
    tracer.stop(t.looper, T).unwrap();
    tracer.resume(t.looper, Resume::TraceSyscalls).unwrap();
    tracer.stop(t.reader, T).unwrap();
    tracer.resume(t.reader, Resume::Run).unwrap();

    let mut target = t.target;
    target.send("quit-looper");
    let events = serve(&mut tracer, |ev| exited(ev, t.looper));
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, TraceEvent::Exited(_)))
            .count(),
        1,
        "{events:?}"
    );
    assert_eq!(tracer.traced(), [t.reader]);

    // Nothing happens: a clean timeout.
    assert!(tracer
        .next_event(Duration::from_millis(100))
        .unwrap()
        .is_none());

    // stop() on a thread that has exited, and on one that is not the process's.
    let err = tracer.stop(t.looper, T).unwrap_err();
    assert!(
        matches!(err, Error::ThreadExited { tid, .. } if tid == t.looper),
        "{err}"
    );
    let err = tracer.stop(my_tid(), T).unwrap_err();
    assert!(matches!(err, Error::ThreadExited { .. }), "{err}");
    assert_eq!(tracer.traced(), [t.reader]);
    assert!(matches!(
        tracer.resume(t.looper, Resume::Run),
        Err(Error::InvalidArgument { .. })
    ));
    // Running, not stopped: resume() refuses.
    assert!(matches!(
        tracer.resume(t.reader, Resume::Run),
        Err(Error::InvalidArgument { .. })
    ));
    drop(tracer);
    target.send("write x");
    target.expect("pipe got x");
}

#[test]
fn main_thread_exit_is_reported_though_no_wait_reports_it() {
    let mut t = Tracee::start();
    let pid = t.pid();
    let process = Process::open(pid).unwrap();
    let mut tracer = process.tracer();
    tracer.stop(pid, T).unwrap();
    tracer.resume(pid, Resume::Run).unwrap();
    tracer.stop(t.looper, T).unwrap();
    tracer.resume(t.looper, Resume::TraceSyscalls).unwrap();
    t.target.send("main-exit");
    // A zombie main thread reports nothing while other threads live.
    serve(&mut tracer, |ev| exited(ev, pid));
    assert_eq!(tracer.traced(), [t.looper]);
    let err = tracer.stop(pid, T).unwrap_err();
    assert!(matches!(err, Error::ThreadExited { .. }), "{err}");
    let loops = t.field(LOOPS);
    serve(&mut tracer, |_| t.field(LOOPS) > loops);
    drop(tracer);
    assert_eq!(t.tracer_pid(t.looper), 0);
    let loops = t.field(LOOPS);
    t.wait_past(LOOPS, loops);
    // The zombie is ours to reap once the process ends.
    t.target.kill(libc::SIGKILL);
    assert_eq!(Process::release_abandoned_threads(ANSWER_TIMEOUT), 0);
}

#[test]
fn a_thread_killed_while_held_is_reported() {
    let t = Tracee::start();
    let process = Process::open(t.pid()).unwrap();
    let mut tracer = process.tracer();
    tracer.stop(t.sleeper, T).unwrap();
    tracer.stop(t.reader, T).unwrap();
    t.target.kill(libc::SIGKILL);
    let events = serve(&mut tracer, |ev| {
        exited(ev, t.sleeper) && exited(ev, t.reader)
    });
    assert_eq!(events.len(), 2, "{events:?}");
    assert!(tracer.traced().is_empty());
    // Once every thread is dead (a zombie process), stop() says so.
    wait_for("the process to die", || (!process.is_alive()).then_some(()));
    let err = tracer.stop(t.looper, T).unwrap_err();
    assert!(matches!(err, Error::Exited { .. }), "{err}");
}

#[test]
fn another_tracer_is_named() {
    let t = Tracee::start();
    let mut other = Target::start_with_args("tracer", &[&t.pid().to_string()]);
    let process = Process::open(t.pid()).unwrap();
    let mut tracer = process.tracer();
    let err = tracer.stop(t.pid(), T).unwrap_err();
    assert!(
        matches!(err, Error::AlreadyTraced { tracer_pid, .. } if tracer_pid == other.pid),
        "{err}"
    );
    assert!(tracer.traced().is_empty());
    // Its other threads are free.
    tracer.stop(t.looper, T).unwrap();
    tracer.detach(t.looper).unwrap();
    other.close_stdin();
    assert!(other.wait_exit().success());
    tracer.stop(t.pid(), T).unwrap();
    tracer.resume(t.pid(), Resume::Run).unwrap();
}

#[test]
fn exec_by_an_untraced_thread_ends_every_tracee() {
    let mut t = Tracee::start();
    let process = Process::open(t.pid()).unwrap();
    let mut tracer = process.tracer();
    let traced = [t.pid(), t.looper, t.reader, t.sleeper];
    for (i, &tid) in traced.iter().enumerate() {
        tracer.stop(tid, T).unwrap();
        let how = if i % 2 == 0 {
            Resume::TraceSyscalls
        } else {
            Resume::Run
        };
        tracer.resume(tid, how).unwrap();
    }
    // The signal thread is held when the exec kills it.
    tracer.stop(t.signalled, T).unwrap();
    t.target.send("exec");
    serve(&mut tracer, |ev| {
        traced.iter().all(|&tid| exited(ev, tid)) && exited(ev, t.signalled)
    });
    assert!(tracer.traced().is_empty());
    assert!(tracer
        .next_event(Duration::from_millis(20))
        .unwrap()
        .is_none());
    after_exec(&mut t, &mut tracer);
}

#[test]
fn exec_by_a_traced_thread_ends_every_tracee() {
    let mut t = Tracee::start();
    let process = Process::open(t.pid()).unwrap();
    let mut tracer = process.tracer();
    tracer.stop(t.looper, T).unwrap();
    tracer.resume(t.looper, Resume::TraceSyscalls).unwrap();
    tracer.stop(t.execer, T).unwrap();
    tracer.resume(t.execer, Resume::TraceSyscalls).unwrap();
    t.target.send("exec");
    let events = serve(&mut tracer, |ev| {
        exited(ev, t.looper) && exited(ev, t.execer)
    });
    assert!(events.iter().any(|e| matches!(
        e,
        TraceEvent::SyscallEntry { tid, regs } if *tid == t.execer && regs.orig_rax == SYS_EXECVE
    )));
    assert!(tracer.traced().is_empty());
    after_exec(&mut t, &mut tracer);
}

/// The new program runs, untraced, and the tracer has nothing left.
fn after_exec(t: &mut Tracee, tracer: &mut Tracer<'_>) {
    wait_for("the exec'd program to be untraced", || {
        // Lets go of threads that could not be detached at once.
        assert!(tracer.next_event(Duration::ZERO).unwrap().is_none());
        (t.tracer_pid(t.pid()) == 0).then_some(())
    });
    loop {
        if t.target.next_line().expect("output of the new program") == "execed" {
            break;
        }
    }
    t.target.send("ping");
    t.target.expect("pong execed");
    let err = tracer.stop(t.pid(), T).unwrap_err();
    assert!(matches!(err, Error::Exited { .. }), "{err}");
    t.assert_untraced();
}

#[test]
fn a_thread_in_uninterruptible_sleep_times_out_and_is_detached_later() {
    let mut t = Tracee::start();
    t.target.send("vfork");
    t.target.wait_thread_state(t.vforker, 'D');
    let process = Process::open(t.pid()).unwrap();
    let mut tracer = process.tracer();
    let err = tracer
        .stop(t.vforker, Duration::from_millis(100))
        .unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    // The error says what the thread is doing.
    assert!(
        err.to_string().contains("in uninterruptible sleep"),
        "{err}"
    );
    assert_eq!(tracer.traced(), [t.vforker]);
    let err = tracer.detach(t.vforker).unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    assert!(tracer.traced().is_empty());
    assert_eq!(t.tracer_pid(t.vforker), my_tid());
    // Once it leaves vfork() it stops at the pending interrupt and is
    // detached.
    t.target.send("vfork-release");
    assert_eq!(Process::release_abandoned_threads(ANSWER_TIMEOUT), 0);
    t.target.expect("vfork done 1");
    drop(tracer);
    t.assert_untraced();
    t.assert_everyone_runs();
}

#[test]
fn stop_each_is_not_held_up_by_a_thread_that_cannot_stop() {
    let mut t = Tracee::start();
    t.target.send("vfork");
    t.target.wait_thread_state(t.vforker, 'D');
    let process = Process::open(t.pid()).unwrap();
    let mut tracer = process.tracer();
    let mut handed = Vec::new();
    // The thread in uninterruptible sleep is asked first and alone: the
    // others are asked while it does not stop, and handed over as they do.
    tracer
        .stop_each::<Error>(
            &[t.vforker, t.looper, t.sleeper, t.pid()],
            1,
            Duration::from_secs(3),
            Duration::from_secs(3),
            &mut |tr, tid, stopped| {
                match stopped {
                    Ok(regs) => {
                        assert_ne!(regs.rip, 0);
                        // Held while it is handed over.
                        assert_eq!(t.target.thread_state(tid), 't', "thread {tid}");
                        tr.detach(tid)?;
                        handed.push((tid, true));
                    }
                    Err(Error::Timeout { .. }) => handed.push((tid, false)),
                    Err(e) => return Err(e),
                }
                Ok(ControlFlow::Continue(()))
            },
        )
        .unwrap();
    assert_eq!(handed.len(), 4, "{handed:?}");
    assert_eq!(handed[3], (t.vforker, false), "{handed:?}");
    let mut stopped: Vec<Tid> = handed[..3]
        .iter()
        .map(|&(tid, ok)| {
            assert!(ok);
            tid
        })
        .collect();
    stopped.sort_unstable();
    let mut want = vec![t.looper, t.sleeper, t.pid()];
    want.sort_unstable();
    assert_eq!(stopped, want);
    // The one that timed out stays traced, its stop still asked for.
    assert_eq!(tracer.traced(), [t.vforker]);
    // Once it leaves vfork() it stops at the pending interrupt; the drop
    // lets it go.
    t.target.send("vfork-release");
    drop(tracer);
    assert_eq!(Process::release_abandoned_threads(ANSWER_TIMEOUT), 0);
    t.target.expect("vfork done 1");
    t.assert_untraced();
    t.assert_everyone_runs();
}

#[test]
fn stop_each_hands_over_every_thread_once_even_more_spinners_than_cores() {
    let target = Target::start("threads");
    let process = Process::open(target.pid).unwrap();
    let threads = process.threads().unwrap();
    let mut tracer = process.tracer();
    let mut handed = Vec::new();
    let mut exited = 0;
    tracer
        .stop_each::<Error>(&threads, 1, T, T, &mut |tr, tid, stopped| {
            match stopped {
                Ok(_) => {
                    tr.detach(tid)?;
                    handed.push(tid);
                }
                // A short-lived thread of the churner.
                Err(Error::ThreadExited { .. }) => exited += 1,
                Err(e) => return Err(e),
            }
            Ok(ControlFlow::Continue(()))
        })
        .unwrap();
    assert_eq!(handed.len() + exited, threads.len());
    let once: std::collections::BTreeSet<Tid> = handed.iter().copied().collect();
    assert_eq!(
        once.len(),
        handed.len(),
        "a thread handed over twice: {handed:?}"
    );
    // main + 8 spinners + pipe reader + cond waiter + sleeper + churner.
    assert!(handed.len() >= 13, "{handed:?}");
    assert!(tracer.traced().is_empty());
    // An early end leaves the threads still asked traced; dropping the
    // tracer lets them go.
    let mut first = None;
    tracer
        .stop_each::<Error>(&threads[..3], 3, T, T, &mut |tr, tid, stopped| {
            stopped?;
            tr.detach(tid)?;
            first = Some(tid);
            Ok(ControlFlow::Break(()))
        })
        .unwrap();
    assert!(first.is_some());
    assert!(tracer.traced().len() <= 2);
    drop(tracer);
    for tid in process.threads().unwrap() {
        let status = format!("/proc/{}/task/{tid}/status", target.pid);
        if let Ok(status) = std::fs::read_to_string(status) {
            let tracer = status.lines().find_map(|l| l.strip_prefix("TracerPid:"));
            assert_eq!(tracer.map(str::trim), Some("0"), "thread {tid}");
        }
    }
}

#[test]
fn drop_detaches_running_held_and_listening_threads() {
    let mut t = Tracee::start();
    let process = Process::open(t.pid()).unwrap();
    let mut tracer = process.tracer();
    for tid in [t.pid(), t.looper, t.reader, t.sleeper, t.signalled] {
        tracer.stop(tid, T).unwrap();
    }
    tracer.resume(t.looper, Resume::TraceSyscalls).unwrap();
    tracer.resume(t.sleeper, Resume::Run).unwrap();
    tracer.resume(t.signalled, Resume::TraceSyscalls).unwrap();
    // main and the reader stay held; the looper stops at an entry.
    serve(&mut tracer, |ev| ev.len() > 5);
    drop(tracer);
    t.assert_untraced();
    t.target.send("write abc");
    t.target.expect("pipe got abc");
    t.assert_everyone_runs();
    t.target.assert_no_stop_reported();
}

/// Runs in a child process (see below): traces threads of the given
/// process with `TraceSyscalls` and serves them until killed.
#[test]
#[ignore = "helper process of tracer_killed_at_any_moment_leaves_the_target_running"]
fn helper_tracer_to_be_killed() {
    let Ok(spec) = std::env::var("SUTURE_TRACER_HELPER") else {
        return;
    };
    let ids: Vec<i32> = spec.split(' ').map(|s| s.parse().unwrap()).collect();
    let process = Process::open(ids[0]).unwrap();
    let tids = &ids[1..];
    let mut tracer = process.tracer();
    for &tid in tids {
        tracer.stop(tid, T).unwrap();
        tracer.resume(tid, Resume::TraceSyscalls).unwrap();
    }
    println!("helper ready");
    for n in 0usize.. {
        // Now and then one thread stays held for a while.
        let held = tids[n % tids.len()];
        let _ = tracer.stop(held, T);
        for _ in 0..n % 5 {
            if let Ok(Some(TraceEvent::SyscallEntry { tid, .. })) =
                tracer.next_event(Duration::from_millis(1))
            {
                if tid != held {
                    let _ = tracer.resume(tid, Resume::TraceSyscalls);
                }
            }
        }
        let _ = tracer.resume(held, Resume::TraceSyscalls);
    }
}

#[test]
fn tracer_killed_at_any_moment_leaves_the_target_running() {
    let mut t = Tracee::start();
    let traced = [t.pid(), t.looper, t.reader, t.sleeper, t.signalled];
    let spec = std::iter::once(t.pid())
        .chain(traced)
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join(" ");
    let exe = std::env::current_exe().unwrap();
    let mut sent = 0;
    for round in 0..6u64 {
        let mut helper = Command::new(&exe)
            .args([
                "helper_tracer_to_be_killed",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("SUTURE_TRACER_HELPER", &spec)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let (tx, rx) = mpsc::channel();
        let out = helper.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(|l| l.ok()) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        loop {
            let line = rx.recv_timeout(ANSWER_TIMEOUT).expect("helper ready");
            // libtest prints the test name on the same line.
            if line.ends_with("helper ready") {
                break;
            }
        }
        // Signals while traced; the last one may be in flight at the kill.
        for _ in 0..20 {
            t.kill_thread(t.signalled, libc::SIGUSR1);
            sent += 1;
            t.wait_past(USR1, sent - 1);
        }
        t.kill_thread(t.signalled, libc::SIGUSR1);
        sent += 1;
        std::thread::sleep(Duration::from_millis(round * 3));
        helper.kill().unwrap();
        helper.wait().unwrap();

        // The kernel detached everything; nothing is left stopped.
        t.assert_untraced();
        let loops = t.field(LOOPS);
        t.wait_past(LOOPS, loops);
        t.assert_everyone_runs();
        t.wait_past(USR1, sent - 1);
        for tid in traced {
            assert_ne!(t.target.thread_state(tid), 't', "thread {tid}");
        }
    }
    // Every signal was handled exactly once.
    let loops = t.field(SIG_LOOPS);
    t.wait_past(SIG_LOOPS, loops + 2);
    assert_eq!(t.field(USR1), sent);
    t.target.send("write abc");
    t.target.expect("pipe got abc");
    t.target.assert_no_stop_reported();
}

/// An exec waits for every killed thread we trace to be reaped, while it
/// holds the mutex `PTRACE_SEIZE` needs: seizing another thread then would
/// wait forever for an exec that waits for us. The exec watchdog reaps our
/// exited tracees meanwhile, so the seize returns.
#[test]
fn a_seize_during_an_exec_that_waits_for_our_tracee_does_not_deadlock() {
    let mut t = Tracee::start();
    let (pid, signalled, execer) = (t.pid(), t.signalled, t.execer);
    let (held_tx, held_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (seized_tx, seized_rx) = mpsc::channel();
    std::thread::scope(|s| {
        s.spawn(move || {
            let process = Process::open(pid).unwrap();
            let mut tracer = process.tracer();
            tracer.stop(signalled, T).unwrap();
            held_tx.send(()).unwrap();
            go_rx.recv().unwrap();
            // The exec'ing thread is the one still alive.
            let seized = tracer.stop(execer, T);
            seized_tx
                .send(seized.map(drop).map_err(|e| e.to_string()))
                .unwrap();
            // The reaped thread reads as gone; nothing stays traced.
            wait_for("the tracer to let go of everything", || {
                let _ = tracer.next_event(Duration::from_millis(10));
                tracer.traced().is_empty().then_some(())
            });
        });
        held_rx.recv().unwrap();
        t.target.send("exec");
        // Only the exec kills the held thread: it is now a zombie that the
        // exec waits for, with the mutex held.
        t.target.wait_thread_state(signalled, 'Z');
        go_tx.send(()).unwrap();
        let seized = match seized_rx.recv_timeout(Duration::from_secs(30)) {
            Ok(seized) => seized,
            Err(_) => {
                // Ends the deadlock (the exec is killable) before failing.
                // SAFETY: kill takes plain integers.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                panic!("PTRACE_SEIZE deadlocked with the exec");
            }
        };
        // The exec'ing thread took over the leader's id: its own is gone.
        assert!(seized.is_err(), "{seized:?}");
    });
    loop {
        if t.target.next_line().expect("output of the new program") == "execed" {
            break;
        }
    }
    t.target.send("ping");
    t.target.expect("pong execed");
    t.assert_untraced();
}
