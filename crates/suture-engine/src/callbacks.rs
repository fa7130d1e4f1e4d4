//! Running a patch's callbacks inside the target (kernel: `klp_callbacks`).
//!
//! A callback is an ordinary function of the patch image, called on one
//! borrowed thread while the other threads keep running. It may take locks
//! (malloc, stdio), so the borrowed thread must not be holding one: only a
//! thread blocked in a plain waiting system call (read, poll, nanosleep...),
//! whose stack unwinds reliably (no signal frame) and shows no allocator,
//! loader or stdio function, is chosen. A callback that does not return in
//! time is interrupted and reported; the operation then fails cleanly.

use crate::check::Checker;
use crate::objects::Objects;
use crate::Error;
use std::time::{Duration, Instant};
use suture_process::Process;
use suture_unwind::{Outcome, Regs, Special};

/// How long a callback may run.
pub const CALLBACK_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to look for a thread in a safe place.
const PICK_FOR: Duration = Duration::from_secs(5);

/// System calls a thread may be blocked in when it is borrowed: waits that
/// hold no lock of the process (not `futex`, which may be a lock wait).
const SAFE_WAITS: &[i64] = &[
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_pread64,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_select,
    libc::SYS_pselect6,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_pause,
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_wait4,
    libc::SYS_waitid,
    libc::SYS_rt_sigsuspend,
    libc::SYS_rt_sigtimedwait,
];

/// Functions that take (or run under) a lock a callback might need: the
/// allocator, the dynamic loader, stdio.
fn unsafe_function(name: &str) -> bool {
    const NAMES: &[&str] = &[
        "malloc",
        "free",
        "calloc",
        "realloc",
        "reallocarray",
        "memalign",
        "posix_memalign",
        "aligned_alloc",
        "valloc",
        "pvalloc",
        "dlopen",
        "dlclose",
        "dlsym",
        "dlvsym",
        "dlmopen",
        "dl_iterate_phdr",
        "fork",
        "fgets",
        "fgetc",
        "fread",
        "fwrite",
        "fputs",
        "fputc",
        "fprintf",
        "fscanf",
        "fflush",
        "fclose",
        "fopen",
        "fdopen",
        "freopen",
        "getline",
        "getdelim",
        "getc",
        "putc",
        "puts",
        "printf",
        "vprintf",
        "vfprintf",
        "scanf",
    ];
    const PREFIXES: &[&str] = &["_IO_", "_dl_", "__libc_malloc", "__libc_free", "__isoc99_"];
    let base = name.trim_start_matches("__").trim_end_matches("_unlocked");
    NAMES.contains(&base) || PREFIXES.iter().any(|p| name.starts_with(p))
}

/// Runs callbacks in one process.
pub struct Runner<'a> {
    proc: &'a Process,
    checker: &'a Checker,
    objects: &'a Objects,
}

impl<'a> Runner<'a> {
    pub fn new(proc: &'a Process, checker: &'a Checker, objects: &'a Objects) -> Self {
        Runner {
            proc,
            checker,
            objects,
        }
    }

    /// Whether a thread stopped with `regs` is in a safe place to borrow.
    fn safe(&self, regs: &libc::user_regs_struct) -> bool {
        if !SAFE_WAITS.contains(&(regs.orig_rax as i64)) {
            return false;
        }
        let unwind = self.checker.unwind(
            self.proc,
            &Regs {
                pc: regs.rip,
                sp: regs.rsp,
                bp: regs.rbp,
            },
            &|_| Special::None,
        );
        if unwind.outcome != Outcome::Complete {
            return false;
        }
        unwind.frames.iter().all(|f| {
            let Some(o) = self.objects.containing(f.lookup) else {
                return true;
            };
            let Ok((elf, bias)) = o.elf() else {
                return true;
            };
            elf.symbol_at(f.lookup - bias)
                .is_none_or(|(sym, _)| !unsafe_function(&sym.name))
        })
    }

    /// Call `func(arg)` in the target on a thread in a safe place; returns
    /// the callback's return value (its `int`/`void` result in `eax`).
    pub fn call(&self, what: &str, func: u64, arg: u64) -> Result<u64, Error> {
        let deadline = Instant::now() + PICK_FOR;
        loop {
            for tid in self.proc.threads()? {
                let mut h = match self.proc.hijack_thread(tid, Duration::from_millis(500)) {
                    Ok(h) => h,
                    Err(_) => continue,
                };
                if !self.safe(h.saved_regs()) {
                    h.release()?;
                    continue;
                }
                h.set_timeout(CALLBACK_TIMEOUT);
                let r = h.call(func, &[arg]);
                let released = h.release();
                let v = r.map_err(|e| {
                    Error::Other(format!("the {what} did not complete in the target: {e}"))
                })?;
                released?;
                return Ok(v);
            }
            if Instant::now() >= deadline {
                return Err(Error::Other(format!(
                    "cannot run the {what}: no thread of process {} is waiting in a place where it holds no lock (blocked in read, poll, sleep...); retry when the process is idle",
                    self.proc.pid()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
