//! Stopping every thread of a real process.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::Target;
use suture_process::{read_stack, Process, StoppedProcess};

const T: Duration = Duration::from_secs(10);

/// Live threads of the process per /proc (zombie threads excluded).
fn live_threads(target: &Target, process: &Process) -> BTreeSet<i32> {
    process
        .threads()
        .unwrap()
        .into_iter()
        .filter(|&t| {
            std::fs::read_to_string(format!("/proc/{}/task/{t}/stat", target.pid))
                .map(|s| {
                    let st = s[s.rfind(')').unwrap() + 2..].chars().next().unwrap();
                    st != 'Z' && st != 'X'
                })
                .unwrap_or(false)
        })
        .collect()
}

fn check_all_held(target: &Target, process: &Process, stopped: &StoppedProcess<'_>) {
    let held: BTreeSet<i32> = stopped.threads().into_iter().collect();
    // While everything is held no thread can appear or vanish.
    assert_eq!(
        held,
        live_threads(target, process),
        "every live thread is held"
    );
    for &tid in &held {
        // 't': stopped by a tracer.
        assert_eq!(target.thread_state(tid), 't', "thread {tid}");
    }
}

#[test]
fn stops_spinning_and_blocked_threads_and_resumes_them() {
    let mut target = Target::start("threads");
    let counters = target.info_addr("counters");
    let process = Process::open(target.pid).unwrap();

    let stopped = process.stop_all(T).unwrap();
    // main + 8 spinners + pipe reader + cond waiter + sleeper + churner
    // (+ a short-lived churn thread or two).
    assert!(stopped.threads().len() >= 13, "{:?}", stopped.threads());
    check_all_held(&target, &process, &stopped);

    // Nothing runs: the spinners' counters stand still.
    let before = process.read_mem(counters, 8 * 8).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(process.read_mem(counters, 8 * 8).unwrap(), before);

    // Every pc lies in executable memory; every stack is readable.
    let maps = process.maps().unwrap();
    let pcs = stopped.pcs();
    assert_eq!(pcs.len(), stopped.threads().len());
    for (tid, pc) in pcs {
        assert!(
            maps.iter().any(|m| m.contains(pc) && m.executable()),
            "pc {pc:#x} of thread {tid}"
        );
        let regs = stopped.regs(tid).unwrap();
        assert_eq!(regs.rip, pc);
        let (start, stack) = read_stack(&process, regs.rsp, 4096).unwrap();
        assert_eq!(start, regs.rsp);
        assert!(!stack.is_empty());
    }
    assert!(stopped.regs(1).is_none());

    stopped.resume().unwrap();
    target.assert_no_stop_reported();

    assert_everyone_continues(&mut target);
}

#[test]
fn threads_created_and_exiting_meanwhile() {
    let mut target = Target::start("threads");
    let process = Process::open(target.pid).unwrap();
    // The churner creates and joins threads all the time: stop and resume
    // repeatedly; threads being created are held too, exiting ones dropped.
    for _ in 0..50 {
        let stopped = process.stop_all(T).unwrap();
        check_all_held(&target, &process, &stopped);
        stopped.resume().unwrap();
    }
    // Dropping resumes as well.
    for _ in 0..10 {
        let stopped = process.stop_all(T).unwrap();
        drop(stopped);
    }
    target.assert_no_stop_reported();
    assert_everyone_continues(&mut target);
}

#[test]
fn hijack_and_stop_all_alternate() {
    let mut target = Target::start("threads");
    let process = Process::open(target.pid).unwrap();
    for _ in 0..10 {
        let mut hj = process.hijack(T).unwrap();
        assert_eq!(hj.getpid().unwrap(), target.pid);
        hj.release().unwrap();
        let stopped = process.stop_all(T).unwrap();
        stopped.resume().unwrap();
    }
    target.send("progress");
    target.expect("progress ok");
}

/// Every spinner, sleeper and churner makes progress, and the threads
/// blocked on a pipe and a condition variable wake when asked.
fn assert_everyone_continues(target: &mut Target) {
    target.send("progress");
    target.expect("progress ok");
    target.send("wake");
    let mut got = vec![target.next_line().unwrap(), target.next_line().unwrap()];
    got.sort();
    assert_eq!(got, ["cond woke", "pipe got x"]);
}
