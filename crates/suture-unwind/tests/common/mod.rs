//! Test harness: compiles the C programs in `tests/c/` with the system `cc`,
//! runs them as children (killed and reaped on drop, even when a test
//! fails), and builds an [`Unwinder`] for a live process from its
//! `/proc/PID/maps`, the way suture's engine finds a target's objects.
//!
//! No test depends on timing: programs print `ready` once set up, every
//! wait is bounded and fails the test when it runs out.

#![allow(dead_code)]

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::thread;
use std::time::{Duration, Instant};

use suture_elf::ObjectFile;
use suture_process::{Mapping, Process};
use suture_unwind::{Regs, Symbolizer, Unwinder};
use tempfile::TempDir;

/// How long to wait for any answer from a target before failing.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// Optimised, without frame pointers: the unwinder must rely on CFI.
pub const CFLAGS: &[&str] = &["-O2", "-fomit-frame-pointer", "-pthread", "-Wall"];

/// Compiles `tests/c/NAME.c` into `dir` with `flags`.
pub fn compile(dir: &Path, name: &str, flags: &[&str]) -> PathBuf {
    let src = source(name);
    let exe = dir.join(name);
    let out = Command::new("cc")
        .args(flags)
        .arg("-o")
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

pub fn source(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/c")
        .join(format!("{name}.c"))
}

/// A running test program. Killed (SIGKILL) and reaped on drop.
pub struct Target {
    child: Child,
    pub pid: i32,
    pub exe: PathBuf,
    _stdin: ChildStdin,
    /// The lines printed before `ready`.
    pub info: Vec<String>,
    _dir: TempDir,
}

impl Target {
    /// Compiles and starts `tests/c/NAME.c`, then waits for its `ready` line.
    pub fn start(name: &str, flags: &[&str]) -> Target {
        let dir = tempfile::tempdir().expect("tempdir");
        let exe = compile(dir.path(), name, flags);
        Self::run(exe, dir, true)
    }

    /// Starts an installed program (found in PATH) with stdin piped.
    pub fn system(program: &str) -> Target {
        let dir = tempfile::tempdir().expect("tempdir");
        Self::run(PathBuf::from(program), dir, false)
    }

    fn run(exe: PathBuf, dir: TempDir, wait_ready: bool) -> Target {
        let mut child = Command::new(&exe)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawning test program");
        let out = lines(child.stdout.take().unwrap());
        let stdin = child.stdin.take().unwrap();
        let mut target = Target {
            pid: child.id() as i32,
            child,
            exe,
            _stdin: stdin,
            info: Vec::new(),
            _dir: dir,
        };
        if wait_ready {
            loop {
                let line = match out.recv_timeout(ANSWER_TIMEOUT) {
                    Ok(l) => l,
                    Err(e) => panic!("{} printed no ready line: {e}", target.exe.display()),
                };
                if line == "ready" {
                    break;
                }
                target.info.push(line);
            }
        }
        target
    }

    /// The words after `KEY` of every info line starting with `KEY `.
    pub fn info_all(&self, key: &str) -> Vec<Vec<String>> {
        self.info
            .iter()
            .filter_map(|l| l.strip_prefix(key)?.strip_prefix(' '))
            .map(|rest| rest.split_whitespace().map(str::to_string).collect())
            .collect()
    }

    /// Waits (bounded) until thread `tid` is blocked in system call `nr`.
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
}

fn lines<R: std::io::Read + Send + 'static>(r: R) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(l) = line else { break };
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    rx
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Ok(None) = self.child.try_wait() {
            if Instant::now() > deadline {
                break;
            }
            thread::sleep(Duration::from_millis(1));
        }
    }
}

/// One ELF object mapped by the target.
pub struct Obj {
    pub path: String,
    pub bias: u64,
    /// Its executable mappings.
    pub ranges: Vec<(u64, u64)>,
    pub bytes: Vec<u8>,
}

impl Obj {
    fn contains(&self, addr: u64) -> bool {
        self.ranges.iter().any(|&(s, e)| s <= addr && addr < e)
    }
}

/// The code of a live process: the unwinder and the objects behind it.
pub struct Code {
    pub unwinder: Unwinder,
    pub objs: Vec<Obj>,
    symbolizers: RefCell<HashMap<String, Option<Symbolizer>>>,
}

fn is_file_path(p: &str) -> bool {
    p.starts_with('/') && !p.starts_with("/memfd:") && !p.starts_with("/dev/")
}

/// The object mapped first at `first` (its offset-0 mapping), with the
/// executable mappings of the same path (or the vdso).
fn object(process: &Process, maps: &[Mapping], first: &Mapping) -> Option<Obj> {
    let path = first.path.clone()?;
    let bytes = if path == "[vdso]" {
        process.read_mem(first.start, first.len() as usize).ok()?
    } else {
        // map_files opens exactly the file mapped.
        let via = format!(
            "/proc/{}/map_files/{:x}-{:x}",
            process.pid(),
            first.start,
            first.end
        );
        std::fs::read(via).ok()?
    };
    let file = ObjectFile::parse(&bytes).ok()?;
    let bias = file.load_bias(first.start, first.offset)?;
    let ranges: Vec<(u64, u64)> = maps
        .iter()
        .filter(|m| m.path.as_deref() == Some(path.as_str()) && m.executable())
        .map(|m| (m.start, m.end))
        .collect();
    (!ranges.is_empty()).then_some(Obj {
        path,
        bias,
        ranges,
        bytes,
    })
}

impl Code {
    /// Every ELF object (and the vdso) the process maps executable code of.
    pub fn load(process: &Process) -> Code {
        let maps = process.maps().expect("maps");
        let mut objs: Vec<Obj> = Vec::new();
        for m in &maps {
            let Some(path) = m.path.as_deref() else {
                continue;
            };
            let candidate =
                (is_file_path(path) && m.inode != 0 && m.offset == 0) || path == "[vdso]";
            if !candidate || objs.iter().any(|o| o.path == path) {
                continue;
            }
            if let Some(obj) = object(process, &maps, m) {
                objs.push(obj);
            }
        }
        let mut unwinder = Unwinder::new();
        for o in &objs {
            unwinder
                .add_object(&o.path, &o.bytes, o.bias, &o.ranges)
                .unwrap_or_else(|e| panic!("adding {}: {e}", o.path));
        }
        Code {
            unwinder,
            objs,
            symbolizers: RefCell::new(HashMap::new()),
        }
    }

    pub fn obj_at(&self, addr: u64) -> Option<&Obj> {
        self.objs.iter().find(|o| o.contains(addr))
    }

    /// The function containing run-time address `addr`, if it has a name.
    pub fn name(&self, addr: u64) -> Option<String> {
        let obj = self.obj_at(addr)?;
        let mut cache = self.symbolizers.borrow_mut();
        let sym = cache
            .entry(obj.path.clone())
            .or_insert_with(|| symbolizer_for(&obj.bytes));
        Some(sym.as_ref()?.symbolize(addr.wrapping_sub(obj.bias))?.name)
    }

    /// Whether the object at `addr` has a full symbol table (its own or a
    /// separate debug file's): its local functions can be named.
    pub fn has_local_symbols(&self, addr: u64) -> bool {
        self.obj_at(addr).is_some_and(|o| {
            ObjectFile::parse(&o.bytes).is_ok_and(|f| f.has_symtab())
                || debug_file(&o.bytes).is_some()
        })
    }
}

/// The separate debug file of an object, found by build id.
fn debug_file(bytes: &[u8]) -> Option<Vec<u8>> {
    let id = ObjectFile::parse(bytes).ok()?.build_id()?;
    if id.len() < 3 {
        return None;
    }
    std::fs::read(format!(
        "/usr/lib/debug/.build-id/{}/{}.debug",
        &id[..2],
        &id[2..]
    ))
    .ok()
}

/// A symbolizer for the object, from its separate debug file if it has no
/// `.symtab` of its own.
fn symbolizer_for(bytes: &[u8]) -> Option<Symbolizer> {
    let stripped = !ObjectFile::parse(bytes).ok()?.has_symtab();
    match debug_file(bytes).filter(|_| stripped) {
        Some(debug) => Symbolizer::new(&debug).ok(),
        None => Symbolizer::new(bytes).ok(),
    }
}

/// Reads one word of the process's memory.
pub fn reader(process: &Process) -> impl FnMut(u64) -> Option<u64> + '_ {
    |addr| {
        let b = process.read_mem(addr, 8).ok()?;
        Some(u64::from_le_bytes(b.try_into().ok()?))
    }
}

pub fn regs(r: &libc::user_regs_struct) -> Regs {
    Regs {
        pc: r.rip,
        sp: r.rsp,
        bp: r.rbp,
    }
}

/// Every thread's backtrace per gdb (`None` if gdb is not installed): the
/// addresses gdb prints, by thread id, inline frames merged.
pub fn gdb_backtraces(pid: i32) -> Option<HashMap<i32, Vec<u64>>> {
    let out = Command::new("timeout")
        .args([
            "120",
            "gdb",
            "-batch",
            "-nx",
            "-iex",
            "set debuginfod enabled off",
        ])
        .args([
            "-ex",
            "set backtrace past-main on",
            "-ex",
            "set backtrace limit 2000",
        ])
        .args(["-ex", "thread apply all bt", "-p", &pid.to_string()])
        .stdin(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() && !text.contains("Thread ") {
        eprintln!("gdb did not run: {}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    let mut all: HashMap<i32, Vec<u64>> = HashMap::new();
    let mut current = None;
    for line in text.lines() {
        if let Some(lwp) = line.split("(LWP ").nth(1) {
            current = lwp.split(')').next().and_then(|t| t.parse().ok());
            continue;
        }
        let (Some(tid), Some(rest)) = (current, line.strip_prefix('#')) else {
            continue;
        };
        // "#N  0xADDR in name (...)": frames without an address are inline
        // frames or frame 0 at a line start.
        let mut words = rest.split_whitespace().skip(1);
        if let Some(addr) = words
            .next()
            .and_then(|w| w.strip_prefix("0x"))
            .and_then(|h| u64::from_str_radix(h, 16).ok())
        {
            let list = all.entry(tid).or_default();
            if list.last() != Some(&addr) {
                list.push(addr);
            }
        } else {
            all.entry(tid).or_default();
        }
    }
    Some(all)
}
