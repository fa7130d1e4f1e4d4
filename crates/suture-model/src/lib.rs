//! The livepatch model of suture, free of operating-system code.
//!
//! This crate holds the semantics of the Linux kernel's livepatch
//! (`kernel/livepatch/core.c`, `patch.c`, `transition.c`) restated for a
//! process: the list of patches, one func stack per patched function, the
//! transition with its per-thread states, atomic replace with nop entries,
//! and the redirection rule every patch site follows. Every operation here is
//! a pure state change; the engine turns the resulting [`SiteMode`]s into
//! code writes inside the target.
//!
//! Names follow the kernel: [`Patch`] is `klp_patch`, [`Object`] is
//! `klp_object`, [`Func`] is `klp_func`, a func stack is `klp_ops`.

mod model;
mod types;

pub use model::{Completion, DisableKind, Model, ModelError};
pub use types::{
    CallbackKind, Code, Func, Object, Patch, SiteMode, State, Target, ThreadId, ThreadState,
    Transition,
};
