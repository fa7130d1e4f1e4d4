//! Shared test harness: builds the C fixtures once (cached by content),
//! starts targets that are killed when dropped, runs the `suture` binary.
#![allow(dead_code)]

pub mod consist;

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const SUTURE: &str = env!("CARGO_BIN_EXE_suture");

fn fixture_src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn cc() -> Command {
    Command::new("cc")
}

/// Build every fixture into a directory named after their content; tests
/// running in parallel (or in separate processes) share it.
pub fn fixtures() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let src = fixture_src();
        let mut h = DefaultHasher::new();
        let mut names: Vec<_> = std::fs::read_dir(&src)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        names.sort();
        for n in &names {
            n.hash(&mut h);
            std::fs::read(n).unwrap().hash(&mut h);
        }
        // The recipe below and the suture that builds the patches count too.
        include_str!("mod.rs").hash(&mut h);
        std::fs::read(SUTURE)
            .map(|b| b.len())
            .unwrap_or(0)
            .hash(&mut h);
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("fixtures-{:x}", h.finish()));
        if dir.join("done").exists() {
            return dir;
        }
        let tmp = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "fixtures-tmp-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).unwrap();
        build_all(&src, &tmp);
        std::fs::write(tmp.join("done"), "").unwrap();
        // Another process may have won the race: either copy is complete.
        if std::fs::rename(&tmp, &dir).is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        assert!(dir.join("done").exists());
        dir
    })
}

fn build_all(src: &Path, out: &Path) {
    let s = |n: &str| src.join(n);
    let o = |n: &str| out.join(n);
    let target_srcs = [s("target.c"), s("dup_a.c"), s("dup_b.c")];
    run(cc()
        .args(["-O2", "-g", "-pthread", "-fPIE", "-pie", "-o"])
        .arg(o("target"))
        .args(&target_srcs)
        .arg("-ldl"));
    run(cc()
        .args(["-O2", "-g", "-pthread", "-fno-pie", "-no-pie", "-o"])
        .arg(o("target-nopie"))
        .args(&target_srcs)
        .arg("-ldl"));
    run(cc()
        .args(["-O2", "-g", "-pthread", "-fcf-protection=full", "-o"])
        .arg(o("target-cet"))
        .args(&target_srcs)
        .arg("-ldl"));
    run(cc()
        .args(["-O2", "-pthread", "-rdynamic", "-o"])
        .arg(o("target-stripped"))
        .args(&target_srcs)
        .arg("-ldl"));
    run(Command::new("strip")
        .arg("--strip-all")
        .arg(o("target-stripped")));
    run(cc()
        .args(["-O2", "-g", "-shared", "-fPIC", "-o"])
        .arg(o("libfixture.so"))
        .arg(s("lib.c")));
    run(cc().args(["-O2", "-o"]).arg(o("tiny")).arg(s("tiny.c")));
    run(cc()
        .args(["-O2", "-g", "-pthread", "-o"])
        .arg(o("parked"))
        .arg(s("parked.c")));
    run(cc()
        .args(["-O2", "-g", "-pthread", "-o"])
        .arg(o("consist"))
        .arg(s("consist.c"))
        .arg("-ldl"));
    for p in [
        "patch_static",
        "patch_global",
        "patch_lib",
        "patch_stack1",
        "patch_stack2",
        "patch_missing",
        "patch_noobj",
        "patch_buildid",
        "patch_ifunc",
        "patch_alias",
        "patch_reader",
        "patch_reader2",
        "patch_ab",
        "patch_p1",
        "patch_p2",
        "patch_p3",
        "patch_shadow",
        "patch_parked",
    ] {
        run(Command::new(SUTURE)
            .arg("build")
            .arg(s(&format!("{p}.c")))
            .arg("-o")
            .arg(o(&format!("{}.o", p.trim_start_matches("patch_")))));
    }
    run(Command::new(SUTURE)
        .arg("build")
        .arg(s("patch_dup.c"))
        .arg("-o")
        .arg(o("dup0.o"))
        .args(["--", "-DSYMPOS=0"]));
    run(Command::new(SUTURE)
        .arg("build")
        .arg(s("patch_dup.c"))
        .arg("-o")
        .arg(o("dup2.o"))
        .args(["--", "-DSYMPOS=2"]));
    for (f, name) in [("tiny", "tiny"), ("loopy", "loopy")] {
        run(Command::new(SUTURE)
            .arg("build")
            .arg(s("patch_tiny.c"))
            .arg("-o")
            .arg(o(&format!("{name}.o")))
            .args(["--", &format!("-DFUNC=\"{f}\"")]));
    }
    for (out, defs) in [
        ("cb", &["-DNAME=\"cb\""][..]),
        ("cb2", &["-DNAME=\"cb2\"", "-DFUNC_FH"][..]),
        ("cbfail", &["-DNAME=\"cbfail\"", "-DFAIL_PRE"][..]),
        ("cbr", &["-DNAME=\"cbr\"", "-DFUNC_FA", "-DREPLACE=1"][..]),
        ("cblib", &["-DNAME=\"cblib\"", "-DLIB"][..]),
        ("cbhang", &["-DNAME=\"cbhang\"", "-DFUNC_FH", "-DHANG"][..]),
    ] {
        run(Command::new(SUTURE)
            .arg("build")
            .arg(s("patch_cb.c"))
            .arg("-o")
            .arg(o(&format!("{out}.o")))
            .arg("--")
            .args(defs));
    }
    for (out, version) in [("st1", 1), ("st2", 1), ("st3", 2), ("st0", 0)] {
        run(Command::new(SUTURE)
            .arg("build")
            .arg(s("patch_state.c"))
            .arg("-o")
            .arg(o(&format!("{out}.o")))
            .arg("--")
            .arg(format!("-DNAME=\"{out}\""))
            .arg(format!("-DVERSION={version}")));
    }
    for name in ["ra", "rb"] {
        run(Command::new(SUTURE)
            .arg("build")
            .arg(s("patch_p3.c"))
            .arg("-o")
            .arg(o(&format!("{name}.o")))
            .args(["--", &format!("-DNAME=\"{name}\"")]));
    }
    run(cc()
        .args(["-c", "-O2", "-o"])
        .arg(o("nodesc.o"))
        .arg(s("patch_nodesc.c")));
    std::fs::write(o("garbage.o"), b"\x7fELF this is not really an object").unwrap();
}

pub fn fixture(name: &str) -> PathBuf {
    fixtures().join(name)
}

/// A running target, killed and reaped on drop even when the test fails.
pub struct Target {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pub pid: i32,
}

impl Target {
    pub fn start(bin: &str, args: &[&str]) -> Target {
        Target::start_env(bin, args, &[])
    }

    /// Like [`Target::start`], with extra environment variables.
    pub fn start_env(bin: &str, args: &[&str], env: &[(&str, &str)]) -> Target {
        let mut child = Command::new(fixture(bin))
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start target");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        assert!(line.starts_with("ready"), "target said {line:?}");
        let pid = child.id() as i32;
        Target {
            child,
            stdin,
            stdout,
            pid,
        }
    }

    /// The standard multi-threaded target with the fixture library loaded.
    pub fn standard(bin: &str) -> Target {
        let lib = fixture("libfixture.so");
        Target::start(bin, &[lib.to_str().unwrap()])
    }

    pub fn ask(&mut self, cmd: &str) -> String {
        writeln!(self.stdin, "{cmd}").unwrap();
        self.stdin.flush().unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        assert!(!line.is_empty(), "target died");
        line
    }

    /// Per thread: (calls, compute_static, compute_global, lib_compute).
    pub fn query(&mut self) -> Vec<(i64, i64, i64, i64)> {
        let line = self.ask("q");
        line.split_whitespace()
            .skip(1)
            .map(|t| {
                let v: Vec<i64> = t.split(':').map(|x| x.parse().unwrap()).collect();
                (v[0], v[1], v[2], v[3])
            })
            .collect()
    }

    /// Results once every thread has completed two more calls (so its last
    /// call began after this function was called).
    pub fn fresh_results(&mut self) -> Vec<(i64, i64, i64, i64)> {
        let start = self.query();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let now = self.query();
            if now.iter().zip(&start).all(|(n, s)| n.0 >= s.0 + 2) {
                return now;
            }
            assert!(
                Instant::now() < deadline,
                "target threads stopped making progress"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn addr(&mut self, name: &str) -> u64 {
        let line = self.ask("a");
        for kv in line.split_whitespace() {
            let (k, v) = kv.split_once('=').unwrap();
            if k == name {
                return u64::from_str_radix(v.trim_start_matches("0x"), 16).unwrap();
            }
        }
        panic!("no address for {name}");
    }

    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// How the target ended, if it did.
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().unwrap()
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn suture(args: &[&str]) -> Output {
    Command::new(SUTURE)
        .args(args)
        .output()
        .expect("run suture")
}

/// Run suture with extra environment variables and require success;
/// returns stdout.
pub fn ok_env(args: &[&str], env: &[(&str, &str)]) -> String {
    ok_env_both(args, env).0
}

/// Like [`ok_env`]; returns stdout and stderr.
pub fn ok_env_both(args: &[&str], env: &[(&str, &str)]) -> (String, String) {
    let out = Command::new(SUTURE)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run suture");
    assert!(
        out.status.success(),
        "suture {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    (
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Run suture and require success; returns stdout.
pub fn ok(args: &[&str]) -> String {
    ok_env(args, &[])
}

/// Run suture and require exit status 1; returns stderr.
pub fn fails(args: &[&str]) -> String {
    let out = suture(args);
    assert_eq!(
        out.status.code(),
        Some(1),
        "suture {args:?} should fail: stdout {} stderr {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stderr).unwrap()
}

pub fn json(args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&ok(args)).expect("json output")
}

pub fn read_mem(pid: i32, addr: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut buf = vec![0; len];
    f.read_exact_at(&mut buf, addr).unwrap();
    buf
}

/// The bytes of `len` bytes at `addr` in a file mapped by the target, as
/// they are on disk: (file offset = addr - bias for a PIE whose first
/// mapping is at offset 0; text segments map with vaddr == offset here).
pub fn file_bytes(pid: i32, path: &Path, addr: u64, len: usize) -> Vec<u8> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let canon = std::fs::canonicalize(path).unwrap();
    let mut base = None;
    for l in maps.lines() {
        if l.ends_with(canon.to_str().unwrap()) {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (start, _) = f[0].split_once('-').unwrap();
            let start = u64::from_str_radix(start, 16).unwrap();
            let off = u64::from_str_radix(f[2], 16).unwrap();
            if off == 0 {
                base = Some(start);
                break;
            }
        }
    }
    let base = base.expect("mapping");
    let bytes = std::fs::read(path).unwrap();
    let is_exec = bytes[16] == 2; // ET_EXEC: addresses are absolute
    let off = if is_exec {
        addr - 0x400000
    } else {
        addr - base
    } as usize;
    bytes[off..off + len].to_vec()
}

/// The symbol table of a fixture via `nm`: name -> (address, size).
pub fn nm(path: &Path) -> Vec<(String, u64, u64)> {
    let out = Command::new("nm").arg("-S").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 4).then(|| {
                (
                    f[3].to_string(),
                    u64::from_str_radix(f[0], 16).unwrap(),
                    u64::from_str_radix(f[1], 16).unwrap(),
                )
            })
        })
        .collect()
}
