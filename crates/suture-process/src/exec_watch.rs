//! Keeps a `PTRACE_SEIZE` from deadlocking with an `execve` in the target.
//!
//! An exec first kills every other thread of the process and waits until
//! each is released (`de_thread`). A killed thread that we trace is only
//! released when we reap it. All the while the exec holds the process's
//! `cred_guard_mutex`, and `PTRACE_SEIZE` of any of its threads waits for
//! that mutex. So a thread of ours that holds a tracee and then seizes
//! another thread of the same process at the wrong moment waits forever for
//! an exec that waits forever for it.
//!
//! The way out: while a seize has been waiting longer than [`PATIENCE`], a
//! watchdog thread reaps the target's exited threads that are our tracees.
//! `wait` works across the threads of a thread group, so the watchdog can
//! reap what another thread of ours traces. It collects only exits: a
//! tracee's ptrace-stop is reported even to a wait for exits alone, so each
//! report is looked at first (`WNOWAIT`, see `sys::reap_if_exited`), and a
//! stop is left to the tracer thread. The tracer later finds the reaped
//! thread gone (`ECHILD`), which it already reads as "gone". The
//! exec then completes, releases the mutex, and the seize returns (usually
//! `ESRCH`: the thread died in the exec).

use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::Tid;

/// How long a seize may wait before the watchdog starts reaping (it notices
/// within twice that). A seize normally takes microseconds.
const PATIENCE: Duration = Duration::from_millis(20);

/// What the watchdog watches.
struct Watch {
    seizing: Mutex<Seizes>,
    armed: Condvar,
}

/// Seizes under way (the process, the thread being seized, and when the
/// seize began), how many ever began, and whether the watchdog sleeps
/// until woken (it only does after a look that found no seize begun since
/// the one before: a run of seizes, such as 512 in a row over a window,
/// wakes it once, not once per seize).
#[derive(Default)]
struct Seizes {
    under_way: Vec<(i32, Tid, Instant)>,
    begun: u64,
    asleep: bool,
}

fn watch() -> &'static Watch {
    static WATCH: OnceLock<Watch> = OnceLock::new();
    WATCH.get_or_init(|| {
        let spawned = std::thread::Builder::new()
            .name("suture-exec-watch".into())
            .spawn(watchdog);
        if let Err(e) = spawned {
            // Without the watchdog a seize can still work; it only loses
            // the way out of the exec deadlock.
            crate::debug_log(format_args!("exec watchdog not started: {e}"));
        }
        Watch {
            seizing: Mutex::new(Seizes::default()),
            armed: Condvar::new(),
        }
    })
}

/// Runs `seize` (a `PTRACE_SEIZE` of `tid`, a thread of process `tgid`)
/// under the watchdog. The process is given, not looked up: the thread may
/// be one the exec already killed, gone from `/proc`.
pub(crate) fn seize_watched<T>(tgid: i32, tid: Tid, seize: impl FnOnce() -> T) -> T {
    let w = watch();
    let began = Instant::now();
    let mut seizing = lock(&w.seizing);
    seizing.under_way.push((tgid, tid, began));
    seizing.begun += 1;
    if seizing.asleep {
        w.armed.notify_one();
    }
    drop(seizing);
    let r = seize();
    let mut seizing = lock(&w.seizing);
    if let Some(i) = seizing
        .under_way
        .iter()
        .position(|&e| e == (tgid, tid, began))
    {
        seizing.under_way.swap_remove(i);
    }
    r
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn watchdog() {
    // The watchdog must never take the SIGCHLD a tracer thread sleeps on.
    crate::sys::block_sigchld();
    let w = watch();
    let mut seizing = lock(&w.seizing);
    // Seizes begun by the last look.
    let mut seen = 0;
    loop {
        let oldest = seizing.under_way.iter().map(|&(_, _, t)| t).min();
        match oldest {
            None if seizing.begun == seen => {
                seizing.asleep = true;
                seizing = w.armed.wait(seizing).unwrap_or_else(|p| p.into_inner());
                seizing.asleep = false;
            }
            // Seizes came and went since the last look: more may follow
            // unannounced, so look again (a stuck one is then seen within
            // twice the patience).
            None => {
                seen = seizing.begun;
                seizing = w
                    .armed
                    .wait_timeout(seizing, PATIENCE)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            Some(t) if t.elapsed() < PATIENCE => {
                let left = PATIENCE - t.elapsed();
                seizing = w
                    .armed
                    .wait_timeout(seizing, left)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            Some(_) => {
                let stuck: Vec<(i32, Tid)> = seizing
                    .under_way
                    .iter()
                    .filter(|&&(_, _, t)| t.elapsed() >= PATIENCE)
                    .map(|&(tgid, tid, _)| (tgid, tid))
                    .collect();
                drop(seizing);
                for (tgid, tid) in stuck {
                    reap_exited_threads(tgid, tid);
                }
                std::thread::sleep(PATIENCE);
                seizing = lock(&w.seizing);
            }
        }
    }
}

/// Reaps the exited threads (other than the leader, which an exec handles
/// itself) of process `tgid` that are our tracees (`tid`: the thread whose
/// seize waits).
fn reap_exited_threads(tgid: i32, tid: Tid) {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{tgid}/task")) else {
        return;
    };
    for task in tasks.flatten() {
        let Some(t) = task
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<Tid>().ok())
        else {
            continue;
        };
        if t != tgid && crate::sys::reap_if_exited(t) {
            crate::debug_log(format_args!(
                "reaped exited thread {t} of {tgid} while seizing {tid} (exec under way)"
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    /// Killed and reaped when dropped, also when the test fails.
    struct Kill(Child);

    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// Detaches a stopped tracee when dropped, also when the test fails.
    struct Release(i32);

    impl Drop for Release {
        fn drop(&mut self) {
            // Fails only if it is not stopped; then nothing holds it.
            let _ = crate::sys::detach(self.0, 0);
        }
    }

    const SRC: &str = r#"
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>
static volatile long tid;
static void *quitter(void *a) { char c; tid = gettid(); (void)a; read(0, &c, 1); return 0; }
int main(void) {
    pthread_t t;
    pthread_create(&t, 0, quitter, 0);
    while (!tid) usleep(1000);
    printf("ready %ld\n", tid);
    fflush(stdout);
    for (;;) pause();
}
"#;

    fn state(pid: i32, tid: i32) -> Option<char> {
        let s = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
        s[s.rfind(')')? + 2..].chars().next()
    }

    fn until(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !f() {
            assert!(Instant::now() < deadline, "waited too long for {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The reaper collects exits only: a tracee in a ptrace-stop that the
    /// tracer has not collected yet keeps its report (the kernel offers it
    /// to a wait for exits too; taking it left a thread stopped for good).
    #[test]
    fn the_reaper_leaves_a_stop_report_to_the_tracer() {
        let (mut child, pid, tid) = start();
        crate::sys::block_sigchld();
        crate::sys::seize(pid, tid, false).unwrap();
        // Dropped before `child`: a tracee left stopped would keep the
        // child from being reaped after a failure.
        let _release = Release(tid);
        crate::sys::interrupt(tid).unwrap();
        until("the traced thread to stop", || state(pid, tid) == Some('t'));
        super::reap_exited_threads(pid, i32::MAX);
        assert_eq!(
            crate::sys::wait_nohang(tid),
            Some(crate::sys::Report::Interrupt),
            "the stop report must still be there for the tracer"
        );
        drop(_release);
        child.0.stdin.take().unwrap().write_all(b"x").unwrap();
        until("the released thread to run and exit", || {
            state(pid, tid).is_none()
        });
    }

    /// The test program, started: its pid and the id of its thread that
    /// exits once it reads a byte on stdin.
    fn start() -> (Kill, i32, i32) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("t.c"), SRC).unwrap();
        let exe = dir.path().join("t");
        let cc = Command::new("cc")
            .args(["-O2", "-pthread", "-o"])
            .arg(&exe)
            .arg(dir.path().join("t.c"))
            .status()
            .unwrap();
        assert!(cc.success());
        let mut child = Kill(
            Command::new(&exe)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let pid = child.0.id() as i32;
        let mut line = String::new();
        BufReader::new(child.0.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let tid: i32 = line.trim().strip_prefix("ready ").unwrap().parse().unwrap();
        (child, pid, tid)
    }

    /// An exited thread we trace stays a zombie until we reap it. The
    /// watchdog reaps it knowing only its process: the thread whose seize
    /// waits may be gone from `/proc` already (killed by the exec).
    #[test]
    fn our_exited_tracees_are_reaped_through_their_process() {
        let (mut child, pid, tid) = start();
        crate::sys::seize(pid, tid, false).unwrap();
        child.0.stdin.take().unwrap().write_all(b"x").unwrap();
        until("the traced thread to exit", || state(pid, tid) == Some('Z'));
        // A thread id that names nothing, as a thread gone from /proc.
        super::reap_exited_threads(pid, i32::MAX);
        until("the zombie to be reaped", || state(pid, tid).is_none());
    }
}
