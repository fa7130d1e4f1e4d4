use std::fmt;

/// Errors of this crate. Every message is one sentence meant for the user.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The input is not usable: not ELF, wrong architecture or type,
    /// truncated or corrupt, or a malformed patch descriptor.
    #[error("{0}")]
    Invalid(String),
    /// Well-formed input that uses something suture does not support in a
    /// patch (constructors, thread-local storage, unknown relocations, ...).
    #[error("{0}")]
    Unsupported(String),
    /// Linking failed (relocation overflow, bad base address, ...).
    #[error("{0}")]
    Link(String),
    /// The caller's resolver failed for the undefined symbol `name`; the
    /// message is the resolver's own, passed through unchanged.
    #[error("{failure}")]
    Resolve {
        name: String,
        failure: ResolveFailure,
    },
}

/// An error produced by the resolver given to [`crate::Layout::link`],
/// carried through unchanged (downcast `.0` to get the original back).
#[derive(Debug)]
pub struct ResolveFailure(pub Box<dyn std::error::Error + Send + Sync + 'static>);

impl ResolveFailure {
    pub fn new(e: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>) -> Self {
        ResolveFailure(e.into())
    }
}

impl fmt::Display for ResolveFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl From<String> for ResolveFailure {
    fn from(s: String) -> Self {
        ResolveFailure::new(s)
    }
}

impl From<&str> for ResolveFailure {
    fn from(s: &str) -> Self {
        ResolveFailure::new(s)
    }
}

impl From<crate::symbols::LookupError> for ResolveFailure {
    fn from(e: crate::symbols::LookupError) -> Self {
        ResolveFailure::new(e)
    }
}

pub(crate) fn invalid(msg: impl Into<String>) -> Error {
    Error::Invalid(msg.into())
}
