//! At which priority suture should run for a given target.
//!
//! suture raises its priority while target threads wait for it (see
//! `suture_process::set_hold_priority`). For the rest of its work the
//! question is whether it would starve: only if the CPUs are kept busy. A
//! service that is not saturated needs its CPU time more than suture does.

use std::time::{Duration, Instant};

/// Whether the CPUs are kept busy: over about 60 ms process `pid` used at
/// least 60% of all of them, or on average at least as many tasks as there
/// are CPUs were runnable besides the one looking (many threads that each
/// run briefly leave a thread of ordinary priority waiting behind them
/// all). The look costs a few reads of `/proc`, whatever the number of
/// threads: it runs alongside a command's work.
pub fn cpus_kept_busy(pid: i32) -> bool {
    const SAMPLES: usize = 8;
    let Ok(p) = suture_process::Process::open(pid) else {
        return false;
    };
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    // SAFETY: sysconf only reads a constant of the system.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let t0 = Instant::now();
    let Some(a) = p.cpu_ticks() else {
        return false;
    };
    let mut runnable = 0;
    for _ in 0..SAMPLES {
        std::thread::sleep(Duration::from_millis(7));
        // This thread is running while it reads.
        runnable += procs_running().unwrap_or(1).saturating_sub(1);
    }
    let Some(b) = p.cpu_ticks() else {
        return false;
    };
    let used = b.saturating_sub(a) as f64 / hz;
    used >= 0.6 * cpus as f64 * t0.elapsed().as_secs_f64() || runnable >= cpus * SAMPLES
}

/// The number of runnable tasks of the whole machine (`procs_running` in
/// `/proc/stat`).
fn procs_running() -> Option<usize> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    stat.lines()
        .find_map(|l| l.strip_prefix("procs_running "))
        .and_then(|v| v.trim().parse().ok())
}
