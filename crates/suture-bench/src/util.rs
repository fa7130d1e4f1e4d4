//! Processes, the suture binary, statistics, the machine.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

pub type Result<T> = std::result::Result<T, String>;

/// The repository root (this crate is `crates/suture-bench`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."))
}

/// This crate's directory (the C sources are in `c/`).
pub fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The suture binary: `$SUTURE_BIN`, next to this binary (same target
/// directory), `target/release/suture`, else built with cargo.
pub fn suture_bin() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("SUTURE_BIN") {
        return Ok(PathBuf::from(p));
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        let p = dir.join("suture");
        if p.is_file() {
            return Ok(p);
        }
    }
    let root = repo_root();
    let p = root.join("target/release/suture");
    if p.is_file() {
        return Ok(p);
    }
    eprintln!("building suture (cargo build --release -p suture)");
    let st = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--release", "-p", "suture"])
        .env_remove("CARGO_TARGET_DIR")
        .current_dir(&root)
        .status()
        .map_err(|e| format!("cargo: {e}"))?;
    if !st.success() || !p.is_file() {
        return Err("cannot build suture".into());
    }
    Ok(p)
}

/// Makes `cmd` start a session of its own, as a service and an operator's
/// shell are in production. With the kernel's autogroup scheduling
/// (`kernel.sched_autogroup_enabled`, on by default) the CPU is shared
/// between sessions first and nice values weigh only within one: a target
/// with hundreds of busy threads in the bench's session would otherwise
/// starve suture of CPU time (waking up from a 200 µs sleep at nice -20
/// took 75 ms on average next to 512 spinning threads of the same session,
/// 68 µs with the spinners in a session of their own).
pub fn own_session(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the child between fork and exec and only
    // calls setsid, which is async-signal-safe and touches no memory.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// CPU time (user and system) of the children this process has waited
/// for, in ms: the difference around a command is that command's own.
pub fn children_cpu_ms() -> f64 {
    // SAFETY: getrusage writes only the rusage we pass.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru);
        ru
    };
    let ms = |t: libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 / 1e3;
    ms(ru.ru_utime) + ms(ru.ru_stime)
}

/// `CLOCK_MONOTONIC` in ms (the clock of suture's debug lines).
pub fn monotonic_ms() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as f64 * 1e3 + ts.tv_nsec as f64 / 1e6
}

/// Runs a command, returns stdout; fails with its stderr.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A started target: killed and reaped when dropped (also on error).
pub struct Target {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pub pid: i32,
    /// The first line, "ready PID ...".
    pub ready: String,
}

impl Target {
    pub fn start(cmd: &mut Command) -> Result<Target> {
        let mut child = own_session(cmd)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("{cmd:?}: {e}"))?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = BufReader::new(child.stdout.take().expect("piped"));
        let pid = child.id() as i32;
        let mut t = Target {
            child,
            stdin,
            stdout,
            pid,
            ready: String::new(),
        };
        let line = t.line()?;
        if !line.starts_with("ready ") {
            return Err(format!("target said {line:?}"));
        }
        t.ready = line;
        Ok(t)
    }

    pub fn line(&mut self) -> Result<String> {
        let mut s = String::new();
        let n = self
            .stdout
            .read_line(&mut s)
            .map_err(|e| format!("target: {e}"))?;
        if n == 0 {
            return Err("target exited".into());
        }
        Ok(s.trim_end().to_string())
    }

    pub fn send(&mut self, cmd: &str) -> Result<()> {
        writeln!(self.stdin, "{cmd}")
            .and_then(|_| self.stdin.flush())
            .map_err(|e| format!("target: {e}"))
    }

    /// Sends `x`, waits up to a few seconds, then kills.
    pub fn finish(mut self) -> Option<std::process::ExitStatus> {
        let _ = self.send("x");
        for _ in 0..100 {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        None // Drop kills it
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Median, minimum and maximum.
pub fn stats(v: &[f64]) -> (f64, f64, f64) {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = s.len();
    let med = if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    };
    (med, s[0], s[n - 1])
}

/// CPU model, cores, kernel.
pub fn machine() -> (String, usize, String) {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    (cpu, cores, kernel)
}

/// Reads `len` bytes of another process's memory.
pub fn read_mem(pid: i32, addr: u64, len: usize) -> Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(format!("/proc/{pid}/mem")).map_err(|e| format!("mem: {e}"))?;
    let mut buf = vec![0; len];
    f.read_exact_at(&mut buf, addr)
        .map_err(|e| format!("mem at {addr:#x}: {e}"))?;
    Ok(buf)
}

pub fn hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}
