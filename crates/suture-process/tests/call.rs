//! Calling functions inside a real process with `Hijack::call`.

mod common;

use std::time::{Duration, Instant};

use common::Target;
use suture_process::{Error, Process};

const T: Duration = Duration::from_secs(10);

/// Whether the target has a handler installed for `sig` (SigCgt).
fn catches(pid: i32, sig: i32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .unwrap()
        .trim();
    u64::from_str_radix(hex, 16).unwrap() & (1 << (sig - 1)) != 0
}

#[test]
fn call_returns_rax_and_program_continues() {
    let mut target = Target::start("caller");
    let last = target.check_ticks(0, 3);
    let process = Process::open(target.pid).unwrap();

    let mut hj = process.hijack(T).unwrap();
    assert_eq!(hj.tid(), target.pid);
    let saved = *hj.saved_regs();
    let add3 = target.info_addr("add3");
    assert_eq!(hj.call(add3, &[1, 20, 300]).unwrap(), 321);
    assert_eq!(hj.call(add3, &[u64::MAX, 5, 0]).unwrap(), 4);
    assert_eq!(
        hj.call(target.info_addr("entry_alignment"), &[]).unwrap(),
        0
    );
    assert_eq!(
        hj.call(target.info_addr("double_work"), &[1000]).unwrap(),
        9 * 1000 * 1001
    );
    // Calls and system calls mix.
    assert_eq!(hj.getpid().unwrap(), target.pid);
    assert_eq!(hj.call(add3, &[2, 2, 2]).unwrap(), 6);
    assert_eq!(hj.saved_regs().rip, saved.rip);
    let err = hj.call(add3, &[0; 7]).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
    hj.release().unwrap();

    target.assert_no_stop_reported();
    target.check_ticks(last, 3);
    // The main thread's blocked read restarted.
    target.send("echo after");
    target.expect("echo after");
    target.send("result");
    target.expect("result 9009000.0");
    assert!(catches(target.pid, libc::SIGSEGV));
}

#[test]
fn call_preserves_vector_registers_of_the_thread() {
    let mut target = Target::start("caller");
    let process = Process::open(target.pid).unwrap();
    target.send("spin");
    target.expect("spinning");
    // The main thread now spins with known values in xmm0..xmm15.
    target.wait_thread_state(target.pid, 'R');

    let mut hj = process.hijack_thread(target.pid, T).unwrap();
    assert_eq!(hj.call(target.info_addr("clobber_xmm"), &[]).unwrap(), 7);
    assert_eq!(
        hj.call(target.info_addr("double_work"), &[10]).unwrap(),
        9 * 10 * 11
    );
    hj.release().unwrap();

    process
        .write_mem(target.info_addr("spin_flag"), &1i32.to_le_bytes())
        .unwrap();
    target.expect("xmm ok");
    target.send("echo alive");
    target.expect("echo alive");
    target.assert_no_stop_reported();
}

#[test]
fn crash_in_callee_is_reported_and_target_survives() {
    let mut target = Target::start("caller");
    let last = target.check_ticks(0, 2);
    let process = Process::open(target.pid).unwrap();
    let crash = target.info_addr("crash");

    let mut hj = process.hijack(T).unwrap();
    let err = hj.call(crash, &[]).unwrap_err();
    match &err {
        Error::CallFault { signal, rip, .. } => {
            assert_eq!(*signal, libc::SIGSEGV);
            assert!((crash..crash + 64).contains(rip), "rip {rip:#x}");
        }
        other => panic!("expected CallFault, got {other}"),
    }
    assert!(err.to_string().contains("signal 11"), "{err}");
    // The thread is still usable.
    assert_eq!(hj.call(target.info_addr("add3"), &[1, 2, 3]).unwrap(), 6);
    assert_eq!(hj.getpid().unwrap(), target.pid);
    hj.release().unwrap();

    target.check_ticks(last, 3);
    target.send("echo survived");
    // The program's SIGSEGV handler would print "caught SIGSEGV" and exit.
    target.expect("echo survived");
    assert!(catches(target.pid, libc::SIGSEGV), "handler kept");
    target.assert_no_stop_reported();
}

#[test]
fn endless_callee_times_out_and_thread_is_restored() {
    let mut target = Target::start("caller");
    let process = Process::open(target.pid).unwrap();

    let mut hj = process.hijack(T).unwrap();
    hj.set_timeout(Duration::from_millis(200));
    let t0 = Instant::now();
    let err = hj.call(target.info_addr("forever"), &[]).unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(5));
    // The thread was stopped again and can be used further.
    hj.set_timeout(T);
    assert_eq!(hj.call(target.info_addr("add3"), &[4, 5, 6]).unwrap(), 15);
    hj.release().unwrap();

    let last = target.check_ticks(0, 2);
    target.check_ticks(last, 2);
    target.send("echo fine");
    target.expect("echo fine");
    target.assert_no_stop_reported();
}

#[test]
fn signal_sent_during_call_is_delivered_after_release() {
    let target = Target::start("caller");
    let process = Process::open(target.pid).unwrap();

    let mut hj = process.hijack(T).unwrap();
    hj.set_timeout(Duration::from_millis(300));
    let tid = hj.tid();
    let pid = target.pid;
    // A SIGSEGV sent by a user to the borrowed thread while the callee runs
    // must not be taken for the callee's crash nor lost.
    let sender = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        // SAFETY: tgkill takes only integers.
        unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, libc::SIGSEGV) };
    });
    let err = hj.call(target.info_addr("forever"), &[]).unwrap_err();
    sender.join().unwrap();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    hj.release().unwrap();
    target.expect("caught SIGSEGV");
}

/// Virtual address of the IFUNC symbol `name` in the ELF file's .dynsym.
fn ifunc_symbol(elf: &[u8], name: &str) -> Option<u64> {
    let u16_at = |o: usize| u16::from_le_bytes(elf[o..o + 2].try_into().unwrap()) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(elf[o..o + 4].try_into().unwrap()) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap());
    assert_eq!(&elf[..5], b"\x7fELF\x02", "64-bit ELF");
    let shoff = u64_at(0x28) as usize;
    let shentsize = u16_at(0x3a);
    let shnum = u16_at(0x3c);
    let section = |i: usize| shoff + i * shentsize;
    for i in 0..shnum {
        let sh = section(i);
        if u32_at(sh + 4) != 11 {
            continue; // not SHT_DYNSYM
        }
        let (off, size, entsize) = (
            u64_at(sh + 0x18) as usize,
            u64_at(sh + 0x20) as usize,
            u64_at(sh + 0x38) as usize,
        );
        let strtab = u64_at(section(u32_at(sh + 0x28)) + 0x18) as usize;
        for sym in (off..off + size).step_by(entsize) {
            let name_off = strtab + u32_at(sym);
            let end = name_off + elf[name_off..].iter().position(|&b| b == 0)?;
            let info = elf[sym + 4];
            // STT_GNU_IFUNC = 10, defined (st_shndx != 0).
            if &elf[name_off..end] == name.as_bytes() && info & 0xf == 10 && u16_at(sym + 6) != 0 {
                return Some(u64_at(sym + 8));
            }
        }
    }
    None
}

#[test]
fn ifunc_resolver_of_memcpy_returns_libc_code() {
    let mut target = Target::start("caller");
    let process = Process::open(target.pid).unwrap();
    let maps = process.maps().unwrap();
    let libc_maps: Vec<_> = maps
        .iter()
        .filter(|m| m.path.as_deref().is_some_and(|p| p.contains("/libc.so")))
        .collect();
    let first = libc_maps
        .iter()
        .find(|m| m.offset == 0)
        .expect("libc mapped");
    let path = first.path.clone().unwrap();
    let elf = std::fs::read(&path).unwrap();
    // libc's first PT_LOAD has vaddr 0: the bias is where offset 0 is mapped.
    let bias = first.start;
    let resolver = bias + ifunc_symbol(&elf, "memcpy").expect("memcpy is an IFUNC");

    let mut hj = process.hijack(T).unwrap();
    let implementation = hj.call(resolver, &[]).unwrap();
    hj.release().unwrap();

    assert_ne!(implementation, resolver);
    assert!(
        libc_maps
            .iter()
            .any(|m| m.perms.starts_with("r-x") && m.contains(implementation)),
        "memcpy implementation {implementation:#x} not in libc's code"
    );
    target.send("echo ok");
    target.expect("echo ok");
    target.assert_no_stop_reported();
}
