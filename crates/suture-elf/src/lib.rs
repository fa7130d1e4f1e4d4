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
pub mod link;
pub mod patch;
pub mod symbols;

pub use error::{Error, ResolveFailure};
pub use link::{Layout, LinkedImage, Prot, Region};
pub use patch::{
    CallbacksDesc, FuncDesc, ObjectDesc, PatchDesc, PatchFile, StateDesc, SymRef, SymbolAlias,
};
pub use symbols::{LookupError, ObjectFile, Segment, SymKind, Symbol};
