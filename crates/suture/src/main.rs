//! The `suture` command line: a thin layer over `suture-engine`.

mod build;
mod demo;
mod format;

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

#[derive(Subcommand)]
enum Command {
    /// Load a patch into a running process and enable it.
    Apply {
        /// Target process id.
        pid: i32,
        /// Patch file (a relocatable object from `suture build`).
        patch: PathBuf,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Disable a patch and unload it.
    Disable {
        pid: i32,
        /// Name of the patch (as `suture status` shows it).
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Show the patches of a process: patches, objects, functions, sites.
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
        #[arg(long)]
        json: bool,
    },
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
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Apply { pid, patch, json } => {
            let r = suture_engine::apply(pid, &patch)?;
            format::print(json, &r, format::apply)
        }
        Command::Disable { pid, name, json } => {
            let r = suture_engine::disable(pid, &name)?;
            format::print(json, &r, format::disable)
        }
        Command::Status { pid, json } => {
            let r = suture_engine::status(pid)?;
            format::print(json, &r, format::status)
        }
        Command::List { json } => {
            let r = suture_engine::list()?;
            format::print(json, &r, format::list)
        }
        Command::Check { pid, patch, json } => {
            let r = suture_engine::check(pid, &patch)?;
            format::print(json, &r, format::check)
        }
        Command::Build { src, output, extra } => {
            let out = build::build(&src, output.as_deref(), &extra)?;
            println!("built {}", out.display());
            Ok(())
        }
        Command::Demo => demo::run(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("suture: {e:#}");
            ExitCode::from(1)
        }
    }
}
