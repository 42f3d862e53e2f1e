//! `cifar_fast._native`: the Rust half of the Python package, a thin face on `cifar-data`'s
//! pipeline. The Python half (`py_src/cifar_fast`) gives it torchvision's and torch's names.
//!
//! - `dataset`: the datasets (a tensor file read as pixels, or an image folder) with the
//!   transform the workers run natively, and map-style access one sample at a time.
//! - `loader`: the pipeline's epochs as Python iterators, with the loader's position.
//! - `pool`: the batch buffers lent out, and `array`: how they leave, through DLPack,
//!   back to the pool when the last tensor or view of a batch is freed.
//! - `prepare`: a torchvision-style `root` found or prepared, and `cifar-prep` as a function.
//! - `errors`: every failure as the Python exception its cause calls for; `fork`: what a
//!   forked child must not wait for.
//!
//! No libtorch is linked: one build serves any torch 2.x, and NumPy without torch. No panic
//! crosses into the interpreter (PyO3 turns one into `PanicException`, and the workers turn
//! theirs into errors).
mod array;
mod dataset;
mod errors;
mod fork;
mod loader;
mod pool;
mod prepare;

use pyo3::prelude::*;

/// The extension's Rust allocations go to jemalloc (prefixed: the interpreter keeps its own
/// malloc). The batch buffers are megabytes each; glibc serves those with a fresh `mmap` and
/// hands them back with `munmap`, and the kernel then spent more than twice the system time
/// copying samples into them (docs/benchmarks.md's Python section has the figures).
#[cfg(target_os = "linux")]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    fork::watch();
    m.add_class::<dataset::Dataset>()?;
    m.add_class::<loader::Loader>()?;
    m.add_class::<loader::EpochIter>()?;
    m.add_class::<array::Array>()?;
    m.add_function(wrap_pyfunction!(prepare::prepare_root, m)?)?;
    m.add_function(wrap_pyfunction!(prepare::prepare, m)?)?;
    m.add("JPEG_SIMD", cifar_data::decode::jpeg::simd())?;
    m.add("FormatError", m.py().get_type::<errors::FormatError>())?;
    m.add("WorkerError", m.py().get_type::<errors::WorkerError>())?;
    Ok(())
}
