//! Thin wrappers over the ptrace and wait interfaces, plus the bookkeeping
//! of threads we could not detach in time.
//!
//! ptrace ties a tracee to the *thread* that attached it: every request and
//! every `waitpid` for it must come from that thread. The types built on
//! these wrappers are therefore `!Send`.

use std::cell::RefCell;
use std::ptr;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::ptrace;
use nix::unistd::Pid;

use crate::Tid;

/// What `waitpid` reported for one thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Report {
    /// The thread exited or was killed (and is now reaped), or it is not
    /// (any more) our tracee.
    Gone,
    /// `PTRACE_EVENT_STOP` with `SIGTRAP`: the stop we asked for with
    /// `PTRACE_INTERRUPT` (or the first stop of an auto-attached thread).
    Interrupt,
    /// `PTRACE_EVENT_STOP` with a stop signal: the thread is in a group-stop
    /// (the process was stopped by SIGSTOP/SIGTSTP/...).
    GroupStop(i32),
    /// Signal-delivery-stop: the thread is about to receive this signal.
    Signal(i32),
    /// Another `PTRACE_EVENT_*` stop (e.g. `PTRACE_EVENT_CLONE`).
    PtraceEvent(i32),
}

/// `WSTOPSIG` of a system-call stop of a thread seized with
/// `PTRACE_O_TRACESYSGOOD` (decoded as [`Report::Signal`], but no signal:
/// never pass it on).
pub(crate) const SYSCALL_STOP: i32 = libc::SIGTRAP | 0x80;

/// The signal to pass on when leaving a stop reported as
/// `Report::Signal(sig)`: `sig`, or none for a system-call stop.
fn deliverable(sig: i32) -> i32 {
    if sig == SYSCALL_STOP {
        0
    } else {
        sig
    }
}

/// Decodes a raw wait status of a traced thread.
pub(crate) fn decode_status(status: i32) -> Report {
    if libc::WIFSTOPPED(status) {
        let sig = libc::WSTOPSIG(status);
        let event = (status >> 16) & 0xff;
        if event == libc::PTRACE_EVENT_STOP {
            if sig == libc::SIGTRAP {
                Report::Interrupt
            } else {
                Report::GroupStop(sig)
            }
        } else if event != 0 {
            Report::PtraceEvent(event)
        } else {
            Report::Signal(sig)
        }
    } else {
        // WIFEXITED / WIFSIGNALED: the thread is gone (and reaped by this wait).
        Report::Gone
    }
}

/// Whether some child or tracee of this thread has a stop or an end to
/// report (looked at without collecting it: `WNOWAIT`).
pub(crate) fn any_report() -> bool {
    waitid_nohang(
        libc::P_ALL,
        0,
        libc::WNOWAIT | libc::WSTOPPED | libc::WEXITED | libc::__WALL,
    )
}

/// One `waitid(idtype, id, WNOHANG | flags)`: whether it found a report.
fn waitid_nohang(idtype: libc::idtype_t, id: libc::id_t, flags: libc::c_int) -> bool {
    waitid_info(idtype, id, flags).is_some()
}

/// One non-blocking `waitpid(tid, __WALL | WNOHANG)`. `None`: nothing to report yet.
pub(crate) fn wait_nohang(tid: Tid) -> Option<Report> {
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: waitpid only writes the status through the valid pointer we pass.
        let r = unsafe { libc::waitpid(tid, &mut status, libc::__WALL | libc::WNOHANG) };
        if r == 0 {
            return None;
        }
        if r < 0 {
            match Errno::last() {
                Errno::EINTR => continue,
                // ECHILD: not our tracee (any more): it was reaped or never attached.
                _ => return Some(Report::Gone),
            }
        }
        return Some(decode_status(status));
    }
}

/// Waits, bounded by `deadline`, for the next report about `tid`.
/// `None` on timeout. Polls with short, growing sleeps.
pub(crate) fn wait_until(tid: Tid, deadline: Instant) -> Option<Report> {
    let mut backoff = Backoff::new();
    loop {
        if let Some(ev) = wait_nohang(tid) {
            return Some(ev);
        }
        if Instant::now() >= deadline {
            return None;
        }
        backoff.sleep(deadline);
    }
}

/// Waits between polls: growing from 20 µs to 5 ms, never past a deadline,
/// and cut short by `SIGCHLD`.
///
/// Every ptrace-stop of a tracee notifies its tracer with `SIGCHLD`. The
/// calling thread blocks that signal and sleeps in `sigtimedwait`, so a
/// stop is noticed within microseconds, not at the next poll: a stopped
/// thread of the target is held only as long as suture needs it. If
/// another thread of ours takes the signal, the sleep simply ends at its
/// timeout. (Children spawned later start with an empty signal mask:
/// `std::process::Command` resets it.)
pub(crate) struct Backoff(Duration);

impl Backoff {
    pub fn new() -> Self {
        block_sigchld();
        Backoff(Duration::from_micros(20))
    }
    pub fn reset(&mut self) {
        self.0 = Duration::from_micros(20);
    }
    pub fn sleep(&mut self, deadline: Instant) {
        let left = deadline.saturating_duration_since(Instant::now());
        wait_sigchld(self.0.min(left));
        self.0 = (self.0 * 2).min(Duration::from_millis(5));
    }
}

fn sigchld_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise the set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        set
    }
}

thread_local! {
    static SIGCHLD_BLOCKED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Blocks `SIGCHLD` in the calling thread (once), so that it stays pending
/// for [`wait_sigchld`] instead of being discarded. Every other thread of
/// suture should call it too: a thread that does not block it may take
/// (and discard) the `SIGCHLD` of a tracee's stop that a tracer thread
/// waits for, which then notices the stop only at its next poll.
pub fn block_sigchld() {
    SIGCHLD_BLOCKED.with(|b| {
        if !b.get() {
            let set = sigchld_set();
            // SAFETY: changes only this thread's mask, from a valid set.
            unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, ptr::null_mut()) };
            b.set(true);
        }
    });
}

/// Sleeps until a `SIGCHLD` is pending (taking it) or `max` has passed.
fn wait_sigchld(max: Duration) {
    if max.is_zero() {
        return;
    }
    block_sigchld();
    let set = sigchld_set();
    let ts = libc::timespec {
        tv_sec: max.as_secs() as libc::time_t,
        tv_nsec: max.subsec_nanos() as libc::c_long,
    };
    // SAFETY: valid set and timeout; a null siginfo pointer is allowed.
    // EINTR and EAGAIN (timeout) both just end the sleep.
    unsafe { libc::sigtimedwait(&set, ptr::null_mut(), &ts) };
}

fn pid(tid: Tid) -> Pid {
    Pid::from_raw(tid)
}

/// Raw ptrace request taking an integer `data` (a signal number, an option
/// mask, ...) and no address.
fn request(req: libc::c_uint, tid: Tid, data: usize) -> nix::Result<()> {
    // SAFETY: the requests passed here (CONT, SYSCALL, SINGLESTEP, LISTEN,
    // DETACH) read no memory of ours: `addr` is ignored and `data` is a
    // plain integer.
    let r = unsafe {
        libc::ptrace(
            req,
            tid,
            ptr::null_mut::<libc::c_void>(),
            data as *mut libc::c_void,
        )
    };
    Errno::result(r).map(drop)
}

/// Seizes `tid`, a thread of process `tgid` (as do the other `seize_*`).
pub(crate) fn seize(tgid: i32, tid: Tid, trace_clone: bool) -> nix::Result<()> {
    let opts = if trace_clone {
        ptrace::Options::PTRACE_O_TRACECLONE
    } else {
        ptrace::Options::empty()
    };
    seize_with(tgid, tid, opts)
}

/// Every `PTRACE_SEIZE` goes through here: under the exec watchdog
/// ([`crate::exec_watch`]), and deliberately never with
/// `PTRACE_O_EXITKILL`: if we die, the target lives on.
fn seize_with(tgid: i32, tid: Tid, opts: ptrace::Options) -> nix::Result<()> {
    crate::exec_watch::seize_watched(tgid, tid, || ptrace::seize(pid(tid), opts))
}

/// Reaps `tid` if it is an exited tracee of ours; never consumes a stop
/// report. Whether it was reaped.
///
/// `WEXITED` alone is not enough: the kernel reports a tracee's
/// ptrace-stop to its tracer whatever the options ("traditionally we see
/// ptrace'd stopped tasks regardless of options", `kernel/exit.c`), as
/// `CLD_TRAPPED`, and a consuming wait clears it. A stop taken that way is
/// lost to the tracer thread, whose tracee then sits in its ptrace-stop for
/// good. So the report is first looked at (`WNOWAIT`) and collected only if
/// it is an exit (a zombie reports nothing else afterwards).
pub(crate) fn reap_if_exited(tid: Tid) -> bool {
    let flags = libc::WEXITED | libc::__WALL;
    let exited = |info: &libc::siginfo_t| {
        matches!(
            info.si_code,
            libc::CLD_EXITED | libc::CLD_KILLED | libc::CLD_DUMPED
        )
    };
    match waitid_info(libc::P_PID, tid as libc::id_t, flags | libc::WNOWAIT) {
        Some(info) if exited(&info) => waitid_info(libc::P_PID, tid as libc::id_t, flags).is_some(),
        _ => false,
    }
}

/// One `waitid(idtype, id, WNOHANG | flags)`: the report, if it found one.
fn waitid_info(
    idtype: libc::idtype_t,
    id: libc::id_t,
    flags: libc::c_int,
) -> Option<libc::siginfo_t> {
    // SAFETY: waitid writes only into the siginfo we pass.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        let r = libc::waitid(idtype, id, &mut info, libc::WNOHANG | flags);
        (r == 0 && info.si_pid() != 0).then_some(info)
    }
}

/// Seizes with `PTRACE_O_TRACESYSGOOD` only: system-call stops are then
/// told apart from a real `SIGTRAP` ([`SYSCALL_STOP`]); threads the tracee
/// creates stay untraced.
pub(crate) fn seize_tracesysgood(tgid: i32, tid: Tid) -> nix::Result<()> {
    seize_with(tgid, tid, ptrace::Options::PTRACE_O_TRACESYSGOOD)
}

/// Like [`seize_tracesysgood`], with `PTRACE_O_TRACECLONE`: threads the
/// tracee creates are traced from birth.
pub(crate) fn seize_tracesysgood_clone(tgid: i32, tid: Tid) -> nix::Result<()> {
    seize_with(
        tgid,
        tid,
        ptrace::Options::PTRACE_O_TRACESYSGOOD | ptrace::Options::PTRACE_O_TRACECLONE,
    )
}

pub(crate) fn interrupt(tid: Tid) -> nix::Result<()> {
    ptrace::interrupt(pid(tid))
}

/// Resume, delivering `sig` (0 for none) if the thread is in a signal-delivery-stop.
pub(crate) fn cont(tid: Tid, sig: i32) -> nix::Result<()> {
    request(libc::PTRACE_CONT, tid, sig as usize)
}

/// Resume until the next system-call entry or exit (`PTRACE_SYSCALL`),
/// delivering `sig` (0 for none) if the thread is in a signal-delivery-stop.
pub(crate) fn syscall(tid: Tid, sig: i32) -> nix::Result<()> {
    request(libc::PTRACE_SYSCALL, tid, sig as usize)
}

/// `PTRACE_LISTEN`: leave a group-stop's `PTRACE_EVENT_STOP` without running;
/// the thread reports again when the group-stop ends (`SIGCONT`) or is
/// interrupted.
pub(crate) fn listen(tid: Tid) -> nix::Result<()> {
    request(libc::PTRACE_LISTEN, tid, 0)
}

/// Execute one instruction, delivering `sig` (0 for none) first if in a signal-delivery-stop.
pub(crate) fn step(tid: Tid, sig: i32) -> nix::Result<()> {
    request(libc::PTRACE_SINGLESTEP, tid, sig as usize)
}

/// Detach, delivering `sig` (0 for none) if the thread is in a signal-delivery-stop.
pub(crate) fn detach(tid: Tid, sig: i32) -> nix::Result<()> {
    request(libc::PTRACE_DETACH, tid, sig as usize)
}

pub(crate) fn getregs(tid: Tid) -> nix::Result<libc::user_regs_struct> {
    ptrace::getregs(pid(tid))
}

pub(crate) fn setregs(tid: Tid, regs: &libc::user_regs_struct) -> nix::Result<()> {
    ptrace::setregs(pid(tid), *regs)
}

pub(crate) fn getsiginfo(tid: Tid) -> nix::Result<libc::siginfo_t> {
    ptrace::getsiginfo(pid(tid))
}

pub(crate) fn setsiginfo(tid: Tid, info: &libc::siginfo_t) -> nix::Result<()> {
    ptrace::setsiginfo(pid(tid), info)
}

/// Whether a thread in a system-call stop ([`SYSCALL_STOP`]) is at the entry
/// of the call (else at its exit).
pub(crate) fn at_syscall_entry(tid: Tid) -> nix::Result<bool> {
    // SAFETY: ptrace_syscall_info is plain integers; all zeroes is valid.
    let mut info: libc::ptrace_syscall_info = unsafe { std::mem::zeroed() };
    // SAFETY: PTRACE_GET_SYSCALL_INFO writes at most `addr` (= the size of
    // our struct) bytes to `data`, which points to it.
    let r = unsafe {
        libc::ptrace(
            libc::PTRACE_GET_SYSCALL_INFO,
            tid,
            std::mem::size_of::<libc::ptrace_syscall_info>() as *mut libc::c_void,
            &mut info as *mut libc::ptrace_syscall_info as *mut libc::c_void,
        )
    };
    match Errno::result(r) {
        Ok(_) => Ok(info.op == libc::PTRACE_SYSCALL_INFO_ENTRY),
        // Before Linux 5.3: at the entry the kernel has set rax to -ENOSYS.
        Err(Errno::EIO) => Ok(getregs(tid)?.rax as i64 == -(libc::ENOSYS as i64)),
        Err(e) => Err(e),
    }
}

/// `PTRACE_GETEVENTMSG`, e.g. the new thread id at a `PTRACE_EVENT_CLONE` stop.
pub(crate) fn event_msg(tid: Tid) -> nix::Result<i64> {
    ptrace::getevent(pid(tid))
}

/// The thread's blocked-signal mask (bit `n - 1` for signal `n`).
pub(crate) fn getsigmask(tid: Tid) -> nix::Result<u64> {
    let mut mask: u64 = 0;
    // SAFETY: PTRACE_GETSIGMASK writes exactly `addr` (= 8, the kernel's
    // sigset size) bytes to `data`, which points to our u64.
    let r = unsafe {
        libc::ptrace(
            libc::PTRACE_GETSIGMASK,
            tid,
            std::mem::size_of::<u64>() as *mut libc::c_void,
            &mut mask as *mut u64 as *mut libc::c_void,
        )
    };
    Errno::result(r).map(|_| mask)
}

pub(crate) fn setsigmask(tid: Tid, mask: u64) -> nix::Result<()> {
    // SAFETY: PTRACE_SETSIGMASK reads exactly `addr` (= 8) bytes from `data`,
    // which points to our u64.
    let r = unsafe {
        libc::ptrace(
            libc::PTRACE_SETSIGMASK,
            tid,
            std::mem::size_of::<u64>() as *mut libc::c_void,
            &mask as *const u64 as *mut libc::c_void,
        )
    };
    Errno::result(r).map(drop)
}

/// `PTRACE_GET_RSEQ_CONFIGURATION`: the thread's registered `struct rseq`
/// address and abort signature, if it registered one.
pub(crate) fn rseq_configuration(tid: Tid) -> Option<(u64, u32)> {
    #[repr(C)]
    #[derive(Default)]
    struct Conf {
        rseq_abi_pointer: u64,
        rseq_abi_size: u32,
        signature: u32,
        flags: u32,
        pad: u32,
    }
    let mut conf = Conf::default();
    // SAFETY: the kernel writes at most `addr` (= size of Conf) bytes of
    // `struct ptrace_rseq_configuration`, whose layout Conf reproduces, to
    // `data`, which points to our Conf.
    let r = unsafe {
        libc::ptrace(
            libc::PTRACE_GET_RSEQ_CONFIGURATION,
            tid,
            std::mem::size_of::<Conf>() as *mut libc::c_void,
            &mut conf as *mut Conf as *mut libc::c_void,
        )
    };
    (r > 0 && conf.rseq_abi_pointer != 0 && conf.rseq_abi_size >= 16)
        .then_some((conf.rseq_abi_pointer, conf.signature))
}

/// `NT_X86_XSTATE`: the regset holding the XSAVE area (x87, SSE, AVX, ...).
const NT_X86_XSTATE: libc::c_int = 0x202;

/// Large enough for every XSAVE layout in use (AMX tile data included).
const XSTATE_MAX: usize = 64 * 1024;

/// A thread's floating-point/vector state, as saved by [`get_fpstate`].
pub(crate) enum FpState {
    /// The whole XSAVE area (`PTRACE_GETREGSET`, `NT_X86_XSTATE`).
    Xstate(Vec<u8>),
    /// x87 and SSE only (`PTRACE_GETFPREGS`), where XSAVE is unavailable.
    Fpregs(Box<libc::user_fpregs_struct>),
}

/// `fx_sw_bytes.magic1` (`FP_XSTATE_MAGIC1`) and the word after the XSAVE
/// area of a signal frame (`FP_XSTATE_MAGIC2`),
/// arch/x86/include/uapi/asm/sigcontext.h.
const FP_XSTATE_MAGIC1: u32 = 0x4650_5853;
const FP_XSTATE_MAGIC2: u32 = 0x4650_5845;

/// Offset of `sw_reserved` (`struct _fpx_sw_bytes`) in the 512-byte legacy
/// FXSAVE area.
const SW_RESERVED: usize = 464;

const _: () = assert!(std::mem::size_of::<libc::user_fpregs_struct>() == 512);

/// XSAVE feature bit of AMX tile data: enabled per process on demand, so
/// not part of a thread's default signal-frame size.
const XFEATURE_XTILE_DATA: u32 = 18;

/// Size of the standard-format XSAVE area holding `features`, from CPUID
/// leaf 0xD (the tracer runs on the same CPU as the target).
fn xsave_size(features: u64) -> usize {
    let mut size = 512 + 64;
    for i in 2..63 {
        if features & (1 << i) != 0 {
            #[allow(unused_unsafe)]
            // SAFETY: CPUID leaf 0xD exists wherever XSAVE does (features is
            // non-zero only then); the instruction has no other effect.
            let r = unsafe { std::arch::x86_64::__cpuid_count(0xd, i) };
            // ebx = offset in the standard format (0 for supervisor state).
            if r.ebx != 0 {
                size = size.max(r.ebx as usize + r.eax as usize);
            }
        }
    }
    size
}

impl FpState {
    /// The state laid out as the `fpstate` of an x86-64 signal frame, and
    /// whether it is in XSAVE form (`UC_FP_XSTATE`).
    ///
    /// A signal frame's XSAVE area carries in its software-reserved bytes
    /// (`sw_reserved`, offset 464) a `struct _fpx_sw_bytes` { `magic1` =
    /// `FP_XSTATE_MAGIC1`, `extended_size` = `xstate_size` + 4, `xfeatures`,
    /// `xstate_size` } and is followed by `FP_XSTATE_MAGIC2`
    /// (arch/x86/include/uapi/asm/sigcontext.h, arch/x86/kernel/fpu/signal.c).
    /// `NT_X86_XSTATE` puts the process's XCR0 in the first word of those
    /// bytes instead, so they are rebuilt here: `xfeatures` = XCR0 without
    /// the dynamically enabled AMX tile data, `xstate_size` = the size of
    /// the area for those features (which `rt_sigreturn` requires to be at
    /// most the thread's own signal-frame size). Without XSAVE (or with
    /// `PTRACE_GETFPREGS` only) it is the FXSAVE area alone with
    /// `sw_reserved` zeroed, which `rt_sigreturn` restores as x87/SSE only.
    pub(crate) fn signal_frame_image(&self) -> (Vec<u8>, bool) {
        let word =
            |b: &[u8], off: usize| u64::from_le_bytes(b[off..off + 8].try_into().unwrap_or([0; 8]));
        let mut fx = match self {
            FpState::Xstate(buf) if buf.len() >= 512 + 64 => {
                let xcr0 = word(buf, SW_RESERVED);
                let features = xcr0 & !(1u64 << XFEATURE_XTILE_DATA);
                let size = xsave_size(features);
                if features & 0b11 == 0b11 && size <= buf.len() {
                    let mut v = buf[..size].to_vec();
                    let sw = &mut v[SW_RESERVED..512];
                    sw.fill(0);
                    sw[0..4].copy_from_slice(&FP_XSTATE_MAGIC1.to_le_bytes());
                    sw[4..8].copy_from_slice(&(size as u32 + 4).to_le_bytes());
                    sw[8..16].copy_from_slice(&features.to_le_bytes());
                    sw[16..20].copy_from_slice(&(size as u32).to_le_bytes());
                    v.extend_from_slice(&FP_XSTATE_MAGIC2.to_le_bytes());
                    return (v, true);
                }
                buf[..512].to_vec()
            }
            FpState::Xstate(buf) => {
                let mut v = buf.clone();
                v.resize(512, 0);
                v
            }
            FpState::Fpregs(fp) => {
                let p: *const libc::user_fpregs_struct = &**fp;
                // SAFETY: user_fpregs_struct is 512 bytes of plain integers
                // (the FXSAVE layout) with no padding; `p` points to one.
                unsafe { std::slice::from_raw_parts(p.cast::<u8>(), 512) }.to_vec()
            }
        };
        fx[SW_RESERVED..512].fill(0);
        (fx, false)
    }
}

/// Saves the thread's extended FP/vector state.
pub(crate) fn get_fpstate(tid: Tid) -> nix::Result<FpState> {
    let mut buf = vec![0u8; XSTATE_MAX];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: PTRACE_GETREGSET writes at most `iov.iov_len` bytes to
    // `iov.iov_base` (our buffer) and updates `iov.iov_len`; `iov` lives
    // across the call.
    let r = unsafe {
        libc::ptrace(
            libc::PTRACE_GETREGSET,
            tid,
            NT_X86_XSTATE as usize as *mut libc::c_void,
            &mut iov as *mut libc::iovec as *mut libc::c_void,
        )
    };
    match Errno::result(r) {
        Ok(_) => {
            buf.truncate(iov.iov_len.min(XSTATE_MAX));
            Ok(FpState::Xstate(buf))
        }
        Err(Errno::ESRCH) => Err(Errno::ESRCH),
        Err(_) => {
            // SAFETY: user_fpregs_struct is plain integers; all zeroes is valid.
            let mut fp: Box<libc::user_fpregs_struct> = Box::new(unsafe { std::mem::zeroed() });
            // SAFETY: PTRACE_GETFPREGS writes one user_fpregs_struct to `data`,
            // which points to ours.
            let r = unsafe {
                libc::ptrace(
                    libc::PTRACE_GETFPREGS,
                    tid,
                    ptr::null_mut::<libc::c_void>(),
                    &mut *fp as *mut libc::user_fpregs_struct as *mut libc::c_void,
                )
            };
            Errno::result(r).map(|_| FpState::Fpregs(fp))
        }
    }
}

/// Restores state saved by [`get_fpstate`].
pub(crate) fn set_fpstate(tid: Tid, state: &FpState) -> nix::Result<()> {
    let r = match state {
        FpState::Xstate(buf) => {
            let mut iov = libc::iovec {
                iov_base: buf.as_ptr() as *mut libc::c_void,
                iov_len: buf.len(),
            };
            // SAFETY: PTRACE_SETREGSET only reads `iov.iov_len` bytes from
            // `iov.iov_base` (our buffer, not written through).
            unsafe {
                libc::ptrace(
                    libc::PTRACE_SETREGSET,
                    tid,
                    NT_X86_XSTATE as usize as *mut libc::c_void,
                    &mut iov as *mut libc::iovec as *mut libc::c_void,
                )
            }
        }
        FpState::Fpregs(fp) => {
            // SAFETY: PTRACE_SETFPREGS reads one user_fpregs_struct from
            // `data`, which points to ours.
            unsafe {
                libc::ptrace(
                    libc::PTRACE_SETFPREGS,
                    tid,
                    ptr::null_mut::<libc::c_void>(),
                    &**fp as *const libc::user_fpregs_struct as *mut libc::c_void,
                )
            }
        }
    };
    Errno::result(r).map(drop)
}

/// Sends `sig` to thread `tid` of process `tgid`.
pub(crate) fn tgkill(tgid: i32, tid: Tid, sig: i32) -> nix::Result<()> {
    // SAFETY: tgkill takes only integers.
    let r = unsafe { libc::tgkill(tgid, tid, sig) };
    Errno::result(r).map(drop)
}

/// Our own thread id (ptrace's idea of "the tracer").
pub(crate) fn gettid() -> Tid {
    nix::unistd::gettid().as_raw()
}

/// Reaps a thread that is gone or going (after ESRCH on a thread we held),
/// waiting at most `limit`. Returns whether it was reaped.
pub(crate) fn reap(tid: Tid, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        match wait_until(tid, deadline) {
            Some(Report::Gone) => return true,
            // A stop: it is alive after all; detach it.
            Some(Report::Signal(sig)) => {
                if detach(tid, deliverable(sig)).is_ok() {
                    return true;
                }
            }
            Some(_) => {
                if detach(tid, 0).is_ok() {
                    return true;
                }
            }
            None => return false,
        }
    }
}

// ---------------------------------------------------------------------------
// Threads we attached but could not get into a ptrace-stop in time (e.g. stuck
// in uninterruptible sleep). A running tracee cannot be detached: it will stop
// at its pending PTRACE_INTERRUPT once it leaves the kernel, and must then be
// detached by this same thread. The kernel also detaches every tracee of a
// thread when that thread exits.

thread_local! {
    static ABANDONED: RefCell<Vec<Tid>> = const { RefCell::new(Vec::new()) };
}

/// Remember a seized thread that could not be detached yet, making sure an
/// interrupt is pending so it stops (and can be detached) as soon as it can.
pub(crate) fn abandon(tid: Tid) {
    let _ = interrupt(tid);
    ABANDONED.with(|a| {
        let mut a = a.borrow_mut();
        if !a.contains(&tid) {
            a.push(tid);
        }
    });
}

/// Detaches (or reaps) the abandoned threads that have stopped (or died) by
/// now, waiting at most `wait` for the rest. Returns how many remain attached.
/// Whether `tid` is one of the threads we let go of but could not detach
/// yet.
pub(crate) fn is_abandoned(tid: Tid) -> bool {
    ABANDONED.with(|a| a.borrow().contains(&tid))
}

/// Seizes `tid` with `seize`; if it is still ours from an earlier hold
/// (abandoned: it had not stopped when we let it go), waits a moment for
/// that release to complete and tries once more.
pub(crate) fn seize_fresh(tid: Tid, seize: impl Fn(Tid) -> nix::Result<()>) -> nix::Result<()> {
    match seize(tid) {
        Err(Errno::EPERM) if is_abandoned(tid) => {
            let deadline = Instant::now() + Duration::from_millis(500);
            while is_abandoned(tid) && Instant::now() < deadline {
                release_abandoned(Duration::from_millis(20));
            }
            seize(tid)
        }
        r => r,
    }
}

pub(crate) fn release_abandoned(wait: Duration) -> usize {
    let deadline = Instant::now() + wait;
    let mut backoff = Backoff::new();
    loop {
        let remaining = ABANDONED.with(|a| {
            let mut a = a.borrow_mut();
            a.retain(|&tid| match wait_nohang(tid) {
                None => true,
                Some(Report::Gone) => false,
                // Never lose a signal: a signal-delivery-stop's signal goes
                // along with the detach.
                Some(Report::Signal(sig)) => {
                    detach(tid, deliverable(sig)).is_err() && !reap_quick(tid)
                }
                Some(_) => detach(tid, 0).is_err() && !reap_quick(tid),
            });
            a.len()
        });
        if remaining == 0 || Instant::now() >= deadline {
            return remaining;
        }
        backoff.sleep(deadline);
    }
}

fn reap_quick(tid: Tid) -> bool {
    matches!(wait_nohang(tid), Some(Report::Gone))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode() {
        // exited with code 3
        assert_eq!(decode_status(3 << 8), Report::Gone);
        // killed by SIGKILL
        assert_eq!(decode_status(9), Report::Gone);
        // signal-delivery-stop SIGUSR1
        assert_eq!(decode_status(0x7f | (10 << 8)), Report::Signal(10));
        // PTRACE_EVENT_STOP with SIGTRAP: interrupt
        assert_eq!(
            decode_status(0x7f | (5 << 8) | (libc::PTRACE_EVENT_STOP << 16)),
            Report::Interrupt
        );
        // PTRACE_EVENT_STOP with SIGSTOP: group-stop
        assert_eq!(
            decode_status(0x7f | (19 << 8) | (libc::PTRACE_EVENT_STOP << 16)),
            Report::GroupStop(19)
        );
        assert_eq!(
            decode_status(0x7f | (5 << 8) | (libc::PTRACE_EVENT_CLONE << 16)),
            Report::PtraceEvent(libc::PTRACE_EVENT_CLONE)
        );
        // real-time signal
        assert_eq!(decode_status(0x7f | (34 << 8)), Report::Signal(34));
        // system-call stop under PTRACE_O_TRACESYSGOOD: never a signal to pass on
        assert_eq!(
            decode_status(0x7f | (SYSCALL_STOP << 8)),
            Report::Signal(SYSCALL_STOP)
        );
        assert_eq!(deliverable(SYSCALL_STOP), 0);
        assert_eq!(deliverable(libc::SIGTRAP), libc::SIGTRAP);
    }
}
