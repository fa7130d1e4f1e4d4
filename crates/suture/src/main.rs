//! The `suture` command line: a thin layer over `suture-engine`.

mod audit;
mod build;
mod demo;
mod format;
mod signing;
mod transition;

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// Live-patch functions of running Linux processes, with the kernel
/// livepatch's model.
#[derive(Parser)]
#[command(name = "suture", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// How apply and disable wait for their transition.
#[derive(clap::Args, Clone, Copy)]
struct WaitArgs {
    /// Return once the transition has started and its worker watches the
    /// pending threads; the worker completes it.
    #[arg(long)]
    no_wait: bool,
    /// Give up waiting after SECS seconds (exit status 3; the transition
    /// goes on).
    #[arg(long, value_name = "SECS", default_value_t = 60.0)]
    timeout: f64,
}

#[derive(Subcommand)]
enum Command {
    /// Load a patch into a running process and enable it.
    Apply {
        /// Target process id.
        pid: i32,
        /// Patch file (a relocatable object from `suture build`).
        patch: PathBuf,
        #[command(flatten)]
        wait: WaitArgs,
        /// Accept a patch file that others than its owner or root could
        /// have written (group/world-writable, or in such a directory).
        #[arg(long)]
        allow_untrusted: bool,
        /// Accept the patch only if PATCH.sig verifies with a key in the
        /// keys directory (SUTURE_KEYS_DIR, default /etc/suture/keys).
        #[arg(long)]
        require_signed: bool,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Disable a patch and unload it; on the patch in transition, reverse it.
    Disable {
        pid: i32,
        /// Name of the patch (as `suture status` shows it).
        name: String,
        #[command(flatten)]
        wait: WaitArgs,
        #[arg(long)]
        json: bool,
    },
    /// Complete the transition in progress now, switching every pending
    /// thread without checking its stack (overrides consistency).
    Force {
        pid: i32,
        #[arg(long)]
        json: bool,
    },
    /// Wait for the transition in progress to complete (starting a new
    /// worker for it if none runs).
    Wait {
        pid: i32,
        /// Give up after SECS seconds (exit status 3).
        #[arg(long, value_name = "SECS", default_value_t = 60.0)]
        timeout: f64,
        #[arg(long)]
        json: bool,
    },
    /// Show the patches of a process: patches, objects, functions, sites,
    /// and the transition in progress with the threads it waits for.
    Status {
        pid: i32,
        #[arg(long)]
        json: bool,
    },
    /// List every process that carries suture patches.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Make every check `apply` makes, changing nothing.
    Check {
        pid: i32,
        patch: PathBuf,
        /// As for `apply`.
        #[arg(long)]
        allow_untrusted: bool,
        #[arg(long)]
        json: bool,
    },
    /// Make an ed25519 key pair: PREFIX.key (secret) and PREFIX.pub (put
    /// it in the keys directory of the machines that must accept it).
    Keygen { prefix: PathBuf },
    /// Sign a patch file with a secret key: writes PATCH.sig.
    Sign { key: PathBuf, patch: PathBuf },
    /// Compile a C patch with the right flags.
    Build {
        /// C source of the patch.
        src: PathBuf,
        /// Output object (default: SRC with .o).
        #[arg(short = 'o', long)]
        output: Option<PathBuf>,
        /// Extra compiler arguments (after `--`).
        #[arg(last = true)]
        extra: Vec<String>,
    },
    /// Run the bundled demo: start a service, patch it live, unpatch it.
    Demo,
    /// Internal: the worker that completes a transition in the background.
    #[command(name = "__worker", hide = true)]
    Worker { pid: i32 },
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Apply {
            pid,
            patch,
            wait,
            allow_untrusted,
            require_signed,
            json,
        } => {
            let r = trusted(&patch, allow_untrusted)
                .map_err(anyhow::Error::from)
                .and_then(|()| signed(&patch, require_signed))
                .and_then(|()| suture_engine::apply(pid, &patch).map_err(anyhow::Error::from));
            let label = r.as_ref().map(|r| r.patch.clone()).ok();
            audit::record("apply", pid, label.as_deref(), Some(&patch), &r);
            let r = r?;
            let name = r.patch.clone();
            let pending = r.pending;
            transition::finish_command(pid, &name, pending, wait, json, r, format::apply, true)
        }
        Command::Disable {
            pid,
            name,
            wait,
            json,
        } => {
            let r = suture_engine::disable(pid, &name).map_err(anyhow::Error::from);
            audit::record("disable", pid, Some(&name), None, &r);
            let r = r?;
            let pending = r.pending;
            // A reversed disable re-enables the patch.
            let present_ok = r.target == "patched";
            transition::finish_command(
                pid,
                &name,
                pending,
                wait,
                json,
                r,
                format::disable,
                present_ok,
            )
        }
        Command::Force { pid, json } => {
            let r = suture_engine::force(pid).map_err(anyhow::Error::from);
            let label = r.as_ref().map(|r| r.patch.clone()).ok();
            audit::record("force", pid, label.as_deref(), None, &r);
            let r = r?;
            format::print(json, &r, format::force)
        }
        Command::Wait { pid, timeout, json } => transition::wait_command(pid, timeout, json),
        Command::Status { pid, json } => {
            let r = suture_engine::status(pid)?;
            format::print(json, &r, format::status)
        }
        Command::List { json } => {
            let r = suture_engine::list()?;
            format::print(json, &r, format::list)
        }
        Command::Check {
            pid,
            patch,
            allow_untrusted,
            json,
        } => {
            trusted(&patch, allow_untrusted)?;
            let r = suture_engine::check(pid, &patch)?;
            format::print(json, &r, format::check)
        }
        Command::Build { src, output, extra } => {
            let out = build::build(&src, output.as_deref(), &extra)?;
            println!("built {}", out.display());
            Ok(())
        }
        Command::Keygen { prefix } => {
            let (secret, public) = signing::keygen(&prefix)?;
            println!(
                "secret key {} (keep it private); public key {} (copy it to {} where patches must be accepted)",
                secret.display(),
                public.display(),
                signing::keys_dir().display()
            );
            Ok(())
        }
        Command::Sign { key, patch } => {
            let sig = signing::sign(&key, &patch)?;
            println!("signed {}: {}", patch.display(), sig.display());
            Ok(())
        }
        Command::Demo => demo::run(),
        Command::Worker { pid } => Ok(suture_engine::worker::run(pid)?),
    }
}

/// The patch file must be one only its owner or root could have written,
/// unless the operator allows otherwise.
fn trusted(patch: &std::path::Path, allow: bool) -> Result<(), suture_engine::Error> {
    // A missing file is reported by the command itself, after the more
    // fundamental checks (the process, the right to trace it).
    if allow || !patch.exists() {
        return Ok(());
    }
    suture_engine::trust::check_patch_file(patch)
}

/// With --require-signed, the patch's detached signature must verify.
fn signed(patch: &std::path::Path, require: bool) -> Result<()> {
    if require {
        signing::verify(patch)?;
    }
    Ok(())
}

/// Commands that operate on a process run at a raised priority (nice -20
/// by default, `SUTURE_NICE` to choose) while they hold target threads
/// stopped: every thread held waits for suture. The rest of the work runs
/// at the priority suture was started with, so it never takes CPU time from
/// a service that is serving, unless the CPUs are kept busy
/// (suture would then get a sliver of CPU time): then, and for the
/// transition worker (it only ever works for threads that wait for it, and
/// how fast it wakes up is part of their pause), all the time. Whether the
/// CPUs are kept busy takes about 60 ms of samples, taken on a thread of
/// its own while the command works. Best effort: without the
/// right to raise it, suture runs as it was started.
fn raise_priority(pid: i32, worker: bool) {
    let nice = std::env::var("SUTURE_NICE")
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
        .unwrap_or(-20);
    suture_engine::set_hold_priority(nice);
    if worker {
        suture_engine::keep_hold_priority();
        return;
    }
    std::thread::spawn(move || {
        suture_engine::block_sigchld();
        if suture_engine::cpus_kept_busy(pid) {
            suture_engine::keep_hold_priority();
        }
    });
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Apply { pid, .. }
        | Command::Disable { pid, .. }
        | Command::Force { pid, .. }
        | Command::Wait { pid, .. } => raise_priority(pid, false),
        Command::Worker { pid } => raise_priority(pid, true),
        _ => {}
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("suture: {e:#}");
            match e.downcast_ref::<transition::TimedOut>() {
                Some(_) => ExitCode::from(3),
                None => ExitCode::from(1),
            }
        }
    }
}
