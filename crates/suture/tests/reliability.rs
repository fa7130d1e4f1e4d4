//! Reliability (issue 7): suture killed at any moment, and targets that
//! misbehave during an operation. Every check here holds whatever moment a
//! kill lands or a target acts: the target stays alive and correct, its
//! function entries hold either their original bytes or one complete jump
//! into suture's memory, no thread stays traced or stopped, and the next
//! command completes or undoes what was interrupted.
//!
//! Random kill moments come from a seeded generator (`SUTURE_KILL_SEED`,
//! printed with every trial) spread over the measured length of an
//! uninterrupted run. The long run:
//! `SUTURE_KILL_TRIALS=200 cargo test -p suture --test reliability -- --ignored --nocapture kill_long`

mod common;
use common::consist::*;
use common::*;
use serde_json::Value;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A hang detector only: no operation here takes nearly this long.
const HANG: Duration = Duration::from_secs(90);

// ---------------------------------------------------------------------------
// Helpers

/// splitmix64: small, seedable, good enough to spread kill moments.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
}

fn seed() -> u64 {
    match std::env::var("SUTURE_KILL_SEED") {
        Ok(s) => s.parse().expect("SUTURE_KILL_SEED is a number"),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    }
}

fn proc_state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.chars().next()
}

fn gone(pid: i32) -> bool {
    matches!(proc_state(pid), None | Some('Z') | Some('X'))
}

/// suture processes (commands, workers, or a command's child before its
/// exec) acting on `pid`.
fn suture_procs(pid: i32) -> Vec<i32> {
    let exe = std::fs::canonicalize(SUTURE).unwrap();
    let me = std::process::id() as i32;
    let want = pid.to_string();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if p == me || gone(p) {
            continue;
        }
        if std::fs::read_link(format!("/proc/{p}/exe")).ok().as_ref() != Some(&exe) {
            continue;
        }
        let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
        if cmd.split(|b| *b == 0).any(|a| a == want.as_bytes()) {
            out.push(p);
        }
    }
    out
}

fn sigkill(pid: i32) {
    // SAFETY: kill(2) with a pid and a signal number.
    unsafe { libc::kill(pid, libc::SIGKILL) };
}

/// Kill every suture process acting on `pid` and wait until they are gone.
fn kill_suture_procs(pid: i32) {
    let deadline = Instant::now() + HANG;
    let mut quiet = 0;
    while quiet < 3 {
        let procs = suture_procs(pid);
        if procs.is_empty() {
            quiet += 1;
        } else {
            quiet = 0;
            for p in procs {
                sigkill(p);
            }
        }
        assert!(Instant::now() < deadline, "suture processes do not die");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Wait (bounded) until no suture process acts on `pid` any more.
fn wait_no_suture(pid: i32, what: &str) {
    let deadline = Instant::now() + HANG;
    let mut quiet = 0;
    while quiet < 3 {
        if suture_procs(pid).is_empty() {
            quiet += 1;
        } else {
            quiet = 0;
        }
        assert!(
            Instant::now() < deadline,
            "hang: suture still runs ({what})"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Every thread of `pid` is untraced and not stopped.
fn threads_free(pid: i32) -> Result<(), String> {
    for e in std::fs::read_dir(format!("/proc/{pid}/task"))
        .map_err(|e| e.to_string())?
        .flatten()
    {
        let Ok(st) = std::fs::read_to_string(e.path().join("status")) else {
            continue; // exited meanwhile
        };
        let field = |k: &str| {
            st.lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        let tid = e.file_name().to_string_lossy().to_string();
        if field("TracerPid:") != "0" {
            return Err(format!(
                "thread {tid} still traced: {}",
                field("TracerPid:")
            ));
        }
        let state = field("State:");
        if state.starts_with('t') || state.starts_with('T') {
            return Err(format!("thread {tid} left stopped: {state}"));
        }
    }
    Ok(())
}

/// Threads may take a moment to leave a stop after their tracer died.
fn assert_threads_free(pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match threads_free(pid) {
            Ok(()) => return,
            Err(e) => assert!(Instant::now() < deadline, "{e}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

const FUNCS: [&str; 5] = ["a", "b", "fa", "fh", "reader_fn"];

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Entry {
    Original,
    Jump,
    /// The `int3` of a live write a killed suture left (the original bytes
    /// or a jump after it); suture's handler sends threads on, and the next
    /// command finishes or takes back the write.
    Int3,
}

/// Each function's entry in the target: its original bytes (from the ELF
/// file), or a complete `jmp rel32` (after `endbr64`) into a suture
/// mapping followed by int3 padding and the original bytes; either of them
/// with an `int3` for first byte (a live write a killed suture left) when
/// suture's `SIGTRAP` handler is mapped. Anything else (a half-written
/// jump, a stray int3) is an error.
fn entries(pid: i32) -> Result<Vec<(String, Entry)>, String> {
    let path = fixture("consist");
    let syms = nm(&path);
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).map_err(|e| e.to_string())?;
    let canon = std::fs::canonicalize(&path).unwrap();
    let base = maps
        .lines()
        .find(|l| l.ends_with(canon.to_str().unwrap()))
        .map(|l| u64::from_str_radix(l.split('-').next().unwrap(), 16).unwrap())
        .ok_or("no consist mapping")?;
    let suture_map = |a: u64| {
        maps.lines().any(|l| {
            let (r, rest) = l.split_once(' ').unwrap();
            let (s, e) = r.split_once('-').unwrap();
            let (s, e) = (
                u64::from_str_radix(s, 16).unwrap(),
                u64::from_str_radix(e, 16).unwrap(),
            );
            s <= a && a < e && rest.contains("/memfd:suture") && rest.contains("r-x")
        })
    };
    let mut out = Vec::new();
    for name in FUNCS {
        let (_, off, size) = syms.iter().find(|(m, _, _)| m == name).unwrap().clone();
        let addr = base + off;
        let len = size.min(16) as usize;
        let live = read_mem(pid, addr, len);
        let file = file_bytes(pid, &path, addr, len);
        if live == file {
            out.push((name.to_string(), Entry::Original));
            continue;
        }
        let skip = if file.starts_with(&[0xf3, 0x0f, 0x1e, 0xfa]) {
            4
        } else {
            0
        };
        let bad = || format!("{name} at {addr:#x}: live {live:02x?} file {file:02x?}");
        let int3 = live[skip] == 0xcc && maps.contains("/memfd:suture-trap");
        if int3 && live[..skip] == file[..skip] && live[skip + 1..] == file[skip + 1..] {
            out.push((name.to_string(), Entry::Int3));
            continue;
        }
        if live[..skip] != file[..skip] || !(live[skip] == 0xe9 || int3) {
            return Err(format!("damaged entry: {}", bad()));
        }
        let rel = i32::from_le_bytes(live[skip + 1..skip + 5].try_into().unwrap());
        let to = (addr + skip as u64 + 5).wrapping_add(rel as i64 as u64);
        if !suture_map(to) {
            return Err(format!(
                "jump to {to:#x}, not into suture's code: {}",
                bad()
            ));
        }
        let mut i = skip + 5;
        while i < len && live[i] == 0xcc && file[i] != 0xcc {
            i += 1;
        }
        if live[i..] != file[i..] {
            return Err(format!("damaged bytes after the jump: {}", bad()));
        }
        out.push((
            name.to_string(),
            if int3 { Entry::Int3 } else { Entry::Jump },
        ));
    }
    Ok(out)
}

fn patch_names(st: &Value) -> Vec<String> {
    st["patches"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|p| p["name"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Results the target may show: `mixed` never grows, and each value is the
/// old or a new function's.
#[derive(Clone, Copy)]
struct Allowed {
    fa: &'static [i64],
    zero: &'static [i64],
}

const AB: Allowed = Allowed {
    fa: &[2, 4],
    zero: &[1],
};
const P1: Allowed = Allowed {
    fa: &[2, 3],
    zero: &[1, 2],
};

/// The target is alive, makes progress, and its results are old-or-new.
fn check_results(t: &mut Consist, allowed: Allowed) -> Result<(), String> {
    if let Some(st) = t.t.exit_status() {
        return Err(format!("the target died: {st}"));
    }
    let q0 = t.q();
    let deadline = Instant::now() + HANG;
    let q = loop {
        let q = t.q();
        if q.pairs > q0.pairs + 1000 && q.mixed == 0 {
            break q;
        }
        if q.mixed != 0 {
            return Err(format!("mixed results: {q:?}"));
        }
        if Instant::now() > deadline {
            return Err(format!("no progress: {q:?}"));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    if !q.fa.iter().all(|v| allowed.fa.contains(v))
        || !q.zero.iter().all(|v| allowed.zero.contains(v))
        || !q.fh.iter().all(|v| *v == 101)
    {
        return Err(format!("wrong results: {q:?}"));
    }
    Ok(())
}

/// Run a suture command with the hang detector; returns its output.
fn run_bounded(args: &[&str]) -> std::process::Output {
    let child = Command::new(SUTURE)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_bounded(child, args)
}

fn wait_bounded(mut child: Child, what: &[&str]) -> std::process::Output {
    let deadline = Instant::now() + HANG;
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "hang: suture {what:?} still ran after {HANG:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn no_panic(out: &std::process::Output, what: &str) {
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        !e.contains("panicked") && out.status.code() != Some(101),
        "suture panicked ({what}): {e}"
    );
}

/// Finish the transition in progress consistently: the reader is let
/// through once and `wait` completes it (restarting a killed worker).
/// `force` would switch threads that are inside the old a() and make them
/// call the new b(): that is what force means, so it is only the last
/// resort, after `wait` timed out.
fn finish_transition(t: &mut Consist, after: &str) -> Result<(), String> {
    let pid = t.pid();
    t.t.ask("w");
    let out = run_bounded(&["wait", &pid, "--timeout", "30"]);
    no_panic(&out, "wait");
    if out.status.code() == Some(3) {
        let out = run_bounded(&["force", &pid]);
        no_panic(&out, "force");
        // A worker may have completed the transition meanwhile.
        let done = String::from_utf8_lossy(&out.stderr).contains("no transition in progress");
        if !out.status.success() && !done {
            return Err(format!(
                "force after {after} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    } else if !out.status.success() {
        return Err(format!(
            "wait after {after} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// Take every patch out, whatever state an interrupted command left: a
/// transition is finished (`finish_transition`), then each patch is
/// disabled (newest first), releasing the reader so transitions complete.
fn disable_everything(t: &mut Consist) -> Result<(), String> {
    let pid = t.pid();
    let cmd = |args: &[&str]| -> Result<std::process::Output, String> {
        let out = run_bounded(args);
        no_panic(&out, &args.join(" "));
        Ok(out)
    };
    let st = json(&["status", &pid, "--json"]);
    if !st["transition"].is_null() {
        finish_transition(t, "the interruption")?;
    }
    let st = json(&["status", &pid, "--json"]);
    if patch_names(&st).is_empty() {
        // Killed during the first live write, before any patch was
        // recorded: the next command that opens the record finishes or
        // withdraws its `int3`s (`live::repair`); with no patch to disable,
        // `check` is that command here (it changes nothing else).
        let out = cmd(&["check", &pid, &f("ab.o")])?;
        if !out.status.success() {
            return Err(format!(
                "check after the interruption failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    for name in patch_names(&st).iter().rev() {
        let out = cmd(&["disable", &pid, name, "--no-wait"])?;
        if !out.status.success() {
            return Err(format!(
                "disable {name} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        finish_transition(t, &format!("disable {name}"))?;
    }
    wait_no_suture(t.t.pid, "after disabling everything");
    let st = json(&["status", &pid, "--json"]);
    if !patch_names(&st).is_empty() || !st["transition"].is_null() {
        return Err(format!("patches left after disabling everything: {st:#}"));
    }
    let e = entries(t.t.pid)?;
    if e.iter().any(|(_, k)| *k != Entry::Original) {
        return Err(format!("entries not restored: {e:?}"));
    }
    Ok(())
}

/// Every check that must hold once no suture process runs.
fn check_target(t: &mut Consist, allowed: Allowed) -> Result<(), String> {
    let pid = t.t.pid;
    if let Some(st) = t.t.exit_status() {
        return Err(format!("the target died: {st}"));
    }
    assert_threads_free(pid);
    let e = entries(pid)?;
    check_results(t, allowed)?;
    let out = run_bounded(&["status", &t.pid(), "--json"]);
    no_panic(&out, "status");
    if !out.status.success() {
        return Err(format!(
            "status fails: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let st: Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
    // No jump may exist that the record does not know about (an int3 of a
    // start that was not recorded yet is taken back by the next command).
    if patch_names(&st).is_empty() && e.iter().any(|(_, k)| *k == Entry::Jump) {
        return Err(format!(
            "entries patched but the record has no patch: {e:?} {st:#}"
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// 1. suture killed at any moment

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// `apply ab.o` on an unpatched target.
    Apply,
    /// `disable ab` of a completed patch.
    Disable,
    /// `apply p3.o`, a cumulative patch replacing ab (nops for a and b).
    Replace,
    /// The worker completing p1's transition once the reader leaves.
    Transition,
}

const KINDS: [Kind; 4] = [Kind::Apply, Kind::Disable, Kind::Replace, Kind::Transition];

impl Kind {
    fn allowed(self) -> Allowed {
        match self {
            Kind::Transition => P1,
            _ => AB,
        }
    }

    /// A target in the state before the operation.
    fn setup(self) -> Consist {
        let mut t = Consist::start(&[]);
        let pid = t.pid();
        match self {
            Kind::Apply => {}
            Kind::Disable | Kind::Replace => {
                ok(&["apply", &pid, &f("ab.o"), "--timeout", "60"]);
            }
            Kind::Transition => {
                ok(&["apply", &pid, &f("p1.o"), "--no-wait"]);
                let _ = &mut t;
            }
        }
        t
    }

    /// Start the operation; returns the command (None for a transition,
    /// which the worker runs).
    fn start(self, t: &mut Consist) -> Option<Child> {
        let pid = t.pid();
        let args: Vec<String> = match self {
            Kind::Apply => vec![
                "apply".into(),
                pid,
                f("ab.o"),
                "--timeout".into(),
                "60".into(),
            ],
            Kind::Disable => vec![
                "disable".into(),
                pid,
                "ab".into(),
                "--timeout".into(),
                "60".into(),
            ],
            Kind::Replace => vec![
                "apply".into(),
                pid,
                f("p3.o"),
                "--timeout".into(),
                "60".into(),
            ],
            Kind::Transition => {
                // The reader leaves the old reader_fn: the worker switches
                // it at its next call and completes the transition.
                t.t.ask("w");
                return None;
            }
        };
        Some(
            Command::new(SUTURE)
                .args(&args)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        )
    }
}

/// How long the uninterrupted operation takes (command and worker).
fn measure(kind: Kind) -> Duration {
    let mut t = kind.setup();
    let t0 = Instant::now();
    if let Some(c) = kind.start(&mut t) {
        let out = wait_bounded(c, &["measure"]);
        assert!(
            out.status.success(),
            "{kind:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    wait_no_suture(t.t.pid, "measuring");
    let d = t0.elapsed();
    check_target(&mut t, kind.allowed()).unwrap();
    d
}

/// One trial: start the operation, SIGKILL suture after `delay`, check the
/// target, then take everything out.
fn trial(kind: Kind, delay: Duration, kill_worker: bool) -> Result<(), String> {
    let mut t = kind.setup();
    let pid = t.t.pid;
    let cmd = kind.start(&mut t);
    std::thread::sleep(delay);
    match cmd {
        Some(mut c) => {
            let _ = c.kill();
            let _ = c.wait();
            if kill_worker {
                kill_suture_procs(pid);
            } else {
                // The worker (if the command started one) finishes alone.
                wait_no_suture(pid, "worker after the command was killed");
            }
        }
        None => kill_suture_procs(pid),
    }
    check_target(&mut t, kind.allowed())?;
    disable_everything(&mut t)?;
    check_results(&mut t, kind.allowed())?;
    assert_threads_free(pid);
    Ok(())
}

fn kill_trials(trials: usize) -> (usize, Vec<String>) {
    let seed = seed();
    println!("kill trials: seed {seed} (SUTURE_KILL_SEED={seed} reproduces)");
    let mut rng = Rng(seed);
    // SUTURE_KILL_KINDS=apply,disable,replace,transition picks some.
    let kinds: Vec<Kind> = match std::env::var("SUTURE_KILL_KINDS") {
        Ok(v) => KINDS
            .iter()
            .copied()
            .filter(|k| v.to_lowercase().contains(&format!("{k:?}").to_lowercase()))
            .collect(),
        Err(_) => KINDS.to_vec(),
    };
    let durations: Vec<Duration> = kinds.iter().map(|k| measure(*k)).collect();
    for (k, d) in kinds.iter().zip(&durations) {
        println!("  {k:?}: uninterrupted run {d:?}");
    }
    let mut failures = Vec::new();
    for i in 0..trials {
        let k = i % kinds.len();
        let kind = kinds[k];
        // Over the whole run and a little past its end.
        let span = durations[k].as_micros() as u64 * 11 / 10;
        let delay = Duration::from_micros(rng.below(span));
        let kill_worker = rng.below(2) == 0;
        println!("  trial {i}: {kind:?} kill after {delay:?} (worker killed too: {kill_worker})");
        let r = std::panic::catch_unwind(|| trial(kind, delay, kill_worker));
        let r = match r {
            Ok(r) => r,
            Err(p) => Err(p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".into())),
        };
        if let Err(e) = r {
            let msg = format!("trial {i} (seed {seed}, {kind:?}, delay {delay:?}, worker killed {kill_worker}): {e}");
            println!("  FAILED {msg}");
            failures.push(msg);
        }
    }
    println!("kill trials: {trials} trials, {} failures", failures.len());
    (trials, failures)
}

/// suture (the command, and sometimes its worker) SIGKILLed at 16 seeded
/// random moments of apply, disable, replace and a transition: the target
/// always survives intact (see RELIABILITY.md; `kill_long` is the long run).
#[test]
fn kill_at_random_moments() {
    let (_, failures) = kill_trials(16);
    assert!(failures.is_empty(), "{failures:#?}");
}

/// The long run: `SUTURE_KILL_TRIALS=200 cargo test -p suture --test
/// reliability -- --ignored --nocapture kill_long`.
#[test]
#[ignore]
fn kill_long() {
    let n = std::env::var("SUTURE_KILL_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let (_, failures) = kill_trials(n);
    assert!(failures.is_empty(), "{failures:#?}");
}

// ---------------------------------------------------------------------------
// 2. The target misbehaving during an operation

/// The exit status of a suture command: success, a clear failure (1, with
/// a message) or a transition left to the worker (3); never a panic.
fn sane(out: &std::process::Output, what: &str) {
    no_panic(out, what);
    let code = out.status.code();
    assert!(
        matches!(code, Some(0) | Some(1) | Some(3)),
        "{what}: unexpected exit {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    if code == Some(1) {
        assert!(!out.stderr.is_empty(), "{what}: failed without saying why");
    }
}

/// A target that survived: everything taken out, then every check.
fn survived(t: &mut Consist) {
    disable_everything(t).unwrap();
    check_target(t, AB).unwrap();
}

/// apply ab / disable ab, `cycles` times, while `during` runs in a thread
/// until the cycles end.
fn cycles_while(
    t: &mut Consist,
    cycles: usize,
    during: impl Fn(&std::sync::atomic::AtomicBool) + Send + Sync,
) {
    let pid = t.pid();
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| during(&stop));
        for i in 0..cycles {
            let out = run_bounded(&["apply", &pid, &f("ab.o"), "--timeout", "30"]);
            sane(&out, &format!("apply, cycle {i}"));
            let out = run_bounded(&["disable", &pid, "ab", "--timeout", "30"]);
            sane(&out, &format!("disable, cycle {i}"));
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
    });
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) with a pid and a signal number.
    unsafe { libc::kill(pid, sig) };
}

#[test]
fn target_exiting_or_killed_during_apply() {
    let mut rng = Rng(seed());
    let d = measure(Kind::Apply);
    for (i, how) in ["kill", "exit", "kill", "exit"].iter().enumerate() {
        let mut t = Consist::start(&[]);
        let pid = t.t.pid;
        let delay = Duration::from_micros(rng.below(d.as_micros() as u64));
        println!("target {how} after {delay:?}");
        let c = Kind::Apply.start(&mut t).unwrap();
        std::thread::sleep(delay);
        if *how == "kill" {
            signal(pid, libc::SIGKILL);
        } else {
            let _ = writeln_target(&mut t, "x");
        }
        let out = wait_bounded(c, &["apply", "(target ends)"]);
        sane(&out, &format!("apply {i}"));
        if !out.status.success() {
            let e = String::from_utf8_lossy(&out.stderr);
            assert!(
                e.contains(&pid.to_string()) || e.contains("exited") || e.contains("no process"),
                "the error does not say the target ended: {e}"
            );
        }
        wait_no_suture(pid, "after the target ended");
    }
}

/// Write a command to the target without waiting for its answer.
fn writeln_target(t: &mut Consist, cmd: &str) -> std::io::Result<()> {
    // The target may already be gone: its answer is not needed.
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        t.t.ask(cmd);
    }));
    let _ = r;
    Ok(())
}

#[test]
fn target_exec_during_apply() {
    let mut rng = Rng(seed());
    let d = measure(Kind::Apply);
    for _ in 0..3 {
        let mut t = Consist::start(&[]);
        let delay = Duration::from_micros(rng.below(d.as_micros() as u64));
        println!("exec after {delay:?}");
        let c = Kind::Apply.start(&mut t).unwrap();
        std::thread::sleep(delay);
        let line = t.t.ask("e");
        assert!(line.starts_with("ready"), "{line}");
        let out = wait_bounded(c, &["apply", "(target execs)"]);
        sane(&out, "apply across an exec");
        println!(
            "  apply: {:?} {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        wait_no_suture(t.t.pid, "after exec");
        // The new image is a new program: whatever suture did, it is intact.
        check_target(&mut t, AB).unwrap();
        survived(&mut t);
    }
}

#[test]
fn target_forking_during_operations() {
    let mut t = Consist::start(&[]);
    assert_eq!(t.t.ask("F").trim(), "ok");
    cycles_while(&mut t, 2, |_| {});
    survived(&mut t);
}

#[test]
fn threads_created_and_ended_during_operations() {
    let mut t = Consist::start(&[]);
    assert_eq!(t.t.ask("T").trim(), "ok");
    assert_eq!(t.t.ask("T").trim(), "ok");
    cycles_while(&mut t, 2, |_| {});
    survived(&mut t);
}

#[test]
fn signal_storm_during_operations() {
    let mut t = Consist::start(&[]);
    let pid = t.t.pid;
    cycles_while(&mut t, 2, |stop| {
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            signal(pid, libc::SIGUSR1);
        }
    });
    survived(&mut t);
}

#[test]
fn sigstop_sigcont_from_outside_during_operations() {
    let mut t = Consist::start(&[]);
    let pid = t.t.pid;
    cycles_while(&mut t, 2, |stop| {
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            signal(pid, libc::SIGSTOP);
            std::thread::sleep(Duration::from_millis(7));
            signal(pid, libc::SIGCONT);
            std::thread::sleep(Duration::from_millis(11));
        }
        signal(pid, libc::SIGCONT);
    });
    signal(pid, libc::SIGCONT);
    survived(&mut t);
}

#[test]
fn target_stopped_for_the_whole_operation() {
    let mut t = Consist::start(&[]);
    let pid = t.t.pid;
    signal(pid, libc::SIGSTOP);
    let p = t.pid();
    let out = run_bounded(&["apply", &p, &f("ab.o"), "--timeout", "10"]);
    sane(&out, "apply on a stopped target");
    println!(
        "apply on a stopped target: {:?} {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    signal(pid, libc::SIGCONT);
    survived(&mut t);
}

// ---------------------------------------------------------------------------
// 3. Seccomp

/// suture maps each image region with its final protection and never calls
/// mprotect: a filter that forbids it (EPERM, or killing the process)
/// neither stops the patch nor kills the target.
fn seccomp_case(mode: &str) {
    let mut t = Consist::start(&[mode]);
    let pid = t.pid();
    let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(st.contains("Seccomp:\t2"), "no filter: {st}");
    ok(&["apply", &pid, &f("ab.o"), "--timeout", "60"]);
    let e = entries(t.t.pid).unwrap();
    assert!(
        e.iter()
            .filter(|(n, _)| n == "a" || n == "b")
            .all(|(_, k)| *k == Entry::Jump),
        "{e:?}"
    );
    check_results(&mut t, AB).unwrap();
    // A replace patch: nops, then their removal (and memory freed).
    ok(&["apply", &pid, &f("p3.o"), "--timeout", "60"]);
    let q = t.until("p3 in effect", |q| q.fa.iter().all(|v| *v == 4));
    assert_eq!(q.mixed, 0);
    survived(&mut t);
}

#[test]
fn seccomp_filter_returning_eperm_for_mprotect() {
    seccomp_case("seccomp=errno");
}

#[test]
fn seccomp_filter_killing_on_mprotect() {
    seccomp_case("seccomp=kill");
}

// ---------------------------------------------------------------------------
// 4. Load

/// Ten targets patched at once by ten `suture apply` running in parallel,
/// then unpatched by ten parallel `disable`: every command succeeds, every
/// target stays correct and ends byte-identical to its file.
#[test]
fn ten_targets_patched_at_once() {
    let mut ts: Vec<Consist> = (0..10).map(|_| Consist::start(&[])).collect();
    let pids: Vec<String> = ts.iter().map(|t| t.pid()).collect();
    let ab = f("ab.o");
    for what in ["apply", "disable"] {
        let children: Vec<(String, Child)> = pids
            .iter()
            .map(|pid| {
                let args: Vec<&str> = if what == "apply" {
                    vec!["apply", pid, &ab, "--timeout", "60"]
                } else {
                    vec!["disable", pid, "ab", "--timeout", "60"]
                };
                let c = Command::new(SUTURE)
                    .args(&args)
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap();
                (pid.clone(), c)
            })
            .collect();
        for (pid, c) in children {
            let out = wait_bounded(c, &[what, &pid]);
            assert!(
                out.status.success(),
                "{what} {pid}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        for t in &mut ts {
            check_results(t, AB).unwrap();
        }
    }
    for t in &mut ts {
        let e = entries(t.t.pid).unwrap();
        assert!(e.iter().all(|(_, k)| *k == Entry::Original), "{e:?}");
        check_target(t, AB).unwrap();
    }
}

/// A target whose threads make system calls as fast as they can (some
/// through a patched function, so they are pending and traced while the
/// transition runs): apply/disable cycles of a patch of that function and
/// of a() and b() complete, results stay old-or-new.
#[test]
fn heavy_system_call_load() {
    let mut t = Consist::start(&["sysload"]);
    let pid = t.pid();
    cycles_while(&mut t, 3, |_| {});
    check_results(&mut t, AB).unwrap();
    // reader_fn, called by the storm threads: the reader blocked in it
    // holds the transition; let it through and wait for the worker.
    let out = run_bounded(&["apply", &pid, &f("p1.o"), "--no-wait"]);
    sane(&out, "apply p1 --no-wait");
    t.t.ask("w");
    let out = run_bounded(&["wait", &pid, "--timeout", "60"]);
    sane(&out, "wait p1");
    assert!(
        out.status.success(),
        "the transition did not complete under load: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    t.until("p1 in effect", |q| q.zero.iter().all(|v| *v == 2));
    survived(&mut t);
}
