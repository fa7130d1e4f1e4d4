//! The trap handler, executed for real in this process: an `int3` in the
//! table is sent on as the finished jump or call would; a foreign `int3`
//! ends the process with `SIGTRAP`, as it would without the handler.

use suture_x86::trap::{trap_handler, KIND_CALL, KIND_JUMP};

const PAGE: usize = 4096;
const SA_RESTORER: i32 = 0x0400_0000;

/// An anonymous mapping of `pages` pages holding `bytes` at its start,
/// made executable (read + exec).
unsafe fn exec_pages(bytes: &[u8], pages: usize) -> *mut u8 {
    // SAFETY: a fresh private anonymous mapping; we write inside it, then
    // only change its protection.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            pages * PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        assert_ne!(p, libc::MAP_FAILED);
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), p as *mut u8, bytes.len());
        p as *mut u8
    }
}

unsafe fn protect_rx(p: *mut u8, pages: usize) {
    // SAFETY: `p` is a mapping of `pages` pages made by `exec_pages`.
    let r = unsafe { libc::mprotect(p as *mut _, pages * PAGE, libc::PROT_READ | libc::PROT_EXEC) };
    assert_eq!(r, 0);
}

/// Installs the handler (mapped at a fresh address) with `entries`
/// relative to `code`; returns nothing (the mappings stay for the test).
unsafe fn install(entries: &[(u64, u64, u64)]) {
    // Reserve the address first to know where the handler goes.
    let pages = 32;
    // SAFETY: a fresh mapping, written then made executable.
    unsafe {
        let p = exec_pages(&[], pages);
        let at = p as u64;
        let (code, layout) = trap_handler(at, 1024).unwrap();
        std::ptr::copy_nonoverlapping(code.as_ptr(), p, code.len());
        let table = layout.table_bytes(entries).unwrap();
        std::ptr::copy_nonoverlapping(table.as_ptr(), layout.count as *mut u8, table.len());
        protect_rx(p, pages);
        // struct kernel_sigaction { handler, flags, restorer, mask }
        let act: [u64; 4] = [
            layout.handler,
            (libc::SA_SIGINFO | SA_RESTORER | libc::SA_ONSTACK) as u64,
            layout.restorer,
            !0,
        ];
        let r = libc::syscall(
            libc::SYS_rt_sigaction,
            libc::SIGTRAP,
            act.as_ptr(),
            0usize,
            8usize,
        );
        assert_eq!(r, 0, "rt_sigaction: {}", std::io::Error::last_os_error());
    }
}

#[test]
fn int3_in_the_table_runs_as_the_finished_jump_or_call_and_a_foreign_one_kills() {
    // Code page:
    //   0x00 jump site: int3 + 4 junk bytes   (table: jump to 0x40)
    //   0x10 call site: int3 + 4 junk bytes   (table: call 0x48), then ret
    //   0x20 foreign:   int3; ret
    //   0x40 mov eax, 42; ret
    //   0x48 mov eax, 7; ret
    let mut code = vec![0x90u8; 0x60];
    code[0x00..0x05].copy_from_slice(&[0xCC, 0xDE, 0xAD, 0xBE, 0xEF]);
    code[0x10..0x15].copy_from_slice(&[0xCC, 0xDE, 0xAD, 0xBE, 0xEF]);
    code[0x15] = 0xC3;
    code[0x20..0x22].copy_from_slice(&[0xCC, 0xC3]);
    code[0x40..0x46].copy_from_slice(&[0xB8, 42, 0, 0, 0, 0xC3]);
    code[0x48..0x4E].copy_from_slice(&[0xB8, 7, 0, 0, 0, 0xC3]);
    // SAFETY: the mappings are ours; the functions called follow the C ABI
    // (return a value in eax, clobber nothing callee-saved).
    unsafe {
        let c = exec_pages(&code, 1);
        protect_rx(c, 1);
        let base = c as u64;
        install(&[
            (base, base + 0x40, KIND_JUMP),
            (base + 0x10, base + 0x48, KIND_CALL),
        ]);
        let f: extern "C" fn() -> u32 = std::mem::transmute(base);
        assert_eq!(f(), 42, "the jump site ran its destination");
        let g: extern "C" fn() -> u32 = std::mem::transmute(base + 0x10);
        assert_eq!(g(), 7, "the call site called its destination and came back");
        // Many times, from several threads at once.
        let threads: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(move || {
                    let f: extern "C" fn() -> u32 = std::mem::transmute(base);
                    (0..2000).map(|_| f()).sum::<u32>()
                })
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().unwrap(), 2000 * 42);
        }
        // A foreign int3 (not in the table) ends a child with SIGTRAP.
        let pid = libc::fork();
        if pid == 0 {
            let h: extern "C" fn() = std::mem::transmute(base + 0x20);
            h();
            libc::_exit(0);
        }
        let mut status = 0;
        assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
        assert!(
            libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGTRAP,
            "status {status:#x}"
        );
        // And so does a SIGTRAP sent by another process.
        let pid = libc::fork();
        if pid == 0 {
            libc::raise(libc::SIGTRAP);
            libc::_exit(0);
        }
        assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
        assert!(
            libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGTRAP,
            "status {status:#x}"
        );
    }
}
