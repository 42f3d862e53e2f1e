//! [`Loader`] and [`EpochIter`]: the pipeline's epochs as Python iterators.
//!
//! An epoch's iterator is a native object, so that a `for` loop takes each batch straight from
//! `__next__` with no Python code between the batch leaving the pipeline and reaching the
//! loop: a `KeyboardInterrupt` (or any exception a signal handler raises) that lands inside
//! `next()` leaves the batch with the iterator, which serves it first on the next call. Nothing
//! is lost or repeated, and the loader's position counts only the batches delivered.
//!
//! One thread at a time takes batches from an iterator (the others wait without the GIL);
//! `len()`, `close()` and the loader's position need no lock, so a signal handler may call
//! them while its own thread is inside `next()`. An iterator a `fork()` copied into a child
//! raises there, never waits for the parent's workers, and is let go without joining them.
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::Poll;
use std::thread::ThreadId;
use std::time::Duration;

use cifar_data::pipeline::{Dtype, Epoch, Filled, HeapBuffer, Pipeline, Settings, Shards};
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

use crate::array::{Array, Owner};
use crate::dataset::{Dataset, Recipe, Samples};
use crate::errors::to_py;
use crate::fork;
use crate::pool::{Lease, Pool, PoolBuffers};

/// How long a wait for a batch runs without the GIL before Ctrl-C is checked for.
const SIGNAL_CHECK: Duration = Duration::from_millis(10);

/// A lock only ever held for a few instructions (never across Python code or a wait); a
/// poisoned one only means a panic elsewhere, the data is whole.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Where a loader stands: the epoch and the batches of it delivered, set by its latest
/// iterator (an older one still running no longer moves it).
#[derive(Default)]
struct Position(Mutex<Mark>);

#[derive(Default)]
struct Mark {
    ticket: u64,
    epoch: u64,
    done: usize,
}

impl Position {
    /// A new iterator at `(epoch, done)`; returns its ticket.
    fn start(&self, epoch: u64, done: usize) -> u64 {
        let mut m = lock(&self.0);
        m.ticket += 1;
        m.epoch = epoch;
        m.done = done;
        m.ticket
    }

    fn set(&self, ticket: u64, epoch: u64, done: usize) {
        let mut m = lock(&self.0);
        if m.ticket == ticket {
            m.epoch = epoch;
            m.done = done;
        }
    }

    fn get(&self) -> (u64, usize) {
        let m = lock(&self.0);
        (m.epoch, m.done)
    }
}

/// A loader's settings, its pool, and its position; each [`Loader::epoch`] starts the workers
/// anew.
#[pyclass(module = "cifar_fast._native", frozen)]
pub struct Loader {
    settings: Settings,
    pool: Mutex<Arc<Pool>>,
    position: Arc<Position>,
    batches: usize,
}

#[pymethods]
impl Loader {
    /// Checks every setting against `dataset` now, as PyTorch's DataLoader does at
    /// construction. `even`: shards as `DistributedSampler` makes them (else strided).
    #[new]
    #[pyo3(signature = (dataset, batch_size, shuffle, seed, drop_last, rank, world_size, even))]
    #[allow(clippy::too_many_arguments)] // one per Python keyword
    fn new(
        dataset: &Dataset,
        batch_size: usize,
        shuffle: bool,
        seed: u64,
        drop_last: bool,
        rank: usize,
        world_size: usize,
        even: bool,
    ) -> PyResult<Loader> {
        let settings = Settings {
            batch_size,
            shuffle,
            seed,
            num_workers: 0,
            prefetch: None,
            drop_last,
            rank,
            world: world_size,
            start: (0, 0),
            shards: if even { Shards::Even } else { Shards::Strided },
            order: None,
            ..Settings::default()
        };
        // No worker is started: a pipeline without them has none to join.
        let buffers = PoolBuffers { pool: Pool::new(0), host_step: true, workers: 0 };
        let probe = pipeline(dataset.recipe(), &settings, buffers).map_err(to_py)?;
        let batches = probe.sampler().batches_per_epoch();
        Ok(Loader { settings, pool: Mutex::new(Pool::new(8)), position: Arc::default(), batches })
    }

    fn __len__(&self) -> usize {
        self.batches
    }

    /// Batches in an epoch of `samples` samples (a user's sampler's length).
    fn batches_of(&self, samples: usize) -> usize {
        let b = self.settings.batch_size;
        if self.settings.drop_last { samples / b } else { samples.div_ceil(b) }
    }

    /// `(epoch, batches delivered)` of the latest epoch begun.
    fn position(&self) -> (u64, usize) {
        self.position.get()
    }

    /// Epoch `epoch`'s batches from batch `start` on, over `dataset` (its transform as it is
    /// now), with `num_workers` workers of their own; in `order` where a sampler of the user's
    /// gave one. Each batch leaves through `convert` (called with the array's DLPack capsule
    /// where `capsule`, else with the array), then `.pin_memory()` where `pin`.
    /// A batch that takes longer than `timeout` seconds (0: no limit) is an error, as torch's
    /// `timeout`.
    #[pyo3(signature = (dataset, epoch, start, num_workers, prefetch, host_step, order, convert, capsule, pin, timeout))]
    #[allow(clippy::too_many_arguments)] // one per Python keyword
    fn epoch(
        &self,
        py: Python<'_>,
        dataset: &Dataset,
        epoch: u64,
        start: usize,
        num_workers: usize,
        prefetch: Option<usize>,
        host_step: bool,
        order: Option<Vec<usize>>,
        convert: Py<PyAny>,
        capsule: bool,
        pin: bool,
        timeout: f64,
    ) -> PyResult<EpochIter> {
        let recipe = dataset.recipe().clone();
        let settings = Settings {
            start: (epoch, start),
            num_workers,
            prefetch,
            order: order.map(Arc::from),
            ..self.settings.clone()
        };
        let pool = {
            let mut pool = lock(&self.pool);
            if !pool.is_ours() {
                // Made before a fork: the child starts a pool of its own.
                *pool = Pool::new(8);
            }
            pool.clone()
        };
        let buffers = PoolBuffers { pool: pool.clone(), host_step, workers: num_workers };
        let pipeline = py.detach(|| pipeline(&recipe, &settings, buffers)).map_err(to_py)?;
        let (shape, dtype) = (pipeline.sample_shape(), pipeline.dtype());
        if pool.spec() != Some((pipeline.capacity(), shape, dtype)) {
            // The dataset's transform changed its samples' size or type since the pool's buffers
            // were made: a pool of their size from now on.
            let fresh = Pool::new(8);
            fresh.set_spec((pipeline.capacity(), shape, dtype));
            *lock(&self.pool) = fresh;
        }
        let pool = lock(&self.pool).clone();
        let mut pipeline = pipeline;
        pipeline.buffers_mut().pool = pool.clone();
        // Room for what an epoch has on its way plus a few the user holds.
        pool.keep_at_least(pipeline.prefetch() + 4);
        let live = pipeline.into_epoch(epoch);
        let ticket = self.position.start(epoch, live.position());
        Ok(EpochIter {
            remaining: AtomicUsize::new(live.remaining()),
            cell: Mutex::new(Cell {
                epoch: Held(Some(Box::new(live)), fork::generation()),
                busy: None,
                waiting: 0,
                pending: None,
            }),
            turn: Condvar::new(),
            closed: AtomicBool::new(false),
            generation: fork::generation(),
            output: Output { convert, capsule, pin },
            timeout: (timeout > 0.0).then(|| Duration::from_secs_f64(timeout)),
            shape,
            dtype,
            pool,
            position: self.position.clone(),
            ticket,
            epoch,
        })
    }
}

type LiveEpoch = Epoch<PoolBuffers, Pipeline<PoolBuffers>>;

/// The pipeline over `recipe`'s samples.
fn pipeline(
    recipe: &Recipe,
    settings: &Settings,
    buffers: PoolBuffers,
) -> cifar_data::Result<Pipeline<PoolBuffers>> {
    match &recipe.samples {
        Samples::Dense { source, augment } => {
            Pipeline::new(source.clone(), &Settings { augment: *augment, ..settings.clone() }, buffers)
        }
        Samples::Images { source, settings: images } => {
            Pipeline::images(source.clone(), images.clone(), settings, buffers)
        }
    }
}

/// An epoch held by an iterator. Dropped with the GIL released (joining the workers waits for
/// the sample each is writing); a copy a fork left in a child is let go without a join.
struct Held(Option<Box<LiveEpoch>>, u64);

impl Drop for Held {
    fn drop(&mut self) {
        let Some(epoch) = self.0.take() else { return };
        if self.1 != fork::generation() {
            std::mem::forget(epoch);
            return;
        }
        Python::attach(|py| py.detach(move || drop(epoch)));
    }
}

/// What an iterator keeps between calls: the epoch, the thread taking a batch now, the threads
/// waiting for their turn, and a batch that was taken but not delivered (its conversion was
/// interrupted).
struct Cell {
    epoch: Held,
    busy: Option<ThreadId>,
    waiting: usize,
    pending: Option<(Array, Array)>,
}

/// How a batch's arrays reach the user.
struct Output {
    convert: Py<PyAny>,
    capsule: bool,
    pin: bool,
}

impl Output {
    fn convert(&self, py: Python<'_>, array: &Array) -> PyResult<Py<PyAny>> {
        let arg = if self.capsule { array.capsule(py)? } else { Py::new(py, array.clone())?.into_any() };
        let out = self.convert.call1(py, (arg,))?;
        if self.pin { out.call_method0(py, "pin_memory") } else { Ok(out) }
    }
}

/// One epoch's batches as `(images, labels)`. Dropping it (or `close()`) stops and joins its
/// workers.
#[pyclass(module = "cifar_fast._native", frozen)]
pub struct EpochIter {
    cell: Mutex<Cell>,
    /// Signalled when the thread taking a batch is done.
    turn: Condvar,
    closed: AtomicBool,
    remaining: AtomicUsize,
    generation: u64,
    output: Output,
    timeout: Option<Duration>,
    shape: [usize; 3],
    dtype: Dtype,
    pool: Arc<Pool>,
    position: Arc<Position>,
    ticket: u64,
    epoch: u64,
}

/// The right to take the next batch, with what the iterator kept; given back on drop.
struct Claim<'a> {
    iter: &'a EpochIter,
    epoch: Option<Box<LiveEpoch>>,
    pending: Option<(Array, Array)>,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut cell = lock(&self.iter.cell);
        cell.epoch.0 = self.epoch.take();
        cell.pending = self.pending.take();
        cell.busy = None;
        // A wake-up is a system call: only where a thread waits (one takes the batches, as a
        // rule, and then a `next()` would pay for it).
        if cell.waiting > 0 {
            self.iter.turn.notify_all();
        }
    }
}

#[pymethods]
impl EpochIter {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<(Py<PyAny>, Py<PyAny>)>> {
        if self.generation != fork::generation() {
            return Err(PyRuntimeError::new_err(
                "this DataLoader iterator was started before os.fork(), and its workers stayed in the parent: \
                 start a new epoch in the child (iter(loader))",
            ));
        }
        let mut claim = self.claim(py)?;
        let began = std::time::Instant::now();
        loop {
            if self.closed.load(Ordering::Relaxed) {
                claim.pending = None;
                self.end(py, &mut claim);
                return Ok(None);
            }
            if let Some((images, labels)) = claim.pending.take() {
                return self.deliver(py, &mut claim, images, labels).map(Some);
            }
            let Some(epoch) = claim.epoch.as_mut() else { return Ok(None) };
            match py.detach(|| epoch.poll_next(Some(SIGNAL_CHECK))) {
                // Nothing is held here: an exception from a signal handler leaves all as it was.
                Poll::Pending => {
                    py.check_signals()?;
                    if let Some(limit) = self.timeout.filter(|&t| began.elapsed() > t) {
                        return Err(PyRuntimeError::new_err(format!(
                            "DataLoader timed out after {} seconds",
                            limit.as_secs_f64()
                        )));
                    }
                }
                Poll::Ready(None) => {
                    self.end(py, &mut claim);
                    self.position.set(self.ticket, self.epoch + 1, 0);
                    return Ok(None);
                }
                Poll::Ready(Some(Err(e))) => {
                    // The batch is consumed, failed; the epoch goes on.
                    self.delivered(claim.epoch.as_deref());
                    return Err(to_py(e));
                }
                Poll::Ready(Some(Ok(filled))) => {
                    let (images, labels) = self.arrays(filled);
                    return self.deliver(py, &mut claim, images, labels).map(Some);
                }
            }
        }
    }

    /// Batches of the epoch not yet yielded.
    fn __len__(&self) -> usize {
        self.remaining.load(Ordering::Relaxed)
    }

    /// Stops the workers now (waiting for the sample each is writing). From a signal handler
    /// that interrupted this iterator's own `next()`, that `next()` stops them as it resumes.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        self.closed.store(true, Ordering::Relaxed);
        self.remaining.store(0, Ordering::Relaxed);
        if self.generation != fork::generation() {
            return Ok(());
        }
        let me = std::thread::current().id();
        if lock(&self.cell).busy == Some(me) {
            return Ok(());
        }
        let mut claim = self.claim(py)?;
        claim.pending = None;
        self.end(py, &mut claim);
        Ok(())
    }
}

impl EpochIter {
    /// Waits (without the GIL) for the right to take a batch. A second claim from the thread
    /// that holds one is a signal handler calling `next()` inside `next()`: refused.
    fn claim(&self, py: Python<'_>) -> PyResult<Claim<'_>> {
        let me = std::thread::current().id();
        // Uncontended (the usual case: one thread takes the batches), without giving up the GIL.
        if let Ok(mut cell) = self.cell.try_lock()
            && cell.busy.is_none()
        {
            cell.busy = Some(me);
            let (epoch, pending) = (cell.epoch.0.take(), cell.pending.take());
            return Ok(Claim { iter: self, epoch, pending });
        }
        let taken = py.detach(|| {
            let mut cell = lock(&self.cell);
            loop {
                match cell.busy {
                    None => break,
                    Some(t) if t == me => return None,
                    Some(_) => {
                        cell.waiting += 1;
                        cell = self.turn.wait(cell).unwrap_or_else(|p| p.into_inner());
                        cell.waiting -= 1;
                    }
                }
            }
            cell.busy = Some(me);
            Some((cell.epoch.0.take(), cell.pending.take()))
        });
        match taken {
            Some((epoch, pending)) => Ok(Claim { iter: self, epoch, pending }),
            None => Err(PyRuntimeError::new_err(
                "next() of a cifar_fast iterator was called from a signal handler that interrupted the same \
                 iterator's next()",
            )),
        }
    }

    /// Ends the epoch: its workers stopped and joined, without the GIL.
    fn end(&self, py: Python<'_>, claim: &mut Claim<'_>) {
        self.remaining.store(0, Ordering::Relaxed);
        let epoch = claim.epoch.take();
        py.detach(move || drop(epoch));
    }

    /// Hands a batch over through the output's conversion; one that fails (a signal's
    /// exception inside it, say) is kept for the next call.
    fn deliver(
        &self,
        py: Python<'_>,
        claim: &mut Claim<'_>,
        images: Array,
        labels: Array,
    ) -> PyResult<(Py<PyAny>, Py<PyAny>)> {
        let converted =
            self.output.convert(py, &images).and_then(|x| Ok((x, self.output.convert(py, &labels)?)));
        match converted {
            Ok(pair) => {
                self.delivered(claim.epoch.as_deref());
                Ok(pair)
            }
            Err(e) => {
                claim.pending = Some((images, labels));
                Err(e)
            }
        }
    }

    /// Counts one batch of the epoch as consumed.
    fn delivered(&self, epoch: Option<&LiveEpoch>) {
        let _ = self.remaining.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| r.checked_sub(1));
        if let Some(epoch) = epoch {
            self.position.set(self.ticket, self.epoch, epoch.position());
        }
    }

    /// The images `[len, C, H, W]` f32, viewing the buffer (lent until the last view goes),
    /// and the labels `[len]` i64 in their own small allocation.
    fn arrays(&self, filled: Filled<HeapBuffer>) -> (Array, Array) {
        let Filled { buffer, len, .. } = filled;
        let labels = buffer.labels[..len].to_vec();
        let [c, h, w] = self.shape.map(|d| d as i64);
        let n = len as i64;
        (
            Array::new(Owner::Batch(Lease::new(buffer, self.pool.clone()), self.dtype), vec![n, c, h, w]),
            Array::new(Owner::Labels(labels), vec![n]),
        )
    }
}
