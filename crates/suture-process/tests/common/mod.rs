//! Test harness: compiles the C programs in `tests/c/` into a temporary
//! directory and runs them as children, talking to them over pipes.
//!
//! [`Target`] kills and reaps its child on drop, so nothing is left behind
//! when a test fails. No test depends on timing to pass: the programs print
//! `ready` once set up and answer commands on stdin; every wait for an
//! answer is bounded and fails the test when it runs out.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// How long to wait for any answer from a target before failing.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// Compiles `tests/c/NAME.c` into `dir`, returning the executable's path.
pub fn compile(dir: &Path, name: &str) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/c")
        .join(format!("{name}.c"));
    let exe = dir.join(name);
    let out = Command::new("cc")
        .args(["-O1", "-g", "-pthread", "-Wall", "-o"])
        .arg(&exe)
        .arg(&src)
        .output()
        .expect("running cc");
    assert!(
        out.status.success(),
        "cc failed for {}:\n{}",
        src.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    exe
}

fn spawn_lines<R: std::io::Read + Send + 'static>(r: R) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            match line {
                Ok(l) => {
                    if tx.send(l).is_err() {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
    });
    rx
}

/// A running test program. Killed (SIGKILL) and reaped on drop.
pub struct Target {
    child: Child,
    pub pid: i32,
    stdin: Option<ChildStdin>,
    out: Receiver<String>,
    err: Receiver<String>,
    /// The lines printed before `ready`.
    pub info: Vec<String>,
    _dir: TempDir,
}

impl Target {
    /// Compiles and starts `tests/c/NAME.c`, then waits for its `ready` line.
    pub fn start(name: &str) -> Target {
        Self::start_with_args(name, &[])
    }

    pub fn start_with_args(name: &str, args: &[&str]) -> Target {
        let dir = tempfile::tempdir().expect("tempdir");
        let exe = compile(dir.path(), name);
        let mut child = Command::new(&exe)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning test program");
        let pid = child.id() as i32;
        let out = spawn_lines(child.stdout.take().unwrap());
        let err = spawn_lines(child.stderr.take().unwrap());
        let stdin = child.stdin.take();
        let mut target = Target {
            child,
            pid,
            stdin,
            out,
            err,
            info: Vec::new(),
            _dir: dir,
        };
        loop {
            let line = target
                .next_line()
                .unwrap_or_else(|| panic!("{name} ended before printing ready"));
            if line == "ready" {
                break;
            }
            target.info.push(line);
        }
        target
    }

    /// Value of an info line `KEY VALUE` printed before `ready`.
    pub fn info(&self, key: &str) -> String {
        self.info
            .iter()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no info line {key:?} in {:?}", self.info))
            .to_string()
    }

    /// An info value printed as a hexadecimal pointer (`0x...`).
    pub fn info_addr(&self, key: &str) -> u64 {
        let v = self.info(key);
        u64::from_str_radix(v.trim_start_matches("0x"), 16).expect("hex address")
    }

    pub fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .expect("writing to target");
        stdin.flush().unwrap();
    }

    /// Closes the target's stdin.
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Next stdout line; `None` at end of output. Panics after [`ANSWER_TIMEOUT`].
    pub fn next_line(&self) -> Option<String> {
        match self.out.recv_timeout(ANSWER_TIMEOUT) {
            Ok(l) => Some(l),
            Err(RecvTimeoutError::Disconnected) => None,
            Err(RecvTimeoutError::Timeout) => panic!("no output from target {}", self.pid),
        }
    }

    /// The next stdout line, which must start with `prefix`.
    pub fn expect(&self, prefix: &str) -> String {
        let line = self
            .next_line()
            .unwrap_or_else(|| panic!("target ended while waiting for {prefix:?}"));
        assert!(
            line.starts_with(prefix),
            "expected a line starting with {prefix:?}, got {line:?}"
        );
        line
    }

    /// Waits for the end of the target's stdout (it exited).
    pub fn wait_eof(&self) {
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        while self.next_line().is_some() {
            assert!(Instant::now() < deadline, "target keeps printing");
        }
    }

    /// Next stderr line (bounded wait).
    pub fn next_err_line(&self) -> String {
        self.err
            .recv_timeout(ANSWER_TIMEOUT)
            .expect("stderr line from target")
    }

    /// Waits for `tick N` lines on stderr and checks they count up by one,
    /// `count` of them, starting after `last` (0: accept any start).
    /// Returns the last tick seen.
    pub fn check_ticks(&self, mut last: u64, count: usize) -> u64 {
        for _ in 0..count {
            let line = self.next_err_line();
            let n: u64 = line
                .strip_prefix("tick ")
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("unexpected stderr line {line:?}"));
            if last != 0 {
                assert_eq!(n, last + 1, "ticks must count up without gaps");
            }
            last = n;
        }
        last
    }

    /// Panics if the kernel reports a stop of the child to us as its parent
    /// (a parent shell would see the same). Call only while no `Hijack` or
    /// `StoppedProcess` is alive.
    pub fn assert_no_stop_reported(&self) {
        let mut status = 0;
        // SAFETY: waitpid writes only the status through the valid pointer.
        let r = unsafe { libc::waitpid(self.pid, &mut status, libc::WNOHANG | libc::WUNTRACED) };
        assert_eq!(
            r, 0,
            "parent saw a state change of the target: status {status:#x}"
        );
    }

    /// State letter from /proc/PID/task/TID/stat.
    pub fn thread_state(&self, tid: i32) -> char {
        let s = std::fs::read_to_string(format!("/proc/{}/task/{tid}/stat", self.pid)).unwrap();
        s[s.rfind(')').unwrap() + 2..].chars().next().unwrap()
    }

    /// Waits (bounded) until thread `tid` is in state `state`.
    pub fn wait_thread_state(&self, tid: i32, state: char) {
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        loop {
            let now = self.thread_state(tid);
            if now == state {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "thread {tid} stays in state {now}, expected {state}"
            );
            thread::sleep(Duration::from_millis(1));
        }
    }

    /// Waits (bounded) until thread `tid` is blocked in system call `nr`
    /// (per /proc/PID/task/TID/syscall).
    pub fn wait_in_syscall(&self, tid: i32, nr: i64) {
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        let path = format!("/proc/{}/task/{tid}/syscall", self.pid);
        loop {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if text.split_whitespace().next() == Some(nr.to_string().as_str()) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "thread {tid} not in syscall {nr}: {text}"
            );
            thread::sleep(Duration::from_millis(1));
        }
    }

    pub fn kill(&self, sig: i32) {
        // SAFETY: kill takes only integers.
        assert_eq!(unsafe { libc::kill(self.pid, sig) }, 0);
    }

    /// Waits (as the parent) for the child to exit and returns its wait status.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        self.child.wait().expect("waiting for target")
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.stdin = None;
        // Only kill a child that has not been reaped already (if it was,
        // its pid may belong to someone else by now).
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            // Bounded: a thread still traced by this test thread (a bug
            // under test) would keep the process from being reaped.
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match self.child.try_wait() {
                    Ok(None) if Instant::now() < deadline => {
                        thread::sleep(Duration::from_millis(1));
                    }
                    Ok(None) => {
                        eprintln!(
                            "target {} cannot be reaped: reaping leftover traced threads",
                            self.pid
                        );
                        reap_traced_threads(self.pid);
                        let _ = self.child.try_wait();
                        if !std::thread::panicking() {
                            panic!("target {} had threads left traced", self.pid);
                        }
                        break;
                    }
                    _ => break,
                }
            }
        }
    }
}

/// Reaps exited threads of `pid` that are still traced by this thread.
fn reap_traced_threads(pid: i32) {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return;
    };
    for entry in dir.flatten() {
        if let Some(tid) = entry
            .file_name()
            .to_str()
            .and_then(|t| t.parse::<i32>().ok())
        {
            let mut status = 0;
            // SAFETY: waitpid writes only the status through the valid pointer.
            unsafe { libc::waitpid(tid, &mut status, libc::__WALL | libc::WNOHANG) };
        }
    }
}
