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
mod report;
mod step;
mod util;

use std::process::ExitCode;

fn usage() -> ExitCode {
    eprintln!(
        "usage: suture-bench calls [--rounds N] [--batches N] [--calls N] [--no-callgrind] [--no-write]"
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first() else {
        return usage();
    };
    match cmd.as_str() {
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
