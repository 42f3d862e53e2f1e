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
    /// A loader worker failed (or panicked) on one sample.
    #[error("worker failed on sample {index}: {msg}")]
    Worker {
        /// The dataset index of the sample being read.
        index: usize,
        /// What went wrong.
        msg: String,
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
