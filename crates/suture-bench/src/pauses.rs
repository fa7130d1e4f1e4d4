//! Pauses (issue 6, item 2): the largest gap each thread of a target sees in
//! its own progress while a patch is applied and disabled, against a baseline
//! of the same duration in the same process; and the longest interval in which
//! every thread had a gap at once (the whole process stopped).

use crate::calls::Suture;
use crate::util::{self, run as run_cmd, Result, Target};
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub const TARGET_PAUSE_US: f64 = 200.0;
pub const THREADS: [usize; 4] = [1, 8, 64, 512];
pub const MODES: [&str; 2] = ["duty", "spin"];
/// Spin mode runs up to this many threads (see `run_in`): at 512 spinning
/// threads on 2 cores one `apply` takes several seconds (each thread stops
/// only when the scheduler next runs it; the borrowed thread waits for a
/// core at each of its system calls).
pub const SPIN_MAX: usize = 512;

pub struct Options {
    pub rounds: usize,
    pub threads: Vec<usize>,
    pub write: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            rounds: 3,
            threads: THREADS.to_vec(),
            write: true,
        }
    }
}

/// One thread's dump: largest gap, gap count, recorded gaps (start, end) ns.
pub struct ThreadGaps {
    pub max: i64,
    pub n: i64,
    pub gaps: Vec<(i64, i64)>,
}

fn dump(t: &mut Target) -> Result<Vec<ThreadGaps>> {
    t.send("f")?;
    t.line()?;
    t.send("d")?;
    let mut v = Vec::new();
    loop {
        let l = t.line()?;
        if l == "end" {
            break;
        }
        let w: Vec<i64> = l
            .split_whitespace()
            .skip(1)
            .map(|x| x.parse().map_err(|e| format!("{x:?}: {e}")))
            .collect::<Result<_>>()?;
        if w.len() < 3 {
            return Err(format!("bad dump line {l:?}"));
        }
        let gaps = w[3..].chunks(2).map(|c| (c[0], c[1])).collect();
        v.push(ThreadGaps {
            max: w[1],
            n: w[2],
            gaps,
        });
    }
    Ok(v)
}

/// Prints every gap of 500 µs or more, on the `CLOCK_MONOTONIC` ms clock
/// of suture's `SUTURE_DEBUG_HOLDS=1` lines, to line them up.
fn print_long_gaps(threads: &[ThreadGaps], base_ns: i64) {
    let mut long: Vec<(usize, i64, i64)> = threads
        .iter()
        .enumerate()
        .flat_map(|(i, t)| t.gaps.iter().map(move |&(s, e)| (i, s, e)))
        .filter(|&(_, s, e)| e - s >= 500_000)
        .collect();
    long.sort_by_key(|&(_, s, _)| s);
    for (i, s, e) in long {
        eprintln!(
            "{:.3} gap of thread #{i}: {} us (until {:.3})",
            (base_ns + s) as f64 / 1e6,
            (e - s) / 1000,
            (base_ns + e) as f64 / 1e6
        );
    }
}

/// Intersection of two sorted lists of disjoint intervals.
fn intersect(a: &[(i64, i64)], b: &[(i64, i64)]) -> Vec<(i64, i64)> {
    let (mut i, mut j, mut out) = (0, 0, Vec::new());
    while i < a.len() && j < b.len() {
        let s = a[i].0.max(b[j].0);
        let e = a[i].1.min(b[j].1);
        if s < e {
            out.push((s, e));
        }
        if a[i].1 < b[j].1 {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

/// The intervals in which every thread had a gap.
pub fn all_in_gap(threads: &[ThreadGaps]) -> Vec<(i64, i64)> {
    let mut it = threads.iter();
    let Some(first) = it.next() else {
        return Vec::new();
    };
    let mut acc = first.gaps.clone();
    acc.sort();
    for t in it {
        let mut g = t.gaps.clone();
        g.sort();
        acc = intersect(&acc, &g);
        if acc.is_empty() {
            break;
        }
    }
    acc
}

/// Nearest-rank percentile of sorted values.
fn pct(s: &[f64], p: f64) -> f64 {
    if s.is_empty() {
        return f64::NAN;
    }
    let k = ((p / 100.0) * s.len() as f64).ceil() as usize;
    s[k.clamp(1, s.len()) - 1]
}

/// Figures of one window (µs).
#[derive(Clone, Copy, Default)]
pub struct Window {
    pub max_us: f64,
    pub median_us: f64,
    pub p99_us: f64,
    /// longest interval in which every thread had a gap
    pub all_us: f64,
    /// number of such intervals of at least 20 µs
    pub all_count: usize,
    /// some thread had more gaps than it could record (all_us is a lower bound)
    pub truncated: bool,
}

fn window(th: &[ThreadGaps]) -> Window {
    let mut m: Vec<f64> = th.iter().map(|t| t.max as f64 / 1000.0).collect();
    m.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let all = all_in_gap(th);
    Window {
        max_us: m.last().copied().unwrap_or(f64::NAN),
        median_us: pct(&m, 50.0),
        p99_us: pct(&m, 99.0),
        all_us: all
            .iter()
            .map(|(s, e)| (e - s) as f64 / 1000.0)
            .fold(0.0, f64::max),
        all_count: all.len(),
        truncated: th.iter().any(|t| t.n as usize > t.gaps.len()),
    }
}

fn wjson(w: &Window) -> Value {
    json!({ "max_gap_us": w.max_us, "median_thread_max_gap_us": w.median_us, "p99_thread_max_gap_us": w.p99_us,
            "all_threads_in_gap_longest_us": w.all_us, "all_threads_in_gap_intervals": w.all_count,
            "gap_list_truncated": w.truncated })
}

pub struct Round {
    pub patch: Window,
    pub base: Window,
    pub apply_ms: f64,
    pub disable_ms: f64,
    pub window_ms: f64,
    /// What `suture apply` and `disable` themselves report (`held` in
    /// their JSON), the larger of the two: the longest time every thread
    /// was stopped at once, the longest any thread waited in a
    /// whole-process stop, the longest stop of a thread to look at it, and
    /// the longest stop of the thread borrowed for system calls (µs).
    pub held_all_us: f64,
    pub held_whole_us: f64,
    pub held_check_us: f64,
    pub held_borrow_us: f64,
}

/// The `held` figures of a command's JSON report: (all at once, whole-stop
/// wait, a thread looked at, the borrowed thread), µs.
fn held(json_out: &str) -> (f64, f64, f64, f64) {
    let v: Value = serde_json::from_str(json_out).unwrap_or(Value::Null);
    let h = &v["held"];
    let f = |k: &str| h[k].as_f64().unwrap_or(f64::NAN);
    (
        f("whole_all_us"),
        f("whole_held_us"),
        f("check_held_us"),
        f("borrow_held_us"),
    )
}

/// results[mode][n] = rounds
pub struct Results {
    pub rounds: usize,
    pub threads: Vec<usize>,
    pub res: Vec<Vec<Vec<Round>>>,
    pub sleep_ns: Vec<Vec<u64>>,
}

pub fn compile(dir: &Path) -> Result<PathBuf> {
    let out = dir.join("pauses");
    run_cmd(
        Command::new("cc")
            .args(["-O2", "-g", "-pthread", "-o"])
            .arg(&out)
            .arg(util::crate_dir().join("c/pauses.c")),
    )?;
    Ok(out)
}

pub fn run(o: &Options) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("suture-bench-pauses-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let r = run_in(o, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    r
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn run_in(o: &Options, dir: &Path) -> Result<()> {
    let su = Suture {
        bin: util::suture_bin()?,
    };
    eprintln!("suture: {}", su.bin.display());
    let exe = compile(dir)?;
    let src = util::crate_dir().join("c/patch_pauses.c");
    let mut res = Vec::new();
    let mut sleeps = Vec::new();
    for mode in MODES {
        let mut per_n = Vec::new();
        let mut sl = Vec::new();
        for &n in &o.threads {
            if mode == "spin" && n > SPIN_MAX {
                // each apply competes with n spinning threads for 2 cores
                per_n.push(Vec::new());
                sl.push(0);
                continue;
            }
            let mut t = Target::start(Command::new(&exe).arg(n.to_string()).arg(mode))?;
            let ps = t.pid.to_string();
            sl.push(
                t.ready
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("sleep_ns="))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0),
            );
            let mut rounds = Vec::new();
            for r in 0..o.rounds {
                let name = format!("bench-pauses-{mode}-{n}-{r}");
                let obj = dir.join(format!("{name}.o"));
                su.build(&src, &obj, &name)?;
                // warm up: let the threads run a moment after the build
                std::thread::sleep(Duration::from_millis(200));
                t.send("r")?;
                t.line()?;
                let t0 = Instant::now();
                let ha = held(&su.cmd(&[
                    "apply",
                    &ps,
                    &obj.to_string_lossy(),
                    "--timeout",
                    "60",
                    "--json",
                ])?);
                let apply = t0.elapsed();
                let t1 = Instant::now();
                let hd = held(&su.cmd(&["disable", &ps, &name, "--timeout", "60", "--json"])?);
                let disable = t1.elapsed();
                std::thread::sleep(Duration::from_millis(20));
                let win = t0.elapsed();
                let dumped = dump(&mut t)?;
                if std::env::var_os("SUTURE_BENCH_DEBUG").is_some() {
                    let base = t
                        .ready
                        .split_whitespace()
                        .find_map(|w| w.strip_prefix("base="))
                        .and_then(|b| b.parse().ok())
                        .unwrap_or(0);
                    print_long_gaps(&dumped, base);
                }
                let patch = window(&dumped);
                t.send("r")?;
                t.line()?;
                std::thread::sleep(win);
                let base = window(&dump(&mut t)?);
                eprintln!(
                    "pauses {mode} N={n} round {}/{}: max gap {:.0} us patching vs {:.0} us baseline; all threads in a gap {:.0} us vs {:.0} us; apply {:.1} ms, disable {:.1} ms",
                    r + 1, o.rounds, patch.max_us, base.max_us, patch.all_us, base.all_us, ms(apply), ms(disable)
                );
                rounds.push(Round {
                    patch,
                    base,
                    apply_ms: ms(apply),
                    disable_ms: ms(disable),
                    window_ms: ms(win),
                    held_all_us: ha.0.max(hd.0),
                    held_whole_us: ha.1.max(hd.1),
                    held_check_us: ha.2.max(hd.2),
                    held_borrow_us: ha.3.max(hd.3),
                });
            }
            let _ = t.finish();
            per_n.push(rounds);
        }
        res.push(per_n);
        sleeps.push(sl);
    }
    let r = Results {
        rounds: o.rounds,
        threads: o.threads.clone(),
        res,
        sleep_ns: sleeps,
    };
    print!("{}", r.markdown());
    if o.write {
        crate::out::write(
            &util::repo_root(),
            "pauses",
            r.json(),
            "## Pauses",
            &r.markdown(),
            &[("benchmarks-pauses.svg", r.svg())],
        )?;
    }
    Ok(())
}

/// (median, min, max) over rounds of a figure.
fn over(rounds: &[Round], f: impl Fn(&Round) -> f64) -> (f64, f64, f64) {
    util::stats(&rounds.iter().map(f).collect::<Vec<_>>())
}

fn fmt3((m, lo, hi): (f64, f64, f64)) -> String {
    if m.is_nan() {
        return "not run".into();
    }
    format!("{m:.0} ({lo:.0}..{hi:.0})")
}

impl Results {
    fn json(&self) -> Value {
        let mut modes = serde_json::Map::new();
        for (mi, mode) in MODES.iter().enumerate() {
            let mut per = serde_json::Map::new();
            for (ni, n) in self.threads.iter().enumerate() {
                let rs = &self.res[mi][ni];
                per.insert(
                    n.to_string(),
                    json!({
                        "duty_sleep_ns": self.sleep_ns[mi][ni],
                        "rounds": rs.iter().map(|r| json!({
                            "patching": wjson(&r.patch), "baseline": wjson(&r.base),
                            "apply_ms": r.apply_ms, "disable_ms": r.disable_ms, "window_ms": r.window_ms,
                            "suture_held_all_us": r.held_all_us, "suture_held_whole_us": r.held_whole_us, "suture_held_check_us": r.held_check_us, "suture_held_borrow_us": r.held_borrow_us })).collect::<Vec<_>>(),
                        "median_over_rounds": {
                            "patching_max_gap_us": over(rs, |r| r.patch.max_us).0,
                            "baseline_max_gap_us": over(rs, |r| r.base.max_us).0,
                            "patching_median_thread_max_gap_us": over(rs, |r| r.patch.median_us).0,
                            "baseline_median_thread_max_gap_us": over(rs, |r| r.base.median_us).0,
                            "patching_p99_thread_max_gap_us": over(rs, |r| r.patch.p99_us).0,
                            "baseline_p99_thread_max_gap_us": over(rs, |r| r.base.p99_us).0,
                            "patching_all_threads_in_gap_us": over(rs, |r| r.patch.all_us).0,
                            "baseline_all_threads_in_gap_us": over(rs, |r| r.base.all_us).0,
                            "apply_ms": over(rs, |r| r.apply_ms).0,
                            "disable_ms": over(rs, |r| r.disable_ms).0,
                            "suture_held_all_us": over(rs, |r| r.held_all_us).0,
                            "suture_held_whole_us": over(rs, |r| r.held_whole_us).0,
                            "suture_held_check_us": over(rs, |r| r.held_check_us).0,
                            "suture_held_borrow_us": over(rs, |r| r.held_borrow_us).0,
                        }
                    }),
                );
            }
            modes.insert(mode.to_string(), Value::Object(per));
        }
        json!({
            "command": "cargo run --release -p suture-bench -- pauses",
            "rounds": self.rounds, "gap_record_threshold_us": 20, "duty_spin_us": 50,
            "modes": modes, "targets": self.targets().iter().map(|(t, f, m)| json!({ "target": t, "figure": f, "met": m })).collect::<Vec<_>>(),
        })
    }

    fn idx(&self, n: usize) -> Option<usize> {
        self.threads.iter().position(|&x| x == n)
    }

    fn targets(&self) -> Vec<(String, String, Option<bool>)> {
        let mut v = Vec::new();
        let n = *self.threads.iter().max().unwrap_or(&0);
        if let Some(i) = self.idx(n) {
            let rs = &self.res[0][i];
            let p = over(rs, |r| r.patch.max_us);
            let b = over(rs, |r| r.base.max_us);
            let p99 = over(rs, |r| r.patch.p99_us);
            v.push((
                format!("no thread paused longer than {TARGET_PAUSE_US:.0} µs at {n} threads"),
                format!(
                    "largest gap of any thread while applying and disabling: {:.0} µs (rounds {:.0}..{:.0}), p99 of the per-thread largest gaps {:.0} µs; baseline of the same duration {} µs (duty mode)",
                    p.0, p.1, p.2, p99.0, fmt3(b)
                ),
                Some(p.0 <= TARGET_PAUSE_US),
            ));
        }
        let mut parts = Vec::new();
        for (i, n) in self.threads.iter().enumerate() {
            let rs = &self.res[1][i];
            if rs.is_empty() {
                continue;
            }
            parts.push(format!(
                "{n} threads {:.0} µs (baseline {:.0})",
                over(rs, |r| r.patch.all_us).0,
                over(rs, |r| r.base.all_us).0
            ));
        }
        let mut own = Vec::new();
        for (i, n) in self.threads.iter().enumerate() {
            let rs = &self.res[0][i];
            if rs.is_empty() {
                continue;
            }
            own.push(format!(
                "{n} threads {:.0} µs (each thread waits in it at most {:.0} µs)",
                over(rs, |r| r.held_all_us).0,
                over(rs, |r| r.held_whole_us).0
            ));
        }
        let never = self.res[0]
            .iter()
            .flatten()
            .all(|r| r.held_all_us == 0.0 && r.held_whole_us == 0.0);
        v.push((
            "the whole process never stopped at once for more than the code write (goal: not at all)".into(),
            format!(
                "suture's own figure, the longest time every thread was stopped at once (the code write with the checks of the thread pointers and program counters), duty mode, median over rounds: {}. Seen from the target, the longest interval in which every thread had a gap at once (spin mode): {}",
                own.join(", "),
                parts.join(", ")
            ),
            never.then_some(true),
        ));
        v
    }

    pub fn markdown(&self) -> String {
        let mut m = String::new();
        let _ = writeln!(m, "## Pauses\n");
        let _ = writeln!(
            m,
            "A C target (`crates/suture-bench/c/pauses.c`) runs N threads that call `work()` (the patched function, `c/patch_pauses.c` replaces it with identical code) \
             and read `clock_gettime(CLOCK_MONOTONIC)` in a tight loop, keeping each its largest gap between consecutive timestamps and every gap of at least 20 µs with its start and end. \
             In each of {} rounds per N, the figures are reset, `suture apply` (waiting for the transition: every thread is switched by its own stack check) then `suture disable` run, \
             and the figures are read (the \"patching\" window); then they are reset again and read after a window of the same duration in which nothing happens (the \"baseline\"). \
             The \"suture:\" columns are what the two commands report themselves (`held` in their JSON: they time every stop they make, from the interrupt of the first thread to the release of the last), the larger of apply's and disable's; a stop made by a transition's background worker is not in them. Two modes, each its own process:\n",
            self.rounds
        );
        let _ = writeln!(
            m,
            "- **duty**: each thread spins for 50 µs then sleeps (timer slack 1 ns) so that the N threads together use half a core of the 2: a gap is a pause imposed on the thread, not a scheduler time slice. After a sleep, the gap counted is the lateness of the wake-up past the requested deadline. The per-thread figures and the 200 µs target are read here.\n\
             - **spin**: the threads never sleep. With more threads than cores, a thread's gaps are mostly the scheduler's time slices (milliseconds), but some thread of the process is always running, so an interval in which *every* thread had a gap at once (the intersection of their recorded gaps) is one in which the process made no progress at all: a whole-process stop (or the machine's other load taking both cores, which the baseline shows).\n"
        );
        for (mi, mode) in MODES.iter().enumerate() {
            let _ = writeln!(
                m,
                "### {} mode\n\nµs, median over rounds (min..max of the rounds). \"thread max\": each thread's largest gap; max / median / p99 over the threads.\n",
                mode
            );
            let _ = writeln!(m, "| threads | baseline: max gap | patching: max gap | baseline: median / p99 thread max | patching: median / p99 thread max | all threads in a gap at once: baseline | patching | suture: all stopped at once | suture: longest wait in a whole stop | suture: longest stop to look at a thread | suture: longest stop of the borrowed thread | apply ms | disable ms |");
            let _ = writeln!(m, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
            for (ni, n) in self.threads.iter().enumerate() {
                let rs = &self.res[mi][ni];
                let tr = if rs.iter().any(|r| r.patch.truncated || r.base.truncated) {
                    " (gap list truncated: lower bound)"
                } else {
                    ""
                };
                let _ = writeln!(
                    m,
                    "| {n} | {} | {} | {:.0} / {:.0} | {:.0} / {:.0} | {} | {}{tr} | {} | {} | {} | {} | {:.1} | {:.1} |",
                    fmt3(over(rs, |r| r.base.max_us)),
                    fmt3(over(rs, |r| r.patch.max_us)),
                    over(rs, |r| r.base.median_us).0,
                    over(rs, |r| r.base.p99_us).0,
                    over(rs, |r| r.patch.median_us).0,
                    over(rs, |r| r.patch.p99_us).0,
                    fmt3(over(rs, |r| r.base.all_us)),
                    fmt3(over(rs, |r| r.patch.all_us)),
                    fmt3(over(rs, |r| r.held_all_us)),
                    fmt3(over(rs, |r| r.held_whole_us)),
                    fmt3(over(rs, |r| r.held_check_us)),
                    fmt3(over(rs, |r| r.held_borrow_us)),
                    over(rs, |r| r.apply_ms).0,
                    over(rs, |r| r.disable_ms).0,
                );
            }
            if *mode == "spin" && self.threads.iter().any(|&n| n > SPIN_MAX) {
                let _ = writeln!(m, "\nSpin mode is not run above {SPIN_MAX} threads: every `suture` command then competes with that many spinning threads for the 2 cores, so the whole-process figure above that is read in duty mode, where gaps are not time slices.");
            }
            let _ = writeln!(m);
        }
        let _ = writeln!(
            m,
            "![pause against number of threads](benchmarks-pauses.svg)\n"
        );
        let _ = writeln!(m, "### Targets\n\n| target | figure | met |\n|---|---|---|");
        for (t, f, met) in self.targets() {
            let met = match met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "see figure",
            };
            let _ = writeln!(m, "| {t} | {f} | {met} |");
        }
        let _ = writeln!(m);
        let n = *self.threads.iter().max().unwrap_or(&0);
        if let Some(i) = self.idx(n) {
            let rs = &self.res[0][i];
            if !rs.is_empty() && over(rs, |r| r.patch.max_us).0 > TARGET_PAUSE_US {
                let _ = writeln!(
                    m,
                    "Why the 200 µs target is missed at {n} threads. suture does not stop the whole process \
                     (the \"all stopped at once\" and \"whole stop\" columns are 0 where its live writes are used): \
                     a transition's start and completion write their jumps `int3` first while every thread runs, \
                     with suture's `SIGTRAP` handler in the target sending on a thread that meets one, and the cores \
                     serialized by a `membarrier` suture issues itself (`live.rs` in ARCHITECTURE.md). Each thread is \
                     stopped only on its own: once to enter the pending table (at a later command's start not even that \
                     if it is asleep: its pointer is in the record), once for its stack check, once more if \
                     it is running while the `int3`s are in place and the patch replaces several instructions of a \
                     function (to see that it is not between them), and one sleeping thread now and then is borrowed \
                     for system calls (one thread, once at the start of a command: its mappings and the check of the handler; \
                     a finished transition's table is reused, not mapped again). As suture times them from the \
                     interrupt to the release, the longest stop to look at a thread is {} µs here, and the borrowed \
                     thread's longest stop {} µs (each injected system call costs several ptrace round trips, and \
                     the first command's `membarrier` registration waits for the kernel; a sleeping thread is \
                     preferred, the main thread first, which here waits for the benchmark's commands and measures \
                     nothing, so its stops are in no gap above). On top of that a thread released on 2 loaded cores waits to be scheduled again, and \
                     suture's own CPU time (reading `/proc` for hundreds of threads, tens of µs a file) competes with \
                     the target for the 2 cores: the same-run baseline, with nothing happening, already has gaps of \
                     {} µs (`SUTURE_BENCH_DEBUG=1` lists every gap of 500 µs or more on the clock of suture's \
                     `SUTURE_DEBUG_HOLDS=1` lines). What would close the rest: fewer injected system calls per command \
                     (one mapping for the image and its slots; each mapping is four system calls, eight ptrace stops), \
                     and less CPU time of suture's per thread. \
                     The stack check itself needs the stop: the kernel switches a task while it cannot run (under its \
                     runqueue lock), and from user space only a ptrace-stop keeps a thread from entering an old \
                     function between its check and its switch.\n",
                    fmt3(over(rs, |r| r.held_check_us)),
                    fmt3(over(rs, |r| r.held_borrow_us)),
                    fmt3(over(rs, |r| r.base.max_us)),
                );
            }
        }
        m
    }

    pub fn svg(&self) -> String {
        let (w, h) = (760.0, 400.0);
        let (x0, x1, top, bottom) = (80.0, 560.0, 50.0, 330.0);
        let mut o = String::new();
        let _ = writeln!(o, "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">");
        let _ = writeln!(o, "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>");
        let _ = writeln!(o, "<text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">Pause against number of threads (median of rounds, log scale)</text>", w / 2.0);
        // series: (label, color, dashed, values)
        let get = |mi: usize, f: &dyn Fn(&Round) -> f64| -> Vec<f64> {
            (0..self.threads.len())
                .map(|ni| over(&self.res[mi][ni], f).0)
                .collect()
        };
        let series: Vec<(&str, &str, bool, Vec<f64>)> = vec![
            (
                "duty: max gap, baseline",
                "#4e79a7",
                true,
                get(0, &|r| r.base.max_us),
            ),
            (
                "duty: max gap, patching",
                "#e15759",
                false,
                get(0, &|r| r.patch.max_us),
            ),
            (
                "duty: p99 thread max, patching",
                "#f28e2b",
                false,
                get(0, &|r| r.patch.p99_us),
            ),
            (
                "spin: all threads in a gap, baseline",
                "#59a14f",
                true,
                get(1, &|r| r.base.all_us),
            ),
            (
                "spin: all threads in a gap, patching",
                "#b07aa1",
                false,
                get(1, &|r| r.patch.all_us),
            ),
        ];
        let vals: Vec<f64> = series
            .iter()
            .flat_map(|s| s.3.iter().copied())
            .filter(|v| *v > 0.0 && v.is_finite())
            .collect();
        let lo = vals
            .iter()
            .copied()
            .fold(TARGET_PAUSE_US, f64::min)
            .max(1.0);
        let hi = vals.iter().copied().fold(TARGET_PAUSE_US, f64::max);
        let (l0, l1) = (
            lo.log10().floor(),
            hi.log10().ceil().max(lo.log10().floor() + 1.0),
        );
        let y = |v: f64| {
            let v = v.max(10f64.powf(l0));
            bottom - (v.log10() - l0) / (l1 - l0) * (bottom - top)
        };
        let nx = self.threads.len().max(2) as f64 - 1.0;
        let x = |i: usize| x0 + (x1 - x0) * i as f64 / nx;
        let _ = writeln!(
            o,
            "<line x1=\"{x0}\" y1=\"{bottom}\" x2=\"{x1}\" y2=\"{bottom}\" stroke=\"black\"/>"
        );
        let _ = writeln!(
            o,
            "<line x1=\"{x0}\" y1=\"{top}\" x2=\"{x0}\" y2=\"{bottom}\" stroke=\"black\"/>"
        );
        let mut e = l0;
        while e <= l1 + 1e-9 {
            let v = 10f64.powf(e);
            let label = if v >= 1000.0 {
                format!("{} ms", v / 1000.0)
            } else {
                format!("{v} µs")
            };
            let _ = writeln!(
                o,
                "<line x1=\"{x0}\" y1=\"{:.1}\" x2=\"{x1}\" y2=\"{:.1}\" stroke=\"#ddd\"/>",
                y(v),
                y(v)
            );
            let _ = writeln!(
                o,
                "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\" font-size=\"10\">{label}</text>",
                x0 - 4.0,
                y(v) + 3.0
            );
            e += 1.0;
        }
        for (i, n) in self.threads.iter().enumerate() {
            let _ = writeln!(
                o,
                "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\" font-size=\"11\">{n}</text>",
                x(i),
                bottom + 16.0
            );
        }
        let _ = writeln!(
            o,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-size=\"12\">threads</text>",
            (x0 + x1) / 2.0,
            bottom + 34.0
        );
        let ty = y(TARGET_PAUSE_US);
        let _ = writeln!(o, "<line x1=\"{x0}\" y1=\"{ty:.1}\" x2=\"{x1}\" y2=\"{ty:.1}\" stroke=\"black\" stroke-dasharray=\"2,3\"/>");
        let _ = writeln!(o, "<text x=\"{x1}\" y=\"{:.1}\" text-anchor=\"end\" font-size=\"10\">target 200 µs</text>", ty - 3.0);
        for (k, (label, color, dashed, v)) in series.iter().enumerate() {
            let pts: Vec<String> = v
                .iter()
                .enumerate()
                .filter(|(_, v)| v.is_finite())
                .map(|(i, v)| format!("{:.1},{:.1}", x(i), y(*v)))
                .collect();
            let dash = if *dashed {
                " stroke-dasharray=\"6,4\""
            } else {
                ""
            };
            let _ = writeln!(o, "<polyline points=\"{}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"2\"{dash}/>", pts.join(" "));
            for (i, v) in v.iter().enumerate().filter(|(_, v)| v.is_finite()) {
                let _ = writeln!(o, "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{color}\"><title>{label}, {} threads: {v:.0} µs</title></circle>", x(i), y(*v), self.threads[i]);
            }
            let ly = top + 10.0 + k as f64 * 18.0;
            let _ = writeln!(o, "<line x1=\"575\" y1=\"{ly}\" x2=\"600\" y2=\"{ly}\" stroke=\"{color}\" stroke-width=\"2\"{dash}/>");
            let _ = writeln!(
                o,
                "<text x=\"605\" y=\"{}\" font-size=\"10\">{label}</text>",
                ly + 4.0
            );
        }
        let _ = writeln!(o, "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-size=\"10\">duty: threads spin 50 µs then sleep (half a core in all); spin: threads never sleep, every thread in a gap at once = the process made no progress.</text>", w / 2.0, h - 14.0);
        let _ = writeln!(o, "</svg>");
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_in_gap_is_the_intersection() {
        let t = |g: Vec<(i64, i64)>| ThreadGaps {
            max: 0,
            n: g.len() as i64,
            gaps: g,
        };
        let th = vec![
            t(vec![(0, 10), (20, 40)]),
            t(vec![(5, 30)]),
            t(vec![(8, 25), (26, 50)]),
        ];
        assert_eq!(all_in_gap(&th), vec![(8, 10), (20, 25), (26, 30)]);
        let w = window(&th);
        assert_eq!(w.all_count, 3);
        assert!((w.all_us - 0.005).abs() < 1e-9);
        assert_eq!(pct(&[1.0, 2.0, 3.0, 4.0], 50.0), 2.0);
        assert_eq!(pct(&[1.0, 2.0, 3.0, 4.0], 99.0), 4.0);
    }
}
