//! The suture engine: the operations (`apply`, `disable`, `status`, ...)
//! that join the model to a real process.
//!
//! Layers used: `suture-model` decides what every patch site must do;
//! `suture-elf` reads patch files and the target's objects; `suture-x86`
//! plans sites; `suture-process` stops threads, runs system calls in the
//! target and writes its memory. This crate owns the record kept in the
//! target ([`record`], [`store`]), the memory suture maps there
//! ([`memory`]), symbol resolution ([`resolve`]) and the write protocol
//! ([`write`]).

pub mod callbacks;
pub mod callers;
pub mod check;
pub mod frames;
pub mod live;
pub mod lock;
pub mod memory;
pub mod objects;
pub mod ops;
pub mod priority;
pub mod record;
pub mod report;
pub mod resolve;
pub mod runtime;
pub mod store;
pub mod transition;
pub mod trust;
pub mod worker;
pub mod write;

pub use ops::{apply, check, disable, force, list, status, wait, worker_ready, WaitEnd};
pub use priority::cpus_kept_busy;
pub use report::{
    ApplyReport, CheckReport, DisableReport, ForceReport, ProcessEntry, StatusReport,
};
pub use suture_elf::PATCH_CFLAGS;
/// The priority suture runs at while target threads wait for it.
pub use suture_process::{block_sigchld, keep_hold_priority, set_hold_priority};

/// Why an operation failed. Each message is one sentence a person can act on.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Process(#[from] suture_process::Error),
    #[error(transparent)]
    Model(#[from] suture_model::ModelError),
    #[error("cannot use patch file {path}: {cause}")]
    PatchFile {
        path: String,
        cause: suture_elf::Error,
    },
    #[error("cannot read patch file {path}: {cause}")]
    PatchIo { path: String, cause: std::io::Error },
    #[error("{0}")]
    Object(String),
    #[error(
        "the patch names object '{name}', which the process does not map (loaded objects: {loaded})"
    )]
    ObjectNotMapped { name: String, loaded: String },
    #[error("build-id mismatch for {object}: the patch was built for {expected} but the target maps {found}; build the patch against the running binary")]
    BuildId {
        object: String,
        expected: String,
        found: String,
    },
    #[error("{0}")]
    Symbol(String),
    #[error("cannot patch '{name}' at {addr:#x}: {cause}")]
    Site {
        name: String,
        addr: u64,
        cause: suture_x86::PlanError,
    },
    #[error("{0}")]
    SiteBusy(String),
    #[error("cannot place suture's memory in the target: {0}")]
    Placement(String),
    #[error("cannot link the patch: {0}")]
    Link(suture_elf::Error),
    #[error("suture's record in the target is unreadable: {0}; the target itself is unaffected")]
    CorruptState(String),
    #[error("process {0} carries no suture patches")]
    NoState(i32),
    #[error(
        "another suture command is operating on process {pid}; try again when it has finished"
    )]
    Locked { pid: i32 },
    #[error("{0}")]
    Other(String),
}
