//! The code-write protocol: the only moment the whole process is stopped.
//!
//! Every thread is stopped, each one's program counter is checked against
//! the bytes about to change (a thread stopped between two of the
//! instructions a jump overwrites would resume in the middle of the new
//! jump: it is moved to the same instruction of the relocated copy), the
//! bytes are written, and every thread resumes. [`unused_regions`] tells,
//! one thread at a time, which retired memory no thread can still be
//! running or returning into.

use crate::record::Region;
use crate::Error;
use std::ops::ControlFlow::{Break, Continue};
use std::time::Duration;
use suture_process::{read_stack, Process, StoppedProcess};

/// One write of code into the target.
#[derive(Clone, Debug)]
pub struct CodeWrite {
    pub addr: u64,
    pub bytes: Vec<u8>,
    /// What was there before (to undo a partial write).
    pub old: Vec<u8>,
    /// A pc strictly inside (addr, addr+len) would be torn by this write.
    pub guard_len: u64,
    /// Where a thread stopped at one of these pcs inside the bytes can be
    /// moved instead (the same instruction in the site's relocated copy).
    pub redirect: Vec<(u64, u64)>,
    /// For code a thread may be executing: where a thread that meets the
    /// `int3` of a live write goes, and how (`suture_x86::trap::KIND_*`);
    /// see `live.rs`. `None` for memory no thread can reach yet.
    pub trap: Option<(u64, u64)>,
}

impl CodeWrite {
    pub(crate) fn tears(&self, pc: u64) -> bool {
        pc > self.addr && pc < self.addr + self.guard_len
    }
}

const ATTEMPTS: u32 = 200;
const STOP_TIMEOUT: Duration = Duration::from_secs(3);
/// Largest stack suffix scanned per thread for return addresses.
const STACK_SCAN: usize = 8 << 20;

/// Stop every thread, make sure none is inside the bytes to change (moving
/// a thread between overwritten instructions to their relocated copy),
/// write them, resume.
pub fn write_code(proc: &Process, writes: &[CodeWrite]) -> Result<(), Error> {
    if writes.is_empty() {
        return Ok(());
    }
    write_code_with(proc, &mut |_| Ok(Some(writes.to_vec()))).map(|_| ())
}

/// Computes the writes from the held threads, or declines (`None`).
pub type MakeWrites<'a> =
    dyn FnMut(&StoppedProcess<'_>) -> Result<Option<Vec<CodeWrite>>, Error> + 'a;

/// Like [`write_code`], but the writes are computed while every thread is
/// held, from what the stop shows (each thread's registers, e.g. its
/// thread pointer). `make` may decline (`None`): every thread is resumed
/// and nothing is written (false). It may run more than once (once per
/// attempt).
pub fn write_code_with(proc: &Process, make: &mut MakeWrites<'_>) -> Result<bool, Error> {
    write_code_with_hook(proc, make, &mut || Ok(()))
}

/// Like [`write_code_with`], with `before_write` run while every thread is
/// held, once nothing stands in the way of the writes and just before
/// them (to record what is about to be written: if suture dies during the
/// writes, the record already describes them). An error from it resumes
/// every thread and writes nothing.
pub fn write_code_with_hook(
    proc: &Process,
    make: &mut MakeWrites<'_>,
    before_write: &mut dyn FnMut() -> Result<(), Error>,
) -> Result<bool, Error> {
    let mut last_blocker = None;
    for attempt in 0..ATTEMPTS {
        let mut stopped = proc.stop_all(STOP_TIMEOUT)?;
        let writes = match make(&stopped) {
            Ok(Some(w)) => w,
            Ok(None) => {
                stopped.resume()?;
                return Ok(false);
            }
            Err(e) => {
                stopped.resume()?;
                return Err(e);
            }
        };
        // A thread between two instructions about to be overwritten moves
        // to the same point of their relocated copy, when there is one.
        let mut blocker = None;
        for (tid, pc) in stopped.pcs() {
            let Some(w) = writes.iter().find(|w| w.tears(pc)) else {
                continue;
            };
            match w.redirect.iter().find(|(from, _)| *from == pc) {
                Some((_, to)) => {
                    if let Err(e) = stopped.set_pc(tid, *to) {
                        stopped.resume()?;
                        return Err(e.into());
                    }
                }
                None => {
                    blocker = Some((tid, pc, w.addr));
                    break;
                }
            }
        }
        if let Some(b) = blocker {
            stopped.resume()?;
            last_blocker = Some(b);
            std::thread::sleep(Duration::from_micros(200 * (attempt as u64 + 1).min(50)));
            continue;
        }
        if let Err(e) = before_write() {
            stopped.resume()?;
            return Err(e);
        }
        let mut done = 0;
        let mut failure = None;
        for w in &writes {
            if let Err(e) = proc.write_mem(w.addr, &w.bytes) {
                failure = Some(e);
                break;
            }
            done += 1;
        }
        if let Some(e) = failure {
            // Put back what was already written; the target stays as it was.
            for w in writes[..done].iter().rev() {
                let _ = proc.write_mem(w.addr, &w.old);
            }
            let _ = stopped.resume();
            return Err(e.into());
        }
        stopped.resume()?;
        return Ok(true);
    }
    let (tid, pc, addr) = last_blocker.expect("loop ran");
    Err(Error::SiteBusy(format!(
        "thread {tid} kept executing inside the bytes to be overwritten at {addr:#x} (pc {pc:#x}) over {ATTEMPTS} attempts; try again"
    )))
}

/// How long to wait for one thread to stop for its examination.
const THREAD_STOP_TIMEOUT: Duration = Duration::from_secs(3);

/// Which of `regions` no thread can be executing in or return into.
///
/// The regions must be retired: nothing the target can reach any more
/// leads into them (no site jumps there). A thread seen outside them
/// then stays outside, so each thread is stopped and examined on its own
/// while the others run; no whole-process stop. Threads created meanwhile
/// are examined too (a listing pass that finds none ends the walk).
///
/// With a `checker`, a thread whose stack unwinds reliably is judged by its
/// program counter, registers and return addresses only (precise: stale
/// words in its stack do not count); other threads by every word of their
/// live stack (conservative).
pub fn unused_regions(
    proc: &Process,
    regions: &[Region],
    checker: Option<&crate::check::Checker>,
) -> Result<Vec<bool>, Error> {
    let mut free = vec![true; regions.len()];
    if regions.is_empty() {
        return Ok(free);
    }
    let mut tracer = proc.tracer();
    let mut seen = std::collections::BTreeSet::new();
    loop {
        let fresh: Vec<_> = proc
            .threads()?
            .into_iter()
            .filter(|t| seen.insert(*t))
            .collect();
        if fresh.is_empty() {
            break;
        }
        tracer.stop_each(
            &fresh,
            1,
            THREAD_STOP_TIMEOUT,
            crate::live::RUNNABLE_STOP,
            &mut |tracer, tid, stopped| {
                let regs = match stopped {
                    Ok(r) => r,
                    // Gone: it can no longer be anywhere.
                    Err(suture_process::Error::ThreadExited { .. }) => return Ok(Continue(())),
                    Err(e) => return Err(Error::from(e)),
                };
                let marked = mark_thread(proc, &regs, regions, checker, &mut free);
                let detached = tracer.detach(tid);
                marked?;
                match detached {
                    Ok(()) | Err(suture_process::Error::ThreadExited { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
                // Once every region is in use there is nothing left to learn.
                Ok(if free.iter().all(|f| !f) {
                    Break(())
                } else {
                    Continue(())
                })
            },
        )?;
        if free.iter().all(|f| !f) {
            return Ok(free);
        }
    }
    Ok(free)
}

/// Marks the regions one thread (held, with registers `regs`) may be in.
fn mark_thread(
    proc: &Process,
    regs: &libc::user_regs_struct,
    regions: &[Region],
    checker: Option<&crate::check::Checker>,
    free: &mut [bool],
) -> Result<(), Error> {
    let gprs = [
        regs.rip, regs.rsp, regs.rbp, regs.rax, regs.rbx, regs.rcx, regs.rdx, regs.rsi, regs.rdi,
        regs.r8, regs.r9, regs.r10, regs.r11, regs.r12, regs.r13, regs.r14, regs.r15,
    ];
    let mut mark = |v: u64| {
        for (i, r) in regions.iter().enumerate() {
            if r.contains(v) {
                free[i] = false;
            }
        }
    };
    for v in gprs {
        mark(v);
    }
    if let Some(c) = checker {
        let unwind = c.unwind(
            proc,
            &suture_unwind::Regs {
                pc: regs.rip,
                sp: regs.rsp,
                bp: regs.rbp,
            },
            &|_| suture_unwind::Special::None,
        );
        if unwind.is_complete() {
            for f in &unwind.frames {
                mark(f.pc);
                mark(f.lookup);
            }
            return Ok(());
        }
    }
    // Scan from below the red zone: a leaf may keep data there.
    let (_, stack) = read_stack(proc, regs.rsp.saturating_sub(128), STACK_SCAN)?;
    for w in stack.chunks_exact(8) {
        mark(u64::from_le_bytes(w.try_into().unwrap()));
    }
    Ok(())
}
