//! Process handles, memory access and the errors for unusable targets.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::Target;
use suture_process::{Error, Process};

const T: Duration = Duration::from_secs(10);

#[test]
fn write_mem_over_read_only_code_and_data() {
    let mut target = Target::start("code");
    let func = target.info_addr("fn");
    let msg = target.info_addr("msg");
    let process = Process::open(target.pid).unwrap();

    let code_map = process.mapping_containing(func).unwrap().unwrap();
    assert!(
        code_map.executable() && !code_map.writable(),
        "{code_map:?}"
    );
    let data_map = process.mapping_containing(msg).unwrap().unwrap();
    assert!(!data_map.writable(), "{data_map:?}");

    target.send("call");
    target.expect("value 1");

    // mov eax, 42; ret
    let patch = [0xb8, 42, 0, 0, 0, 0xc3];
    let original = process.read_mem(func, patch.len()).unwrap();
    let stopped = process.stop_all(T).unwrap();
    process.write_mem(func, &patch).unwrap();
    process.write_mem(msg, b"patched!").unwrap();
    stopped.resume().unwrap();
    assert_eq!(process.read_mem(func, patch.len()).unwrap(), patch);
    assert_eq!(process.read_mem(msg, 8).unwrap(), b"patched!");

    target.send("call");
    target.expect("value 42");
    target.send("msg");
    target.expect("message patched!");

    // Protections are unchanged.
    let after = process.mapping_containing(func).unwrap().unwrap();
    assert_eq!(after.perms, code_map.perms);

    process.write_mem(func, &original).unwrap();
    target.send("call");
    target.expect("value 1");
}

#[test]
fn memory_errors_are_reported() {
    let target = Target::start("code");
    let process = Process::open(target.pid).unwrap();
    let err = process.read_mem(0x1000, 16).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");
    let err = process.write_mem(0x1000, b"x").unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");
    assert!(process.read_mem(0x1000, 0).unwrap().is_empty());
}

#[test]
fn process_accessors() {
    let target = Target::start("worker");
    let process = Process::open(target.pid).unwrap();
    assert_eq!(process.pid(), target.pid);
    assert!(process.is_alive());
    assert!(process.start_time() > 0);
    let threads = process.threads().unwrap();
    assert_eq!(threads.len(), 3);
    assert_eq!(threads[0], target.pid);
    assert_eq!(process.thread_name(target.pid).as_deref(), Some("worker"));
    assert!(process.thread_name(1 << 30).is_none());
    assert!(process.exe().unwrap().ends_with("worker"));
    let maps = process.maps().unwrap();
    assert!(maps.iter().any(|m| m.path.as_deref() == Some("[vdso]")));
    assert!(maps.iter().any(|m| m.path.as_deref() == Some("[stack]")));
    assert!(maps.windows(2).all(|w| w[0].end <= w[1].start));
    let insn = process.find_syscall_insn().unwrap();
    assert_eq!(process.read_mem(insn, 2).unwrap(), [0x0f, 0x05]);
    process.check_traceable().unwrap();

    // A thread id is not a process id.
    let err = Process::open(threads[1]).unwrap_err();
    assert!(
        matches!(err, Error::NotAProcess { tgid, .. } if tgid == target.pid),
        "{err}"
    );
}

#[test]
fn nonexistent_pid() {
    // Above the largest possible pid_max (2^22).
    for pid in [-1, 0, (1 << 22) + 1] {
        let err = Process::open(pid).unwrap_err();
        assert!(
            matches!(err, Error::NoSuchProcess { pid: p } if p == pid),
            "{err}"
        );
        assert!(err.to_string().contains("no process with pid"), "{err}");
    }
}

#[test]
fn zombie_is_refused_and_exit_is_noticed() {
    let mut target = Target::start("exiter");
    let process = Process::open(target.pid).unwrap();
    target.send("x");
    target.wait_eof();
    // Not reaped yet: a zombie.
    target.wait_thread_state(target.pid, 'Z');
    assert!(!process.is_alive());
    let err = Process::open(target.pid).unwrap_err();
    assert!(matches!(err, Error::Zombie { .. }), "{err}");
    assert!(matches!(
        process.check_traceable(),
        Err(Error::Zombie { .. })
    ));
    assert!(matches!(process.hijack(T), Err(Error::Exited { .. })));
    assert!(matches!(process.maps(), Err(Error::Exited { .. })));
    let status = target.wait_exit();
    assert_eq!(status.code(), Some(7));
    // Reaped: gone; the old handle notices.
    assert!(!process.is_alive());
    assert!(matches!(process.threads(), Err(Error::Exited { .. })));
}

#[test]
fn already_traced_by_another_tracer() {
    let mut target = Target::start("worker");
    let process = Process::open(target.pid).unwrap();
    let mut tracer = Target::start_with_args("tracer", &[&target.pid.to_string()]);

    let check = |err: Error| match err {
        Error::AlreadyTraced {
            pid,
            tracer_pid,
            ref tracer_name,
        } => {
            assert_eq!(pid, target.pid);
            assert_eq!(tracer_pid, tracer.pid);
            assert_eq!(tracer_name, "tracer");
            let msg = err.to_string();
            assert!(msg.contains("already traced by tracer"), "{msg}");
        }
        other => panic!("expected AlreadyTraced, got {other}"),
    };
    check(process.check_traceable().unwrap_err());
    check(process.hijack(T).unwrap_err());
    check(process.stop_all(T).unwrap_err());

    // The target is untouched, and once the other tracer is gone it works.
    target.send("echo still fine");
    target.expect("echo still fine");
    tracer.close_stdin();
    assert!(tracer.wait_exit().success());
    let deadline = Instant::now() + Duration::from_secs(30);
    while process.check_traceable().is_err() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut hj = process.hijack(T).unwrap();
    assert_eq!(hj.getpid().unwrap(), target.pid);
    hj.release().unwrap();
}

#[test]
fn process_that_exited_before_open() {
    let mut child = Command::new("true").spawn().unwrap();
    let pid = child.id() as i32;
    child.wait().unwrap();
    // (If the pid were reused this instant, open would succeed on the new
    // process, which is fine: it is a different start time.)
    if let Err(err) = Process::open(pid) {
        assert!(matches!(err, Error::NoSuchProcess { .. }), "{err}");
    }
}

/// A thread that blocks a signal while it runs is waited for until it
/// unblocks it; one that blocks it asleep is reported (after the short
/// grace for sleeping threads, once no runnable one is left to wait for).
#[test]
fn threads_blocking_for_good_waits_out_a_runnable_thread_only() {
    let target = Target::start("masks");
    let keeper: i32 = target.info("keeper").parse().unwrap();
    let brief: i32 = target.info("brief").parse().unwrap();
    let process = Process::open(target.pid).unwrap();
    // Right after ready both block it (the brief one spins for 300 ms).
    let now = process.threads_blocking(libc::SIGTRAP).unwrap();
    assert!(now.contains(&keeper), "{now:?}");
    let blocking = process
        .threads_blocking_for_good(
            libc::SIGTRAP,
            Duration::from_millis(5),
            Duration::from_secs(60),
        )
        .unwrap();
    assert_eq!(blocking, vec![keeper], "brief thread {brief}");
}
