//! Unwinding the threads of real processes, stopped with
//! `Process::stop_all`.

mod common;

use std::time::Duration;

use common::{reader, regs, Code, Target, CFLAGS};
use suture_process::Process;
use suture_unwind::{Outcome, Special, Unwind};

const T: Duration = Duration::from_secs(10);

fn no_special(_: u64) -> Special {
    Special::None
}

fn names(code: &Code, u: &Unwind) -> Vec<String> {
    u.frames
        .iter()
        .map(|f| code.name(f.lookup).unwrap_or_else(|| "?".into()))
        .collect()
}

fn unreliable(u: &Unwind) -> &str {
    match &u.outcome {
        Outcome::Unreliable(why) => why,
        Outcome::Complete => panic!("expected an unreliable unwind, got {u:#x?}"),
    }
}

/// `(tid, syscall nr)` of every `thread` line.
fn threads(target: &Target) -> Vec<(i32, i64)> {
    target
        .info_all("thread")
        .iter()
        .map(|w| (w[0].parse().unwrap(), w[1].parse().unwrap()))
        .collect()
}

#[test]
fn every_thread_unwinds_completely_through_its_call_chain() {
    let target = Target::start("chains", CFLAGS);
    let threads = threads(&target);
    assert_eq!(threads.len(), 5, "{:?}", target.info);
    for &(tid, nr) in &threads {
        target.wait_in_syscall(tid, nr);
    }
    let process = Process::open(target.pid).unwrap();
    let code = Code::load(&process);

    let stopped = process.stop_all(T).unwrap();
    let mut unwinds = Vec::new();
    for &(tid, _) in &threads {
        let r = stopped.regs(tid).expect("thread held");
        let u = code
            .unwinder
            .unwind(regs(&r), &mut reader(&process), &no_special);
        unwinds.push((tid, u));
    }
    stopped.resume().unwrap();

    let exe = target.exe.to_string_lossy().to_string();
    for (tid, u) in &unwinds {
        let names = names(&code, u);
        assert_eq!(
            u.outcome,
            Outcome::Complete,
            "thread {tid}: {names:?} {u:#x?}"
        );
        let at = names
            .iter()
            .position(|n| n == "inner")
            .unwrap_or_else(|| panic!("thread {tid}: no inner in {names:?}"));
        assert_eq!(
            names[at..at + 3],
            ["inner", "middle", "outer"],
            "thread {tid}"
        );
        // Frame 0 is in libc's system-call wrapper.
        let libc = code.obj_at(u.frames[0].pc).expect("frame 0 in an object");
        assert!(libc.path.contains("libc.so"), "{}", libc.path);
        let last = u.frames.last().unwrap();
        if *tid == target.pid {
            assert_eq!(
                names[at + 3..].first().map(String::as_str),
                Some("main"),
                "{names:?}"
            );
            assert_eq!(names.last().unwrap(), "_start", "{names:?}");
            assert_eq!(code.obj_at(last.pc).unwrap().path, exe);
            assert!(
                names.iter().any(|n| n.starts_with("__libc_start_main")),
                "{names:?}"
            );
        } else {
            assert_eq!(names[at + 3], "worker", "{names:?}");
            assert!(code.obj_at(last.pc).unwrap().path.contains("libc.so"));
            if code.has_local_symbols(last.pc) {
                let n = names.len();
                assert_eq!(names[n - 2], "start_thread", "{names:?}");
                // clone3 (or clone), under one of its aliases.
                assert!(names[n - 1].contains("clone"), "{names:?}");
            } else {
                eprintln!("libc has no local symbols here (install libc6-dbg to check start_thread and clone3 by name)");
            }
        }
        // The stack pointer grows strictly, frame by frame.
        assert!(u.frames.windows(2).all(|w| w[0].sp < w[1].sp));
    }

    // gdb must find the same frames (after our stop ended: one tracer at a time).
    let Some(gdb) = common::gdb_backtraces(target.pid) else {
        eprintln!("gdb is not installed: skipping the cross-check");
        return;
    };
    for (tid, u) in &unwinds {
        let mut theirs = gdb.get(tid).cloned().unwrap_or_default();
        let ours: Vec<u64> = u.frames.iter().map(|f| f.pc).collect();
        // gdb prints frame 0's pc only when it is not at a line start (a
        // restarted system call may show it 2 bytes earlier).
        if theirs.first().is_some_and(|&p| p.abs_diff(ours[0]) <= 2) {
            theirs.remove(0);
        }
        assert_eq!(theirs, ours[1..], "thread {tid}: gdb vs us");
    }
}

#[test]
fn code_in_anonymous_memory_is_unreliable() {
    let target = Target::start("jit", CFLAGS);
    let tid: i32 = target.info_all("thread")[0][0].parse().unwrap();
    let jit =
        u64::from_str_radix(target.info_all("jit")[0][0].trim_start_matches("0x"), 16).unwrap();
    let process = Process::open(target.pid).unwrap();
    let code = Code::load(&process);

    let stopped = process.stop_all(T).unwrap();
    let r = stopped.regs(tid).unwrap();
    let spinner = code
        .unwinder
        .unwind(regs(&r), &mut reader(&process), &no_special);
    let main = stopped.regs(target.pid).unwrap();
    let main = code
        .unwinder
        .unwind(regs(&main), &mut reader(&process), &no_special);
    stopped.resume().unwrap();

    assert!((jit..jit + 4096).contains(&r.rip), "{:#x}", r.rip);
    let why = unreliable(&spinner);
    assert!(why.contains("no known module"), "{why}");
    assert!(why.contains(&format!("{:#x}", r.rip)), "{why}");
    assert_eq!(spinner.frames.len(), 1);
    // The other threads are not affected.
    assert_eq!(main.outcome, Outcome::Complete, "{main:#x?}");
}

#[test]
fn a_thread_in_a_signal_handler_is_unreliable() {
    let target = Target::start("sighandler", CFLAGS);
    let tid: i32 = target.info_all("handler")[0][0].parse().unwrap();
    target.wait_in_syscall(tid, libc::SYS_pause);
    let process = Process::open(target.pid).unwrap();
    let code = Code::load(&process);

    let stopped = process.stop_all(T).unwrap();
    let r = stopped.regs(tid).unwrap();
    let u = code
        .unwinder
        .unwind(regs(&r), &mut reader(&process), &no_special);
    stopped.resume().unwrap();

    let why = unreliable(&u);
    assert!(why.contains("signal frame"), "{why}");
    let names = names(&code, &u);
    assert_eq!(names[1], "on_signal", "{names:?}");
    // The frame named is the trampoline the handler returns to.
    let last = u.frames.last().unwrap();
    assert!(why.contains(&format!("{:#x}", last.lookup)), "{why}");
    assert!(code.obj_at(last.pc).unwrap().path.contains("libc.so"));
}

#[test]
fn code_without_unwind_tables_is_unreliable_even_with_frame_pointers() {
    // Frame pointers would make a frame-pointer walk look fine: the
    // unwinder must still refuse frames that no CFI covers.
    let flags = [
        "-O2",
        "-fno-omit-frame-pointer",
        "-fno-asynchronous-unwind-tables",
        "-fno-unwind-tables",
        "-pthread",
    ];
    let target = Target::start("chains", &flags);
    let threads = threads(&target);
    for &(tid, nr) in &threads {
        target.wait_in_syscall(tid, nr);
    }
    let process = Process::open(target.pid).unwrap();
    let code = Code::load(&process);
    let stopped = process.stop_all(T).unwrap();
    let unwinds: Vec<Unwind> = threads
        .iter()
        .map(|&(tid, _)| {
            let r = stopped.regs(tid).unwrap();
            code.unwinder
                .unwind(regs(&r), &mut reader(&process), &no_special)
        })
        .collect();
    stopped.resume().unwrap();
    for u in &unwinds {
        let why = unreliable(u);
        assert!(why.contains("has no CFI"), "{why}");
        let last = u.frames.last().unwrap();
        assert_eq!(code.name(last.lookup).as_deref(), Some("inner"), "{why}");
    }
}

#[test]
fn an_installed_program_unwinds_completely() {
    // cat blocked reading its stdin: a distribution-built executable.
    let target = Target::system("cat");
    target.wait_in_syscall(target.pid, libc::SYS_read);
    let process = Process::open(target.pid).unwrap();
    let code = Code::load(&process);
    let stopped = process.stop_all(T).unwrap();
    let r = stopped.regs(target.pid).unwrap();
    let u = code
        .unwinder
        .unwind(regs(&r), &mut reader(&process), &no_special);
    stopped.resume().unwrap();
    assert_eq!(u.outcome, Outcome::Complete, "{u:#x?}");
    assert!(u.frames.len() >= 4, "{u:#x?}");
    let exe = std::fs::canonicalize(process.exe().unwrap()).unwrap();
    let last = code.obj_at(u.frames.last().unwrap().pc).unwrap();
    assert_eq!(std::fs::canonicalize(&last.path).unwrap(), exe);
}
