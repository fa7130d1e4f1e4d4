//! suture-process: everything that touches another process.
//!
//! * [`Process`]: a handle on a running process (by pid, guarded against pid
//!   reuse by its start time) with `/proc` accessors and memory access
//!   through `/proc/PID/mem`.
//! * [`Hijack`]: one thread of the target borrowed (ptrace-stopped) to run
//!   system calls in the target (`mmap`, `memfd_create`, ...), while the rest
//!   of the process keeps running.
//! * [`StoppedProcess`]: every thread of the target held in a ptrace-stop,
//!   for the short moment of a code write.
//! * [`Tracer`]: single threads traced for a long time (the transition
//!   worker): stopped one at a time, caught at system-call entries.
//!
//! The guiding rule is *never harm the target*: every failure path restores
//! registers, resumes and detaches; every wait is bounded; no signal is lost
//! or delivered twice; a parent shell never sees the target stop (we use
//! `PTRACE_SEIZE` + `PTRACE_INTERRUPT`, never `SIGSTOP`), and we never set
//! `PTRACE_O_EXITKILL`, so the target survives us dying.
//!
//! ptrace binds a tracee to the *thread* that attached it, so [`Hijack`],
//! [`StoppedProcess`] and [`Tracer`] are `!Send`: create, use and drop them
//! on one thread.
//! Nothing else in the tracer process may call `waitpid(-1, ...)` with
//! `__WALL` while they exist (it could consume their stop reports).

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::PathBuf;
use std::time::Duration;

mod boost;
mod exec_watch;
mod gap;
mod hijack;
mod hold;
mod procfs;
mod stop;
mod sys;
mod tracer;

pub use boost::{keep_hold_priority, set_hold_priority};
pub use gap::{
    find_gap_near, HEAP_RESERVE, MMAP_MIN_ADDR, PAGE_SIZE, REL32_MARGIN, REL32_REACH, STACK_GUARD,
    USER_SPACE_END,
};
pub use hijack::{Hijack, DEFAULT_SYSCALL_TIMEOUT};
pub use hold::{add_hold_stats, debug_log, take_hold_stats, HoldStats};
pub use nix::errno::Errno;
pub use stop::StoppedProcess;
pub use sys::block_sigchld;
pub use tracer::{Resume, TraceEvent, Tracer};

/// A thread asleep in the kernel, seen from `/proc` ([`Process::asleep`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Asleep {
    /// In clock ticks since boot (`/proc/PID/task/TID/stat`, field 22).
    pub start_time: u64,
    /// Where it resumes in user space.
    pub pc: u64,
}

/// A thread id (what `gettid` returns; the main thread's equals the pid).
pub type Tid = i32;

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong when touching another process.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No process with this pid.
    #[error(
        "there is no process with pid {pid}; check the pid (the process may have exited already)"
    )]
    NoSuchProcess { pid: i32 },
    /// The pid names a thread, not a process.
    #[error("{tid} is a thread of process {tgid}, not a process id; use pid {tgid} instead")]
    NotAProcess { tid: i32, tgid: i32 },
    /// The process has exited and waits to be reaped by its parent.
    #[error("process {pid} is a zombie (it has exited and only waits for its parent to reap it); there is nothing left to patch")]
    Zombie { pid: i32 },
    /// The kernel will not let us trace the process.
    #[error("not allowed to trace process {pid}: {reason}")]
    PermissionDenied { pid: i32, reason: String },
    /// Another tracer (a debugger, strace, ...) is attached.
    #[error("process {pid} is already traced by {tracer_name} (pid {tracer_pid}); a process can have only one tracer, so detach that debugger or tracer and retry")]
    AlreadyTraced {
        pid: i32,
        tracer_pid: i32,
        tracer_name: String,
    },
    /// The process went away while we worked on it.
    #[error("the target (pid {pid}) exited during the operation")]
    Exited { pid: i32 },
    /// The borrowed thread went away (the rest of the process lives on).
    #[error(
        "thread {tid} of process {pid} exited during the operation; retry to borrow another thread"
    )]
    ThreadExited { pid: i32, tid: Tid },
    /// A bounded wait ran out.
    #[error("timed out {what}; the target was left running")]
    Timeout { what: String },
    /// An operating-system call of ours failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// A system call executed in the target returned an error.
    #[error("{what} in the target failed: {errno}")]
    Remote { what: String, errno: Errno },
    /// Executing in the target did not go as planned (a fault, an odd stop).
    #[error("{what}; the thread's registers were restored")]
    RemoteFault { what: String },
    /// A function called in the target ([`Hijack::call`]) raised a signal
    /// (it crashed) instead of returning. The signal was not delivered.
    #[error("{what}: signal {signal} at rip {rip:#x}; the signal was suppressed and the thread's registers were restored")]
    CallFault { what: String, signal: i32, rip: u64 },
    /// No `syscall` instruction to borrow in the target.
    #[error("found no `syscall` instruction (0f 05) in the executable mappings of process {pid}; set one with Hijack::set_syscall_insn")]
    NoSyscallInstruction { pid: i32 },
    /// A caller-supplied value was unusable.
    #[error("invalid argument: {what}")]
    InvalidArgument { what: String },
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn ptrace(what: &str, tid: Tid, errno: Errno) -> Error {
        Error::io(
            format!("ptrace {what} on thread {tid} failed"),
            io::Error::from_raw_os_error(errno as i32),
        )
    }
}

/// One line of `/proc/PID/maps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    /// Exclusive.
    pub end: u64,
    /// As in maps, e.g. `"r-xp"`.
    pub perms: String,
    pub offset: u64,
    /// `"major:minor"` in hex, as in maps.
    pub dev: String,
    pub inode: u64,
    /// `None` for anonymous memory; else a file path (possibly with
    /// `" (deleted)"`), `"[vdso]"`, `"[stack]"`, `"/memfd:NAME (deleted)"`, ...
    pub path: Option<String>,
}

impl Mapping {
    pub fn readable(&self) -> bool {
        self.perms.as_bytes().first() == Some(&b'r')
    }
    pub fn writable(&self) -> bool {
        self.perms.as_bytes().get(1) == Some(&b'w')
    }
    pub fn executable(&self) -> bool {
        self.perms.as_bytes().get(2) == Some(&b'x')
    }
    /// `true` for a shared mapping (`s` in the fourth column).
    pub fn shared(&self) -> bool {
        self.perms.as_bytes().get(3) == Some(&b's')
    }
    pub fn contains(&self, addr: u64) -> bool {
        self.start <= addr && addr < self.end
    }
    pub fn len(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A handle on a running process.
///
/// Holds `/proc/PID/mem` open from [`Process::open`] on, so memory accesses
/// can never reach another process that later reuses the pid.
#[derive(Debug)]
pub struct Process {
    pid: i32,
    start_time: u64,
    mem: Option<File>,
    /// The code [`Hijack`](crate::Hijack) returns through, found once.
    return_gadgets: std::sync::OnceLock<Option<ReturnGadgets>>,
}

/// Code in the target that lets a borrowed thread restore its own state
/// (see the module documentation of `hijack`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ReturnGadgets {
    /// A `syscall; ret` sequence (`0f 05 c3`).
    pub syscall_ret: u64,
    /// A signal restorer: `mov $15, %rax; syscall` (`48 c7 c0 0f 00 00 00
    /// 0f 05`, glibc's and musl's `__restore_rt`) or `mov $15, %eax;
    /// syscall` (`b8 0f 00 00 00 0f 05`).
    pub restorer: u64,
    /// Address just after the restorer's `syscall` instruction.
    pub restorer_end: u64,
}

/// How a process looks right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Liveness {
    Alive,
    Zombie,
    Gone,
}

impl Process {
    /// Opens process `pid`: it must exist, be a process (not a thread of
    /// another one) and not be a zombie. Remembers its start time to detect
    /// pid reuse.
    pub fn open(pid: i32) -> Result<Process> {
        if pid <= 0 {
            return Err(Error::NoSuchProcess { pid });
        }
        let stat =
            procfs::read_stat(&proc_path(pid, "stat"))?.ok_or(Error::NoSuchProcess { pid })?;
        if let Ok(status) = fs::read_to_string(proc_path(pid, "status")) {
            if let Some(tgid) = procfs::status_field(&status, "Tgid").and_then(|t| t.parse().ok()) {
                if tgid != pid {
                    return Err(Error::NotAProcess { tid: pid, tgid });
                }
            }
        }
        let mut process = Process {
            pid,
            start_time: stat.start_time,
            mem: None,
            return_gadgets: std::sync::OnceLock::new(),
        };
        match process.liveness() {
            Liveness::Alive => {}
            Liveness::Zombie => return Err(Error::Zombie { pid }),
            Liveness::Gone => return Err(Error::NoSuchProcess { pid }),
        }
        // Opening may fail for lack of permission; memory access then
        // reports why (see read_mem / write_mem).
        process.mem = OpenOptions::new()
            .read(true)
            .write(true)
            .open(proc_path(pid, "mem"))
            .or_else(|_| File::open(proc_path(pid, "mem")))
            .ok();
        // The mem file is bound to the process it was opened for; make sure
        // that is still the one we looked at.
        if process.liveness() == Liveness::Gone {
            return Err(Error::NoSuchProcess { pid });
        }
        Ok(process)
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Field 22 of `/proc/PID/stat` (clock ticks after boot).
    pub fn start_time(&self) -> u64 {
        self.start_time
    }

    /// The same process (same pid and start time) still exists and is not a zombie.
    pub fn is_alive(&self) -> bool {
        self.liveness() == Liveness::Alive
    }

    pub(crate) fn liveness(&self) -> Liveness {
        match procfs::read_stat(&proc_path(self.pid, "stat")) {
            Ok(Some(stat)) if stat.start_time == self.start_time => {
                if !stat.is_dead() {
                    return Liveness::Alive;
                }
                // A main thread that called pthread_exit is a zombie while
                // the other threads live on: the process is still alive.
                let live_thread = self.threads_raw().is_ok_and(|tids| {
                    tids.iter().any(|&t| {
                        t != self.pid && self.thread_stat(t).is_some_and(|s| !s.is_dead())
                    })
                });
                if live_thread {
                    Liveness::Alive
                } else {
                    Liveness::Zombie
                }
            }
            _ => Liveness::Gone,
        }
    }

    /// `Exited` if the process is gone or a zombie, else `Ok`.
    pub(crate) fn ensure_alive(&self) -> Result<()> {
        if self.is_alive() {
            Ok(())
        } else {
            Err(Error::Exited { pid: self.pid })
        }
    }

    /// Error to report after an operation on a thread failed with ESRCH or
    /// similar: the whole process exited, or just that thread.
    pub(crate) fn vanished(&self, tid: Tid) -> Error {
        if self.is_alive() {
            Error::ThreadExited { pid: self.pid, tid }
        } else {
            Error::Exited { pid: self.pid }
        }
    }

    pub(crate) fn thread_stat(&self, tid: Tid) -> Option<procfs::Stat> {
        procfs::read_stat(&proc_path(self.pid, &format!("task/{tid}/stat")))
            .ok()
            .flatten()
    }

    fn threads_raw(&self) -> io::Result<Vec<Tid>> {
        procfs::list_tasks(&proc_path(self.pid, "task"))
    }

    /// The CPU time the whole process has used (user and system), in
    /// clock ticks (`sysconf(_SC_CLK_TCK)` per second).
    pub fn cpu_ticks(&self) -> Option<u64> {
        procfs::read_stat(&proc_path(self.pid, "stat"))
            .ok()
            .flatten()
            .map(|s| s.cpu_ticks)
    }

    /// Thread ids of the process (from `/proc/PID/task`), sorted.
    pub fn threads(&self) -> Result<Vec<Tid>> {
        match self.threads_raw() {
            Ok(tids) if self.liveness() != Liveness::Gone => Ok(tids),
            Ok(_) => Err(Error::Exited { pid: self.pid }),
            Err(e) if procfs::is_gone(&e) => Err(Error::Exited { pid: self.pid }),
            Err(e) => Err(Error::io(
                format!("listing the threads of process {}", self.pid),
                e,
            )),
        }
    }

    /// How the process handles signal `sig`: `(caught, ignored)`, from the
    /// `SigCgt` and `SigIgn` masks of `/proc/PID/status` (neither: the
    /// default action).
    pub fn signal_disposition(&self, sig: i32) -> Result<(bool, bool)> {
        let status = std::fs::read_to_string(proc_path(self.pid, "status")).map_err(|e| {
            if procfs::is_gone(&e) {
                Error::Exited { pid: self.pid }
            } else {
                Error::io(format!("reading the status of process {}", self.pid), e)
            }
        })?;
        let bit = |key: &str| {
            procfs::status_field(&status, key)
                .and_then(|v| u64::from_str_radix(v, 16).ok())
                .is_some_and(|m| m & (1 << (sig - 1)) != 0)
        };
        Ok((bit("SigCgt"), bit("SigIgn")))
    }

    /// The threads that block signal `sig` now (`SigBlk` of each thread's
    /// status); threads that vanish meanwhile are left out.
    pub fn threads_blocking(&self, sig: i32) -> Result<Vec<Tid>> {
        let mut out = Vec::new();
        for tid in self.threads()? {
            if self.thread_signal_bit(tid, "SigBlk", sig) {
                out.push(tid);
            }
        }
        Ok(out)
    }

    /// The threads that block signal `sig` and go on blocking it: each one
    /// found blocking it is looked at again every millisecond, for up to
    /// `sleeping` while it sleeps and up to `runnable` while it is
    /// runnable. Many block every signal for a moment, then restore their
    /// mask: a thread creating another (`pthread_create`), or one just
    /// given back after a borrow (its mask comes back when it next runs,
    /// which on a loaded machine waits for a core); a thread that blocks
    /// the signal for good (e.g. a worker of a `sigwait` design) mostly
    /// sleeps.
    pub fn threads_blocking_for_good(
        &self,
        sig: i32,
        sleeping: std::time::Duration,
        runnable: std::time::Duration,
    ) -> Result<Vec<Tid>> {
        let t0 = std::time::Instant::now();
        let mut blocking = self.threads_blocking(sig)?;
        while !blocking.is_empty() {
            let waited = t0.elapsed();
            let any_runnable = blocking
                .iter()
                .any(|&t| self.thread_stat(t).is_some_and(|s| s.state == 'R'));
            if waited >= runnable || (!any_runnable && waited >= sleeping) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
            blocking.retain(|&t| self.thread_signal_bit(t, "SigBlk", sig));
        }
        Ok(blocking)
    }

    /// Whether signal `sig` is pending for thread `tid` itself (`SigPnd`),
    /// e.g. the `SIGTRAP` of an `int3` it just executed, not delivered yet.
    pub fn thread_has_pending(&self, tid: Tid, sig: i32) -> bool {
        self.thread_signal_bit(tid, "SigPnd", sig)
    }

    /// The user-space pc of thread `tid` if it is asleep in the kernel now
    /// (in a system call, a fault or a stop): it can only come back to
    /// user space there. `None` while it runs (or is runnable), or if it is
    /// gone. Read from `/proc/PID/task/TID/syscall`, without stopping it.
    pub fn blocked_pc(&self, tid: Tid) -> Option<u64> {
        let text =
            std::fs::read_to_string(proc_path(self.pid, &format!("task/{tid}/syscall"))).ok()?;
        procfs::syscall_pc(&text)
    }

    /// Thread `tid` asleep in the kernel now, without stopping it: its
    /// start time (which tells it from a later thread with the same id) and
    /// the user-space pc it will come back to ([`Process::blocked_pc`]).
    /// `None` while it runs, or if it is gone.
    pub fn asleep(&self, tid: Tid) -> Option<Asleep> {
        let pc = self.blocked_pc(tid)?;
        let stat = self.thread_stat(tid).filter(|s| !s.is_dead())?;
        Some(Asleep {
            start_time: stat.start_time,
            pc,
        })
    }

    fn thread_signal_bit(&self, tid: Tid, key: &str, sig: i32) -> bool {
        std::fs::read_to_string(proc_path(self.pid, &format!("task/{tid}/status")))
            .ok()
            .and_then(|status| {
                procfs::status_field(&status, key).and_then(|v| u64::from_str_radix(v, 16).ok())
            })
            .is_some_and(|m| m & (1 << (sig - 1)) != 0)
    }

    /// The thread's name (`comm`), if the thread exists.
    pub fn thread_name(&self, tid: Tid) -> Option<String> {
        fs::read_to_string(proc_path(self.pid, &format!("task/{tid}/comm")))
            .ok()
            .map(|s| s.trim_end_matches('\n').to_string())
    }

    /// The memory mappings (`/proc/PID/maps`), in address order.
    pub fn maps(&self) -> Result<Vec<Mapping>> {
        match fs::read_to_string(proc_path(self.pid, "maps")) {
            Ok(text) => {
                self.ensure_alive()?;
                Ok(procfs::parse_maps(&text))
            }
            Err(e) if procfs::is_gone(&e) => Err(Error::Exited { pid: self.pid }),
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                Err(self.permission_error("reading its memory map was refused".to_string()))
            }
            Err(e) => Err(Error::io(format!("reading /proc/{}/maps", self.pid), e)),
        }
    }

    /// The mapping containing `addr`, if any.
    pub fn mapping_containing(&self, addr: u64) -> Result<Option<Mapping>> {
        Ok(self.maps()?.into_iter().find(|m| m.contains(addr)))
    }

    /// The executable file (target of `/proc/PID/exe`).
    pub fn exe(&self) -> Result<PathBuf> {
        match fs::read_link(proc_path(self.pid, "exe")) {
            Ok(p) => {
                self.ensure_alive()?;
                Ok(p)
            }
            Err(e) if procfs::is_gone(&e) => Err(Error::Exited { pid: self.pid }),
            Err(e) => Err(Error::io(format!("reading /proc/{}/exe", self.pid), e)),
        }
    }

    fn mem(&self) -> Result<&File> {
        match &self.mem {
            Some(f) => Ok(f),
            None => {
                self.ensure_alive()?;
                Err(self.permission_error(format!("/proc/{}/mem could not be opened", self.pid)))
            }
        }
    }

    /// Opens (read-write) the file behind file descriptor `fd` of the target,
    /// through `/proc/PID/fd/FD`. This is how to fill a `memfd` created in
    /// the target: a shared mapping that is not writable cannot be written
    /// through `/proc/PID/mem` (the kernel forces writes only into private,
    /// copy-on-write mappings), but the file behind it can.
    pub fn open_fd(&self, fd: i32) -> Result<File> {
        let path = proc_path(self.pid, &format!("fd/{fd}"));
        let file = OpenOptions::new().read(true).write(true).open(&path);
        self.ensure_alive()?;
        file.map_err(|e| Error::io(format!("opening {}", path.display()), e))
    }

    /// Reads `len` bytes of target memory at `addr` (through `/proc/PID/mem`).
    pub fn read_mem(&self, addr: u64, len: usize) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        let result = self.mem()?.read_exact_at(&mut buf, addr);
        self.mem_result(result, || {
            format!(
                "reading {len} bytes at {addr:#x} in process {} (is it mapped and readable?)",
                self.pid
            )
        })?;
        Ok(buf)
    }

    /// Writes `data` to target memory at `addr` (through `/proc/PID/mem`,
    /// which also works on read-only pages such as code: the kernel makes a
    /// private copy of the page, as a debugger's breakpoint write does).
    /// Fails unless every byte was written.
    pub fn write_mem(&self, addr: u64, data: &[u8]) -> Result<()> {
        let result = self.mem()?.write_all_at(data, addr);
        self.mem_result(result, || {
            format!(
                "writing {} bytes at {addr:#x} in process {} (is it mapped?)",
                data.len(),
                self.pid
            )
        })
    }

    /// A failed access to `/proc/PID/mem` is the process exiting if it did,
    /// else an I/O error described by `what`.
    fn mem_result(&self, r: io::Result<()>, what: impl FnOnce() -> String) -> Result<()> {
        r.or_else(|e| {
            // An exiting process loses its memory before all of its threads
            // are reported dead (a read then ends early): give the exit a
            // moment to show.
            let deadline = std::time::Instant::now() + std::time::Duration::from_millis(200);
            loop {
                self.ensure_alive()?;
                if e.kind() != io::ErrorKind::UnexpectedEof || std::time::Instant::now() >= deadline
                {
                    return Err(Error::io(what(), e));
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        })
    }

    /// Checks, without attaching, that we may trace the process: it is alive,
    /// no other tracer is attached to any of its threads, and uid,
    /// capabilities, Yama and dumpability allow it.
    pub fn check_traceable(&self) -> Result<()> {
        self.check_permission()?;
        self.check_no_other_tracer()
    }

    /// The part of [`Process::check_traceable`] that does not depend on
    /// who traces the process now: it is alive and we have the right.
    pub fn check_permission(&self) -> Result<()> {
        match self.liveness() {
            Liveness::Alive => {}
            Liveness::Zombie => return Err(Error::Zombie { pid: self.pid }),
            Liveness::Gone => return Err(Error::NoSuchProcess { pid: self.pid }),
        }
        match self.permission_problems() {
            Some(reason) => Err(Error::PermissionDenied {
                pid: self.pid,
                reason,
            }),
            None => Ok(()),
        }
    }

    /// `AlreadyTraced` if some thread has a tracer other than the calling thread.
    pub(crate) fn check_no_other_tracer(&self) -> Result<()> {
        let me = sys::gettid();
        for tid in self.threads()? {
            if let Some(tracer) = self.tracer_of(tid) {
                if tracer != me {
                    return Err(self.already_traced(tracer));
                }
            }
        }
        Ok(())
    }

    /// The tracer (a thread id) of thread `tid`, if any.
    pub(crate) fn tracer_of(&self, tid: Tid) -> Option<Tid> {
        let status = fs::read_to_string(proc_path(self.pid, &format!("task/{tid}/status"))).ok()?;
        procfs::status_field(&status, "TracerPid")
            .and_then(|t| t.parse().ok())
            .filter(|&t: &Tid| t != 0)
    }

    fn already_traced(&self, tracer: Tid) -> Error {
        // TracerPid is the tracing *thread*; name its process.
        let tgid = procfs::tgid_of(tracer).unwrap_or(tracer);
        let mut tracer_name = fs::read_to_string(format!("/proc/{tgid}/comm"))
            .map(|s| s.trim_end().to_string())
            .unwrap_or_else(|_| "an unknown process".to_string());
        if tgid == std::process::id() as i32 {
            tracer_name
                .push_str(" (this very process: another Hijack or StoppedProcess is active)");
        }
        Error::AlreadyTraced {
            pid: self.pid,
            tracer_pid: tgid,
            tracer_name,
        }
    }

    /// Explains why the kernel would refuse to let us attach, if it would.
    fn permission_problems(&self) -> Option<String> {
        let me = fs::read_to_string("/proc/self/status").unwrap_or_default();
        let target = fs::read_to_string(proc_path(self.pid, "status")).unwrap_or_default();
        const CAP_SYS_PTRACE: u32 = 19;
        let has_cap = procfs::has_capability(&me, "CapEff", CAP_SYS_PTRACE);
        let mut reasons = Vec::new();

        // The kernel compares our *real* ids with all of the target's
        // real/effective/saved ids (PTRACE_MODE_REALCREDS).
        let my_uid = procfs::status_numbers(&me, "Uid").first().copied();
        let my_gid = procfs::status_numbers(&me, "Gid").first().copied();
        let t_uids = procfs::status_numbers(&target, "Uid");
        let t_gids = procfs::status_numbers(&target, "Gid");
        if !has_cap {
            let uid_ok = my_uid.is_some() && t_uids.iter().take(3).all(|u| Some(*u) == my_uid);
            let gid_ok = my_gid.is_some() && t_gids.iter().take(3).all(|g| Some(*g) == my_gid);
            if !uid_ok || !gid_ok {
                reasons.push(format!(
                    "we run as uid {} gid {} without CAP_SYS_PTRACE, but the target runs as uids {:?} gids {:?} (real, effective, saved, fs); run as the target's user or as root",
                    fmt_opt(my_uid), fmt_opt(my_gid), t_uids, t_gids
                ));
            } else if let Ok(meta) = fs::metadata(proc_path(self.pid, "")) {
                // A non-dumpable process has its /proc files owned by root.
                if meta.uid() == 0 && t_uids.get(1).copied() != Some(0) {
                    reasons.push(
                        "the process is not dumpable (it changed credentials, e.g. a setuid program, or called prctl(PR_SET_DUMPABLE, 0)); only root with CAP_SYS_PTRACE may trace it"
                            .to_string(),
                    );
                }
            }
        }

        if let Ok(scope) = fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope") {
            match scope.trim() {
                "1" if !has_cap && !self.is_descendant_of_us() => reasons.push(
                    "Yama ptrace_scope is 1 (restricted): only ancestors of a process may trace it; run as root or with CAP_SYS_PTRACE, or allow it with `sysctl kernel.yama.ptrace_scope=0`"
                        .to_string(),
                ),
                "2" if !has_cap => reasons.push(
                    "Yama ptrace_scope is 2 (admin-only): tracing needs CAP_SYS_PTRACE; run as root"
                        .to_string(),
                ),
                "3" => reasons.push(
                    "Yama ptrace_scope is 3: ptrace is disabled on this system until reboot".to_string(),
                ),
                _ => {}
            }
        }
        (!reasons.is_empty()).then(|| reasons.join("; "))
    }

    fn is_descendant_of_us(&self) -> bool {
        let me = std::process::id() as i32;
        let mut pid = self.pid;
        for _ in 0..4096 {
            if pid == me {
                return true;
            }
            match procfs::read_stat(&proc_path(pid, "stat")) {
                Ok(Some(stat)) if stat.ppid > 0 && stat.ppid != pid => pid = stat.ppid,
                _ => return false,
            }
        }
        false
    }

    /// A `PermissionDenied` with the best explanation we can find.
    pub(crate) fn permission_error(&self, what: String) -> Error {
        if let Err(e @ Error::AlreadyTraced { .. }) = self.check_no_other_tracer() {
            return e;
        }
        let reason = self.permission_problems().unwrap_or_else(|| {
            "uid, capabilities and Yama all allow it, so a security module (SELinux, AppArmor) or a sandbox around this tool probably forbids ptrace".to_string()
        });
        Error::PermissionDenied {
            pid: self.pid,
            reason: format!("{what}: {reason}"),
        }
    }

    /// Finds a `syscall` instruction (bytes `0f 05`) in executable memory:
    /// `[vdso]` first, then libc, then any other readable and executable mapping.
    pub fn find_syscall_insn(&self) -> Result<u64> {
        let maps = self.maps()?;
        let exec = |m: &&Mapping| m.executable() && m.readable();
        let is_libc = |m: &&Mapping| {
            m.path.as_deref().is_some_and(|p| {
                let name = p.rsplit('/').next().unwrap_or(p);
                name.starts_with("libc.so") || name.starts_with("libc-")
            })
        };
        let vdso = maps
            .iter()
            .filter(exec)
            .filter(|m| m.path.as_deref() == Some("[vdso]"));
        let libc = maps.iter().filter(exec).filter(is_libc);
        let rest = maps
            .iter()
            .filter(exec)
            .filter(|m| !is_libc(m) && !matches!(m.path.as_deref(), Some("[vdso]" | "[vsyscall]")));
        for m in vdso.chain(libc).chain(rest) {
            if let Some(addr) = self.scan_for_syscall(m) {
                return Ok(addr);
            }
        }
        self.ensure_alive()?;
        Err(Error::NoSyscallInstruction { pid: self.pid })
    }

    /// The `syscall; ret` sequence and the signal restorer used by
    /// [`Hijack`](crate::Hijack), searched in the target's executable file
    /// mappings (libc and the vDSO first) on first use and cached.
    pub(crate) fn return_gadgets(&self) -> Option<ReturnGadgets> {
        *self
            .return_gadgets
            .get_or_init(|| self.find_return_gadgets())
    }

    fn find_return_gadgets(&self) -> Option<ReturnGadgets> {
        const RESTORERS: [&[u8]; 2] = [
            &[0x48, 0xc7, 0xc0, 0x0f, 0, 0, 0, 0x0f, 0x05],
            &[0xb8, 0x0f, 0, 0, 0, 0x0f, 0x05],
        ];
        let maps = self.maps().ok()?;
        let rank = |m: &Mapping| match m.path.as_deref() {
            Some(p) if p.rsplit('/').next().is_some_and(|n| n.starts_with("libc")) => 0,
            Some("[vdso]") => 1,
            _ => 2,
        };
        let mut exec: Vec<&Mapping> = maps
            .iter()
            .filter(|m| m.executable() && m.readable() && m.path.is_some())
            .filter(|m| m.path.as_deref() != Some("[vsyscall]"))
            .collect();
        exec.sort_by_key(|m| rank(m));
        let mut syscall_ret = None;
        let mut restorer = None;
        for m in exec {
            if syscall_ret.is_none() {
                syscall_ret = self.scan_mapping(m, &[0x0f, 0x05, 0xc3]);
            }
            if restorer.is_none() {
                restorer = RESTORERS
                    .iter()
                    .find_map(|p| Some((self.scan_mapping(m, p)?, p.len() as u64)));
            }
            if let (Some(syscall_ret), Some((restorer, len))) = (syscall_ret, restorer) {
                return Some(ReturnGadgets {
                    syscall_ret,
                    restorer,
                    restorer_end: restorer + len,
                });
            }
        }
        None
    }

    /// The first occurrence of `pattern` in the mapping.
    fn scan_mapping(&self, m: &Mapping, pattern: &[u8]) -> Option<u64> {
        const CHUNK: u64 = 64 * 1024;
        let overlap = pattern.len() as u64 - 1;
        let mut at = m.start;
        while at < m.end {
            let len = CHUNK.min(m.end - at);
            let bytes = self.read_mem(at, len as usize).ok()?;
            if let Some(i) = bytes.windows(pattern.len()).position(|w| w == pattern) {
                return Some(at + i as u64);
            }
            if at + len >= m.end {
                break;
            }
            // Overlap chunks so a pattern split across them is found.
            at += len - overlap;
        }
        None
    }

    fn scan_for_syscall(&self, m: &Mapping) -> Option<u64> {
        const CHUNK: u64 = 64 * 1024;
        let mut at = m.start;
        while at < m.end {
            // Overlap chunks by one byte so a pair split across them is found.
            let len = CHUNK.min(m.end - at);
            let bytes = self.read_mem(at, len as usize).ok()?;
            if let Some(i) = bytes.windows(2).position(|w| w == [0x0f, 0x05]) {
                return Some(at + i as u64);
            }
            if at + len >= m.end {
                break;
            }
            at += len - 1;
        }
        None
    }

    /// Detaches (or reaps) threads that earlier operations on *this thread*
    /// seized but could not detach in time (for instance a thread stuck in
    /// uninterruptible sleep when a timeout struck), waiting at most `wait`.
    /// Returns how many are still attached. Called automatically at the
    /// start of [`Process::hijack`] and [`Process::stop_all`]; the kernel also
    /// detaches them when the calling thread exits.
    pub fn release_abandoned_threads(wait: Duration) -> usize {
        sys::release_abandoned(wait)
    }
}

fn fmt_opt(v: Option<u64>) -> String {
    v.map_or_else(|| "?".to_string(), |v| v.to_string())
}

pub(crate) fn proc_path(pid: i32, rest: &str) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/{rest}"))
}

/// Reads the stack of a stopped thread: `[rsp, end of the mapping containing
/// rsp)`, at most `max` bytes. Returns the start address (`rsp`) and the bytes.
pub fn read_stack(process: &Process, rsp: u64, max: usize) -> Result<(u64, Vec<u8>)> {
    let mapping = process
        .mapping_containing(rsp)?
        .ok_or_else(|| Error::InvalidArgument {
            what: format!(
                "stack pointer {rsp:#x} of process {} lies in no mapping",
                process.pid()
            ),
        })?;
    let len = (mapping.end - rsp).min(max as u64) as usize;
    Ok((rsp, process.read_mem(rsp, len)?))
}
