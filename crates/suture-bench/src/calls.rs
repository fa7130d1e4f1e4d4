//! Cost per call (issue 6, item 1).

use crate::report;
use crate::util::{self, hex, read_mem, run as run_cmd, stats, Result, Target};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub struct Options {
    pub rounds: usize,
    pub batches: usize,
    pub calls: u64,
    pub callgrind: bool,
    pub write: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            rounds: 7,
            batches: 9,
            calls: 1_000_000,
            callgrind: true,
            write: true,
        }
    }
}

pub const MODES: [&str; 4] = ["unpatched", "during", "after", "nop_removed"];
pub const MODE_TITLES: [&str; 4] = [
    "unpatched",
    "during a transition (switched thread, dispatch stub)",
    "after the transition (direct calls rewritten, entry jmp)",
    "after nop removal (replace patch)",
];

/// One `m` reply: ns/call per batch for triv and slow50, instructions per call.
struct Measure {
    triv: Vec<f64>,
    slow: Vec<f64>,
    jmp1: Vec<f64>,
    jmp2: Vec<f64>,
    tbody: Vec<f64>,
    stwin: Vec<f64>,
    /// triv and triv_body called through function pointers.
    tptr: Vec<f64>,
    bptr: Vec<f64>,
    insn: Option<(f64, f64)>,
}

fn nums(line: &str, tag: &str) -> Result<Vec<f64>> {
    let rest = line
        .strip_prefix(tag)
        .ok_or_else(|| format!("expected {tag}, got {line:?}"))?;
    rest.split_whitespace()
        .map(|w| w.parse::<f64>().map_err(|e| format!("{w:?}: {e}")))
        .collect()
}

fn measure(t: &mut Target, o: &Options) -> Result<Measure> {
    t.send(&format!("m {} {}", o.batches, o.calls))?;
    let triv = nums(&t.line()?, "triv")?;
    let slow = nums(&t.line()?, "slow")?;
    let jmp1 = nums(&t.line()?, "jmp1")?;
    let jmp2 = nums(&t.line()?, "jmp2")?;
    let tbody = nums(&t.line()?, "tbody")?;
    let stwin = nums(&t.line()?, "stwin")?;
    let tptr = nums(&t.line()?, "tptr")?;
    let bptr = nums(&t.line()?, "bptr")?;
    let insn_line = t.line()?;
    let insn = nums(&insn_line, "insn")
        .ok()
        .and_then(|v| (v.len() == 2).then(|| (v[0], v[1])));
    Ok(Measure {
        triv,
        slow,
        jmp1,
        jmp2,
        tbody,
        stwin,
        tptr,
        bptr,
        insn,
    })
}

pub struct Suture {
    pub bin: PathBuf,
}

impl Suture {
    /// Runs suture; its stderr is shown with `SUTURE_BENCH_STDERR=1`
    /// (e.g. with `SUTURE_DEBUG_HOLDS=1`), else kept for the error.
    pub fn cmd(&self, args: &[&str]) -> Result<String> {
        let mut c = Command::new(&self.bin);
        // Like an operator's command: not in the session of the target.
        crate::util::own_session(&mut c).args(args);
        if std::env::var_os("SUTURE_BENCH_STDERR").is_some_and(|v| v == "1") {
            c.stderr(std::process::Stdio::inherit());
        }
        run_cmd(&mut c)
    }
    pub fn status(&self, pid: i32) -> Result<Value> {
        let s = self.cmd(&["status", &pid.to_string(), "--json"])?;
        serde_json::from_str(&s).map_err(|e| format!("status json: {e}: {s}"))
    }
    pub fn build(&self, src: &Path, out: &Path, name: &str) -> Result<()> {
        let def = format!("-DNAME=\"{name}\"");
        self.cmd(&[
            "build",
            &src.to_string_lossy(),
            "-o",
            &out.to_string_lossy(),
            "--",
            &def,
        ])
        .map(|_| ())
    }
}

/// Pending threads' names in a status report (empty when no transition).
fn pending_names(st: &Value) -> Vec<String> {
    st["transition"]["pending"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|p| p["name"].as_str().unwrap_or("?").to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// The new code a function's direct callers call now, if suture rewrote
/// any of them.
fn new_code(st: &Value, func: &str) -> Vec<u64> {
    let mut out: Vec<u64> = st["sites"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["function"] == func)
        .flat_map(|s| s["callers"].as_array().cloned().unwrap_or_default())
        .filter_map(|c| {
            c["calls"]
                .as_str()
                .and_then(|a| u64::from_str_radix(a.trim_start_matches("0x"), 16).ok())
        })
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// The site mode of a function ("none" when it has no site).
fn site_mode(st: &Value, func: &str) -> String {
    st["sites"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["function"] == func))
        .map(|s| s["mode"].as_str().unwrap_or("?").to_string())
        .unwrap_or_else(|| "none".into())
}

fn addr_of(ready: &str, name: &str) -> Result<u64> {
    let key = format!("{name}=0x");
    let w = ready
        .split_whitespace()
        .find_map(|w| w.strip_prefix(&key))
        .ok_or_else(|| format!("no {name} in {ready:?}"))?;
    u64::from_str_radix(w, 16).map_err(|e| e.to_string())
}

fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let end = Instant::now() + Duration::from_secs(secs);
    loop {
        if f()? {
            return Ok(());
        }
        if Instant::now() > end {
            return Err(format!("timed out waiting for {what}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn compile_target(dir: &Path) -> Result<PathBuf> {
    let src = util::crate_dir().join("c/target.c");
    let out = dir.join("bench-target");
    run_cmd(
        Command::new("cc")
            .args(["-O2", "-g", "-pthread", "-o"])
            .arg(&out)
            .arg(&src),
    )?;
    Ok(out)
}

pub fn run(o: &Options) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("suture-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let r = run_in(o, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    r
}

fn run_in(o: &Options, dir: &Path) -> Result<()> {
    let su = Suture {
        bin: util::suture_bin()?,
    };
    eprintln!("suture: {}", su.bin.display());
    let target = compile_target(dir)?;
    let cdir = util::crate_dir().join("c");
    let mut patches = Vec::new();
    for r in 0..o.rounds {
        let same = dir.join(format!("same{r}.o"));
        let repl = dir.join(format!("replace{r}.o"));
        su.build(
            &cdir.join("patch_same.c"),
            &same,
            &format!("bench-same-{r}"),
        )?;
        su.build(
            &cdir.join("patch_replace.c"),
            &repl,
            &format!("bench-replace-{r}"),
        )?;
        patches.push((same, repl));
    }

    let mut t = Target::start(&mut Command::new(&target))?;
    let pid = t.pid;
    let ps = pid.to_string();
    let triv_addr = addr_of(&t.ready, "triv")?;
    let slow_addr = addr_of(&t.ready, "slow50")?;
    let step_tid: i32 = t
        .ready
        .split_whitespace()
        .find_map(|w| w.strip_prefix("step="))
        .and_then(|v| v.parse().ok())
        .ok_or("no step thread id")?;
    // Instructions of one call (triv, slow50) by single-stepping, per mode.
    let mut steps: Vec<Vec<String>> = vec![Vec::new(); 4];
    // A call may reach the function's entry or, once suture rewrote the
    // direct call, the new code itself: either starts the count.
    let mut step = |t: &mut Target, i: usize, st: &Value| {
        let entries = |name: &str, entry: u64| {
            let mut v = vec![entry];
            v.extend(new_code(st, name));
            v
        };
        let funcs = [entries("triv", triv_addr), entries("slow50", slow_addr)];
        let r = crate::step::count(pid, step_tid, &funcs, || {
            t.send("s")?;
            t.line().map(|_| ())
        });
        let v = match r {
            Ok(c) => format!("{} {}", c[0], c[1]),
            Err(e) => format!("error: {e}"),
        };
        steps[i].push(v);
    };
    let orig_bytes = read_mem(pid, triv_addr, 8)?;
    eprintln!("target {pid}: {}", t.ready);

    // rounds[r][mode] = (triv batches, slow batches, insn)
    let mut raw: Vec<Value> = Vec::new();
    // per mode: per-round medians
    let mut triv_med = vec![Vec::new(); 4];
    let mut slow_med = vec![Vec::new(); 4];
    // references (unpatched code, measured in the unpatched mode of each round)
    let mut jmp_med = vec![Vec::new(); 2];
    let mut jmp_pair = vec![Vec::new(); 2];
    // per mode, per round: median over batches of (function - its never-patched twin)
    let mut triv_pair = vec![Vec::new(); 4];
    let mut slow_pair = vec![Vec::new(); 4];
    let mut ptr_pair = vec![Vec::new(); 4];
    let mut insn: Vec<Option<(f64, f64)>> = vec![None; 4];
    let mut bytes = vec![String::new(); 4];
    let mut modes_seen = vec![String::new(); 4];
    for (r, (same, repl)) in patches.iter().enumerate() {
        let mut round = serde_json::Map::new();
        let mut record = |i: usize,
                          m: Measure,
                          st: &Value,
                          b: Vec<u8>,
                          round: &mut serde_json::Map<String, Value>| {
            triv_med[i].push(stats(&m.triv).0);
            slow_med[i].push(stats(&m.slow).0);
            let d: Vec<f64> = m.triv.iter().zip(&m.tbody).map(|(a, b)| a - b).collect();
            triv_pair[i].push(stats(&d).0);
            let d: Vec<f64> = m.slow.iter().zip(&m.stwin).map(|(a, b)| a - b).collect();
            slow_pair[i].push(stats(&d).0);
            let d: Vec<f64> = m.tptr.iter().zip(&m.bptr).map(|(a, b)| a - b).collect();
            ptr_pair[i].push(stats(&d).0);
            if i == 0 {
                jmp_med[0].push(stats(&m.jmp1).0);
                jmp_med[1].push(stats(&m.jmp2).0);
                let d: Vec<f64> = m.jmp1.iter().zip(&m.tbody).map(|(a, b)| a - b).collect();
                jmp_pair[0].push(stats(&d).0);
                let d: Vec<f64> = m.jmp2.iter().zip(&m.tbody).map(|(a, b)| a - b).collect();
                jmp_pair[1].push(stats(&d).0);
            }
            if m.insn.is_some() {
                insn[i] = m.insn;
            }
            bytes[i] = hex(&b);
            modes_seen[i] = site_mode(st, "triv");
            round.insert(
                MODES[i].into(),
                json!({ "triv_ns": m.triv, "slow50_ns": m.slow, "ref_jmp1_ns": m.jmp1, "ref_jmp2_ns": m.jmp2, "twin_triv_body_ns": m.tbody, "twin_slow50_ns": m.stwin, "triv_by_pointer_ns": m.tptr, "twin_triv_body_by_pointer_ns": m.bptr, "insn_per_call": m.insn.map(|(a, b)| vec![a, b]),
                        "triv_site": site_mode(st, "triv"), "triv_entry_bytes": hex(&b) }),
            );
        };
        // 1. unpatched
        let st = su.status(pid)?;
        let m = measure(&mut t, o)?;
        step(&mut t, 0, &st);
        record(0, m, &st, read_mem(pid, triv_addr, 8)?, &mut round);

        // 2. during a transition: holder() keeps it open
        su.cmd(&["apply", &ps, &same.to_string_lossy(), "--no-wait"])?;
        let mut st = Value::Null;
        wait_until("every thread but the holder to switch", 20, || {
            st = su.status(pid)?;
            Ok(pending_names(&st) == ["holder"])
        })?;
        let m = measure(&mut t, o)?;
        let st2 = su.status(pid)?;
        if st2["transition"].is_null() || pending_names(&st2) != ["holder"] {
            return Err(format!("transition state changed while measuring: {st2}"));
        }
        step(&mut t, 1, &st2);
        record(1, m, &st, read_mem(pid, triv_addr, 8)?, &mut round);

        // 3. after the transition
        t.send("w")?;
        t.line()?;
        su.cmd(&["wait", &ps, "--timeout", "30"])?;
        let st = su.status(pid)?;
        let m = measure(&mut t, o)?;
        step(&mut t, 2, &st);
        record(2, m, &st, read_mem(pid, triv_addr, 8)?, &mut round);

        // 4. after nop removal: the replace patch (changes other()) takes over
        su.cmd(&["apply", &ps, &repl.to_string_lossy(), "--no-wait"])?;
        t.send("w")?; // the holder sits in the replaced patch's holder()
        t.line()?;
        su.cmd(&["wait", &ps, "--timeout", "30"])?;
        let st = su.status(pid)?;
        let b = read_mem(pid, triv_addr, 8)?;
        if b != orig_bytes {
            return Err(format!(
                "triv's bytes after nop removal {} != original {}",
                hex(&b),
                hex(&orig_bytes)
            ));
        }
        let m = measure(&mut t, o)?;
        step(&mut t, 3, &st);
        record(3, m, &st, b, &mut round);

        // back to unpatched for the next round
        su.cmd(&[
            "disable",
            &ps,
            &format!("bench-replace-{r}"),
            "--timeout",
            "30",
        ])?;
        eprintln!(
            "round {}/{}: triv {:.3} / {:.3} / {:.3} / {:.3} ns, slow50 {:.2} / {:.2} / {:.2} / {:.2} ns (unpatched / during / after / nop removed)",
            r + 1,
            o.rounds,
            triv_med[0][r], triv_med[1][r], triv_med[2][r], triv_med[3][r],
            slow_med[0][r], slow_med[1][r], slow_med[2][r], slow_med[3][r]
        );
        raw.push(Value::Object(round));
    }
    let status = t.finish();
    eprintln!("target exited: {status:?}");

    let callgrind = if o.callgrind {
        crate::calls::callgrind(&su.bin, &target, &patches[0].0, dir)
    } else {
        json!({ "skipped": "--no-callgrind" })
    };

    let res = report::Calls {
        opts_rounds: o.rounds,
        opts_batches: o.batches,
        opts_calls: o.calls,
        triv: triv_med,
        slow: slow_med,
        jmps: jmp_med,
        triv_pair,
        slow_pair,
        ptr_pair,
        jmp_pair,
        insn,
        bytes,
        sites: modes_seen,
        raw,
        callgrind,
        steps,
    };
    res.print();
    if o.write {
        res.write(&util::repo_root())?;
    }
    Ok(())
}

/// Instructions per loop iteration (the call, the function, the loop) from a
/// callgrind output file: inclusive cost of `run_triv` and `run_slow`.
fn callgrind_costs(file: &Path) -> Result<[f64; 4]> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let mut names = std::collections::HashMap::new();
    let mut incl: std::collections::HashMap<String, u64> = Default::default();
    let mut cur = String::new();
    let mut after_calls = false;
    let name_of = |v: &str, names: &mut std::collections::HashMap<String, String>| -> String {
        let v = v.trim();
        if let Some(rest) = v.strip_prefix('(') {
            let (id, name) = rest.split_once(')').unwrap_or((rest, ""));
            let name = name.trim();
            if !name.is_empty() {
                names.insert(id.to_string(), name.to_string());
            }
            names.get(id).cloned().unwrap_or_default()
        } else {
            v.to_string()
        }
    };
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("fn=") {
            cur = name_of(v, &mut names);
        } else if let Some(v) = line.strip_prefix("cfn=") {
            name_of(v, &mut names);
        } else if line.starts_with("calls=") {
            after_calls = true;
        } else if line.starts_with(|c: char| c.is_ascii_digit() || c == '+' || c == '-' || c == '*')
        {
            let cost: u64 = line
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
            *incl.entry(cur.clone()).or_default() += cost;
            after_calls = false;
        } else {
            after_calls = false;
        }
    }
    let _ = after_calls;
    let get = |n: &str| {
        incl.get(n)
            .copied()
            .ok_or_else(|| format!("no {n} in callgrind output"))
    };
    Ok([
        get("run_triv")? as f64,
        get("run_slow")? as f64,
        get("triv")? as f64,
        get("slow50")? as f64,
    ])
}

/// Cross-check with callgrind: the loops run under valgrind for a fixed
/// count, unpatched, then (if suture can attach to valgrind) patched.
pub fn callgrind(suture: &Path, target: &Path, patch: &Path, dir: &Path) -> Value {
    const N: u64 = 100_000;
    if Command::new("valgrind")
        .arg("--version")
        .output()
        .map(|o| !o.status.success())
        .unwrap_or(true)
    {
        return json!({ "skipped": "valgrind is not installed" });
    }
    let out = dir.join("callgrind.out");
    let go = || -> Result<Value> {
        let mut t = Target::start(
            Command::new("valgrind")
                .args([
                    "--tool=callgrind",
                    "--smc-check=all",
                    "--collect-atstart=yes",
                ])
                .arg(format!("--callgrind-out-file={}", out.display()))
                .arg(target)
                .stderr(std::process::Stdio::null()),
        )?;
        t.send(&format!("r {N}"))?;
        t.line()?;
        let pid = t.pid.to_string();
        let apply = run_cmd(Command::new(suture).args([
            "apply",
            &pid,
            &patch.to_string_lossy(),
            "--timeout",
            "20",
        ]));
        let apply_result = match &apply {
            Ok(_) => {
                t.send(&format!("r {N}"))?;
                t.line()?;
                "applied".to_string()
            }
            Err(e) => e.clone(),
        };
        t.finish();
        let [rt, rs, ft, fs] = callgrind_costs(&out)?;
        let k = if apply.is_ok() { 2.0 } else { 1.0 };
        Ok(json!({
            "calls": N,
            "modes": if apply.is_ok() { "unpatched and patched, mixed (counts over both)" } else { "unpatched only" },
            "triv_insn_per_call": ft / (k * N as f64),
            "slow50_insn_per_call": fs / (k * N as f64),
            "triv_loop_insn_per_iteration": rt / (k * N as f64),
            "slow50_loop_insn_per_iteration": rs / (k * N as f64),
            "suture_apply_under_valgrind": apply_result,
        }))
    };
    match go() {
        Ok(v) => v,
        Err(e) => json!({ "error": e }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callgrind_inclusive_costs_follow_name_compression() {
        let dir = std::env::temp_dir().join(format!("suture-bench-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("cg.out");
        let text = "events: Ir\nfn=(1) run_triv\n10 4\ncfn=(2) triv\ncalls=3 20\n10 6\n\
                    fn=(2)\n20 6\nfn=(3) run_slow\n30 1\ncfn=(4) slow50\ncalls=1 40\n30 205\nfn=(4)\n40 205\n";
        std::fs::write(&f, text).unwrap();
        let c = callgrind_costs(&f).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(c, [10.0, 206.0, 6.0, 205.0]);
    }

    #[test]
    fn status_helpers() {
        let st = json!({ "transition": { "pending": [ { "tid": 5, "name": "holder" } ] },
                         "sites": [ { "function": "triv", "mode": "dispatch" } ] });
        assert_eq!(pending_names(&st), ["holder"]);
        assert_eq!(site_mode(&st, "triv"), "dispatch");
        assert_eq!(site_mode(&st, "slow50"), "none");
        assert_eq!(
            addr_of("ready 1 triv=0x10 slow50=0x20", "slow50").unwrap(),
            0x20
        );
    }
}
