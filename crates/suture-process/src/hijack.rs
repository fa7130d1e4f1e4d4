//! Borrowing one thread of the target to execute system calls in it.
//!
//! The first rule: if suture is killed at any moment (SIGKILL, so nothing
//! of ours runs), the kernel detaches the thread and it must carry on
//! exactly as if it had never been borrowed. So every injected system call
//! is built to be safe to abandon: the thread finishes it and then restores
//! its own original state.
//!
//! How it works: the thread is seized (`PTRACE_SEIZE` with
//! `PTRACE_O_TRACESYSGOOD`) and stopped with `PTRACE_INTERRUPT`; its
//! registers and signal mask are saved. Before the first system call, a
//! genuine x86-64 `rt_sigframe` is written on the thread's stack below the
//! red zone (and below a small scratch area, see
//! [`Hijack::memfd_create`]): its `ucontext` holds the saved registers
//! (`cs`/`ss` included; `uc_flags` = `UC_FP_XSTATE` | `UC_SIGCONTEXT_SS` |
//! `UC_STRICT_RESTORE_SS` as the kernel sets them), the saved signal mask,
//! an all-zero `uc_stack` (`restore_altstack` ignores the error it gives, so
//! the alternate signal stack is left as it is) and a pointer to a 64-byte
//! aligned copy of the thread's XSAVE area (`NT_X86_XSTATE`) with the
//! signal-frame software bytes and `FP_XSTATE_MAGIC2` (see
//! `FpState::signal_frame_image` in `sys.rs`; an FXSAVE-only area without
//! them where XSAVE is unavailable). Its `pretcode` word holds the address
//! of a signal restorer found in the target's code (`mov $15, %rax;
//! syscall`, glibc's and musl's `__restore_rt`).
//!
//! For each system call the registers get the number and arguments, `rip`
//! = a `syscall; ret` sequence found in the target's code (libc, vDSO),
//! `rsp` = the frame, `orig_rax = -1`; the signal mask becomes "everything
//! blocked" only once these registers are in place. The thread runs under
//! `PTRACE_SYSCALL`: suture sees the entry stop, then the exit stop, reads
//! `rax` there and loads the next call's registers. Nothing sets the trap
//! flag. Without suture the thread runs on: the call completes, `ret` pops
//! the restorer, whose `rt_sigreturn` restores every register, the mask
//! and the FP/vector state from the frame, and the thread continues where
//! it was borrowed. The registers in the frame are those of a restarted
//! system call where the kernel would restart one (a thread borrowed inside
//! a blocking call: `rax = -ERESTART*`, `orig_rax` = the call), because
//! `rt_sigreturn` disables the kernel's own restart logic: `rip -= 2` and
//! `rax` = the call (also for `-ERESTART_RESTARTBLOCK`, since
//! `rt_sigreturn` resets the restart block and `restart_syscall` would
//! fail with `EINTR`; a relative sleep then starts over; a thread found
//! already inside `restart_syscall` gets the number from the `mov $NR,
//! %eax` before its `syscall` instruction, else `restart_syscall` stays
//! and the call fails with `EINTR`). The gadgets are searched once per
//! [`Process`].
//!
//! On release (suture alive) the thread is first moved from its
//! syscall-exit stop into an interrupt-stop (`PTRACE_INTERRUPT` then
//! `PTRACE_CONT`; it reports before returning to user space); there the
//! saved mask and then the saved registers (including `orig_rax`) are
//! written back and the thread is detached: this stop is inside the
//! kernel's signal-handling path, so an interrupted blocking system call
//! (e.g. `read`, `nanosleep`) is restarted by the kernel exactly as after
//! any signal. Until the registers are restored, the frame restores the
//! mask too, so no moment leaves the thread with our mask and its own
//! registers.
//!
//! Fallback: if the gadgets are not found, the caller chose a `syscall`
//! instruction with [`Hijack::set_syscall_insn`], or there is no room for
//! the frame (or the trampoline page below cannot be mapped, for calls),
//! system calls single-step a `syscall` instruction as before (trap flag
//! set, mask = everything but `SIGTRAP`). That mechanism is **not** safe
//! to abandon: a tracer killed meanwhile leaves the thread
//! with the trap flag or our registers (the process may die of SIGTRAP).
//! Also not covered: a thread with a CET user shadow stack (its
//! `rt_sigreturn` would expect a shadow-stack token we do not write).
//!
//! Signals: while borrowed, the thread's signal mask blocks everything, so
//! signals meant for the process go to other threads or stay pending
//! (with their `siginfo`) until release. A signal that reaches the thread
//! before it is stopped is delivered as it would have been. A `SIGSTOP` is
//! passed on (the process stops as asked; the thread stays usable and
//! re-enters the group-stop on release).
//!
//! Function calls ([`Hijack::call`]) are safe to abandon the same way. On
//! the first call one page is mapped in the target (read + execute,
//! unmapped on release; left behind only if suture is killed) holding a
//! trampoline: `mov %rax, %rdi; mov $15, %eax; syscall`. The frame's
//! `pretcode` then holds the trampoline's address and the callee starts
//! with `rsp` = the frame, so its `ret` enters the trampoline, which calls
//! `rt_sigreturn` on the frame with the result in `rdi`. The thread runs
//! under `PTRACE_SYSCALL` (the callee's own system calls pass through);
//! suture reads the result at the entry stop of that `rt_sigreturn` and
//! lets it run: the thread is back in its saved state (registers, mask,
//! FP state). Without suture the thread simply continues where it was
//! borrowed. Because `rt_sigreturn` resets the thread's restart block, a
//! thread borrowed inside a call to be restarted through it
//! (`-ERESTART_RESTARTBLOCK`, e.g. `nanosleep`) is released with the
//! original call set up to be re-issued rather than relying on
//! `restart_syscall` (see `Hijack::release_regs`). Where the single-step
//! fallback applies, calls use the older mechanism: the return address is
//! canonical but unmapped and the final `ret` faults with `SIGSEGV` there
//! (fatal without a tracer).
//!
//! During a call the synchronous fault signals (`SIGSEGV`, `SIGBUS`,
//! `SIGILL`, `SIGFPE`, `SIGTRAP`) stay unblocked: if they were blocked the
//! kernel would reset the program's handlers for them to `SIG_DFL` when
//! forcing the fault. A fault is the callee's crash: it is suppressed, the
//! registers (general-purpose and extended FP/vector state) and the
//! thread's own mask are restored and [`Error::CallFault`] returned. Such
//! signals sent by other processes meanwhile are held and re-injected on
//! release. The callee's stack lies below the signal frame, whose
//! `pretcode` is set back to the restorer before the next system call.
//!
//! Test hook: the environment variable `SUTURE_TEST_HIJACK_KILL_AT` (see
//! `KILL_AT_ENV`) makes the tracer SIGKILL itself at a named point of the
//! mechanism (`tests/hijack_killed.rs`).

use std::marker::PhantomData;
use std::time::{Duration, Instant};

use nix::errno::Errno;

use crate::sys::{self, Report};
use crate::{Error, Process, Result, ReturnGadgets, Tid};

/// How long one remote system call may take by default.
pub const DEFAULT_SYSCALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Bytes below the stack pointer that the x86-64 ABI reserves for the
/// interrupted code (the red zone).
const RED_ZONE: u64 = 128;

/// The mask while the thread carries our registers: every signal blocked
/// (SIGKILL and SIGSTOP cannot be).
const HIJACK_MASK: u64 = !0;

/// The mask of the single-step fallback: everything but SIGTRAP (blocking
/// it would make the kernel reset a SIGTRAP handler on our single-step
/// traps).
const LEGACY_MASK: u64 = !sig_bit(libc::SIGTRAP);

/// The mask during [`Hijack::call`]: the synchronous fault signals are
/// unblocked (see the module documentation).
const CALL_MASK: u64 = HIJACK_MASK
    & !(sig_bit(libc::SIGSEGV)
        | sig_bit(libc::SIGBUS)
        | sig_bit(libc::SIGILL)
        | sig_bit(libc::SIGFPE)
        | sig_bit(libc::SIGTRAP));

/// Bytes kept free between the red zone and the signal frame, for
/// [`Hijack::memfd_create`]'s name (at most 250 bytes with its NUL).
const SCRATCH: u64 = 512;

/// Size of the x86-64 `struct rt_sigframe`: `pretcode` (8), `struct
/// ucontext` (304), `struct siginfo` (128).
const RT_SIGFRAME_SIZE: u64 = 440;

/// `uc_flags` bits (arch/x86/include/uapi/asm/ucontext.h).
const UC_FP_XSTATE: u64 = 0x1;
const UC_SIGCONTEXT_SS: u64 = 0x2;
const UC_STRICT_RESTORE_SS: u64 = 0x4;

/// Kernel-internal restart codes a system call interrupted by a signal
/// leaves in `rax` (include/linux/errno.h).
const ERESTARTSYS: i64 = 512;
const ERESTARTNOINTR: i64 = 513;
const ERESTARTNOHAND: i64 = 514;
const ERESTART_RESTARTBLOCK: i64 = 516;

/// Test hook: when this environment variable names a point of the
/// mechanism (`loaded`, `entry`, `exit`, `release-stop`, `release-mask`,
/// `call-loaded`, `call-return`),
/// the tracer SIGKILLs itself there. Used by the tests that check the
/// target survives a tracer killed at any moment.
const KILL_AT_ENV: &str = "SUTURE_TEST_HIJACK_KILL_AT";

/// Return addresses for [`Hijack::call`], tried in order: canonical user
/// addresses (below 2^47) far from where Linux puts mappings; the first one
/// not mapped in the target is used. Jumping there faults with `SIGSEGV` at
/// `rip` = the address.
const CALL_RETURN_ADDRESSES: [u64; 4] = [
    0x3ead_dead_0000,
    0x2ead_dead_0000,
    0x1ead_dead_0000,
    0x0ead_dead_0000,
];

/// EFLAGS trap flag and direction flag (the ABI wants DF clear on entry).
const EFLAGS_TF_DF: u64 = 0x100 | 0x400;

const fn sig_bit(sig: i32) -> u64 {
    1u64 << (sig - 1)
}

/// SIGKILLs this process if [`KILL_AT_ENV`] names `point`.
fn test_kill_point(point: &str) {
    static AT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    if AT
        .get_or_init(|| std::env::var(KILL_AT_ENV).ok())
        .as_deref()
        == Some(point)
    {
        // SAFETY: raise takes only an integer; SIGKILL ends the process.
        unsafe { libc::raise(libc::SIGKILL) };
    }
}

/// The kind of ptrace-stop the borrowed thread is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// An interrupt-stop, group-stop or event stop: inside the kernel's
    /// signal-handling path, where restoring the registers lets the kernel
    /// restart an interrupted system call.
    Ptrace,
    /// A signal-delivery-stop (also in the signal-handling path), in which
    /// a signal can be injected on detach.
    Signal,
    /// The exit of one of our system calls (`PTRACE_SYSCALL`): the thread
    /// returns to user space from here, past the signal-handling path.
    SyscallExit,
}

/// How [`Hijack::run_to_signal`] resumes the thread.
#[derive(Clone, Copy)]
enum Resume {
    Step,
    Continue,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// In a ptrace-stop, of this kind.
    Stopped(Stop),
    /// Resumed and not stopped again (only after a failed wait).
    Running,
    /// The thread died (or was detached).
    Gone,
}

/// One thread of the target stopped and borrowed to execute system calls;
/// the rest of the process keeps running. Restores the thread and detaches
/// on [`Hijack::release`] or on drop.
///
/// `!Send`: ptrace binds the tracee to the thread that created this.
pub struct Hijack<'p> {
    process: &'p Process,
    tid: Tid,
    saved_regs: libc::user_regs_struct,
    saved_mask: u64,
    state: State,
    /// The signal mask the thread has now.
    mask_now: u64,
    /// The code to return through (safe mechanism), or `None` for the
    /// single-step fallback. Looked up on the first system call.
    gadgets: Option<Option<ReturnGadgets>>,
    /// Address of the signal frame written on the thread's stack, while it
    /// is intact.
    frame: Option<u64>,
    /// The thread carries our registers (not its saved ones).
    injected: bool,
    /// Our return trampoline for [`Hijack::call`] (one page, unmapped on
    /// release).
    trampoline: Option<u64>,
    /// A call returned through `rt_sigreturn`, which reset the thread's
    /// restart block (see [`Hijack::release_regs`]).
    sigreturned: bool,
    syscall_insn: Option<u64>,
    timeout: Duration,
    /// Signals sent by a process (e.g. a user's SIGTRAP, or a SIGSEGV that
    /// reached the thread during a call) that arrived while we held the
    /// thread, to re-inject on release. At most one per signal number.
    held_signals: Vec<libc::siginfo_t>,
    /// When the thread was asked to stop.
    started: Instant,
    boost: Option<crate::boost::Boost>,
    _not_send: PhantomData<*const ()>,
}

impl Process {
    /// Seizes and interrupts one thread and saves its registers. Threads
    /// blocked in a system call come first (borrowing one costs it
    /// nothing unless its wait ends meanwhile), the main thread before the
    /// others; if one cannot be stopped within its share of `timeout` (e.g.
    /// uninterruptible sleep), the next is tried.
    pub fn hijack(&self, timeout: Duration) -> Result<Hijack<'_>> {
        sys::release_abandoned(Duration::ZERO);
        self.ensure_alive()?;
        let deadline = Instant::now() + timeout;
        // Candidates: sleeping threads, then running ones, the main thread
        // first in each; threads in uninterruptible sleep last and zombies
        // not at all.
        let mut candidates: Vec<(u8, Tid)> = self
            .threads()?
            .into_iter()
            .filter_map(|tid| {
                let stat = self.thread_stat(tid)?;
                if stat.is_dead() {
                    return None;
                }
                let rank = match stat.state {
                    'D' => 4,
                    'S' => 0,
                    _ => 2,
                } + u8::from(tid != self.pid());
                Some((rank, tid))
            })
            .collect();
        candidates.sort_unstable();
        if candidates.is_empty() {
            return Err(Error::Exited { pid: self.pid() });
        }
        let mut last_timeout = None;
        let n = candidates.len();
        for (i, &(_, tid)) in candidates.iter().enumerate() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            // The first thread gets half the time if others could follow;
            // the rest share what remains.
            let share = if i + 1 == n {
                left
            } else if i == 0 {
                left / 2
            } else {
                left / (n - i).min(4) as u32
            };
            match self.hijack_thread(tid, share) {
                Ok(h) => return Ok(h),
                Err(Error::ThreadExited { .. }) => continue,
                // Still ours from an earlier hold whose detach is pending
                // (a thread that had not stopped yet): take another.
                Err(Error::InvalidArgument { .. })
                    if self.tracer_of(tid) == Some(sys::gettid()) =>
                {
                    continue
                }
                Err(e @ Error::Timeout { .. }) => last_timeout = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last_timeout.unwrap_or_else(|| Error::Timeout {
            what: format!(
                "stopping a thread of process {} to borrow it (all threads busy in uninterruptible sleep?)",
                self.pid()
            ),
        }))
    }

    /// Like [`Process::hijack`], but borrows the given thread.
    pub fn hijack_thread(&self, tid: Tid, timeout: Duration) -> Result<Hijack<'_>> {
        // A thread let go earlier but not yet detached (it had not stopped)
        // is released first if it can be.
        sys::release_abandoned(Duration::ZERO);
        // Found (and cached) before the thread is stopped: scanning the C
        // library for them takes milliseconds the thread would wait.
        let _ = self.return_gadgets();
        let started = Instant::now();
        let boost = crate::boost::Boost::new();
        let deadline = started + timeout;
        // TRACESYSGOOD: our system-call stops are told apart from signals.
        let tgid = self.pid();
        if let Err(errno) = sys::seize_fresh(tid, |t| sys::seize_tracesysgood(tgid, t)) {
            return Err(self.seize_error(tid, errno));
        }
        if sys::interrupt(tid).is_err() {
            // Seized but already dying: reap it.
            sys::reap(tid, Duration::from_millis(100));
            return Err(self.vanished(tid));
        }
        // Wait for the interrupt-stop (or a group-stop). A signal that
        // arrives first is delivered as it would have been without us. Any
        // ptrace-stop consumes a pending PTRACE_INTERRUPT, so interrupt
        // again: the thread stops before it runs user code.
        loop {
            match sys::wait_until(tid, deadline) {
                Some(Report::Interrupt) | Some(Report::GroupStop(_)) => break,
                Some(ev @ (Report::Signal(_) | Report::PtraceEvent(_))) => {
                    let sig = if let Report::Signal(sig) = ev { sig } else { 0 };
                    if sys::cont(tid, sig).is_err() || sys::interrupt(tid).is_err() {
                        sys::reap(tid, Duration::from_millis(100));
                        return Err(self.vanished(tid));
                    }
                }
                Some(Report::Gone) => return Err(self.vanished(tid)),
                None => {
                    sys::abandon(tid);
                    sys::release_abandoned(Duration::from_millis(20));
                    return Err(Error::Timeout {
                        what: format!(
                            "stopping thread {tid} of process {} (it may be in uninterruptible sleep)",
                            self.pid()
                        ),
                    });
                }
            }
        }
        // The thread is held: if the pid was reused meanwhile, this is not
        // our process.
        if !self.is_alive() {
            let _ = sys::detach(tid, 0);
            return Err(Error::Exited { pid: self.pid() });
        }
        let saved = sys::getregs(tid).and_then(|regs| Ok((regs, sys::getsigmask(tid)?)));
        let (mut saved_regs, saved_mask) = match saved {
            Ok(s) => s,
            Err(_) => {
                if sys::detach(tid, 0).is_err() {
                    sys::reap(tid, Duration::from_millis(100));
                }
                return Err(self.vanished(tid));
            }
        };
        self.abort_rseq_critical_section(tid, &mut saved_regs);
        Ok(Hijack {
            process: self,
            tid,
            saved_regs,
            saved_mask,
            state: State::Stopped(Stop::Ptrace),
            mask_now: saved_mask,
            gadgets: None,
            frame: None,
            injected: false,
            trampoline: None,
            sigreturned: false,
            syscall_insn: None,
            timeout: DEFAULT_SYSCALL_TIMEOUT,
            held_signals: Vec::new(),
            started,
            boost: Some(boost),
            _not_send: PhantomData,
        })
    }

    /// If the thread was stopped inside an rseq critical section, do what
    /// the kernel would do when it next returns to user space: clear
    /// `rseq->rseq_cs` and continue at the abort handler.
    ///
    /// Without this, our first single-step (with rip pointing elsewhere)
    /// lets the kernel clear `rseq_cs` without aborting, and restoring the
    /// original rip would resume the critical section after it was
    /// preempted, breaking its atomicity (e.g. tcmalloc's per-CPU caches).
    fn abort_rseq_critical_section(&self, tid: Tid, regs: &mut libc::user_regs_struct) {
        let Some((rseq, signature)) = sys::rseq_configuration(tid) else {
            return;
        };
        // struct rseq { u32 cpu_id_start; u32 cpu_id; u64 rseq_cs; ... }
        let Ok(cs_ptr) = self.read_mem(rseq + 8, 8) else {
            return;
        };
        let cs_ptr = u64::from_le_bytes(cs_ptr.try_into().unwrap_or([0; 8]));
        if cs_ptr == 0 {
            return;
        }
        // struct rseq_cs { u32 version; u32 flags; u64 start_ip;
        //                  u64 post_commit_offset; u64 abort_ip; }
        let Ok(cs) = self.read_mem(cs_ptr, 32) else {
            return;
        };
        let word = |i: usize| u64::from_le_bytes(cs[i..i + 8].try_into().unwrap_or([0; 8]));
        let (start, len, abort) = (word(8), word(16), word(24));
        let inside = regs.rip >= start && regs.rip - start < len;
        if !inside {
            return; // the kernel clears a stale rseq_cs itself
        }
        // The kernel insists on the signature right before the handler.
        let sig_ok = abort >= 4
            && self
                .read_mem(abort - 4, 4)
                .is_ok_and(|b| b == signature.to_le_bytes());
        if sig_ok && self.write_mem(rseq + 8, &[0; 8]).is_ok() {
            regs.rip = abort;
        }
    }

    /// The error for a failed PTRACE_SEIZE of one of our threads.
    pub(crate) fn seize_error(&self, tid: Tid, errno: Errno) -> Error {
        match errno {
            Errno::ESRCH => self.vanished(tid),
            Errno::EPERM => {
                if !self.is_alive() {
                    return Error::Exited { pid: self.pid() };
                }
                if self.thread_stat(tid).is_none_or(|s| s.is_dead()) {
                    return self.vanished(tid);
                }
                let tracer = self.tracer_of(tid);
                if let Some(other) = tracer.filter(|&t| t != sys::gettid()) {
                    return self.already_traced(other);
                }
                if tracer.is_some() {
                    return Error::InvalidArgument {
                        what: format!(
                            "thread {tid} of process {} is already held by this thread (an active Hijack or StoppedProcess)",
                            self.pid()
                        ),
                    };
                }
                self.permission_error("the kernel refused PTRACE_SEIZE (EPERM)".to_string())
            }
            other => Error::ptrace("SEIZE", tid, other),
        }
    }
}

impl Hijack<'_> {
    /// The borrowed thread.
    pub fn tid(&self) -> Tid {
        self.tid
    }

    /// The registers the thread had when it was stopped (restored on release).
    pub fn saved_regs(&self) -> &libc::user_regs_struct {
        &self.saved_regs
    }

    /// Uses the `syscall` instruction at `addr` instead of searching one.
    pub fn set_syscall_insn(&mut self, addr: u64) {
        self.syscall_insn = Some(addr);
    }

    /// Limit for one remote system call (default [`DEFAULT_SYSCALL_TIMEOUT`]).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    fn ptrace_failed(&mut self, what: &str, errno: Errno) -> Error {
        if errno == Errno::ESRCH {
            // The thread died (it cannot leave the stop otherwise).
            self.state = State::Gone;
            sys::reap(self.tid, Duration::from_millis(100));
            self.process.vanished(self.tid)
        } else {
            Error::ptrace(what, self.tid, errno)
        }
    }

    fn ensure_stopped(&self) -> Result<()> {
        match self.state {
            State::Stopped(_) => Ok(()),
            State::Gone => Err(self.process.vanished(self.tid)),
            State::Running => Err(Error::Timeout {
                what: format!(
                    "waiting for thread {} of process {} to stop again after an earlier timeout",
                    self.tid,
                    self.process.pid()
                ),
            }),
        }
    }

    /// Executes one system call in the target and returns its result
    /// (`rax`). A negative errno comes back as [`Error::Remote`].
    pub fn syscall(&mut self, nr: i64, args: [u64; 6]) -> Result<u64> {
        self.syscall_named(&format!("system call {nr}"), nr, args)
    }

    fn syscall_named(&mut self, what: &str, nr: i64, args: [u64; 6]) -> Result<u64> {
        self.ensure_stopped()?;
        let result = match self.safe_gadgets() {
            Some(g) => match self.ensure_frame(g) {
                Ok(frame) => self.syscall_safe(what, nr, args, g, frame)?,
                // No room for the frame (e.g. the stack mapping ends just
                // below the red zone): fall back to single-stepping.
                Err(_) => {
                    self.gadgets = Some(None);
                    self.syscall_legacy(what, nr, args)?
                }
            },
            None => self.syscall_legacy(what, nr, args)?,
        };
        let r = result as i64;
        if (-4095..0).contains(&r) {
            return Err(Error::Remote {
                what: what.to_string(),
                errno: Errno::from_raw(-r as i32),
            });
        }
        Ok(result)
    }

    /// The return gadgets of the safe mechanism, or `None` if this borrow
    /// uses the single-step fallback (the gadgets were not found, or the
    /// caller chose a `syscall` instruction with
    /// [`Hijack::set_syscall_insn`]).
    fn safe_gadgets(&mut self) -> Option<ReturnGadgets> {
        if self.syscall_insn.is_some() && self.gadgets.is_none() {
            self.gadgets = Some(None);
        }
        *self
            .gadgets
            .get_or_insert_with(|| self.process.return_gadgets())
    }

    /// Sets the thread's signal mask (if it differs from the current one).
    fn set_mask(&mut self, mask: u64) -> Result<()> {
        if self.mask_now != mask {
            if let Err(errno) = sys::setsigmask(self.tid, mask) {
                return Err(self.ptrace_failed("SETSIGMASK", errno));
            }
            self.mask_now = mask;
        }
        Ok(())
    }

    /// The registers the thread must resume with if it restores itself
    /// through the signal frame (no tracer left): the saved ones, except
    /// that a system call the thread was interrupted in is set up to
    /// restart, as the kernel does when no handler runs
    /// (`arch_do_signal_or_restart`). `rt_sigreturn` sets `orig_rax` to -1,
    /// so the kernel's own restart logic would not apply. For
    /// `-ERESTART_RESTARTBLOCK` the original call is re-issued rather than
    /// `restart_syscall`: `rt_sigreturn` resets the thread's restart block
    /// (`restore_sigcontext`), so `restart_syscall` would fail with `EINTR`.
    /// A thread already inside `restart_syscall` (borrowed again after an
    /// earlier borrow restarted its call) no longer shows the original
    /// number; it is read from the `mov $NR, %eax` (or `%rax`) right before
    /// the `syscall` instruction, as in libc's wrappers; where that is not
    /// found, `restart_syscall` stays (the call then fails with `EINTR`).
    fn frame_regs(&self) -> libc::user_regs_struct {
        let mut r = self.saved_regs;
        if (r.orig_rax as i64) >= 0 {
            let code = -(r.rax as i64);
            if matches!(
                code,
                ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND | ERESTART_RESTARTBLOCK
            ) {
                r.rax = r.orig_rax;
                r.rip = r.rip.wrapping_sub(2);
                if r.orig_rax == libc::SYS_restart_syscall as u64 {
                    if let Some(nr) = self.syscall_number_before(r.rip) {
                        r.rax = nr;
                    }
                }
            }
        }
        r
    }

    /// The registers written back on release: the saved ones, so the
    /// kernel restarts an interrupted system call; except when the thread
    /// was borrowed inside a call to be restarted through its restart
    /// block (`-ERESTART_RESTARTBLOCK`) and a [`Hijack::call`] returned
    /// through `rt_sigreturn` meanwhile, which reset that block
    /// (`restart_syscall` would fail with `EINTR`): then the original call
    /// is re-issued as in the signal frame ([`Hijack::frame_regs`]).
    fn release_regs(&self) -> libc::user_regs_struct {
        let r = self.saved_regs;
        if self.sigreturned && (r.orig_rax as i64) >= 0 && -(r.rax as i64) == ERESTART_RESTARTBLOCK
        {
            let mut f = self.frame_regs();
            f.orig_rax = u64::MAX;
            return f;
        }
        r
    }

    /// The number a `mov $NR, %eax; syscall` or `mov $NR, %rax; syscall`
    /// sequence ending with the `syscall` instruction at `insn` loads.
    fn syscall_number_before(&self, insn: u64) -> Option<u64> {
        // 48 c7 c0 imm32 0f 05 (mov $imm, %rax) or b8 imm32 0f 05 (mov $imm, %eax)
        let b = self.process.read_mem(insn.checked_sub(7)?, 9).ok()?;
        let mov = b[0..3] == [0x48, 0xc7, 0xc0] || b[2] == 0xb8;
        if b[7..9] != [0x0f, 0x05] || !mov {
            return None;
        }
        let nr = u32::from_le_bytes(b[3..7].try_into().ok()?);
        (nr < 1024).then_some(u64::from(nr))
    }

    /// Writes (once per borrow, again after a function call) a genuine
    /// `rt_sigframe` below the red zone whose `ucontext` holds the thread's
    /// saved state (see the module documentation); returns its address.
    fn ensure_frame(&mut self, g: ReturnGadgets) -> Result<u64> {
        if let Some(frame) = self.frame {
            return Ok(frame);
        }
        let fp = match sys::get_fpstate(self.tid) {
            Ok(fp) => fp,
            Err(errno) => return Err(self.ptrace_failed("GETREGSET (xstate)", errno)),
        };
        let (fp_image, xsave) = fp.signal_frame_image();
        let rsp = self.saved_regs.rsp;
        let no_room = || Error::InvalidArgument {
            what: format!("stack pointer {rsp:#x} leaves no room for a signal frame"),
        };
        let fp_addr = rsp
            .checked_sub(RED_ZONE + SCRATCH + fp_image.len() as u64)
            .ok_or_else(no_room)?
            & !63;
        // As the kernel places it: `frame + 8` 16-byte aligned, as at a
        // function's entry.
        let frame = fp_addr
            .checked_sub(RT_SIGFRAME_SIZE + 16)
            .ok_or_else(no_room)?
            & !15;
        let frame = frame + 8;
        let mut bytes = vec![0u8; (fp_addr - frame) as usize];
        bytes.extend_from_slice(&fp_image);
        let r = self.frame_regs();
        let mut put = |off: usize, v: u64| bytes[off..off + 8].copy_from_slice(&v.to_le_bytes());
        // struct rt_sigframe { char *pretcode; struct ucontext uc; siginfo_t info; }
        put(0, g.restorer);
        // struct ucontext { u64 uc_flags; ucontext *uc_link; stack_t uc_stack;
        //                   struct sigcontext_64 uc_mcontext; sigset_t uc_sigmask; }
        let flags = UC_SIGCONTEXT_SS | UC_STRICT_RESTORE_SS | if xsave { UC_FP_XSTATE } else { 0 };
        put(8, flags);
        // uc_link (16) and uc_stack (24..48) stay zero: restore_altstack
        // ignores the error a zero stack_t gives, leaving the thread's
        // alternate signal stack as it is.
        const MC: usize = 48;
        let gprs = [
            r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15, r.rdi, r.rsi, r.rbp, r.rbx,
            r.rdx, r.rax, r.rcx, r.rsp, r.rip, r.eflags,
        ];
        for (i, v) in gprs.into_iter().enumerate() {
            put(MC + 8 * i, v);
        }
        // u16 cs, gs, fs, ss (gs and fs are ignored by the kernel).
        let segs = (r.cs & 0xffff) | ((r.ss & 0xffff) << 48);
        put(MC + 144, segs);
        // err, trapno, oldmask, cr2
        put(MC + 168, self.saved_mask);
        put(MC + 184, fp_addr); // fpstate
        put(MC + 256, self.saved_mask); // uc_sigmask
        if let Err(e) = self.process.write_mem(frame, &bytes) {
            self.process.ensure_alive()?;
            return Err(e);
        }
        self.frame = Some(frame);
        Ok(frame)
    }

    /// One system call, safe to abandon at any moment: the thread returns
    /// through `syscall; ret` into the signal restorer (see the module
    /// documentation). Leaves the thread in its syscall-exit stop.
    fn syscall_safe(
        &mut self,
        what: &str,
        nr: i64,
        args: [u64; 6],
        g: ReturnGadgets,
        frame: u64,
    ) -> Result<u64> {
        let tid = self.tid;
        let mut regs = self.saved_regs;
        regs.rip = g.syscall_ret;
        regs.rsp = frame;
        regs.rax = nr as u64;
        regs.rdi = args[0];
        regs.rsi = args[1];
        regs.rdx = args[2];
        regs.r10 = args[3];
        regs.r8 = args[4];
        regs.r9 = args[5];
        regs.eflags &= !EFLAGS_TF_DF;
        // Not inside a system call any more: no restart on the way out.
        regs.orig_rax = u64::MAX;
        if let Err(errno) = sys::setregs(tid, &regs) {
            return Err(self.ptrace_failed("SETREGS", errno));
        }
        self.injected = true;
        // Only now: with our registers loaded, the frame restores the mask.
        self.set_mask(HIJACK_MASK)?;
        test_kill_point("loaded");
        let deadline = Instant::now() + self.timeout;
        let mut inject = 0;
        loop {
            if let Err(errno) = sys::syscall(tid, inject) {
                return Err(self.ptrace_failed("SYSCALL", errno));
            }
            self.state = State::Running;
            inject = 0;
            match sys::wait_until(tid, deadline) {
                None => return Err(self.timed_out(what)),
                Some(Report::Gone) => {
                    self.state = State::Gone;
                    return Err(self.process.vanished(tid));
                }
                Some(Report::Interrupt | Report::GroupStop(_) | Report::PtraceEvent(_)) => {
                    self.state = State::Stopped(Stop::Ptrace);
                }
                Some(Report::Signal(sys::SYSCALL_STOP)) => {
                    // Until we know which: never release in an entry stop.
                    self.state = State::Stopped(Stop::Ptrace);
                    let (entry, now) = match sys::at_syscall_entry(tid)
                        .and_then(|e| Ok((e, sys::getregs(tid)?)))
                    {
                        Ok(v) => v,
                        Err(errno) => return Err(self.ptrace_failed("GET_SYSCALL_INFO", errno)),
                    };
                    if now.orig_rax != nr as u64 || now.rip != g.syscall_ret + 2 {
                        return Err(Error::RemoteFault {
                            what: format!(
                                "executing {what} at {:#x} in thread {tid}: stopped in system call {} at {:#x}",
                                g.syscall_ret, now.orig_rax as i64, now.rip
                            ),
                        });
                    }
                    if entry {
                        test_kill_point("entry");
                        continue;
                    }
                    self.state = State::Stopped(Stop::SyscallExit);
                    test_kill_point("exit");
                    return Ok(now.rax);
                }
                Some(Report::Signal(libc::SIGSTOP)) => {
                    self.state = State::Stopped(Stop::Signal);
                    inject = libc::SIGSTOP;
                }
                Some(Report::Signal(sig)) => {
                    self.state = State::Stopped(Stop::Signal);
                    let info = match sys::getsiginfo(tid) {
                        Ok(i) => i,
                        Err(errno) => return Err(self.ptrace_failed("GETSIGINFO", errno)),
                    };
                    if self.hold_if_user_sent(&info) {
                        continue;
                    }
                    // A fault caused by our borrowed execution; it must not
                    // reach the program.
                    let rip = sys::getregs(tid).map_or(0, |r| r.rip);
                    return Err(Error::RemoteFault {
                        what: format!(
                            "executing {what} at {:#x} in thread {tid} raised signal {sig} (rip {rip:#x})",
                            g.syscall_ret
                        ),
                    });
                }
            }
        }
    }

    /// One system call by single-stepping a `syscall` instruction (the
    /// fallback where the safe mechanism's code was not found).
    fn syscall_legacy(&mut self, what: &str, nr: i64, args: [u64; 6]) -> Result<u64> {
        let insn = match self.syscall_insn {
            Some(a) => a,
            None => {
                let a = self.process.find_syscall_insn()?;
                self.syscall_insn = Some(a);
                a
            }
        };
        let tid = self.tid;
        let mut regs = self.saved_regs;
        regs.rip = insn;
        regs.rax = nr as u64;
        regs.rdi = args[0];
        regs.rsi = args[1];
        regs.rdx = args[2];
        regs.r10 = args[3];
        regs.r8 = args[4];
        regs.r9 = args[5];
        // Not inside a system call any more: no restart on the way out.
        regs.orig_rax = u64::MAX;
        if let Err(errno) = sys::setregs(tid, &regs) {
            return Err(self.ptrace_failed("SETREGS", errno));
        }
        self.injected = true;
        self.set_mask(LEGACY_MASK)?;
        let deadline = Instant::now() + self.timeout;
        let result = loop {
            let (sig, now) = self.run_to_signal(Resume::Step, what, deadline)?;
            if sig == libc::SIGTRAP {
                self.hold_if_user_signal();
                if now.rip == insn + 2 {
                    break now.rax;
                }
                if now.rip == insn {
                    continue; // not executed yet
                }
            }
            // Anything else is a fault caused by our borrowed execution (all
            // other signals are blocked); it must not reach the program.
            return Err(Error::RemoteFault {
                what: format!(
                    "executing {what} at {insn:#x} in thread {tid} raised signal {sig} (rip {:#x})",
                    now.rip
                ),
            });
        };
        Ok(result)
    }

    /// In a signal-delivery-stop: if the signal was sent by a process (not
    /// our single-step or a fault), keep its siginfo to re-inject on release.
    fn hold_if_user_signal(&mut self) {
        if let Ok(info) = sys::getsiginfo(self.tid) {
            self.hold_if_user_sent(&info);
        }
    }

    /// Holds `info` if it was sent by a process (si_code <= 0: SI_USER,
    /// SI_TKILL, SI_QUEUE, ...); returns whether it was.
    fn hold_if_user_sent(&mut self, info: &libc::siginfo_t) -> bool {
        if info.si_code > 0 {
            return false;
        }
        // Standard signals do not queue: one pending instance per number.
        if !self
            .held_signals
            .iter()
            .any(|h| h.si_signo == info.si_signo)
        {
            self.held_signals.push(*info);
        }
        true
    }

    /// A remote call did not finish in time: stop the thread again (its
    /// system call is interrupted) so it can be restored.
    fn timed_out(&mut self, what: &str) -> Error {
        let tid = self.tid;
        let deadline = Instant::now() + Duration::from_secs(1);
        let mut inject = None;
        while sys::interrupt(tid).is_ok() {
            if let Some(sig) = inject.take() {
                // Pass on a SIGSTOP that arrived meanwhile.
                if sys::cont(tid, sig).is_err() {
                    break;
                }
                continue;
            }
            match sys::wait_until(tid, deadline) {
                Some(Report::Gone) => self.state = State::Gone,
                Some(Report::Signal(libc::SIGSTOP)) => {
                    inject = Some(libc::SIGSTOP);
                    continue;
                }
                Some(Report::Signal(sys::SYSCALL_STOP)) => match sys::at_syscall_entry(tid) {
                    // Our system call, interrupted (or done) at last: the
                    // release goes through `park_for_release`.
                    Ok(false) => self.state = State::Stopped(Stop::SyscallExit),
                    // Never left in an entry stop: let it run to the exit.
                    Ok(true) => {
                        if sys::syscall(tid, 0).is_ok() {
                            continue;
                        }
                        self.state = State::Running;
                    }
                    Err(_) => self.state = State::Gone,
                },
                Some(Report::Signal(_)) => {
                    // Our own single-step trap, a signal sent by a process
                    // (held) or a fault caused by us (suppressed).
                    self.hold_if_user_signal();
                    self.state = State::Stopped(Stop::Signal);
                }
                Some(_) => {
                    self.state = State::Stopped(Stop::Ptrace);
                }
                None => {}
            }
            break;
        }
        Error::Timeout {
            what: format!(
                "running {what} in thread {tid} of process {} (limit {:?})",
                self.process.pid(),
                self.timeout
            ),
        }
    }

    /// Calls the function at `func` in the target on the borrowed thread
    /// with up to six integer arguments (in `rdi`, `rsi`, `rdx`, `rcx`, `r8`,
    /// `r9`; `rax` = 0: no vector arguments) and returns its `rax`.
    ///
    /// The function runs on the thread's stack below the red zone with the
    /// thread's TLS, its signal mask as described in the module
    /// documentation, and is bounded by [`Hijack::set_timeout`]. Afterwards
    /// the general-purpose registers and the extended FP/vector state are
    /// restored, whatever happened. A crash of the function is suppressed
    /// (never delivered) and reported as [`Error::CallFault`]; running out
    /// of time interrupts it and reports [`Error::Timeout`]. Side effects of
    /// the function itself (memory it wrote, locks it took) are not undone:
    /// call only functions that are safe to run at an arbitrary point of the
    /// thread (e.g. IFUNC resolvers, async-signal-safe code).
    pub fn call(&mut self, func: u64, args: &[u64]) -> Result<u64> {
        self.call_named(&format!("the function at {func:#x}"), func, args)
    }

    fn call_named(&mut self, what: &str, func: u64, args: &[u64]) -> Result<u64> {
        if args.len() > 6 {
            return Err(Error::InvalidArgument {
                what: format!(
                    "{} arguments for {what}; at most 6 are passed in registers",
                    args.len()
                ),
            });
        }
        self.ensure_stopped()?;
        if let Some(g) = self.safe_gadgets() {
            if let Ok(trampoline) = self.call_trampoline() {
                if let Ok(frame) = self.ensure_frame(g) {
                    return self.call_safe(what, func, args, frame, trampoline);
                }
            }
        }
        let tid = self.tid;
        let ret_addr = self.call_return_address()?;
        let rsp = self.saved_regs.rsp;
        // At entry (after the pushed return address) rsp + 8 must be a
        // multiple of 16.
        let sp = rsp
            .checked_sub(RED_ZONE + 8)
            .map(|top| (top & !15) - 8)
            .ok_or_else(|| Error::InvalidArgument {
                what: format!("stack pointer {rsp:#x} leaves no room to call {what}"),
            })?;
        self.process.write_mem(sp, &ret_addr.to_le_bytes())?;
        let fp = match sys::get_fpstate(tid) {
            Ok(fp) => fp,
            Err(errno) => return Err(self.ptrace_failed("GETREGSET (xstate)", errno)),
        };
        let mut regs = self.saved_regs;
        regs.rip = func;
        regs.rsp = sp;
        regs.rax = 0;
        let mut a = [0u64; 6];
        a[..args.len()].copy_from_slice(args);
        regs.rdi = a[0];
        regs.rsi = a[1];
        regs.rdx = a[2];
        regs.rcx = a[3];
        regs.r8 = a[4];
        regs.r9 = a[5];
        regs.eflags &= !EFLAGS_TF_DF;
        // Not inside a system call any more: no restart on the way out.
        regs.orig_rax = u64::MAX;
        // The callee's stack overwrites the signal frame, if any.
        self.frame = None;
        let outcome = match sys::setregs(tid, &regs) {
            Ok(()) => {
                self.injected = true;
                self.set_mask(CALL_MASK)
                    .and_then(|()| self.run_call(what, ret_addr))
            }
            Err(errno) => Err(self.ptrace_failed("SETREGS", errno)),
        };
        // Restore whatever the call did to the thread's registers, then its
        // own signal mask: the thread is back in its saved state.
        let restored = match self.state {
            State::Stopped(_) => sys::setregs(tid, &self.saved_regs)
                .map_err(|e| ("SETREGS", e))
                .and_then(|_| sys::set_fpstate(tid, &fp).map_err(|e| ("SETREGSET (xstate)", e)))
                .map(|()| self.injected = false)
                .and_then(|_| sys::setsigmask(tid, self.saved_mask).map_err(|e| ("SETSIGMASK", e)))
                .map(|()| self.mask_now = self.saved_mask),
            // Running: release() deals with it; Gone: nothing to restore.
            State::Running | State::Gone => Ok(()),
        };
        match (outcome, restored) {
            (Err(e), _) => Err(e),
            (Ok(_), Err((req, errno))) => Err(self.ptrace_failed(req, errno)),
            (Ok(v), Ok(())) => Ok(v),
        }
    }

    /// Our return trampoline, mapped (read + execute) on first use:
    /// `mov %rax, %rdi; mov $15, %eax; syscall` (`rt_sigreturn`, with the
    /// callee's result in `rdi` for us to read at the entry stop).
    fn call_trampoline(&mut self) -> Result<u64> {
        if let Some(t) = self.trampoline {
            return Ok(t);
        }
        const CODE: [u8; 10] = [0x48, 0x89, 0xc7, 0xb8, 0x0f, 0, 0, 0, 0x0f, 0x05];
        let page = self.mmap(
            0,
            4096,
            libc::PROT_READ | libc::PROT_EXEC,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )?;
        self.trampoline = Some(page);
        self.process.write_mem(page, &CODE)?;
        Ok(page)
    }

    /// A function call safe to abandon: the callee returns (its `ret` pops
    /// the frame's `pretcode`) into our trampoline, which moves the result
    /// to `rdi` and calls `rt_sigreturn` on the signal frame. Under
    /// `PTRACE_SYSCALL` we read the result at that call's entry stop and
    /// let it run: the thread is back in its saved state (registers, mask,
    /// FP state), in the syscall-exit stop. Without suture it continues
    /// where it was borrowed.
    fn call_safe(
        &mut self,
        what: &str,
        func: u64,
        args: &[u64],
        frame: u64,
        trampoline: u64,
    ) -> Result<u64> {
        let tid = self.tid;
        // The callee runs on the stack below the frame and returns through
        // `pretcode`; the frame is written again (restorer) before the next
        // system call.
        self.frame = None;
        self.process.write_mem(frame, &trampoline.to_le_bytes())?;
        let fp = match sys::get_fpstate(tid) {
            Ok(fp) => fp,
            Err(errno) => return Err(self.ptrace_failed("GETREGSET (xstate)", errno)),
        };
        let mut regs = self.saved_regs;
        regs.rip = func;
        regs.rsp = frame;
        regs.rax = 0;
        let mut a = [0u64; 6];
        a[..args.len()].copy_from_slice(args);
        regs.rdi = a[0];
        regs.rsi = a[1];
        regs.rdx = a[2];
        regs.rcx = a[3];
        regs.r8 = a[4];
        regs.r9 = a[5];
        regs.eflags &= !EFLAGS_TF_DF;
        regs.orig_rax = u64::MAX;
        if let Err(errno) = sys::setregs(tid, &regs) {
            return Err(self.ptrace_failed("SETREGS", errno));
        }
        self.injected = true;
        let outcome = self.set_mask(CALL_MASK).and_then(|()| {
            test_kill_point("call-loaded");
            self.run_call_safe(what, trampoline + 10)
        });
        match outcome {
            Ok(v) => {
                // rt_sigreturn restored the frame's state.
                self.sigreturned = true;
                self.injected = false;
                self.mask_now = self.saved_mask;
                Ok(v)
            }
            Err(e) => {
                // A fault or a timeout: restore the thread ourselves.
                if let State::Stopped(_) = self.state {
                    let restored = sys::setregs(tid, &self.saved_regs)
                        .map_err(|e| ("SETREGS", e))
                        .and_then(|_| {
                            sys::set_fpstate(tid, &fp).map_err(|e| ("SETREGSET (xstate)", e))
                        })
                        .map(|()| self.injected = false)
                        .and_then(|_| {
                            sys::setsigmask(tid, self.saved_mask).map_err(|e| ("SETSIGMASK", e))
                        })
                        .map(|()| self.mask_now = self.saved_mask);
                    if let Err((req, errno)) = restored {
                        return Err(self.ptrace_failed(req, errno));
                    }
                }
                Err(e)
            }
        }
    }

    /// Runs the prepared safe call until the trampoline's `rt_sigreturn`
    /// (entry stop at `sigreturn_end`) and through it; returns the result.
    fn run_call_safe(&mut self, what: &str, sigreturn_end: u64) -> Result<u64> {
        let tid = self.tid;
        let pid = self.process.pid();
        let deadline = Instant::now() + self.timeout;
        let mut inject = 0;
        let mut result = None;
        loop {
            if let Err(errno) = sys::syscall(tid, inject) {
                return Err(self.ptrace_failed("SYSCALL", errno));
            }
            self.state = State::Running;
            inject = 0;
            match sys::wait_until(tid, deadline) {
                None => return Err(self.timed_out(what)),
                Some(Report::Gone) => {
                    self.state = State::Gone;
                    return Err(self.process.vanished(tid));
                }
                Some(Report::Interrupt | Report::GroupStop(_) | Report::PtraceEvent(_)) => {
                    self.state = State::Stopped(Stop::Ptrace);
                }
                Some(Report::Signal(sys::SYSCALL_STOP)) => {
                    // Never released in an entry stop (see timed_out).
                    self.state = State::Stopped(Stop::Ptrace);
                    let (entry, now) = match sys::at_syscall_entry(tid)
                        .and_then(|e| Ok((e, sys::getregs(tid)?)))
                    {
                        Ok(v) => v,
                        Err(errno) => return Err(self.ptrace_failed("GET_SYSCALL_INFO", errno)),
                    };
                    if entry {
                        if now.orig_rax == libc::SYS_rt_sigreturn as u64 && now.rip == sigreturn_end
                        {
                            result = Some(now.rdi);
                            test_kill_point("call-return");
                        }
                        continue;
                    }
                    self.state = State::Stopped(Stop::SyscallExit);
                    if let Some(v) = result {
                        return Ok(v);
                    }
                    // The callee's own system call: run on.
                }
                Some(Report::Signal(libc::SIGSTOP)) => {
                    self.state = State::Stopped(Stop::Signal);
                    inject = libc::SIGSTOP;
                }
                Some(Report::Signal(sig)) => {
                    self.state = State::Stopped(Stop::Signal);
                    let info = match sys::getsiginfo(tid) {
                        Ok(i) => i,
                        Err(errno) => return Err(self.ptrace_failed("GETSIGINFO", errno)),
                    };
                    let self_abort = sig == libc::SIGABRT
                        && info.si_code <= 0
                        // SAFETY: si_code <= 0 (SI_USER, SI_TKILL, SI_QUEUE,
                        // ...): the kill fields of the union are the valid ones.
                        && unsafe { info.si_pid() } == pid;
                    if !self_abort && self.hold_if_user_sent(&info) {
                        continue; // sent by a process: re-injected on release
                    }
                    let rip = sys::getregs(tid).map_or(0, |r| r.rip);
                    return Err(Error::CallFault {
                        what: format!("calling {what} in thread {tid} of process {pid}"),
                        signal: sig,
                        rip,
                    });
                }
            }
        }
    }

    /// Lets the thread run the prepared call until it returns to
    /// `ret_addr`, faults, or runs out of time.
    fn run_call(&mut self, what: &str, ret_addr: u64) -> Result<u64> {
        let tid = self.tid;
        let pid = self.process.pid();
        let deadline = Instant::now() + self.timeout;
        loop {
            let (sig, now) = self.run_to_signal(Resume::Continue, what, deadline)?;
            let info = match sys::getsiginfo(tid) {
                Ok(i) => i,
                Err(errno) => return Err(self.ptrace_failed("GETSIGINFO", errno)),
            };
            // abort() in the callee sends SIGABRT to its own thread: that is
            // the callee failing, not a signal for the program.
            let self_abort = sig == libc::SIGABRT
                && info.si_code <= 0
                // SAFETY: si_code <= 0 (SI_USER, SI_TKILL, SI_QUEUE, ...):
                // the kill fields of the union are the valid ones.
                && unsafe { info.si_pid() } == pid;
            if !self_abort && self.hold_if_user_sent(&info) {
                continue; // sent by a process: re-injected on release
            }
            if sig == libc::SIGSEGV && now.rip == ret_addr {
                return Ok(now.rax);
            }
            return Err(Error::CallFault {
                what: format!("calling {what} in thread {tid} of process {pid}"),
                signal: sig,
                rip: now.rip,
            });
        }
    }

    /// Resumes the borrowed thread (one instruction, or freely) until it
    /// reaches a signal-delivery-stop, and returns the signal with the
    /// registers there. Stray interrupts and group-stops are resumed again;
    /// SIGSTOP is passed on so the process stops as asked, and our next
    /// resume continues it.
    fn run_to_signal(
        &mut self,
        how: Resume,
        what: &str,
        deadline: Instant,
    ) -> Result<(i32, libc::user_regs_struct)> {
        let tid = self.tid;
        let mut inject = 0;
        loop {
            let resumed = match how {
                Resume::Step => sys::step(tid, inject).map_err(|e| ("SINGLESTEP", e)),
                Resume::Continue => sys::cont(tid, inject).map_err(|e| ("CONT", e)),
            };
            if let Err((req, errno)) = resumed {
                return Err(self.ptrace_failed(req, errno));
            }
            self.state = State::Running;
            inject = 0;
            match sys::wait_until(tid, deadline) {
                None => return Err(self.timed_out(what)),
                Some(Report::Gone) => {
                    self.state = State::Gone;
                    return Err(self.process.vanished(tid));
                }
                Some(Report::Interrupt | Report::GroupStop(_) | Report::PtraceEvent(_)) => {
                    self.state = State::Stopped(Stop::Ptrace);
                }
                Some(Report::Signal(sig)) => {
                    self.state = State::Stopped(Stop::Signal);
                    if sig == libc::SIGSTOP {
                        inject = sig;
                        continue;
                    }
                    return match sys::getregs(tid) {
                        Ok(r) => Ok((sig, r)),
                        Err(errno) => Err(self.ptrace_failed("GETREGS", errno)),
                    };
                }
            }
        }
    }

    /// The first of [`CALL_RETURN_ADDRESSES`] not mapped in the target.
    fn call_return_address(&self) -> Result<u64> {
        let maps = self.process.maps()?;
        CALL_RETURN_ADDRESSES
            .into_iter()
            .find(|&a| !maps.iter().any(|m| m.contains(a)))
            .ok_or_else(|| Error::InvalidArgument {
                what: format!(
                    "all candidate return addresses for remote calls are mapped in process {}",
                    self.process.pid()
                ),
            })
    }

    /// `mmap` in the target; returns the address.
    pub fn mmap(
        &mut self,
        addr: u64,
        len: u64,
        prot: i32,
        flags: i32,
        fd: i32,
        off: u64,
    ) -> Result<u64> {
        self.syscall_named(
            "mmap",
            libc::SYS_mmap,
            [
                addr,
                len,
                prot as u64,
                flags as u32 as u64,
                fd as i64 as u64,
                off,
            ],
        )
    }

    pub fn munmap(&mut self, addr: u64, len: u64) -> Result<()> {
        self.syscall_named("munmap", libc::SYS_munmap, [addr, len, 0, 0, 0, 0])
            .map(drop)
    }

    pub fn mprotect(&mut self, addr: u64, len: u64, prot: i32) -> Result<()> {
        self.syscall_named(
            "mprotect",
            libc::SYS_mprotect,
            [addr, len, prot as u64, 0, 0, 0],
        )
        .map(drop)
    }

    /// `memfd_create(name, flags)` in the target. The name is written just
    /// below the thread's red zone on its stack (and the bytes there restored
    /// afterwards).
    pub fn memfd_create(&mut self, name: &str, flags: u32) -> Result<i32> {
        self.ensure_stopped()?;
        let len = name.len() as u64 + 1;
        let rsp = self.saved_regs.rsp;
        let scratch = rsp
            .checked_sub(RED_ZONE + len)
            .map(|a| a & !15)
            .ok_or_else(|| Error::InvalidArgument {
                what: format!("stack pointer {rsp:#x} leaves no room for the name"),
            })?;
        let old = self.process.read_mem(scratch, len as usize)?;
        let r = self.memfd_create_at(name, flags, scratch);
        let restored = self.process.write_mem(scratch, &old);
        let fd = r?;
        restored?;
        Ok(fd)
    }

    /// `memfd_create(name, flags)` in the target, using target memory at
    /// `scratch` (owned by the caller, `name.len() + 1` bytes) for the name.
    pub fn memfd_create_at(&mut self, name: &str, flags: u32, scratch: u64) -> Result<i32> {
        if name.contains('\0') {
            return Err(Error::InvalidArgument {
                what: format!("memfd name {name:?} contains a NUL byte"),
            });
        }
        let mut bytes = name.as_bytes().to_vec();
        bytes.push(0);
        self.process.write_mem(scratch, &bytes)?;
        self.syscall_named(
            "memfd_create",
            libc::SYS_memfd_create,
            [scratch, flags as u64, 0, 0, 0, 0],
        )
        .map(|fd| fd as i32)
    }

    pub fn ftruncate(&mut self, fd: i32, len: u64) -> Result<()> {
        self.syscall_named(
            "ftruncate",
            libc::SYS_ftruncate,
            [fd as i64 as u64, len, 0, 0, 0, 0],
        )
        .map(drop)
    }

    pub fn close(&mut self, fd: i32) -> Result<()> {
        self.syscall_named("close", libc::SYS_close, [fd as i64 as u64, 0, 0, 0, 0, 0])
            .map(drop)
    }

    /// `getpid()` in the target (handy to check the plumbing).
    pub fn getpid(&mut self) -> Result<i32> {
        self.syscall_named("getpid", libc::SYS_getpid, [0; 6])
            .map(|p| p as i32)
    }

    /// From a syscall-exit stop, moves the thread into an interrupt-stop in
    /// the kernel's signal-handling path, without running user code: only
    /// there do restored registers of an interrupted blocking system call
    /// make the kernel restart it. Returns the new state.
    fn park_for_release(&mut self) -> State {
        let tid = self.tid;
        let deadline = Instant::now() + Duration::from_secs(1);
        if sys::interrupt(tid).is_err() {
            return State::Gone;
        }
        let mut inject = 0;
        loop {
            if sys::cont(tid, inject).is_err() {
                return State::Gone;
            }
            inject = 0;
            match sys::wait_until(tid, deadline) {
                None => return State::Running,
                Some(Report::Gone) => return State::Gone,
                // Pass on a SIGSTOP; the thread then reports its group-stop.
                Some(Report::Signal(libc::SIGSTOP)) => inject = libc::SIGSTOP,
                Some(Report::Signal(sys::SYSCALL_STOP)) => {}
                Some(Report::Signal(_)) => {
                    self.hold_if_user_signal();
                    test_kill_point("release-stop");
                    return State::Stopped(Stop::Signal);
                }
                Some(_) => {
                    test_kill_point("release-stop");
                    return State::Stopped(Stop::Ptrace);
                }
            }
        }
    }

    /// Restores the saved registers exactly (including `orig_rax`, so an
    /// interrupted blocking system call restarts) and the signal mask, and
    /// detaches. Also done on drop (ignoring errors).
    pub fn release(mut self) -> Result<()> {
        self.release_inner()
    }

    fn release_inner(&mut self) -> Result<()> {
        if let Some(page) = self.trampoline.take() {
            if matches!(self.state, State::Stopped(_)) {
                let _ = self.munmap(page, 4096);
            }
        }
        let tid = self.tid;
        let state = std::mem::replace(&mut self.state, State::Gone);
        if !matches!(state, State::Gone) {
            crate::hold::record_thread(
                crate::hold::ThreadHold::Borrowed,
                tid,
                self.started.elapsed(),
            );
        }
        let _boost = self.boost.take();
        let state = if state == State::Stopped(Stop::SyscallExit) {
            self.park_for_release()
        } else {
            state
        };
        self.state = State::Gone;
        match state {
            State::Gone => {
                sys::reap(tid, Duration::from_millis(50));
                if self.process.is_alive() {
                    Ok(())
                } else {
                    Err(Error::Exited {
                        pid: self.process.pid(),
                    })
                }
            }
            State::Running => {
                // Cannot detach a running tracee; it stops at its pending
                // interrupt and is detached then.
                sys::interrupt(tid).ok();
                sys::abandon(tid);
                sys::release_abandoned(Duration::from_millis(100));
                Err(Error::Timeout {
                    what: format!(
                        "restoring thread {tid} of process {}: it did not stop again",
                        self.process.pid()
                    ),
                })
            }
            State::Stopped(stop) => {
                let in_signal_stop = stop == Stop::Signal;
                // With the safe mechanism, the mask first: until the
                // registers are restored too, the frame restores it.
                let safe = self.injected && self.frame.is_some();
                let regs = self.release_regs();
                let restored = if safe {
                    sys::setsigmask(tid, self.saved_mask).and_then(|_| {
                        test_kill_point("release-mask");
                        sys::setregs(tid, &regs)
                    })
                } else {
                    sys::setregs(tid, &regs).and_then(|_| sys::setsigmask(tid, self.saved_mask))
                };
                let mut held = std::mem::take(&mut self.held_signals);
                let mut sig = 0;
                if let (Some(info), true) = (held.first(), in_signal_stop) {
                    if sys::setsiginfo(tid, info).is_ok() {
                        sig = info.si_signo;
                        held.remove(0);
                    }
                }
                let detached = sys::detach(tid, sig);
                if detached.is_ok() {
                    // No way to re-inject the others with their original
                    // siginfo here: resend them.
                    for info in &held {
                        let _ = sys::tgkill(self.process.pid(), tid, info.si_signo);
                    }
                }
                match (restored, detached) {
                    (Ok(()), Ok(())) => Ok(()),
                    (Err(Errno::ESRCH), _) | (_, Err(Errno::ESRCH)) => {
                        sys::reap(tid, Duration::from_millis(100));
                        Err(self.process.vanished(tid))
                    }
                    (Err(errno), _) => Err(Error::ptrace("restore registers", tid, errno)),
                    (_, Err(errno)) => Err(Error::ptrace("DETACH", tid, errno)),
                }
            }
        }
    }
}

impl std::fmt::Debug for Hijack<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hijack")
            .field("pid", &self.process.pid())
            .field("tid", &self.tid)
            .field("state", &self.state)
            .field("saved_rip", &format_args!("{:#x}", self.saved_regs.rip))
            .field("syscall_insn", &self.syscall_insn)
            .finish_non_exhaustive()
    }
}

impl Drop for Hijack<'_> {
    fn drop(&mut self) {
        let _ = self.release_inner();
    }
}
