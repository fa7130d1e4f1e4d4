//! Signals sent to the target while we hold it are delivered exactly once.

mod common;

use std::time::Duration;

use common::Target;
use suture_process::Process;

const T: Duration = Duration::from_secs(10);

fn sigrtmin() -> i32 {
    libc::SIGRTMIN()
}

#[test]
fn signals_sent_while_stopped_are_delivered_once_after_resume() {
    let mut target = Target::start("signals");
    let process = Process::open(target.pid).unwrap();

    let stopped = process.stop_all(T).unwrap();
    // A process-directed standard signal and a thread-directed real-time one.
    target.kill(libc::SIGUSR1);
    let some_thread = *stopped.threads().last().unwrap();
    // SAFETY: tgkill takes only integers.
    assert_eq!(
        unsafe { libc::syscall(libc::SYS_tgkill, target.pid, some_thread, sigrtmin()) },
        0
    );
    // Nothing is delivered while held.
    std::thread::sleep(Duration::from_millis(20));
    stopped.resume().unwrap();

    target.send("waitcounts 1 1");
    target.expect("counts usr1 1 rt 1");

    // The same while a thread is borrowed: the signal is blocked in the
    // borrowed thread and handled by another one (or after release).
    let mut hj = process.hijack(T).unwrap();
    target.kill(libc::SIGUSR1);
    // SAFETY: tgkill takes only integers.
    assert_eq!(
        unsafe { libc::syscall(libc::SYS_tgkill, target.pid, hj.tid(), sigrtmin()) },
        0
    );
    assert_eq!(hj.getpid().unwrap(), target.pid);
    assert_eq!(hj.getpid().unwrap(), target.pid);
    hj.release().unwrap();
    target.send("waitcounts 2 2");
    target.expect("counts usr1 2 rt 2");
    target.assert_no_stop_reported();
}

#[test]
fn signals_racing_with_stops_are_neither_lost_nor_doubled() {
    let mut target = Target::start("signals");
    let raiser: i32 = target.info("raiser").parse().unwrap();
    let process = Process::open(target.pid).unwrap();
    // The raiser thread signals itself in a tight loop, so stops often land
    // while a signal is being delivered (signal-delivery-stops).
    for _ in 0..30 {
        let stopped = process.stop_all(T).unwrap();
        stopped.resume().unwrap();
        let mut hj = process.hijack_thread(raiser, T).unwrap();
        assert_eq!(hj.getpid().unwrap(), target.pid);
        hj.release().unwrap();
    }
    // Every raised signal was handled exactly once.
    let (raised, received) = raised_and_received(&mut target);
    assert!(raised > 0);
    assert_eq!(raised, received, "sent and received differ");
    target.send("waitcounts 0 0");
    target.expect("counts usr1 0 rt 0");
}

#[test]
fn sigtrap_arriving_while_borrowed_is_reinjected_with_its_siginfo() {
    let mut target = Target::start("signals");
    let process = Process::open(target.pid).unwrap();
    let mut hj = process.hijack(T).unwrap();
    // SIGTRAP cannot be blocked while we single-step, so the borrowed thread
    // receives it during the next remote call; it must be held and handed
    // to the program on release, with the original sender information.
    // SAFETY: tgkill takes only integers.
    assert_eq!(
        unsafe { libc::syscall(libc::SYS_tgkill, target.pid, hj.tid(), libc::SIGTRAP) },
        0
    );
    assert_eq!(hj.getpid().unwrap(), target.pid);
    assert_eq!(hj.getpid().unwrap(), target.pid);
    hj.release().unwrap();
    target.send("traps");
    target.expect(&format!(
        "traps 1 code {} pid {}",
        libc::SI_TKILL,
        std::process::id()
    ));
    let (raised, received) = raised_and_received(&mut target);
    assert_eq!(raised, received);
}

/// Stops the raiser thread and returns how many signals it raised and how
/// many the program's handler received.
fn raised_and_received(target: &mut Target) -> (u64, u64) {
    target.send("check");
    let line = target.expect("raised ");
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    assert_eq!(v.len(), 2, "{line}");
    (v[0], v[1])
}
