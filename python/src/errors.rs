//! Errors as Python exceptions: every library error becomes the exception its cause calls for,
//! with the library's message (which names the file or sample).
use cifar_data::Error;
use pyo3::create_exception;
use pyo3::exceptions::{
    PyFileNotFoundError, PyKeyboardInterrupt, PyMemoryError, PyOSError, PyPermissionError, PyRuntimeError,
    PyValueError,
};
use pyo3::prelude::*;

create_exception!(
    cifar_fast,
    FormatError,
    PyValueError,
    "A file is not what it claims to be: a corrupt or hostile tarball, pickle, image or tensor file \
     (the message names it)."
);
create_exception!(
    cifar_fast,
    WorkerError,
    PyRuntimeError,
    "A loader worker failed on a sample for a reason that is not the file's (the message names the \
     sample)."
);

/// The Python exception for a library error, chosen by its root cause (a worker's error is its
/// source's): `FileNotFoundError` for data that is not there, `OSError` (or its subclass for
/// the errno) for the system's refusals, [`FormatError`] (a `ValueError`) for bad files,
/// `ValueError` for bad settings, `MemoryError` for an allocation that failed,
/// `KeyboardInterrupt` for an interruption, [`WorkerError`] for the rest (a panic). The text
/// is the whole error's, so a worker's names the sample.
pub fn to_py(e: Error) -> PyErr {
    let msg = e.to_string();
    match e.root_cause() {
        Error::NotFound { .. } => PyFileNotFoundError::new_err(msg),
        Error::Io { error, .. } => match error.kind() {
            std::io::ErrorKind::NotFound => PyFileNotFoundError::new_err(msg),
            std::io::ErrorKind::PermissionDenied => PyPermissionError::new_err(msg),
            _ => PyOSError::new_err(msg),
        },
        Error::Format { .. } => FormatError::new_err(msg),
        Error::Shape(_) | Error::Config(_) => PyValueError::new_err(msg),
        Error::OutOfMemory { .. } => PyMemoryError::new_err(msg),
        Error::Interrupted => PyKeyboardInterrupt::new_err(msg),
        Error::Download { .. } => PyOSError::new_err(msg),
        _ => WorkerError::new_err(msg),
    }
}
