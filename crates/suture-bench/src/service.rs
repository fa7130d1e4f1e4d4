//! Against a restart (issue 6, item 4): the bundled demo service
//! (`crates/suture/demo/service.c`, the shop `suture demo` runs) under a
//! steady request load, while a live patch is applied and disabled, against
//! the same run's baseline and against a restart of the service.
//!
//! The load is open-loop: each client thread has a fixed schedule of send
//! times, and a request's latency is measured from its *scheduled* time, so
//! a stall delays every request scheduled during it (no coordinated
//! omission). Each request is one connection: connect, "buy 2", read the
//! whole reply. A request fails when the connection is refused or reset,
//! the reply is not the expected one, or it takes longer than 2 s.

use crate::calls::Suture;
use crate::util::{self, Result};
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const TARGET_P999_RATIO: f64 = 1.10;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

pub struct Options {
    pub rounds: usize,
    /// Requests per second, all clients together.
    pub rate: u32,
    pub clients: usize,
    /// Length of the baseline window (the others are at least as long).
    pub window: Duration,
    pub write: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            rounds: 7,
            rate: 1000,
            clients: 4,
            window: Duration::from_secs(3),
            write: true,
        }
    }
}

/// One request: when it was due (since the load started) and what happened.
#[derive(Clone, Copy)]
struct Sample {
    due: Duration,
    latency: Duration,
    ok: bool,
}

/// The demo service, killed and reaped when dropped.
struct Service(Child);

impl Service {
    fn start(exe: &Path, port: u16) -> Result<(Service, i32)> {
        let mut child = util::own_session(&mut Command::new(exe))
            .arg(port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting the demo service: {e}"))?;
        let out = child.stdout.take().expect("piped");
        let svc = Service(child);
        let mut line = String::new();
        BufReader::new(out)
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        if line.trim().parse::<u16>().ok() != Some(port) {
            return Err(format!(
                "the demo service did not start on port {port}: {line:?}"
            ));
        }
        let pid = svc.0.id() as i32;
        Ok((svc, pid))
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn one_request(port: u16) -> bool {
    let Ok(mut c) = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), REQUEST_TIMEOUT)
    else {
        return false;
    };
    let _ = c.set_read_timeout(Some(REQUEST_TIMEOUT));
    let _ = c.set_nodelay(true);
    if c.write_all(b"buy 2\n").is_err() {
        return false;
    }
    let mut out = String::new();
    c.read_to_string(&mut out).is_ok() && out.starts_with("ok: 2 item(s)")
}

/// The load: `clients` threads, each sending on its own fixed schedule.
struct Load {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<Sample>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    start: Instant,
}

impl Load {
    fn start(port: u16, rate: u32, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let start = Instant::now();
        let period = Duration::from_secs_f64(clients as f64 / rate as f64);
        let threads = (0..clients)
            .map(|i| {
                let (stop, samples) = (stop.clone(), samples.clone());
                // Clients are spread evenly over one period.
                let offset = period.mul_f64(i as f64 / clients as f64);
                std::thread::spawn(move || {
                    let mut k = 0u32;
                    while !stop.load(Ordering::Relaxed) {
                        let due = offset + period * k;
                        k += 1;
                        let now = start.elapsed();
                        if due > now {
                            std::thread::sleep(due - now);
                        }
                        let ok = one_request(port);
                        let latency = start.elapsed().saturating_sub(due);
                        samples.lock().unwrap().push(Sample { due, latency, ok });
                    }
                })
            })
            .collect();
        Load {
            stop,
            samples,
            threads,
            start,
        }
    }

    fn now(&self) -> Duration {
        self.start.elapsed()
    }

    fn finish(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        let v = self.samples.lock().unwrap().clone();
        v
    }
}

/// Latency figures of the requests due in one window.
#[derive(Clone, Default)]
pub struct Window {
    pub requests: usize,
    pub failed: usize,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    pub ms: f64,
}

fn window(samples: &[Sample], from: Duration, to: Duration) -> Window {
    let sel: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.due >= from && s.due < to)
        .collect();
    // A failed request counts with its latency too: it was not served.
    let mut lat: Vec<f64> = sel.iter().map(|s| s.latency.as_secs_f64() * 1e6).collect();
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let q = |p: f64| -> f64 {
        if lat.is_empty() {
            return f64::NAN;
        }
        let i = ((p * lat.len() as f64).ceil() as usize).clamp(1, lat.len()) - 1;
        lat[i]
    };
    Window {
        requests: sel.len(),
        failed: sel.iter().filter(|s| !s.ok).count(),
        p50_us: q(0.5),
        p99_us: q(0.99),
        p999_us: q(0.999),
        max_us: lat.last().copied().unwrap_or(f64::NAN),
        ms: (to - from).as_secs_f64() * 1000.0,
    }
}

pub struct Round {
    pub baseline: Window,
    pub patch: Window,
    pub restart: Window,
    pub apply_ms: f64,
    pub disable_ms: f64,
    pub restart_ms: f64,
    /// CPU time of the `apply` and `disable` commands themselves.
    pub apply_cpu_ms: f64,
    pub disable_cpu_ms: f64,
}

fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

pub fn run(o: &Options) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("suture-bench-service-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let r = run_in(o, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    r
}

fn run_in(o: &Options, dir: &Path) -> Result<()> {
    let su = Suture {
        bin: util::suture_bin()?,
    };
    let demo = util::repo_root().join("crates/suture/demo");
    let exe: PathBuf = dir.join("shop");
    util::run(
        Command::new("cc")
            .args(["-O2", "-g", "-pthread", "-o"])
            .arg(&exe)
            .arg(demo.join("service.c")),
    )?;
    let fix = dir.join("fix.o");
    util::run(
        Command::new(&su.bin)
            .arg("build")
            .arg(demo.join("fix.c"))
            .arg("-o")
            .arg(&fix),
    )?;
    let port = free_port()?;
    let mut rounds = Vec::new();
    for r in 0..o.rounds {
        let (svc, pid) = Service::start(&exe, port)?;
        let mut svc = Some(svc);
        let ps = pid.to_string();
        let load = Load::start(port, o.rate, o.clients);
        // Warm up, then the baseline window.
        std::thread::sleep(Duration::from_millis(500));
        let b0 = load.now();
        std::thread::sleep(o.window);
        let b1 = load.now();
        // Live patch and disable, then as long again as the baseline if
        // they were quicker (the window is never shorter than it).
        let p0 = load.now();
        let (t, cpu) = (Instant::now(), util::children_cpu_ms());
        let applied = su.cmd(&["apply", &ps, &fix.to_string_lossy(), "--timeout", "30"]);
        let apply_ms = t.elapsed().as_secs_f64() * 1000.0;
        let apply_cpu_ms = util::children_cpu_ms() - cpu;
        let (t, cpu) = (Instant::now(), util::children_cpu_ms());
        let disabled = su.cmd(&["disable", &ps, "fix-negative-quantity", "--timeout", "30"]);
        let disable_ms = t.elapsed().as_secs_f64() * 1000.0;
        let disable_cpu_ms = util::children_cpu_ms() - cpu;
        let spent = load.now() - p0;
        if spent < o.window {
            std::thread::sleep(o.window - spent);
        }
        let p1 = load.now();
        // Restart: stop the service and start it again on the same port
        // (what an operator does to deploy a fix without suture).
        let r0 = load.now();
        let t = Instant::now();
        drop(svc.take());
        let restarted = Service::start(&exe, port);
        let restart_ms = t.elapsed().as_secs_f64() * 1000.0;
        let spent = load.now() - r0;
        if spent < o.window {
            std::thread::sleep(o.window - spent);
        }
        let r1 = load.now();
        let start = load.start;
        let samples = load.finish();
        if std::env::var_os("SUTURE_BENCH_DEBUG").is_some() {
            let mut w: Vec<&Sample> = samples
                .iter()
                .filter(|s| s.due >= p0 && s.due < p1)
                .collect();
            w.sort_by_key(|s| std::cmp::Reverse(s.latency));
            for s in w.iter().take(8) {
                // On the clock of suture's `SUTURE_DEBUG_HOLDS=1` lines.
                let ago = Instant::now().saturating_duration_since(start + s.due);
                eprintln!(
                    "  slow: due at +{:.1} ms from the apply's start (CLOCK_MONOTONIC {:.3} ms; apply {apply_ms:.0} ms, disable {disable_ms:.0} ms): {:.1} ms",
                    (s.due - p0).as_secs_f64() * 1e3,
                    util::monotonic_ms() - ago.as_secs_f64() * 1e3,
                    s.latency.as_secs_f64() * 1e3
                );
            }
        }
        let _svc2 = restarted?;
        applied?;
        disabled?;
        let round = Round {
            baseline: window(&samples, b0, b1),
            patch: window(&samples, p0, p1),
            restart: window(&samples, r0, r1),
            apply_ms,
            disable_ms,
            restart_ms,
            apply_cpu_ms,
            disable_cpu_ms,
        };
        eprintln!(
            "service round {}/{}: p99.9 baseline {:.0} us, live patch {:.0} us, restart {:.0} us; failed {} / {} / {}",
            r + 1,
            o.rounds,
            round.baseline.p999_us,
            round.patch.p999_us,
            round.restart.p999_us,
            round.baseline.failed,
            round.patch.failed,
            round.restart.failed
        );
        rounds.push(round);
    }
    let res = Results {
        rounds,
        rate: o.rate,
        clients: o.clients,
    };
    print!("{}", res.markdown());
    if o.write {
        crate::out::write(
            &util::repo_root(),
            "service",
            res.json(),
            "## Against a restart",
            &res.markdown(),
            &[],
        )?;
    }
    Ok(())
}

pub struct Results {
    pub rounds: Vec<Round>,
    pub rate: u32,
    pub clients: usize,
}

fn wjson(w: &Window) -> Value {
    json!({ "requests": w.requests, "failed": w.failed, "p50_us": w.p50_us, "p99_us": w.p99_us,
            "p999_us": w.p999_us, "max_us": w.max_us, "window_ms": w.ms })
}

impl Results {
    fn med(&self, f: impl Fn(&Round) -> f64) -> (f64, f64, f64) {
        util::stats(&self.rounds.iter().map(f).collect::<Vec<_>>())
    }

    fn json(&self) -> Value {
        json!({
            "command": "cargo run --release -p suture-bench -- service",
            "rate_per_s": self.rate, "clients": self.clients,
            "rounds": self.rounds.iter().map(|r| json!({
                "baseline": wjson(&r.baseline), "live_patch": wjson(&r.patch), "restart": wjson(&r.restart),
                "apply_ms": r.apply_ms, "disable_ms": r.disable_ms, "restart_ms": r.restart_ms,
                "apply_cpu_ms": r.apply_cpu_ms, "disable_cpu_ms": r.disable_cpu_ms,
            })).collect::<Vec<_>>(),
            "p999_ratio_live_patch_to_baseline": self.med(|r| r.patch.p999_us / r.baseline.p999_us).0,
        })
    }

    pub fn markdown(&self) -> String {
        let mut m = String::new();
        let _ = writeln!(m, "## Against a restart\n");
        let _ = writeln!(
            m,
            "The demo service of `suture demo` (`crates/suture/demo/service.c`: 4 worker threads accepting connections on 127.0.0.1, one request per connection) under a steady open-loop load of {} requests/s from {} client threads (each on a fixed schedule; latency counts from the scheduled send time, so a stall delays every request due during it). \
             In each of {} rounds, with a fresh service: a baseline window of 3 s; then `suture apply` of the demo's fix and `suture disable`, in a window of at least 3 s from the start of the apply; then the service is killed and started again on the same port (a restart, as one deploys a fix without suture), in a window of at least 3 s. \
             A request fails when its connection is refused or reset, the reply is wrong, or it takes over 2 s. Latency in µs; figures of each window, median over rounds (min..max).\n",
            self.rate,
            self.clients,
            self.rounds.len()
        );
        let _ = writeln!(
            m,
            "| window | requests | failed | p50 | p99 | p99.9 | max |\n|---|---|---|---|---|---|---|"
        );
        type Pick = fn(&Round) -> &Window;
        let rows: [(&str, Pick); 3] = [
            ("baseline", |r| &r.baseline),
            ("live patch (apply + disable)", |r| &r.patch),
            ("restart", |r| &r.restart),
        ];
        for (name, pick) in rows {
            let f = |g: fn(&Window) -> f64| {
                let (a, lo, hi) = self.med(|r| g(pick(r)));
                format!("{a:.0} ({lo:.0}..{hi:.0})")
            };
            let total_failed: usize = self.rounds.iter().map(|r| pick(r).failed).sum();
            let total: usize = self.rounds.iter().map(|r| pick(r).requests).sum();
            let _ = writeln!(
                m,
                "| {name} | {total} in all | {total_failed} in all | {} | {} | {} | {} |",
                f(|w| w.p50_us),
                f(|w| w.p99_us),
                f(|w| w.p999_us),
                f(|w| w.max_us)
            );
        }
        let (am, _, _) = self.med(|r| r.apply_ms);
        let (dm, _, _) = self.med(|r| r.disable_ms);
        let (rm, _, _) = self.med(|r| r.restart_ms);
        let (ac, _, _) = self.med(|r| r.apply_cpu_ms);
        let (dc, _, _) = self.med(|r| r.disable_cpu_ms);
        let _ = writeln!(
            m,
            "\n`suture apply` took {am:.0} ms and `suture disable` {dm:.0} ms (median), of which {ac:.0} ms and {dc:.0} ms of CPU time (user and system, the command's own); the restart (kill, start, first line of the new process) {rm:.0} ms.\n"
        );
        let ratio = self.med(|r| r.patch.p999_us / r.baseline.p999_us);
        let _ = writeln!(m, "### Targets\n\n| target | figure | met |\n|---|---|---|");
        let _ = writeln!(
            m,
            "| tail latency while a patch is applied and disabled: p99.9 within 10% of the same run's baseline | p99.9 live patch / baseline = {:.2} (rounds {:.2}..{:.2}); failed requests during the live patch: {} | {} |\n",
            ratio.0,
            ratio.1,
            ratio.2,
            self.rounds.iter().map(|r| r.patch.failed).sum::<usize>(),
            if ratio.0 <= TARGET_P999_RATIO { "yes" } else { "**no**" }
        );
        if ratio.0 > TARGET_P999_RATIO {
            let _ = writeln!(
                m,
                "Why it is missed, and what would close it: at {} requests/s a window holds a few thousand requests, so p99.9 is about its third slowest, and three requests delayed by a millisecond are enough. No worker thread is ever stopped with the others (live writes), but each is stopped on its own a few times per command (to enter the pending table, unless it sleeps and an earlier command read its pointer; for its stack check; at the completion), 50 to 200 µs each plus its wait to be scheduled again on 2 cores shared with the load generator; and the slowest requests (`SUTURE_BENCH_DEBUG=1` lists them, on the clock of suture's `SUTURE_DEBUG_HOLDS=1` lines) also fall where suture holds no thread at all: suture's own CPU time ({:.0} ms for `apply`, {:.0} ms for `disable`, above) competes with the service for the 2 cores. A sleeping worker is not stopped to enter the pending table at a later command's start (its pointer is in the record), a command borrows one thread once (its mappings and the handler check together), and a finished transition's table is reused. Closing the rest: less CPU time per command, and fewer injected system calls (the stack check itself needs its stop: only a ptrace-stop keeps a thread from entering an old function between its check and its switch).\n",
                self.rate,
                ac,
                dc
            );
        }
        m
    }
}
