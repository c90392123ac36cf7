//! One error type for the whole crate.
//!
//! Every variant carries a message that names the thing that is wrong (the
//! layer index and type, the weight key, the data key, the offending shape),
//! because the user of a curvature tool usually exported the model from
//! somewhere else and needs to know *where* the two disagree.

use std::path::PathBuf;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every error of the library: the kind says which input is at fault, the
/// message names it (file, op, module path, key, shape).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The model spec (JSON) is malformed or describes a network we cannot build.
    #[error("model spec: {0}")]
    Spec(String),

    /// The weights do not match the spec: a missing, unexpected or mis-shaped tensor.
    #[error("weights: {0}")]
    Weights(String),

    /// The data file or an in-memory batch does not fit the model or likelihood.
    #[error("data: {0}")]
    Data(String),

    /// An argument (subnetwork indices, sample count, ...) is out of range.
    #[error("invalid argument: {0}")]
    Invalid(String),

    /// A computation produced NaN or infinity.
    #[error("numerical error: {0}")]
    NonFinite(String),

    /// An input asks for more memory than the budget allows
    /// ([`budget`](crate::budget)): the message names the quantity and the bytes.
    #[error("memory: {0}")]
    Memory(String),

    /// A [`Monitor`](crate::pass::Monitor) stopped the computation (Ctrl-C).
    #[error("interrupted: {0}")]
    Interrupted(String),

    /// Another process of a data-parallel job failed (see
    /// [`distributed`](crate::distributed)): its rank and its error's message.
    #[error("rank {rank}: {message}")]
    Rank {
        /// The rank that failed.
        rank: usize,
        /// Its error.
        message: String,
    },

    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The user's path (never a temporary file's).
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },

    /// A tensor operation failed; this is a bug or an exotic input we did not check for.
    #[error("tensor operation: {0}")]
    Tensor(candle_core::Error),
}

impl From<candle_core::Error> for Error {
    /// Keeps candle's message, drops the backtrace it attaches when
    /// `RUST_BACKTRACE` is set (it would bury the message a user needs).
    fn from(e: candle_core::Error) -> Self {
        match e {
            candle_core::Error::WithBacktrace { inner, .. } => Error::from(*inner),
            other => Error::Tensor(other),
        }
    }
}

impl Error {
    /// The same error with `what` (a file) in front of its message, unless
    /// the message already names it: every error about a file says which.
    pub fn in_file(self, what: &dyn std::fmt::Display) -> Self {
        let what = what.to_string();
        let pre = |m: String| if m.contains(&what) { m } else { format!("{what}: {m}") };
        match self {
            Error::Spec(m) => Error::Spec(pre(m)),
            Error::Weights(m) => Error::Weights(pre(m)),
            Error::Data(m) => Error::Data(pre(m)),
            Error::Invalid(m) => Error::Invalid(pre(m)),
            Error::NonFinite(m) => Error::NonFinite(pre(m)),
            Error::Memory(m) => Error::Memory(pre(m)),
            Error::Tensor(e) => Error::Data(pre(format!("tensor operation: {e}"))),
            other => other,
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// `bail!(Spec, "layer {i}: ...")` returns early with that error variant.
macro_rules! bail {
    ($kind:ident, $($arg:tt)*) => {
        return Err($crate::error::Error::$kind(format!($($arg)*)))
    };
}
pub(crate) use bail;
