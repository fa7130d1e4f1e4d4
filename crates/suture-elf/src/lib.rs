//! suture-elf: the ELF side of suture.
//!
//! * [`patch`] parses a patch file (a relocatable x86_64 ELF object carrying
//!   one `SUTURE_PATCH` descriptor, see `include/suture.h`);
//! * [`link`] lays the patch out as an image and links it at an address of
//!   the target process;
//! * [`symbols`] reads the symbols of the target's executables and shared
//!   objects on disk.
//!
//! Everything here is pure: it reads bytes and never touches a process.
//! Corrupt input yields an [`Error`], never a panic.

mod elf;
mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod link;
pub mod patch;
pub mod symbols;

pub use error::{Error, ResolveFailure};

/// The compiler flags a patch is built with (README.md's SUTURE_CFLAGS,
/// less `-I`): position-independent code, so far data goes through the
/// GOT this crate builds; one section per function and object; unwind
/// tables for the unwinder. `suture build` passes exactly these.
pub const PATCH_CFLAGS: &[&str] = &[
    "-c",
    "-O2",
    "-fPIC",
    "-fno-common",
    "-ffunction-sections",
    "-fdata-sections",
    "-fasynchronous-unwind-tables",
];
pub use link::{Layout, LinkedImage, Prot, Region};
pub use patch::{
    CallbacksDesc, FuncDesc, ObjectDesc, PatchDesc, PatchFile, StateDesc, SymRef, SymbolAlias,
};
pub use symbols::{LookupError, ObjectFile, Segment, SymKind, Symbol};
