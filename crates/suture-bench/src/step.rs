//! Exact instruction counts per call by single-stepping (ptrace) the target's
//! "step" thread through one call of each measured function: works in every
//! mode, where callgrind cannot follow suture (see `calls::callgrind`).

use crate::util::{read_mem, Result};

fn err(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

fn wait_stop(tid: i32) -> Result<()> {
    let mut st = 0;
    let r = unsafe { libc::waitpid(tid, &mut st, libc::__WALL) };
    if r != tid {
        return Err(err("waitpid"));
    }
    if !libc::WIFSTOPPED(st) {
        return Err(format!("thread {tid} did not stop (status {st:#x})"));
    }
    Ok(())
}

fn regs(tid: i32) -> Result<libc::user_regs_struct> {
    let mut r: libc::user_regs_struct = unsafe { std::mem::zeroed() };
    if unsafe { libc::ptrace(libc::PTRACE_GETREGS, tid, 0, &mut r as *mut _) } < 0 {
        return Err(err("PTRACE_GETREGS"));
    }
    Ok(r)
}

/// Seizes thread `tid` of `pid` (blocked in read() on its pipe), calls
/// `release` (which makes it call each function of `funcs` once, in order),
/// single-steps it and returns the instructions executed from each function's
/// entry to its return (the `ret` included, the `call` not). A function may
/// have several entries (its own, and the new code its callers were
/// rewritten to call). Detaches.
pub fn count(
    pid: i32,
    tid: i32,
    funcs: &[Vec<u64>],
    release: impl FnOnce() -> Result<()>,
) -> Result<Vec<u64>> {
    if unsafe { libc::ptrace(libc::PTRACE_SEIZE, tid, 0, 0) } < 0 {
        return Err(err("PTRACE_SEIZE"));
    }
    let r = (|| {
        if unsafe { libc::ptrace(libc::PTRACE_INTERRUPT, tid, 0, 0) } < 0 {
            return Err(err("PTRACE_INTERRUPT"));
        }
        wait_stop(tid)?;
        release()?;
        let mut out = Vec::new();
        let mut next = 0;
        let mut ret_addr = None;
        let mut n = 0u64;
        for _ in 0..10_000_000u64 {
            if unsafe { libc::ptrace(libc::PTRACE_SINGLESTEP, tid, 0, 0) } < 0 {
                return Err(err("PTRACE_SINGLESTEP"));
            }
            wait_stop(tid)?;
            let rg = regs(tid)?;
            match ret_addr {
                None if funcs[next].contains(&rg.rip) => {
                    let b = read_mem(pid, rg.rsp, 8)?;
                    ret_addr = Some(u64::from_le_bytes(b.try_into().unwrap()));
                    n = 1; // this instruction (at the entry) is about to run
                }
                None => {}
                Some(ra) if rg.rip == ra => {
                    out.push(n);
                    ret_addr = None;
                    next += 1;
                    if next == funcs.len() {
                        return Ok(out);
                    }
                }
                Some(_) => n += 1,
            }
        }
        Err("single-step limit reached".into())
    })();
    unsafe { libc::ptrace(libc::PTRACE_DETACH, tid, 0, 0) };
    r
}
