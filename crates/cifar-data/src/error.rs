//! The library's one error type: every failure names the file or sample it concerns.
use std::path::{Path, PathBuf};

/// A specialised `Result` for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An error from reading, converting or loading CIFAR data.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The operating system refused an operation on `path`.
    ///
    /// The reason is part of the message and deliberately not a `source()`: error reporters
    /// that print the chain (`anyhow`'s `{:#}`) would say it twice.
    #[error("{}: {error}", path.display())]
    Io {
        /// The file or directory concerned.
        path: PathBuf,
        /// What the operating system said.
        error: std::io::Error,
    },
    /// `path` is not what it claims to be: a bad tarball, pickle, record or tensor file.
    #[error("{}: {msg}", path.display())]
    Format {
        /// The file concerned (for a tar member, `archive/member`).
        path: PathBuf,
        /// What is wrong with it.
        msg: String,
    },
    /// A tensor or sample has another shape or dtype than the consumer expects.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// A setting is out of range (a batch size of 0, a shard rank past the world size, ...).
    #[error("invalid setting: {0}")]
    Config(String),
    /// A loader worker failed (or panicked) on one sample: the batch that holds it fails, and
    /// the epoch goes on with the next one.
    #[error("worker failed on sample {index}: {cause}")]
    Worker {
        /// The dataset index of the sample being read.
        index: usize,
        /// What went wrong: the source's own error, or [`Error::Panic`].
        cause: Box<Error>,
    },
    /// A source panicked (a bug in it); the message is the panic's.
    #[error("panicked: {0}")]
    Panic(String),
    /// Every loader worker thread has exited (they only do when the pipeline is dropped, or
    /// when the process could not keep them).
    #[error("every loader worker has exited")]
    WorkersGone,
    /// Memory for `what` could not be allocated.
    #[error("cannot allocate {bytes} bytes for {what}")]
    OutOfMemory {
        /// The size asked for.
        bytes: usize,
        /// What it was for.
        what: String,
    },
    /// The user interrupted the work (Ctrl-C, SIGTERM).
    #[error("interrupted")]
    Interrupted,
    /// Data-parallel training failed: a rank is gone or disagrees, or the launch is wrong.
    #[error("{0}")]
    Distributed(String),
    /// The data asked for is not there (and was not to be, or could not be, prepared).
    #[error("{msg}")]
    NotFound {
        /// Where it was looked for.
        path: PathBuf,
        /// What is missing, and what to put where (the path included).
        msg: String,
    },
    /// A download failed.
    #[error("download of {url} failed: {msg}")]
    Download {
        /// Where from.
        url: String,
        /// Why.
        msg: String,
    },
}

impl Error {
    /// An `Io` error for `path`.
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io { path: path.as_ref().to_path_buf(), error: source }
    }

    /// A `Format` error for `path`.
    pub fn format(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Format { path: path.as_ref().to_path_buf(), msg: msg.into() }
    }

    /// The error behind a worker's (the error itself for any other).
    pub fn root_cause(&self) -> &Error {
        match self {
            Error::Worker { cause, .. } => cause.root_cause(),
            e => e,
        }
    }
}

/// A zeroed vector of `len` values for `what`, or [`Error::OutOfMemory`] where it cannot be
/// had: a size that comes from the user's settings (a batch, an image size) must be an error,
/// not the abort `vec!` makes of a failed allocation, nor the kill that follows an allocation
/// the kernel granted on credit (jemalloc maps without reserving, so a size beyond the
/// machine's memory is granted, and the process is killed when it is written). Sizes above
/// 64 MiB are checked against the memory available first.
///
/// The memory comes zeroed from the allocator (`calloc`'s contract), not written: a fresh
/// mapping is zero already, so a batch buffer's pages are first touched by its first fill
/// rather than all at once here.
pub fn try_zeroed<T: bytemuck::Zeroable>(len: usize, what: &str) -> Result<Vec<T>> {
    let bytes = len.saturating_mul(std::mem::size_of::<T>());
    let refused = || Error::OutOfMemory { bytes, what: what.to_string() };
    #[cfg(target_os = "linux")]
    if bytes > 64 << 20 && crate::store::available_memory().is_some_and(|free| bytes as u64 > free) {
        return Err(refused());
    }
    bytemuck::allocation::try_zeroed_vec(len).map_err(|_| refused())
}

/// Adds a path to `std::io::Result`s, as tch-rs's `cifar.rs` does for its readers.
pub trait IoContext<T> {
    /// The `Io` error for `path`, on failure.
    fn at(self, path: impl AsRef<Path>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl AsRef<Path>) -> Result<T> {
        self.map_err(|e| Error::io(path, e))
    }
}
