//! suture-bench: the benchmarks of issue 6.
//!
//! `cargo run --release -p suture-bench -- calls [--rounds N] [--batches N] [--calls N] [--no-write]`
//! measures the cost per call of a patched function in a C target that times
//! its own calls (see `c/target.c`), in four modes side by side in one run:
//! unpatched, during a transition (per-thread dispatch stub), after the
//! transition (one direct jump), after the function's nop was removed by a
//! replace patch. It writes `BENCHMARKS.json`, `BENCHMARKS.md` and
//! `benchmarks-calls.svg` at the repository root (unless `--no-write`).

mod calls;
mod out;
mod pauses;
mod report;
mod scale;
mod service;
mod step;
mod util;

use std::process::ExitCode;

fn usage() -> ExitCode {
    eprintln!(
        "usage: suture-bench calls [--rounds N] [--batches N] [--calls N] [--no-callgrind] [--no-write]\n\
         \x20      suture-bench pauses [--rounds N] [--threads N,N,...] [--no-write]\n\
         \x20      suture-bench scale [--reps N] [--quick | --configs FxT,...] [--no-strace] [--no-write]\n\
         \x20      suture-bench service [--rounds N] [--rate REQ_PER_S] [--no-write]\n\
         \x20      suture-bench all [--no-write]"
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first() else {
        return usage();
    };
    let fail = |e: String| {
        eprintln!("suture-bench: {e}");
        ExitCode::FAILURE
    };
    let num = |it: &mut std::slice::Iter<String>, name: &str| -> Option<u64> {
        let v = it.next().and_then(|v| v.parse().ok());
        if v.is_none() {
            eprintln!("{name} needs a number");
        }
        v
    };
    match cmd.as_str() {
        "pauses" => {
            let mut o = pauses::Options::default();
            let mut it = args[1..].iter();
            while let Some(a) = it.next() {
                match a.as_str() {
                    "--rounds" => match num(&mut it, a) {
                        Some(v) if v > 0 => o.rounds = v as usize,
                        _ => return usage(),
                    },
                    "--threads" => {
                        let v: Option<Vec<usize>> = it
                            .next()
                            .map(|s| {
                                s.split(',')
                                    .map(|x| x.parse().ok().filter(|&n| n > 0))
                                    .collect()
                            })
                            .unwrap_or(None);
                        match v {
                            Some(v) if !v.is_empty() => o.threads = v,
                            _ => return usage(),
                        }
                    }
                    "--no-write" => o.write = false,
                    _ => return usage(),
                }
            }
            pauses::run(&o).map_or_else(fail, |_| ExitCode::SUCCESS)
        }
        "scale" => {
            let mut o = scale::Options::default();
            let mut it = args[1..].iter();
            while let Some(a) = it.next() {
                match a.as_str() {
                    "--reps" => match num(&mut it, a) {
                        Some(v) if v > 0 => o.reps = v as usize,
                        _ => return usage(),
                    },
                    "--quick" => o.configs = vec![(1, 1), (10, 64), (100, 64)],
                    // FxT,FxT,...: functions x threads
                    "--configs" => {
                        let v: Option<Vec<(usize, usize)>> = it.next().and_then(|s| {
                            s.split(',')
                                .map(|c| {
                                    let (f, t) = c.split_once('x')?;
                                    Some((f.parse().ok()?, t.parse().ok()?))
                                })
                                .collect()
                        });
                        match v {
                            Some(v) if !v.is_empty() => o.configs = v,
                            _ => return usage(),
                        }
                    }
                    "--no-strace" => o.strace = false,
                    "--no-write" => o.write = false,
                    _ => return usage(),
                }
            }
            scale::run(&o).map_or_else(fail, |_| ExitCode::SUCCESS)
        }
        "service" => {
            let mut o = service::Options::default();
            let mut it = args[1..].iter();
            while let Some(a) = it.next() {
                match a.as_str() {
                    "--rounds" => match num(&mut it, a) {
                        Some(v) if v > 0 => o.rounds = v as usize,
                        _ => return usage(),
                    },
                    "--rate" => match num(&mut it, a) {
                        Some(v) if v > 0 => o.rate = v as u32,
                        _ => return usage(),
                    },
                    "--no-write" => o.write = false,
                    _ => return usage(),
                }
            }
            service::run(&o).map_or_else(fail, |_| ExitCode::SUCCESS)
        }
        "all" => {
            let write = match args.get(1).map(String::as_str) {
                None => true,
                Some("--no-write") => false,
                _ => return usage(),
            };
            let c = calls::Options {
                write,
                ..Default::default()
            };
            let p = pauses::Options {
                write,
                ..Default::default()
            };
            let s = scale::Options {
                write,
                ..Default::default()
            };
            let v = service::Options {
                write,
                ..Default::default()
            };
            let mut ok = true;
            for (name, r) in [
                (
                    "calls",
                    &(|| calls::run(&c)) as &dyn Fn() -> util::Result<()>,
                ),
                ("pauses", &|| pauses::run(&p)),
                ("scale", &|| scale::run(&s)),
                ("service", &|| service::run(&v)),
            ] {
                if let Err(e) = r() {
                    eprintln!("suture-bench {name}: {e}");
                    ok = false;
                }
            }
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        "calls" => {
            let mut opts = calls::Options::default();
            let mut it = args[1..].iter();
            while let Some(a) = it.next() {
                let mut num = |name: &str| -> Option<u64> {
                    let v = it.next().and_then(|v| v.parse().ok());
                    if v.is_none() {
                        eprintln!("{name} needs a number");
                    }
                    v
                };
                match a.as_str() {
                    "--rounds" => match num("--rounds") {
                        Some(v) if v > 0 => opts.rounds = v as usize,
                        _ => return usage(),
                    },
                    "--batches" => match num("--batches") {
                        Some(v) if v > 0 => opts.batches = v as usize,
                        _ => return usage(),
                    },
                    "--calls" => match num("--calls") {
                        Some(v) if v >= 25 => opts.calls = v,
                        _ => return usage(),
                    },
                    "--no-callgrind" => opts.callgrind = false,
                    "--no-write" => opts.write = false,
                    _ => return usage(),
                }
            }
            match calls::run(&opts) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("suture-bench: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        _ => usage(),
    }
}
