//! suture-unwind: reliable unwinding of a stopped thread of another
//! process (x86_64), and naming the frames for reports.
//!
//! The transition engine asks "may this thread have a frame inside code
//! being replaced?", and a wrong "no" can crash the target. So an
//! [`Unwind`] is [`Outcome::Complete`] only when every frame down to the
//! thread's outermost one was found with certainty; anything else is
//! [`Outcome::Unreliable`], with the reason.
//!
//! # How a frame is unwound
//!
//! Frame 0 is looked up at the thread's pc, every later frame at its
//! return address − 1 (inside the call). The caller's `special` callback
//! classifies the lookup address first (code suture generated without CFI);
//! otherwise the address must lie in a module added with
//! [`Unwinder::add_object`] or [`Unwinder::add_code`], and an FDE of that
//! module's `.eh_frame` must cover it. framehop recovers the caller, and our
//! own reading of the same CFI row (gimli) must agree with it: framehop
//! silently falls back to frame pointers when its CFI evaluation fails.
//!
//! Unreliable: an address in no module (anonymous or JIT code) or in no
//! FDE; an FDE of a signal trampoline (CIE augmentation `S`, glibc's
//! `__restore_rt`); CFI rules beyond "CFA = rsp or rbp + offset, return
//! address at CFA + offset" (CFA expressions, CFA from other registers);
//! unreadable stack; a stack pointer that does not increase; framehop
//! failing or disagreeing; more than [`MAX_FRAMES`] frames.
//!
//! # The end of the stack
//!
//! An unwind is complete at the first frame, reached by the rules above,
//! whose CFI row either
//! * has an explicit `DW_CFA_undefined` for the return-address column. This
//!   is how glibc marks the outermost frames: `_start` (main thread, in the
//!   executable's crt1.o) and the child side of `clone3` and `clone`
//!   (other threads, below `start_thread`) begin with `cfi_undefined (rip)`;
//!   or
//! * puts the return address where the stack holds 0 (the zero return
//!   address libgcc's unwinder also takes as the end).
//!
//! A zero rbp alone is never taken as the end: without frame pointers rbp
//! is an ordinary register. Missing CFI is never taken as the end.
//!
//! # Naming frames
//!
//! [`Symbolizer`] (or the one-shot [`symbolize`] and [`file_line`]) names a
//! link-time address of an object: function and offset from its symbol
//! table, file and line from its DWARF when it has uncompressed debug
//! information.

mod cfi;
mod module;
mod symbolize;
mod unwind;

pub use symbolize::{file_line, symbolize, Symbol, Symbolizer};
pub use unwind::{Frame, Outcome, Regs, Special, Unwind, Unwinder, MAX_FRAMES};

/// A module that cannot be added, or an object that cannot be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{name}: {what}")]
pub struct Error {
    /// The module's name as given.
    pub name: String,
    pub what: String,
}
