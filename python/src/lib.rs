//! `cifar_fast._native`: the Rust half of the Python package, a thin face on `cifar-data`'s
//! pipeline. The Python half (`py_src/cifar_fast`) gives it torchvision's and torch's names.
//!
//! - [`Dataset`]: a source of samples (a tensor file read as pixels, or an image folder) with
//!   the transform the workers run natively, and map-style access one sample at a time.
//! - [`Loader`] and [`EpochIter`]: the pipeline's epochs; each batch leaves as two [`Array`]s
//!   that share one buffer of the loader's pool, handed to torch or NumPy through DLPack.
//!   The buffer returns to the pool when the last tensor or view of either is freed (the
//!   capsule's deleter), never earlier; a pool that runs dry grows rather than blocks.
//!
//! No libtorch is linked: one build serves any torch 2.x, and NumPy without torch. Every
//! failure is a Python exception (see [`to_py`]); no panic crosses into the interpreter (PyO3
//! turns one into `PanicException`, and the workers turn theirs into errors).
use std::ffi::c_void;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use cifar_data::pipeline::{Buffers, Epoch, Filled, HeapBuffer, Pipeline, Settings, default_prefetch};
use cifar_data::prep::root::{Root, find_or_prepare};
use cifar_data::source::Pixels;
use cifar_data::{Augment, Error, ImageFolder, Padding, SizePolicy, Source};
use dlpark::ffi::{DLDataType, DLDevice, DLManagedTensor, DLManagedTensorVersioned};
use dlpark::python::{DlpackExporter, ExportRequest, export_dlpack};
use dlpark::{DlpackFlags, Managed, ManagedTensorBase};
use pyo3::create_exception;
use pyo3::exceptions::{
    PyFileNotFoundError, PyIndexError, PyKeyboardInterrupt, PyOSError, PyPermissionError, PyRuntimeError,
    PyTypeError, PyValueError,
};
use pyo3::prelude::*;

/// The extension's Rust allocations go to jemalloc (prefixed: the interpreter keeps its own
/// malloc). The batch buffers are megabytes each; glibc serves those with a fresh `mmap` and
/// hands them back with `munmap`, and the kernel then spent more than twice the system time
/// copying samples into them (the README's Python benchmark has the figures).
#[cfg(target_os = "linux")]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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

/// The Python exception for a library error: `FileNotFoundError` for data that is not there,
/// `OSError` (or its subclass for the errno) for the system's refusals, [`FormatError`] (a
/// `ValueError`) for bad files, `ValueError` for bad settings, `KeyboardInterrupt` for an
/// interruption, [`WorkerError`] for the rest of a worker's failures.
fn to_py(e: Error) -> PyErr {
    let msg = e.to_string();
    match e {
        Error::NotFound { .. } => PyFileNotFoundError::new_err(msg),
        Error::Io { error, .. } => match error.kind() {
            std::io::ErrorKind::NotFound => PyFileNotFoundError::new_err(msg),
            std::io::ErrorKind::PermissionDenied => PyPermissionError::new_err(msg),
            _ => PyOSError::new_err(msg),
        },
        Error::Format { .. } => FormatError::new_err(msg),
        Error::Shape(_) | Error::Config(_) => PyValueError::new_err(msg),
        Error::Interrupted => PyKeyboardInterrupt::new_err(msg),
        Error::Download { .. } => PyOSError::new_err(msg),
        _ => WorkerError::new_err(msg),
    }
}

/// Where a sample comes from, and what the workers do to it.
struct Recipe {
    source: Arc<dyn Source>,
    labels: Vec<i64>,
    augment: Augment,
}

/// A dataset the package can load: samples, labels, class names, and the native transform.
#[pyclass(module = "cifar_fast._native", frozen)]
struct Dataset {
    recipe: Arc<Recipe>,
    path: PathBuf,
    /// `__getitem__` calls so far: each draws its own random crop and flip, as a torchvision
    /// transform draws anew on every access.
    draws: std::sync::atomic::AtomicU64,
}

/// `(mean, std)`, each three floats, from Python.
type Norm = Option<([f32; 3], [f32; 3])>;

/// The native transform: crop padding, its mode and fill (normalized), and the flip.
fn augment(crop_padding: usize, padding_mode: &str, fill: [f32; 3], flip: bool) -> PyResult<Augment> {
    let padding = match padding_mode {
        "constant" if fill == [0.0; 3] => Padding::Zero,
        "constant" => Padding::Constant(fill),
        "reflect" => Padding::Reflect,
        "symmetric" => Padding::Symmetric,
        "edge" => Padding::Edge,
        other => {
            return Err(PyValueError::new_err(format!(
                "padding_mode {other:?}: one of 'constant', 'edge', 'reflect', 'symmetric'"
            )));
        }
    };
    Ok(Augment { crop_padding, padding: Some(padding), flip })
}

#[pymethods]
impl Dataset {
    /// A prepared tensor file, read as pixels normalized by `norm` (`None`: the file's own).
    #[staticmethod]
    #[pyo3(signature = (path, norm, crop_padding=0, padding_mode="constant", fill=[0.0; 3], flip=false, crop_size=None))]
    #[allow(clippy::too_many_arguments)] // one per Python keyword
    fn tensor_file(
        py: Python<'_>,
        path: PathBuf,
        norm: Norm,
        crop_padding: usize,
        padding_mode: &str,
        fill: [f32; 3],
        flip: bool,
        crop_size: Option<(usize, usize)>,
    ) -> PyResult<Dataset> {
        let augment = augment(crop_padding, padding_mode, fill, flip)?;
        let pixels = py.detach(|| Pixels::open(&path, norm)).map_err(to_py)?;
        check_crop(&pixels, crop_padding, crop_size)?;
        let labels = pixels.labels().to_vec();
        Ok(Dataset::new(Arc::new(pixels), labels, augment, path))
    }

    /// An image folder (`root/<class>/<image>`), decoded by the workers, at `size` (`(width,
    /// height)`; `None`: 32×32), resized to it or refused when another size (`resize`).
    #[staticmethod]
    #[pyo3(signature = (root, norm, size=None, resize=false, crop_padding=0, padding_mode="constant", fill=[0.0; 3], flip=false, crop_size=None))]
    #[allow(clippy::too_many_arguments)] // one per Python keyword
    fn image_folder(
        py: Python<'_>,
        root: PathBuf,
        norm: Norm,
        size: Option<(u32, u32)>,
        resize: bool,
        crop_padding: usize,
        padding_mode: &str,
        fill: [f32; 3],
        flip: bool,
        crop_size: Option<(usize, usize)>,
    ) -> PyResult<Dataset> {
        let augment = augment(crop_padding, padding_mode, fill, flip)?;
        let (mean, std) = norm.unwrap_or(([0.0; 3], [1.0; 3]));
        let mut folder = py.detach(|| ImageFolder::new(&root)).map_err(to_py)?.normalize(mean, std);
        if let Some((w, h)) = size {
            if w == 0 || h == 0 {
                return Err(PyValueError::new_err(format!("size {w}x{h}: both sides must be positive")));
            }
            folder = folder.size(w, h);
        }
        if resize {
            folder = folder.policy(SizePolicy::Resize);
        }
        check_crop(&folder, crop_padding, crop_size)?;
        let labels = folder.samples().iter().map(|(_, l)| *l).collect();
        Ok(Dataset::new(Arc::new(folder), labels, augment, root))
    }

    fn __len__(&self) -> usize {
        self.recipe.source.len()
    }

    /// `[C, H, W]` of a sample.
    #[getter]
    fn shape(&self) -> [usize; 3] {
        self.recipe.source.sample_shape()
    }

    /// Class names in label order (empty where the data names none).
    #[getter]
    fn classes(&self) -> Vec<String> {
        self.recipe.source.classes()
    }

    /// Every sample's label.
    #[getter]
    fn targets(&self) -> Vec<i64> {
        self.recipe.labels.clone()
    }

    /// The file or folder read.
    #[getter]
    fn path(&self) -> PathBuf {
        self.path.clone()
    }

    /// Sample `index` (negative counts from the end) as `(Array [C, H, W] f32, label)`.
    fn get(&self, py: Python<'_>, index: isize) -> PyResult<(Array, i64)> {
        let n = self.recipe.source.len();
        let i = if index < 0 { index + n as isize } else { index };
        if i < 0 || i as usize >= n {
            return Err(PyIndexError::new_err(format!("index {index} is out of range for {n} samples")));
        }
        let i = i as usize;
        let shape = self.recipe.source.sample_shape();
        let size: usize = shape.iter().product();
        let draw = self.draws.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let recipe = &self.recipe;
        let (values, label) = py
            .detach(|| -> cifar_data::Result<(Vec<f32>, i64)> {
                let mut out = vec![0f32; size];
                let label = if recipe.augment.is_identity() {
                    recipe.source.read_into(i, &mut out)?
                } else {
                    let mut raw = vec![0f32; size];
                    let label = recipe.source.read_into(i, &mut raw)?;
                    // A fresh draw each access: `seed` from the access count.
                    recipe.augment.apply(draw, 0, i, shape, &raw, &mut out);
                    label
                };
                Ok((out, label))
            })
            .map_err(to_py)?;
        let owner = Arc::new(Owner::Sample(values));
        let ptr = match &*owner {
            Owner::Sample(v) => v.as_ptr() as *mut c_void,
            Owner::Batch { .. } => unreachable!(),
        };
        let dims = shape.map(|d| d as i64).to_vec();
        Ok((Array { owner, data: ptr, shape: dims, dtype: DLDataType::of::<f32>() }, label))
    }
}

/// A RandomCrop of `size` (`(h, w)`) after `padding`, checked against the images: the native
/// crop gives back the image's size, and a padding as wide as the image would read outside it.
fn check_crop(source: &dyn Source, padding: usize, size: Option<(usize, usize)>) -> PyResult<()> {
    let [_, h, w] = source.sample_shape();
    if let Some((ch, cw)) = size
        && (ch, cw) != (h, w)
    {
        return Err(PyTypeError::new_err(format!(
            "transform RandomCrop({ch}, {cw}) is not run by cifar_fast: it crops to {ch}x{cw}, the images are \
             {h}x{w}: only a crop back to the image's size (after padding) is run natively; supported: see \
             cifar_fast.SUPPORTED_TRANSFORMS"
        )));
    }
    if padding > 0 && padding >= h.min(w) {
        return Err(PyValueError::new_err(format!(
            "RandomCrop padding {padding} must be smaller than the images' {w}x{h}"
        )));
    }
    Ok(())
}

impl Dataset {
    fn new(source: Arc<dyn Source>, labels: Vec<i64>, augment: Augment, path: PathBuf) -> Dataset {
        Dataset { recipe: Arc::new(Recipe { source, labels, augment }), path, draws: Default::default() }
    }
}

/// Prepares `root` as `cifar-train`'s first run does (prepared files, a tarball there, the
/// official download with its md5, the real images beside the checkout where offline) and
/// returns the `(train, test)` paths. `download=False` finds prepared files only. Each thing
/// done is said on stderr, as torchvision says "Files already downloaded and verified".
#[pyfunction]
#[pyo3(signature = (root, dataset=None, download=true))]
fn prepare_root(
    py: Python<'_>,
    root: PathBuf,
    dataset: Option<String>,
    download: bool,
) -> PyResult<(PathBuf, PathBuf)> {
    let mut r = Root::new(root);
    r.dataset = dataset;
    r.download = download;
    let found = py
        .detach(|| {
            let bar = indicatif::ProgressBar::new(0);
            find_or_prepare(&r, &mut |line| eprintln!("cifar_fast: {line}"), &bar)
        })
        .map_err(to_py)?;
    Ok((found.train, found.test))
}

/// `cifar-prep` from Python: converts `input` (a CIFAR tarball, an image folder or archive)
/// into tensor files in `out`, returning `{split: path}`.
#[pyfunction]
#[pyo3(signature = (input, out, dtype="f32", norm=None, dataset_stats=false, size=None, name=None, force=false,
                    max_image_pixels=cifar_data::prep::image::MAX_IMAGE_PIXELS))]
#[allow(clippy::too_many_arguments)] // one per Python keyword
fn prepare(
    py: Python<'_>,
    input: PathBuf,
    out: PathBuf,
    dtype: &str,
    norm: Norm,
    dataset_stats: bool,
    size: Option<(u32, u32)>,
    name: Option<String>,
    force: bool,
    max_image_pixels: u64,
) -> PyResult<Vec<(String, PathBuf)>> {
    use cifar_data::prep::{Norm as PrepNorm, PrepOptions, StoreDtype};
    let dtype = match dtype {
        "f32" | "float32" => StoreDtype::F32,
        "u8" | "uint8" => StoreDtype::U8,
        other => return Err(PyValueError::new_err(format!("dtype {other:?}: 'f32' or 'u8'"))),
    };
    let norm = match (norm, dataset_stats) {
        (Some(_), true) => return Err(PyValueError::new_err("give norm or dataset_stats=True, not both")),
        (Some((mean, std)), false) => PrepNorm::Custom { mean, std },
        (None, true) => PrepNorm::Dataset,
        (None, false) => PrepNorm::Half,
    };
    if let PrepNorm::Custom { std, .. } = norm
        && std.iter().any(|s| s.is_nan() || *s <= 0.0 || s.is_infinite())
    {
        return Err(PyValueError::new_err(format!("norm std {std:?}: every value must be positive")));
    }
    if max_image_pixels == 0 {
        return Err(PyValueError::new_err("max_image_pixels must be at least 1"));
    }
    let opts = PrepOptions { dtype, norm, force, size: size.map(|(w, h)| (h, w)), name, max_image_pixels };
    let summary = py
        .detach(|| cifar_data::prep::prepare(&input, &out, &opts, &indicatif::ProgressBar::new(0)))
        .map_err(to_py)?;
    Ok(summary.splits.into_iter().map(|s| (s.split, s.path)).collect())
}

/// The memory an [`Array`] shows: one batch's buffer (back to its pool when the last view of
/// it goes) or one sample's values.
enum Owner {
    /// Held for its `Drop`, which gives the buffer back.
    Batch {
        _lease: Lease,
    },
    Sample(Vec<f32>),
}

/// A buffer lent out with a batch; dropping it gives the buffer back to its pool.
struct Lease {
    buffer: Option<HeapBuffer>,
    pool: Arc<Pool>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(b) = self.buffer.take() {
            self.pool.put(b);
        }
    }
}

/// Free buffers, shared by a loader's epochs and the leases of their batches. At most `keep`
/// are kept: a user who held many batches and then let them go gets the memory back.
struct Pool {
    free: Mutex<Vec<HeapBuffer>>,
    keep: usize,
}

impl Pool {
    fn put(&self, b: HeapBuffer) {
        // A poisoned lock only means a panic elsewhere while pushing; the list is still whole.
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        if free.len() < self.keep {
            free.push(b);
        }
    }
}

/// The Python front's [`Buffers`]: plain allocations from the shared pool, else fresh ones
/// made by the workers (the pool grows rather than blocks while the user keeps batches).
struct PoolBuffers {
    pool: Arc<Pool>,
    host_step: bool,
    workers: usize,
}

impl Buffers for PoolBuffers {
    type Buffer = HeapBuffer;

    fn take(&mut self) -> Option<HeapBuffer> {
        self.pool.free.lock().unwrap_or_else(|p| p.into_inner()).pop()
    }

    fn give_back(&mut self, b: HeapBuffer) {
        self.pool.put(b);
    }

    /// The Rust loader's depth, and at least two batches a worker (torch's `prefetch_factor=2`),
    /// so that every worker has a batch to fill: the byte cap alone leaves one batch of 256 on
    /// its way, and one worker of two busy.
    fn default_prefetch(&self, capacity: usize, batch_bytes: usize) -> usize {
        default_prefetch(capacity, batch_bytes, self.host_step).max(2 * self.workers)
    }
}

/// An n-dimensional array of the package's memory, exported through DLPack: pass it to
/// `torch.from_dlpack` or `numpy.from_dlpack` (zero-copy; every export keeps the memory alive).
#[pyclass(module = "cifar_fast._native", frozen)]
struct Array {
    owner: Arc<Owner>,
    data: *mut c_void,
    shape: Vec<i64>,
    dtype: DLDataType,
}

// SAFETY: `data` points into memory `owner` keeps alive and never moves (a `Vec`'s heap block);
// the pointer itself is only handed to DLPack consumers, so sharing it across threads is sharing
// `owner`, which is `Send + Sync`.
unsafe impl Send for Array {}
// SAFETY: as above; `Array` has no interior mutability.
unsafe impl Sync for Array {}

impl Array {
    fn export<M: ManagedTensorBase>(&self) -> PyResult<Managed<M>> {
        let strides = compact_strides(&self.shape);
        let meta = dlpark::metadata::Dynamic::new(self.shape.clone(), strides);
        let mut init = meta
            .prepare_as::<M>()
            .map_err(|e| PyValueError::new_err(e.to_string()))?
            .initialize(self.owner.clone());
        init.set_data(self.data);
        init.set_dtype(self.dtype);
        init.set_device(DLDevice::CPU);
        // SAFETY: the data pointer is valid for the shape and dtype (the owner holds that many
        // elements and rides along as the context, so it lives until the consumer's deleter);
        // the strides are explicit and compact; no flag is set (writable, not copied).
        Ok(unsafe { init.finish() })
    }
}

fn compact_strides(shape: &[i64]) -> Vec<i64> {
    let mut strides = vec![1i64; shape.len()];
    for k in (0..shape.len().saturating_sub(1)).rev() {
        strides[k] = strides[k + 1] * shape[k + 1];
    }
    strides
}

impl DlpackExporter for Array {
    fn device(&self) -> DLDevice {
        DLDevice::CPU
    }

    fn flags(&self) -> DlpackFlags {
        DlpackFlags::empty()
    }

    fn prepare_export(&self, _py: Python<'_>, _request: &ExportRequest<'_>) -> PyResult<()> {
        Ok(())
    }

    fn export_legacy(&self, _py: Python<'_>) -> PyResult<Managed<DLManagedTensor>> {
        self.export()
    }

    fn export_versioned(&self, _py: Python<'_>) -> PyResult<Managed<DLManagedTensorVersioned>> {
        self.export()
    }
}

#[pymethods]
impl Array {
    #[pyo3(signature = (*, stream=None, max_version=None, dl_device=None, copy=None))]
    fn __dlpack__<'py>(
        &self,
        py: Python<'py>,
        stream: Option<Bound<'py, PyAny>>,
        max_version: Option<(u32, u32)>,
        dl_device: Option<(u32, i32)>,
        copy: Option<bool>,
    ) -> PyResult<Py<PyAny>> {
        let request = ExportRequest::parse(stream.as_ref(), max_version, dl_device, copy)?;
        export_dlpack(self, py, request)
    }

    fn __dlpack_device__(&self) -> (u32, i32) {
        (1, 0)
    }

    #[getter]
    fn shape(&self) -> Vec<i64> {
        self.shape.clone()
    }
}

/// A loader's settings and its pool; each [`Loader::epoch`] starts the workers anew.
#[pyclass(module = "cifar_fast._native", frozen)]
struct Loader {
    recipe: Arc<Recipe>,
    settings: Settings,
    pool: Arc<Pool>,
    host_step: bool,
    batches: usize,
}

#[pymethods]
impl Loader {
    #[new]
    #[pyo3(signature = (dataset, batch_size, shuffle, seed, num_workers, drop_last, prefetch, rank, world_size, host_step))]
    #[allow(clippy::too_many_arguments)] // one per Python keyword
    fn new(
        dataset: &Dataset,
        batch_size: usize,
        shuffle: bool,
        seed: u64,
        num_workers: usize,
        drop_last: bool,
        prefetch: Option<usize>,
        rank: usize,
        world_size: usize,
        host_step: bool,
    ) -> PyResult<Loader> {
        let recipe = dataset.recipe.clone();
        let settings = Settings {
            batch_size,
            shuffle,
            seed,
            num_workers,
            prefetch,
            drop_last,
            augment: recipe.augment,
            rank,
            world: world_size,
            start: (0, 0),
        };
        // Checks every setting now, as PyTorch's DataLoader does at construction (no worker is
        // started: an empty pipeline would have none to join).
        let check = Settings { num_workers: 0, ..settings.clone() };
        let probe = Pipeline::new(
            recipe.source.clone(),
            &check,
            PoolBuffers {
                pool: Arc::new(Pool { free: Mutex::new(Vec::new()), keep: 0 }),
                host_step,
                workers: num_workers,
            },
        )
        .map_err(to_py)?;
        let batches = probe.sampler().batches_per_epoch();
        // Room for what an epoch has on its way plus a few the user holds.
        let keep = probe.prefetch() + 4;
        drop(probe);
        Ok(Loader {
            recipe,
            settings,
            pool: Arc::new(Pool { free: Mutex::new(Vec::new()), keep }),
            host_step,
            batches,
        })
    }

    fn __len__(&self) -> usize {
        self.batches
    }

    /// Epoch `epoch`'s batches from batch `start` on, with workers of their own.
    #[pyo3(signature = (epoch, start=0))]
    fn epoch(&self, py: Python<'_>, epoch: u64, start: usize) -> PyResult<EpochIter> {
        let settings = Settings { start: (epoch, start), ..self.settings.clone() };
        let buffers = PoolBuffers {
            pool: self.pool.clone(),
            host_step: self.host_step,
            workers: self.settings.num_workers,
        };
        let source = self.recipe.source.clone();
        let pipeline = py.detach(|| Pipeline::new(source, &settings, buffers)).map_err(to_py)?;
        Ok(EpochIter { inner: Mutex::new(Some(pipeline.into_epoch(epoch))), recipe: self.recipe.clone() })
    }
}

/// One epoch's batches as `(images, labels)` [`Array`] pairs. Dropping it (or `close()`) stops
/// and joins its workers.
#[pyclass(module = "cifar_fast._native", frozen)]
struct EpochIter {
    inner: Mutex<Option<Epoch<PoolBuffers, Pipeline<PoolBuffers>>>>,
    recipe: Arc<Recipe>,
}

/// How long a wait for a batch runs without the GIL before Ctrl-C is checked for.
const SIGNAL_CHECK: Duration = Duration::from_millis(10);

#[pymethods]
impl EpochIter {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<(Array, Array)>> {
        let mut guard =
            self.inner.lock().map_err(|_| WorkerError::new_err("a previous batch failed inside"))?;
        let Some(epoch) = guard.as_mut() else { return Ok(None) };
        loop {
            match py.detach(|| epoch.poll_next(Some(SIGNAL_CHECK))) {
                Poll::Pending => py.check_signals()?,
                Poll::Ready(None) => {
                    // The epoch is over: its workers are joined now, not when Python collects it.
                    *guard = None;
                    return Ok(None);
                }
                Poll::Ready(Some(Ok(filled))) => {
                    let pool = epoch.pipeline().buffers().pool.clone();
                    return Ok(Some(batch(filled, pool, epoch.pipeline().sample_shape())));
                }
                Poll::Ready(Some(Err(e))) => {
                    *guard = None;
                    return Err(self.classify(py, e));
                }
            }
        }
    }

    /// Batches of the epoch not yet yielded.
    fn __len__(&self, py: Python<'_>) -> usize {
        py.detach(|| self.inner.lock().ok().and_then(|g| g.as_ref().map(|e| e.remaining())).unwrap_or(0))
    }

    /// Stops the workers now (waiting for the batches in their hands).
    fn close(&self, py: Python<'_>) {
        py.detach(|| drop(self.inner.lock().ok().and_then(|mut g| g.take())));
    }
}

impl EpochIter {
    /// A worker's failure as the exception its cause calls for: the worker's message (which
    /// names the sample) keeps its text; the kind comes from reading that sample once more here.
    fn classify(&self, py: Python<'_>, e: Error) -> PyErr {
        let Error::Worker { index, msg } = &e else { return to_py(e) };
        let source = &self.recipe.source;
        let mut out = vec![0f32; source.sample_shape().iter().product()];
        let again = if *index < source.len() {
            py.detach(|| {
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| source.read_into(*index, &mut out)))
            })
        } else {
            Ok(Ok(0))
        };
        let text = format!("worker failed on sample {index}: {msg}");
        match again {
            Ok(Err(Error::Format { .. })) => FormatError::new_err(text),
            Ok(Err(Error::Io { error, .. })) if error.kind() == std::io::ErrorKind::NotFound => {
                PyFileNotFoundError::new_err(text)
            }
            Ok(Err(Error::Io { .. })) => PyOSError::new_err(text),
            _ => WorkerError::new_err(text),
        }
    }
}

/// The images `[len, C, H, W]` f32 and labels `[len]` i64 of a filled buffer, sharing its lease.
fn batch(filled: Filled<HeapBuffer>, pool: Arc<Pool>, shape: [usize; 3]) -> (Array, Array) {
    let Filled { buffer, len, .. } = filled;
    let (images, labels) = (buffer.images.as_ptr() as *mut c_void, buffer.labels.as_ptr() as *mut c_void);
    let owner = Arc::new(Owner::Batch { _lease: Lease { buffer: Some(buffer), pool } });
    let n = len as i64;
    let dims = vec![n, shape[0] as i64, shape[1] as i64, shape[2] as i64];
    (
        Array { owner: owner.clone(), data: images, shape: dims, dtype: DLDataType::of::<f32>() },
        Array { owner, data: labels, shape: vec![n], dtype: DLDataType::of::<i64>() },
    )
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Dataset>()?;
    m.add_class::<Loader>()?;
    m.add_class::<EpochIter>()?;
    m.add_class::<Array>()?;
    m.add_function(wrap_pyfunction!(prepare_root, m)?)?;
    m.add_function(wrap_pyfunction!(prepare, m)?)?;
    m.add("FormatError", m.py().get_type::<FormatError>())?;
    m.add("WorkerError", m.py().get_type::<WorkerError>())?;
    Ok(())
}
