//! Borrowing a thread of a real process to run system calls in it.

mod common;

use std::time::Duration;

use common::Target;
use suture_process::{find_gap_near, Errno, Error, Process};

const T: Duration = Duration::from_secs(10);

#[test]
fn remote_getpid_mmap_mprotect_munmap_and_program_continues() {
    let mut target = Target::start("worker");
    let last = target.check_ticks(0, 3);
    let process = Process::open(target.pid).unwrap();

    let mut hj = process.hijack(T).unwrap();
    assert_eq!(hj.tid(), target.pid, "the main thread is preferred");
    assert_eq!(hj.getpid().unwrap(), target.pid);
    assert_eq!(
        hj.syscall(libc::SYS_getpid, [0; 6]).unwrap(),
        target.pid as u64
    );

    let addr = hj
        .mmap(
            0,
            8192,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
        .unwrap();
    assert_eq!(addr % 4096, 0);
    let m = process.mapping_containing(addr).unwrap().expect("mapped");
    assert_eq!((m.start, m.perms.as_str()), (addr, "rw-p"));
    assert!(m.end >= addr + 8192);
    process.write_mem(addr, b"hello remote").unwrap();
    assert_eq!(process.read_mem(addr, 12).unwrap(), b"hello remote");

    hj.mprotect(addr, 8192, libc::PROT_READ).unwrap();
    let m = process.mapping_containing(addr).unwrap().unwrap();
    assert_eq!(m.perms, "r--p");

    hj.munmap(addr, 8192).unwrap();
    assert!(process.mapping_containing(addr).unwrap().is_none());

    // A failing remote call reports the errno and leaves the thread usable.
    let err = hj
        .mmap(
            0,
            0,
            libc::PROT_READ,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
        .unwrap_err();
    assert!(
        matches!(
            &err,
            Error::Remote {
                errno: Errno::EINVAL,
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string()
            .starts_with("mmap in the target failed: EINVAL"),
        "{err}"
    );
    assert_eq!(hj.getpid().unwrap(), target.pid);

    hj.release().unwrap();
    target.assert_no_stop_reported();

    // The program goes on: the main thread still serves commands, the
    // ticker never skipped a beat.
    target.send("echo after");
    target.expect("echo after");
    target.check_ticks(last, 20);
}

#[test]
fn memfd_create_and_map_it() {
    let mut target = Target::start("worker");
    let process = Process::open(target.pid).unwrap();
    let mut hj = process.hijack(T).unwrap();

    // The name goes below the red zone; that memory is restored afterwards.
    let rsp = hj.saved_regs().rsp;
    let below = process.read_mem(rsp - 512, 512).unwrap();
    let fd = hj.memfd_create("suture_test", libc::MFD_CLOEXEC).unwrap();
    assert!(fd >= 0);
    assert_eq!(process.read_mem(rsp - 512, 512).unwrap(), below);
    let link = std::fs::read_link(format!("/proc/{}/fd/{fd}", target.pid)).unwrap();
    assert!(
        link.to_string_lossy().starts_with("/memfd:suture_test"),
        "{link:?}"
    );

    hj.ftruncate(fd, 4096).unwrap();
    let addr = hj
        .mmap(
            0,
            4096,
            libc::PROT_READ | libc::PROT_EXEC,
            libc::MAP_SHARED,
            fd,
            0,
        )
        .unwrap();
    // A shared read-only mapping cannot be written through /proc/PID/mem
    // (the kernel forces writes only into private copy-on-write mappings)...
    assert!(process.write_mem(addr, &[0xc3; 16]).is_err());
    // ...but the memfd itself can be written from our side.
    {
        use std::os::unix::fs::FileExt;
        let file = process.open_fd(fd).unwrap();
        file.write_all_at(&[0xc3; 16], 0).unwrap();
    }
    assert_eq!(process.read_mem(addr, 16).unwrap(), [0xc3; 16]);

    hj.close(fd).unwrap();
    assert!(std::fs::read_link(format!("/proc/{}/fd/{fd}", target.pid)).is_err());

    let m = process.mapping_containing(addr).unwrap().expect("mapped");
    assert_eq!(m.perms, "r-xs");
    assert_eq!(m.path.as_deref(), Some("/memfd:suture_test (deleted)"));

    // Closing a bad fd fails cleanly.
    assert!(matches!(
        hj.close(fd),
        Err(Error::Remote {
            errno: Errno::EBADF,
            ..
        })
    ));
    hj.release().unwrap();

    target.send("echo memfd");
    target.expect("echo memfd");
    assert!(process
        .maps()
        .unwrap()
        .iter()
        .any(|m| m.path.as_deref() == Some("/memfd:suture_test (deleted)")));
}

#[test]
fn mmap_near_code_with_find_gap_near() {
    let target = Target::start("worker");
    let process = Process::open(target.pid).unwrap();
    let maps = process.maps().unwrap();
    let exe = process.exe().unwrap();
    let text = maps
        .iter()
        .find(|m| m.executable() && m.path.as_deref() == Some(exe.to_str().unwrap()))
        .expect("executable text mapping")
        .clone();
    let size = 3 * 4096;
    let gap = find_gap_near(&maps, text.start, text.end, size).expect("gap");

    let mut hj = process.hijack(T).unwrap();
    let addr = hj
        .mmap(
            gap,
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
        .unwrap();
    assert_eq!(addr, gap);
    let far = (addr + size - 1)
        .abs_diff(text.start)
        .max(addr.abs_diff(text.end - 1));
    assert!(far < 1 << 31);
    hj.munmap(addr, size).unwrap();
    hj.release().unwrap();
}

#[test]
fn thread_blocked_in_read_restarts_after_release() {
    let mut target = Target::start("worker");
    let process = Process::open(target.pid).unwrap();
    // The main thread sits in read(0): borrow it many times, running calls
    // each time, then check the read still completes with the right data.
    for i in 0..10 {
        target.wait_in_syscall(target.pid, libc::SYS_read);
        let mut hj = process.hijack(T).unwrap();
        assert_eq!(hj.tid(), target.pid);
        // It was interrupted inside read(): rax = -ERESTARTSYS, orig_rax = read.
        let regs = *hj.saved_regs();
        assert_eq!(regs.orig_rax, libc::SYS_read as u64);
        assert_eq!(regs.rax as i64, -512);
        assert_eq!(hj.getpid().unwrap(), target.pid);
        hj.release().unwrap();
        if i % 3 == 0 {
            target.send(&format!("echo round {i}"));
            target.expect(&format!("echo round {i}"));
        }
    }
    target.send("echo hello");
    target.expect("echo hello");
    target.assert_no_stop_reported();
}

#[test]
fn thread_in_nanosleep_restarts_after_release() {
    let mut target = Target::start("worker");
    let sleeper: i32 = target.info("sleeper").parse().unwrap();
    let process = Process::open(target.pid).unwrap();
    for _ in 0..5 {
        let mut hj = process.hijack_thread(sleeper, T).unwrap();
        assert_eq!(hj.tid(), sleeper);
        assert_eq!(hj.getpid().unwrap(), target.pid);
        // Release without running anything works too.
        hj.release().unwrap();
        let hj = process.hijack_thread(sleeper, T).unwrap();
        drop(hj);
    }
    // The sleeper keeps sleeping, and nanosleep never failed (a botched
    // restart would return -1 with errno 516 or EINTR).
    target.send("waitsleep");
    let status = target.expect("status sleeps ");
    assert!(status.ends_with(" errors 0"), "{status}");
}

#[test]
fn hijack_while_process_is_group_stopped() {
    let mut target = Target::start("worker");
    let process = Process::open(target.pid).unwrap();
    target.kill(libc::SIGSTOP);
    // As the parent, wait until the stop has happened.
    let mut status = 0;
    // SAFETY: waitpid writes only the status through the valid pointer.
    let r = unsafe { libc::waitpid(target.pid, &mut status, libc::WUNTRACED) };
    assert_eq!(r, target.pid);
    assert!(libc::WIFSTOPPED(status));

    let mut hj = process.hijack(T).unwrap();
    assert_eq!(hj.getpid().unwrap(), target.pid);
    hj.release().unwrap();

    let stopped = process.stop_all(T).unwrap();
    stopped.resume().unwrap();

    // Still stopped as the user asked (each thread re-enters the group-stop
    // right after the detach)...
    for tid in process.threads().unwrap() {
        target.wait_thread_state(tid, 'T');
    }
    // ...and it continues normally on SIGCONT.
    target.kill(libc::SIGCONT);
    target.send("echo continued");
    target.expect("echo continued");
}

#[test]
fn target_exiting_during_hijack_reports_exited() {
    let mut target = Target::start("exiter");
    let process = Process::open(target.pid).unwrap();
    // The main thread, by name: `hijack` could take the worker (if the
    // main thread is not in `pause` yet), which then could not read the
    // byte that makes it exit.
    let mut hj = process.hijack_thread(target.pid, T).unwrap();
    assert_eq!(hj.getpid().unwrap(), target.pid);
    // Another thread now calls exit(); our borrowed thread dies with it.
    target.send("x");
    target.wait_eof();
    let err = hj.getpid().unwrap_err();
    assert!(
        matches!(err, Error::Exited { pid } if pid == target.pid),
        "{err}"
    );
    let err = hj
        .mmap(
            0,
            4096,
            libc::PROT_READ,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
        .unwrap_err();
    assert!(matches!(err, Error::Exited { .. }), "{err}");
    assert!(matches!(hj.release(), Err(Error::Exited { .. })));
    assert!(!process.is_alive());
    assert!(matches!(process.hijack(T), Err(Error::Exited { .. })));
    assert!(matches!(process.stop_all(T), Err(Error::Exited { .. })));
}

#[test]
fn target_exiting_while_hijack_is_dropped() {
    let mut target = Target::start("exiter");
    let process = Process::open(target.pid).unwrap();
    // Borrow the main thread (in pause()), not the worker that must read
    // the byte: under load the main thread may not be asleep yet, and a
    // running thread ranks after sleeping ones.
    target.wait_in_syscall(target.pid, libc::SYS_pause);
    let hj = process.hijack(T).unwrap();
    assert_eq!(hj.tid(), target.pid);
    target.send("x");
    target.wait_eof();
    drop(hj); // must not panic or hang
    assert!(!process.is_alive());
}

#[test]
fn thread_inside_rseq_critical_section_resumes_at_abort_handler() {
    let mut target = Target::start("rseq");
    if target.info.iter().any(|l| l == "no-rseq") {
        eprintln!("glibc did not register rseq; nothing to test");
        return;
    }
    let spinner: i32 = target.info("spinner").parse().unwrap();
    let abort = target.info_addr("abort");
    let cs: Vec<u64> = target
        .info("cs")
        .split(' ')
        .map(|a| u64::from_str_radix(a.trim_start_matches("0x"), 16).unwrap())
        .collect();
    let process = Process::open(target.pid).unwrap();
    let count = |target: &mut Target| -> u64 {
        target.send("count");
        target
            .expect("aborts ")
            .split(' ')
            .nth(1)
            .unwrap()
            .parse()
            .unwrap()
    };

    // The spinner is nearly always inside its critical section; retry in
    // the rare case it was stopped while re-arming.
    for _ in 0..100 {
        let before = count(&mut target);
        let mut hj = process.hijack_thread(spinner, T).unwrap();
        let rip = hj.saved_regs().rip;
        if rip != abort {
            assert!(
                !(cs[0]..cs[1]).contains(&rip),
                "stopped inside the critical section at {rip:#x} but not sent to the abort handler"
            );
            continue;
        }
        assert_eq!(hj.getpid().unwrap(), target.pid);
        hj.release().unwrap();
        // The thread went through its abort handler (which re-arms).
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while count(&mut target) <= before {
            assert!(
                std::time::Instant::now() < deadline,
                "abort handler never ran"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        return;
    }
    panic!("never caught the spinner inside its critical section");
}

#[test]
fn single_step_fallback_with_a_chosen_syscall_instruction() {
    // With a `syscall` instruction chosen by the caller, system calls use
    // the single-step fallback (see the module documentation of hijack).
    let mut target = Target::start("worker");
    let process = Process::open(target.pid).unwrap();
    target.wait_in_syscall(target.pid, libc::SYS_read);
    let insn = process.find_syscall_insn().unwrap();
    let mut hj = process.hijack(T).unwrap();
    hj.set_syscall_insn(insn);
    assert_eq!(hj.getpid().unwrap(), target.pid);
    let addr = hj
        .mmap(
            0,
            4096,
            libc::PROT_READ,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
        .unwrap();
    hj.munmap(addr, 4096).unwrap();
    hj.release().unwrap();
    // The borrowed read() restarted.
    target.send("echo after");
    target.expect("echo after");
    target.assert_no_stop_reported();
}

#[test]
fn remote_syscall_timing_out_is_interrupted_and_thread_restored() {
    let mut target = Target::start("worker");
    let process = Process::open(target.pid).unwrap();
    target.wait_in_syscall(target.pid, libc::SYS_read);
    let mut hj = process.hijack(T).unwrap();
    hj.set_timeout(Duration::from_millis(200));
    // pause() in the borrowed thread never returns by itself (all signals
    // are blocked there).
    assert!(matches!(
        hj.syscall(libc::SYS_pause, [0; 6]),
        Err(Error::Timeout { .. })
    ));
    // The thread is usable again, then restored: its read() restarts.
    hj.set_timeout(T);
    assert_eq!(hj.getpid().unwrap(), target.pid);
    hj.release().unwrap();
    target.send("echo after timeout");
    target.expect("echo after timeout");
    target.assert_no_stop_reported();
}
