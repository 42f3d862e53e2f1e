//! The loader core, with no tensor library: a [`Pipeline`] hands out an epoch's batches in
//! order while its worker threads fill the next ones into buffers a front provides.
//!
//! ```text
//!  consumer (Epoch::next)                      workers ×N
//!   sampler → (seq, indices) + buffer? ───jobs──▶ gather + augment into the buffer
//!   reorder by seq ◀───────────────────────done── (seq, filled) | (seq, buffer, error)
//!   Filled { buffer, len, indices } ─▶ the front (tch tensors, or DLPack for Python)
//! ```
//!
//! The consumer pairs each job with a buffer in sequence order, so buffers are never held by a
//! later batch while an earlier one waits (no deadlock however the workers are scheduled), and
//! at most `prefetch` batches are dispatched ahead of the one being consumed (bounded memory).
//! With no workers the consumer fills the batch it asks for itself, and nothing ahead.
//! Images (a decode each) are filled by the workers together, a sample at a time, the oldest
//! batch first (the `team` module): the first batch of an epoch comes in `1/N` of one worker's time.
//!
//! A sample that fails fails its batch: that batch is an error, and the epoch goes on with the
//! next (as PyTorch's `DataLoader` raises for a batch and goes on).
//! The fronts differ only in their [`Buffers`]: the tch `Loader` (in `cifar-fast`) and the
//! Python package build on this one pipeline, so both get the same batches, bit for bit.
mod buffer;
mod team;
mod worker;

use std::borrow::BorrowMut;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

pub use self::buffer::{Buffer, Buffers, Dtype, Filled, HeapBuffer, Lender, default_prefetch};
use self::worker::{Done, Job, Partial, Recipe, Samples};
use crate::augment::Augment;
use crate::error::{Error, Result};
use crate::geometry::ImageTransform;
use crate::images::ImageSource;
use crate::prep::Normalize;
use crate::sampler::Sampler;
pub use crate::sampler::Shards;
use crate::source::Source;

/// What an image pipeline makes of each image: its geometry, the batch's element type, and how
/// images are decoded.
#[derive(Debug, Clone)]
pub struct ImageSettings {
    /// The resize, crop and flip, drawn for each sample from its image's size.
    pub transform: ImageTransform,
    /// `uint8` pixels, or `float32` normalized.
    pub output: Output,
    /// The decoder's limits and shortcuts.
    pub decode: crate::decode::Options,
}

/// The values a batch holds.
#[derive(Debug, Clone)]
pub enum Output {
    /// `uint8` pixels (`ToImage()`, `PILToTensor()`): a quarter of the bytes, to normalize on
    /// the device.
    U8,
    /// `float32`, `ToTensor()` then `Normalize(mean, std)` (mean 0 and std 1 for `ToTensor()`
    /// alone). Boxed: the table is 3 KiB.
    F32(Box<Normalize>),
}

impl Output {
    /// `ToTensor()` then `Normalize(mean, std)`.
    pub fn normalized(mean: [f32; 3], std: [f32; 3]) -> Self {
        Output::F32(Box::new(Normalize::new(mean, std)))
    }

    fn dtype(&self) -> Dtype {
        match self {
            Output::U8 => Dtype::U8,
            Output::F32(_) => Dtype::F32,
        }
    }
}

/// A pipeline's settings, with PyTorch's `DataLoader` names.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Samples per batch. By default, 32.
    pub batch_size: usize,
    /// Reshuffle every epoch. By default, true.
    pub shuffle: bool,
    /// The seed of the order and the augmentations. By default, 0.
    pub seed: u64,
    /// Worker threads; 0 fills batches on the consumer's thread. By default, 2.
    pub num_workers: usize,
    /// Batches made ahead of the one being consumed; `None` for the front's
    /// [`Buffers::default_prefetch`]. Never more than an epoch's batches; 0 is refused.
    pub prefetch: Option<usize>,
    /// Drop each epoch's last, short batch. By default, false.
    pub drop_last: bool,
    /// Augmentations applied by the workers. By default, none.
    pub augment: Augment,
    /// Load only shard `rank` of `world`. By default, 0 of 1.
    pub rank: usize,
    /// See `rank`.
    pub world: usize,
    /// Start at this epoch, skipping its first batches (to resume). By default, (0, 0).
    pub start: (u64, usize),
    /// How an epoch that does not divide among the ranks is shared. By default,
    /// [`Shards::Strided`].
    pub shards: Shards,
    /// Every epoch's sample order, as a sampler of the user's gave it, instead of the seeded
    /// permutation (`shuffle`, `rank` and `world` then play no part in the order). By
    /// default, none.
    pub order: Option<Arc<[usize]>>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            batch_size: 32,
            shuffle: true,
            seed: 0,
            num_workers: 2,
            prefetch: None,
            drop_last: false,
            augment: Augment::default(),
            rank: 0,
            world: 1,
            start: (0, 0),
            shards: Shards::Strided,
            order: None,
        }
    }
}

/// Batches from a [`Source`], shuffled and prefetched by worker threads into a front's buffers.
pub struct Pipeline<P: Buffers> {
    recipe: Recipe,
    sampler: Sampler,
    prefetch: usize,
    buffers: P,
    /// Closed on drop, which is what stops the workers.
    jobs: Option<Sender<Job<P::Buffer>>>,
    done: Receiver<Done<P::Buffer>>,
    workers: Vec<JoinHandle<()>>,
    next_epoch: u64,
    /// `start`'s epoch and the batches to skip at its start, until the first epoch is asked
    /// for: whichever epoch that is disarms it, so no later epoch loses batches.
    skip: Option<(u64, usize)>,
}

impl<P: Buffers> Pipeline<P> {
    /// Checks `settings` against `source` and starts the workers.
    pub fn new(source: Arc<dyn Source>, settings: &Settings, buffers: P) -> Result<Self> {
        let shape = source.sample_shape();
        let samples = Samples::Dense { source, augment: settings.augment };
        Self::start(samples, shape, Dtype::F32, settings, buffers)
    }

    /// A pipeline over images of any size: each sample's geometry drawn from `(seed, epoch,
    /// index)` and its image's size, and decoded straight into it, as `images` says
    /// (`settings.augment` plays no part). The transform must give every image one size.
    pub fn images(
        source: Arc<dyn ImageSource>,
        images: ImageSettings,
        settings: &Settings,
        buffers: P,
    ) -> Result<Self> {
        let Some((h, w)) = images.transform.output_size() else {
            return Err(Error::Config(
                "the transform leaves each image at a size of its own, which no batch can hold: end it with \
                 a crop or a resize to one size (RandomResizedCrop, CenterCrop, Resize((h, w)))"
                    .into(),
            ));
        };
        if h == 0 || w == 0 {
            return Err(Error::Config(format!(
                "the transform's output is {w}x{h}: both sides must be positive"
            )));
        }
        let dtype = images.output.dtype();
        let samples = Samples::Images { source, settings: Arc::new(images) };
        Self::start(samples, [3, h as usize, w as usize], dtype, settings, buffers)
    }

    fn start(
        samples: Samples,
        shape: [usize; 3],
        dtype: Dtype,
        settings: &Settings,
        buffers: P,
    ) -> Result<Self> {
        let s = settings;
        let len = samples.len();
        if s.batch_size == 0 {
            return Err(Error::Config("batch_size must be at least 1".into()));
        }
        if s.prefetch == Some(0) {
            return Err(Error::Config("prefetch must be at least 1".into()));
        }
        if s.world == 0 || s.rank >= s.world {
            return Err(Error::Config(format!("shard rank {} is not below world size {}", s.rank, s.world)));
        }
        if len == 0 {
            return Err(Error::Config("the dataset is empty".into()));
        }
        if let Some(bad) = s.order.as_deref().and_then(|o| o.iter().find(|&&i| i >= len)) {
            return Err(Error::Config(format!(
                "the sampler gave index {bad}, past the dataset's {len} samples"
            )));
        }
        let sampler = Sampler {
            len,
            batch_size: s.batch_size,
            shuffle: s.shuffle,
            seed: s.seed,
            drop_last: s.drop_last,
            rank: s.rank,
            world: s.world,
            shards: s.shards,
            order: s.order.clone(),
        };
        if s.start.1 > sampler.batches_per_epoch() {
            return Err(Error::Config(format!(
                "start step {} is past the epoch's {} batches",
                s.start.1,
                sampler.batches_per_epoch()
            )));
        }
        // A batch never holds more than a shard's samples, however large `batch_size` is, and
        // no more batches are made ahead than an epoch has.
        let capacity = s.batch_size.min(sampler.samples_per_epoch()).max(1);
        let batch_bytes = capacity * shape.iter().product::<usize>() * dtype.size();
        let prefetch = s
            .prefetch
            .unwrap_or_else(|| buffers.default_prefetch(capacity, batch_bytes))
            .min(sampler.batches_per_epoch().max(1));
        let recipe = Recipe { samples, shape, dtype, seed: s.seed, capacity };
        let (job_tx, job_rx) = crossbeam_channel::unbounded::<Job<P::Buffer>>();
        let (done_tx, done_rx) = crossbeam_channel::unbounded::<Done<P::Buffer>>();
        let mut workers = Vec::with_capacity(s.num_workers);
        // Images are filled by the workers together, a sample at a time; dense samples a job
        // to a worker (see `team`).
        let team = matches!(recipe.samples, Samples::Images { .. }).then(team::Team::new);
        for i in 0..s.num_workers {
            let (recipe, jobs, done, team) = (recipe.clone(), job_rx.clone(), done_tx.clone(), team.clone());
            let handle = std::thread::Builder::new()
                .name(format!("cifar-loader-{i}"))
                .spawn(move || match team {
                    Some(team) => team::work(recipe, jobs, done, team),
                    None => worker::work(recipe, jobs, done),
                })
                .map_err(|e| Error::Config(format!("cannot start a worker thread: {e}")))?;
            workers.push(handle);
        }
        Ok(Pipeline {
            recipe,
            sampler,
            prefetch,
            buffers,
            jobs: Some(job_tx),
            done: done_rx,
            workers,
            next_epoch: s.start.0,
            skip: Some(s.start),
        })
    }

    /// The order of batches.
    pub fn sampler(&self) -> &Sampler {
        &self.sampler
    }

    /// The source of fixed-size samples (`None` for an image pipeline).
    pub fn source(&self) -> Option<&Arc<dyn Source>> {
        match &self.recipe.samples {
            Samples::Dense { source, .. } => Some(source),
            Samples::Images { .. } => None,
        }
    }

    /// The shape of one sample of a batch, `[C, H, W]`.
    pub fn sample_shape(&self) -> [usize; 3] {
        self.recipe.shape
    }

    /// The element type of a batch's images.
    pub fn dtype(&self) -> Dtype {
        self.recipe.dtype
    }

    /// Samples a buffer holds: the batch size, or a shard's samples where those are fewer.
    pub fn capacity(&self) -> usize {
        self.recipe.capacity
    }

    /// Batches made ahead of the one being consumed.
    pub fn prefetch(&self) -> usize {
        self.prefetch
    }

    /// The front's buffers.
    pub fn buffers(&self) -> &P {
        &self.buffers
    }

    /// The front's buffers, to return a buffer or change its pool.
    pub fn buffers_mut(&mut self) -> &mut P {
        &mut self.buffers
    }

    /// The epoch the next [`Pipeline::iter`] gives: the one after the last asked for, or the
    /// start epoch.
    pub fn next_epoch(&self) -> u64 {
        self.next_epoch
    }

    /// The next epoch's batches, like iterating a PyTorch `DataLoader` again.
    pub fn iter(&mut self) -> Epoch<P, &mut Self> {
        let e = self.next_epoch;
        Epoch::new(self, e)
    }

    /// Epoch `epoch`'s batches, borrowing the pipeline.
    pub fn epoch(&mut self, epoch: u64) -> Epoch<P, &mut Self> {
        Epoch::new(self, epoch)
    }

    /// Epoch `epoch`'s batches, owning the pipeline (whose workers end with the epoch).
    pub fn into_epoch(self, epoch: u64) -> Epoch<P, Self> {
        Epoch::new(self, epoch)
    }
}

impl<P: Buffers> Drop for Pipeline<P> {
    /// Closes the job channel and joins every worker.
    fn drop(&mut self) {
        self.jobs = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// One epoch's batches, in order, from a pipeline it borrows (`L = &mut Pipeline`) or owns.
/// If this is the first epoch asked of the pipeline and its start named it, the first batches
/// are skipped; every other epoch is whole. Dropping it early stops the workers' batches at the
/// end of the sample each is writing, waits for that, and gives their buffers back.
pub struct Epoch<P: Buffers, L: BorrowMut<Pipeline<P>>> {
    pipeline: L,
    epoch: u64,
    batches: Vec<Vec<usize>>,
    dispatched: usize,
    yielded: usize,
    ready: BTreeMap<usize, Done<P::Buffer>>,
    /// Without workers: the batch being filled on the consumer's thread, kept across calls
    /// that ran out of time.
    inline: Option<Partial<P::Buffer>>,
    scratch: Vec<f32>,
    /// The workers are gone: nothing more will come.
    broken: bool,
    /// Shared with this epoch's jobs; set on drop, so the workers leave them unfinished.
    abandoned: Arc<AtomicBool>,
}

impl<P: Buffers, L: BorrowMut<Pipeline<P>>> Epoch<P, L> {
    fn new(mut pipeline: L, epoch: u64) -> Self {
        let p = pipeline.borrow_mut();
        let skip = match p.skip.take() {
            Some((start, skip)) if start == epoch => skip,
            _ => 0,
        };
        p.next_epoch = epoch + 1;
        let batches = p.sampler.batches(epoch);
        Epoch {
            pipeline,
            epoch,
            batches,
            dispatched: skip,
            yielded: skip,
            ready: BTreeMap::new(),
            inline: None,
            scratch: Vec::new(),
            broken: false,
            abandoned: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The epoch number.
    pub fn number(&self) -> u64 {
        self.epoch
    }

    /// Batches of this epoch yielded so far (those skipped at a resume, and those that failed,
    /// included).
    pub fn position(&self) -> usize {
        self.yielded
    }

    /// Batches of this epoch not yet yielded.
    pub fn remaining(&self) -> usize {
        if self.broken { 0 } else { self.batches.len() - self.yielded }
    }

    /// The pipeline.
    pub fn pipeline(&self) -> &Pipeline<P> {
        self.pipeline.borrow()
    }

    /// The pipeline, to reach its buffers.
    pub fn pipeline_mut(&mut self) -> &mut Pipeline<P> {
        self.pipeline.borrow_mut()
    }

    /// The next batch, waiting as long as it takes.
    pub fn next_batch(&mut self) -> Option<Result<Filled<P::Buffer>>> {
        match self.poll_next(None) {
            Poll::Ready(next) => next,
            Poll::Pending => unreachable!("no deadline, no timeout"),
        }
    }

    /// The next batch, or `Pending` if it is not ready within `timeout` (`None`: wait as long
    /// as it takes). A front that must stay responsive (Python's Ctrl-C) polls with a short
    /// timeout and calls again; nothing is lost or repeated between the calls. Without workers
    /// the batch is filled here, at least one sample a call.
    ///
    /// A batch that failed is `Some(Err(..))` naming the sample, and the next call goes on
    /// with the batch after it.
    pub fn poll_next(&mut self, timeout: Option<Duration>) -> Poll<Option<Result<Filled<P::Buffer>>>> {
        if self.broken || self.yielded >= self.batches.len() {
            return Poll::Ready(None);
        }
        let deadline = timeout.map(|t| Instant::now() + t);
        let done = if self.pipeline.borrow().workers.is_empty() {
            match self.fill_inline(deadline) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(done) => done,
            }
        } else {
            self.dispatch();
            match self.wait_for(self.yielded, deadline) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(done)) => done,
                Poll::Ready(Err(e)) => {
                    self.broken = true;
                    return Poll::Ready(Some(Err(e)));
                }
            }
        };
        self.yielded += 1;
        let Done { seq, indices, buffer, result } = done;
        if let Err(e) = result {
            if let Some(b) = buffer {
                self.pipeline.borrow_mut().buffers.give_back(b);
            }
            self.dispatch();
            return Poll::Ready(Some(Err(e)));
        }
        // Refill before handing over, so the workers run while the consumer computes.
        self.dispatch();
        let buffer = buffer.expect("a filled batch has its buffer");
        Poll::Ready(Some(Ok(Filled { buffer, len: indices.len(), indices, step: seq })))
    }

    /// Fills the batch the consumer waits for on its own thread, until `deadline`.
    fn fill_inline(&mut self, deadline: Option<Instant>) -> Poll<Done<P::Buffer>> {
        let p = self.pipeline.borrow_mut();
        let mut partial = match self.inline.take() {
            Some(partial) => partial,
            None => {
                let job = Job {
                    seq: self.yielded,
                    epoch: self.epoch,
                    indices: std::mem::take(&mut self.batches[self.yielded]),
                    buffer: p.buffers.take(),
                    lender: None,
                    abandoned: self.abandoned.clone(),
                };
                match p.recipe.start(job) {
                    Ok(partial) => partial,
                    Err(done) => return Poll::Ready(done),
                }
            }
        };
        let failed = p.recipe.fill_some(&mut partial, deadline, &mut self.scratch);
        if failed.is_none() && !partial.is_complete() {
            self.inline = Some(partial);
            return Poll::Pending;
        }
        Poll::Ready(Recipe::finish(partial, failed))
    }

    /// Keeps `prefetch` batches on their way to the workers (none without workers: the
    /// consumer fills the one it asks for).
    fn dispatch(&mut self) {
        let p = self.pipeline.borrow_mut();
        let Some(jobs) = p.jobs.as_ref().filter(|_| !p.workers.is_empty()) else { return };
        while self.dispatched < self.batches.len() && self.dispatched - self.yielded < p.prefetch {
            // Image jobs of a front with a lender take their buffers when they start, not
            // while they wait their turn (dense batches are small: taken here, as always).
            let images = matches!(p.recipe.samples, Samples::Images { .. });
            let lender = if images { p.buffers.lender() } else { None };
            let buffer = if lender.is_none() { p.buffers.take() } else { None };
            let job = Job {
                seq: self.dispatched,
                epoch: self.epoch,
                indices: std::mem::take(&mut self.batches[self.dispatched]),
                lender,
                buffer,
                abandoned: self.abandoned.clone(),
            };
            self.dispatched += 1;
            jobs.send(job).expect("workers outlive the pipeline's job channel");
        }
    }

    fn wait_for(&mut self, seq: usize, deadline: Option<Instant>) -> Poll<Result<Done<P::Buffer>>> {
        loop {
            if let Some(done) = self.ready.remove(&seq) {
                return Poll::Ready(Ok(done));
            }
            let done = &self.pipeline.borrow().done;
            let done = match deadline {
                None => done.recv().map_err(|_| Error::WorkersGone),
                Some(d) => match done.recv_deadline(d) {
                    Ok(done) => Ok(done),
                    Err(RecvTimeoutError::Timeout) => return Poll::Pending,
                    Err(RecvTimeoutError::Disconnected) => Err(Error::WorkersGone),
                },
            };
            match done {
                Ok(done) => {
                    self.ready.insert(done.seq, done);
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl<P: Buffers, L: BorrowMut<Pipeline<P>>> Iterator for Epoch<P, L> {
    type Item = Result<Filled<P::Buffer>>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_batch()
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining(), Some(self.remaining()))
    }
}

impl<P: Buffers, L: BorrowMut<Pipeline<P>>> Drop for Epoch<P, L> {
    /// Collects the batches still in the workers' hands, so the next epoch starts clean: each
    /// worker stops at the end of the sample it is writing.
    fn drop(&mut self) {
        self.abandoned.store(true, Ordering::Relaxed);
        let in_workers = self.dispatched.saturating_sub(self.yielded + self.ready.len());
        let ready = std::mem::take(&mut self.ready);
        let inline = self.inline.take();
        let p = self.pipeline.borrow_mut();
        let buffers =
            ready.into_values().filter_map(|d| d.buffer).chain(inline.and_then(Partial::into_buffer));
        for b in buffers {
            p.buffers.give_back(b);
        }
        if p.workers.is_empty() {
            return;
        }
        for _ in 0..in_workers {
            match p.done.recv() {
                Ok(done) => {
                    if let Some(b) = done.buffer {
                        p.buffers.give_back(b);
                    }
                }
                Err(_) => break,
            }
        }
    }
}
