//! The prefetch pipeline: a [`Loader`] hands out an epoch's batches in order while its worker
//! threads fill the next ones.
//!
//! ```text
//!  consumer (Epoch::next)                      workers ×N
//!   sampler → (seq, indices) + free slot ──jobs──▶ gather + augment into the slot
//!   reorder by seq ◀──────────────────────done── (seq, slot) | (seq, slot, error)
//!   Batch { images, labels } ─▶ training step (the batch owns its memory)
//! ```
//!
//! The consumer pairs each job with a slot in sequence order, so slots are never held by a
//! later batch while an earlier one waits (no deadlock however the workers are scheduled), and
//! at most `prefetch` batches are dispatched ahead of the one being consumed (bounded memory).
//! On the CPU each slot is a fresh libtorch allocation that becomes the batch's tensors, so no
//! worker ever writes memory a user's tensor can see; the allocator (jemalloc in
//! `cifar-train`) hands the same blocks back batch after batch. On CUDA the slots are a pool
//! of pinned staging buffers, each reused only after its copy to the device is complete.
mod slots;
mod worker;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use tch::{Device, Tensor};

use self::slots::Slot;
use self::worker::{Done, Job, Recipe};
use crate::augment::Augment;
use crate::error::{Error, Result};
use crate::sampler::Sampler;
use crate::source::Source;

/// One batch, as the model receives it.
///
/// Its tensors are the user's: nothing the loader does later writes memory they (or views of
/// them, shallow clones, tensors autograd saved) can see. On the CPU the workers filled a fresh
/// libtorch allocation for this batch, freed when its last tensor goes; on CUDA they are
/// device tensors of their own, copied from a pinned staging buffer.
pub struct Batch {
    /// `[B, C, H, W]` f32, normalized (and augmented), on the loader's device.
    pub images: Tensor,
    /// `[B]` i64.
    pub labels: Tensor,
    /// The dataset index of each sample.
    pub indices: Vec<usize>,
    copy_time: std::time::Duration,
    sync_time: std::time::Duration,
}

impl Batch {
    /// Samples in the batch.
    pub fn len(&self) -> usize {
        self.indices.len()
    }

    /// Host time spent issuing this batch's copy to the device (zero on the CPU).
    pub fn copy_time(&self) -> std::time::Duration {
        self.copy_time
    }

    /// Host time spent, while fetching this batch, waiting for the device to finish earlier
    /// work (the synchronisation that frees pinned buffers, see `Loader`): time the device
    /// was computing, not time the data was late.
    pub fn sync_time(&self) -> std::time::Duration {
        self.sync_time
    }

    /// Whether the batch is empty (never, for batches a loader yields).
    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }
}

impl std::fmt::Debug for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch").field("images", &self.images.size()).field("indices", &self.indices).finish()
    }
}

/// Settings for a [`Loader`], with PyTorch's `DataLoader` names.
pub struct LoaderBuilder {
    source: Arc<dyn Source>,
    batch_size: usize,
    shuffle: bool,
    seed: u64,
    num_workers: usize,
    prefetch: Option<usize>,
    drop_last: bool,
    device: Device,
    augment: Augment,
    rank: usize,
    world: usize,
    start: (u64, usize),
}

impl LoaderBuilder {
    /// Samples per batch. By default, 32.
    pub fn batch_size(mut self, n: usize) -> Self {
        self.batch_size = n;
        self
    }

    /// Reshuffle every epoch. By default, true.
    pub fn shuffle(mut self, yes: bool) -> Self {
        self.shuffle = yes;
        self
    }

    /// The seed of the order and the augmentations. By default, 0.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Worker threads; 0 fills batches on the consumer's thread. By default, 2.
    pub fn num_workers(mut self, n: usize) -> Self {
        self.num_workers = n;
        self
    }

    /// Batches made ahead of the one being consumed. By default, [`default_prefetch`]: at
    /// least 4 batches and at least 64 samples, and for CPU training no more than 2 MiB of
    /// batches (at least one). Never more than an epoch's batches; 0 is refused by `build`.
    pub fn prefetch(mut self, n: usize) -> Self {
        self.prefetch = Some(n);
        self
    }

    /// Drop each epoch's last, short batch. By default, false.
    pub fn drop_last(mut self, yes: bool) -> Self {
        self.drop_last = yes;
        self
    }

    /// Where batches go: the CPU, or a CUDA device (the host buffers are then pinned and
    /// copied asynchronously). Other devices are refused by `build`. By default, the CPU.
    pub fn device(mut self, device: Device) -> Self {
        self.device = device;
        self
    }

    /// Augmentations applied by the workers. By default, none.
    pub fn augment(mut self, augment: Augment) -> Self {
        self.augment = augment;
        self
    }

    /// Load only shard `rank` of `world` (every `world`-th sample of the epoch's permutation).
    /// By default, 0 of 1.
    pub fn shard(mut self, rank: usize, world: usize) -> Self {
        self.rank = rank;
        self.world = world;
        self
    }

    /// Start at `epoch`, skipping its first `step` batches (to resume a run). By default, (0, 0).
    pub fn start_at(mut self, epoch: u64, step: usize) -> Self {
        self.start = (epoch, step);
        self
    }

    /// Checks the settings and starts the workers.
    pub fn build(self) -> Result<Loader> {
        if self.batch_size == 0 {
            return Err(Error::Config("batch_size must be at least 1".into()));
        }
        if !matches!(self.device, Device::Cpu | Device::Cuda(_)) {
            return Err(Error::Config(format!(
                "device {:?}: the loader serves the CPU and CUDA only",
                self.device
            )));
        }
        if self.prefetch == Some(0) {
            return Err(Error::Config("prefetch must be at least 1".into()));
        }
        if self.world == 0 || self.rank >= self.world {
            return Err(Error::Config(format!(
                "shard rank {} is not below world size {}",
                self.rank, self.world
            )));
        }
        if self.source.is_empty() {
            return Err(Error::Config("the dataset is empty".into()));
        }
        let sampler = Sampler {
            len: self.source.len(),
            batch_size: self.batch_size,
            shuffle: self.shuffle,
            seed: self.seed,
            drop_last: self.drop_last,
            rank: self.rank,
            world: self.world,
        };
        // A batch never holds more than a shard's samples, however large `batch_size` is, and
        // no more batches are made ahead than an epoch has.
        let capacity = self.batch_size.min(self.source.len().div_ceil(self.world));
        let batch_bytes = capacity * self.source.sample_shape().iter().product::<usize>() * 4;
        let prefetch = self
            .prefetch
            .unwrap_or_else(|| default_prefetch(capacity, batch_bytes, self.device))
            .min(sampler.batches_per_epoch().max(1));
        if self.start.1 > sampler.batches_per_epoch() {
            return Err(Error::Config(format!(
                "start step {} is past the epoch's {} batches",
                self.start.1,
                sampler.batches_per_epoch()
            )));
        }
        let recipe = Recipe {
            shape: self.source.sample_shape(),
            source: self.source,
            augment: self.augment,
            seed: self.seed,
            batch_size: capacity,
        };
        let (job_tx, job_rx) = crossbeam_channel::unbounded::<Job>();
        let (done_tx, done_rx) = crossbeam_channel::unbounded::<Done>();
        let mut workers = Vec::with_capacity(self.num_workers);
        for i in 0..self.num_workers {
            let (recipe, jobs, done) = (recipe.clone(), job_rx.clone(), done_tx.clone());
            let handle = std::thread::Builder::new()
                .name(format!("cifar-loader-{i}"))
                .spawn(move || worker::work(recipe, jobs, done))
                .map_err(|e| Error::Config(format!("cannot start a worker thread: {e}")))?;
            workers.push(handle);
        }
        let (free_tx, free_rx) = crossbeam_channel::unbounded();
        let mut loader = Loader {
            recipe,
            sampler,
            device: self.device,
            prefetch,
            jobs: Some(job_tx),
            done: done_rx,
            free_tx,
            free_rx,
            slots: 0,
            in_flight: Vec::new(),
            synced: Default::default(),
            workers,
            next_epoch: self.start.0,
            skip: Some(self.start),
        };
        // CUDA: the pinned pool a steady epoch needs, allocated now rather than inside the
        // first steps (pinning costs milliseconds a buffer): `prefetch` on their way, one being
        // copied, and those whose copies await their synchronisation. (The CPU has no pool:
        // each batch is a fresh allocation its tensors own.)
        if loader.device.is_cuda() {
            for _ in 0..prefetch + 1 + loader.max_in_flight() {
                let slot = loader.new_slot();
                let _ = loader.free_tx.send(slot);
            }
        }
        Ok(loader)
    }
}

/// The prefetch depth when none is given, for batches of `batch_bytes` going to `device`:
/// 4 batches, and more for small batches so that at least 64 samples are on their way; for
/// CPU training, no more batches than fit in 2 MiB (but at least one).
///
/// The queue must outlast the time a woken worker waits for a core, which does not shrink with
/// the batch: on a machine whose cores the training threads keep busy that is up to a
/// scheduler tick (4 ms). Measured on 2 cores at batch 4 (steps of 0.65 ms), 4 batches ahead
/// left the step waiting on data 2.4–2.9% of the time, 16 ahead 0.6%; at batch 32, 2 ahead
/// 2.5–3.3%, 4 ahead 0.3–0.5%.
///
/// Big batches need few ahead, and on the CPU more cost the step that shares the cores: each
/// buffer filled ahead is written through the caches the step works in, and a deeper queue
/// lets more workers fill at once beside it. Measured on 2 cores (median of 4–5 interleaved
/// runs, share of the in-memory step): batch 256, 1 ahead 101%, 4 ahead 95%; batch 128, 1 ahead
/// 97%, 4 ahead 94%; the data wait stayed at 0.3–0.6% either way. On CUDA the buffers are
/// pinned and the step runs on the device, so the cap does not apply.
pub fn default_prefetch(batch_size: usize, batch_bytes: usize, device: Device) -> usize {
    let depth = 64usize.div_ceil(batch_size.max(1)).max(4);
    match device {
        Device::Cpu => depth.min((2 << 20) / batch_bytes.max(1)).max(1),
        _ => depth,
    }
}

/// Batches from a [`Source`], shuffled, prefetched by worker threads, on a device.
///
/// ```no_run
/// use cifar_fast::{Dataset, Loader};
/// let train = Dataset::open("data/cifar10-train.safetensors")?;
/// let mut loader = Loader::builder(train).batch_size(32).num_workers(2).build()?;
/// for epoch in 0..2 {
///     for batch in loader.epoch(epoch) {
///         let batch = batch?;
///         assert_eq!(batch.images.size()[1..], [3, 32, 32]);
///     }
/// }
/// # Ok::<(), cifar_fast::Error>(())
/// ```
pub struct Loader {
    recipe: Recipe,
    sampler: Sampler,
    device: Device,
    prefetch: usize,
    /// Closed on drop, which is what stops the workers.
    jobs: Option<Sender<Job>>,
    done: Receiver<Done>,
    /// CUDA's pool of pinned slots: back here after the sync that follows their copy (or
    /// unused, when an epoch ends early or a batch failed).
    free_tx: Sender<Slot>,
    free_rx: Receiver<Slot>,
    /// Pinned slots allocated so far (CUDA; 0 on the CPU).
    slots: usize,
    /// CUDA only: slots whose non-blocking copy was issued but not yet synchronised.
    in_flight: Vec<Slot>,
    /// Time spent in device synchronisations since the last batch was handed out.
    synced: std::time::Duration,
    workers: Vec<JoinHandle<()>>,
    next_epoch: u64,
    /// `start_at`'s epoch and the batches to skip at its start, until the first epoch is
    /// asked for: whichever epoch that is disarms it, so no later epoch loses batches.
    skip: Option<(u64, usize)>,
}

impl Loader {
    /// Settings for a loader over `source`.
    pub fn builder(source: impl Source + 'static) -> LoaderBuilder {
        Self::builder_arc(Arc::new(source))
    }

    /// As [`Loader::builder`], for a source shared with other code.
    pub fn builder_arc(source: Arc<dyn Source>) -> LoaderBuilder {
        LoaderBuilder {
            source,
            batch_size: 32,
            shuffle: true,
            seed: 0,
            num_workers: 2,
            prefetch: None,
            drop_last: false,
            device: Device::Cpu,
            augment: Augment::default(),
            rank: 0,
            world: 1,
            start: (0, 0),
        }
    }

    /// The order of batches.
    pub fn sampler(&self) -> &Sampler {
        &self.sampler
    }

    /// The source.
    pub fn source(&self) -> &Arc<dyn Source> {
        &self.recipe.source
    }

    /// Batches in a full epoch.
    pub fn len(&self) -> usize {
        self.sampler.batches_per_epoch()
    }

    /// Whether an epoch has no batches (only with `drop_last` and fewer samples than a batch).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Pinned staging buffers allocated for CUDA (made at build: `prefetch`, one being copied
    /// and the copies in flight). 0 on the CPU, where every batch is a fresh allocation that
    /// its tensors own, so at most `prefetch` exist beside those the consumer keeps.
    pub fn buffers(&self) -> usize {
        self.slots
    }

    /// Batches made ahead of the one being consumed.
    pub fn prefetch(&self) -> usize {
        self.prefetch
    }

    /// The next epoch's batches: the epoch after the last one iterated (or the `start_at`
    /// epoch), like iterating a PyTorch `DataLoader` again.
    pub fn iter(&mut self) -> Epoch<'_> {
        let e = self.next_epoch;
        self.epoch(e)
    }

    /// Epoch `epoch`'s batches, in order. If this is the first epoch asked for and `start_at`
    /// named it, its first batches are skipped; every other epoch is whole.
    pub fn epoch(&mut self, epoch: u64) -> Epoch<'_> {
        let skip = match self.skip.take() {
            Some((start, skip)) if start == epoch => skip,
            _ => 0,
        };
        self.next_epoch = epoch + 1;
        let batches = self.sampler.batches(epoch);
        Epoch {
            loader: self,
            epoch,
            batches,
            dispatched: skip,
            yielded: skip,
            ready: BTreeMap::new(),
            failed: false,
        }
    }

    /// A slot to fill: on the CPU none (the worker allocates a fresh one); on CUDA one from
    /// the pool, else by synchronising outstanding copies, else a new one.
    fn take_slot(&mut self) -> Option<Slot> {
        if self.device == Device::Cpu {
            return None;
        }
        if let Ok(slot) = self.free_rx.try_recv() {
            return Some(slot);
        }
        // The copies read pinned memory after `to_device_` returned; tch offers no CUDA events
        // to wait for one copy, so we wait for the device (which follows every copy issued) and
        // only then give those buffers back. Batching the waits (one per `prefetch` steps)
        // keeps the GPU's queue from draining every step.
        if self.in_flight.len() >= self.max_in_flight()
            && let Device::Cuda(i) = self.device
        {
            let t = std::time::Instant::now();
            tch::Cuda::synchronize(i as i64);
            self.synced += t.elapsed();
            let slot = self.in_flight.pop().unwrap();
            for s in self.in_flight.drain(..) {
                let _ = self.free_tx.send(s);
            }
            return Some(slot);
        }
        Some(self.new_slot())
    }

    /// CUDA: copies left in flight before one synchronisation frees their buffers.
    fn max_in_flight(&self) -> usize {
        self.prefetch.max(2)
    }

    /// A new pinned slot for the CUDA pool.
    fn new_slot(&mut self) -> Slot {
        self.slots += 1;
        Slot::new(self.recipe.batch_size, self.recipe.shape, Some(self.device))
    }

    /// A slot no batch will hand out: back to CUDA's pool (on the CPU it is simply freed).
    fn recycle(&self, slot: Slot) {
        if self.device.is_cuda() {
            let _ = self.free_tx.send(slot);
        }
    }
}

impl Drop for Loader {
    /// Closes the job channel and joins every worker.
    fn drop(&mut self) {
        self.jobs = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        if let Device::Cuda(i) = self.device
            && !self.in_flight.is_empty()
        {
            tch::Cuda::synchronize(i as i64);
        }
    }
}

/// One epoch's batches, in order. Dropping it early waits for the batches in progress.
pub struct Epoch<'a> {
    loader: &'a mut Loader,
    epoch: u64,
    batches: Vec<Vec<usize>>,
    dispatched: usize,
    yielded: usize,
    ready: BTreeMap<usize, Done>,
    failed: bool,
}

impl Epoch<'_> {
    /// The epoch number.
    pub fn number(&self) -> u64 {
        self.epoch
    }

    /// Batches of this epoch not yet yielded.
    pub fn remaining(&self) -> usize {
        self.batches.len() - self.yielded
    }

    /// Keeps `prefetch` batches on their way.
    fn dispatch(&mut self) {
        while self.dispatched < self.batches.len() && self.dispatched - self.yielded < self.loader.prefetch {
            let job = Job {
                seq: self.dispatched,
                epoch: self.epoch,
                indices: std::mem::take(&mut self.batches[self.dispatched]),
                slot: self.loader.take_slot(),
            };
            self.dispatched += 1;
            match &self.loader.jobs {
                Some(jobs) if !self.loader.workers.is_empty() => {
                    jobs.send(job).expect("workers outlive the loader's job channel");
                }
                _ => {
                    let done = self.loader.recipe.run(job, &mut Vec::new());
                    self.ready.insert(done.seq, done);
                }
            }
        }
    }

    fn wait_for(&mut self, seq: usize) -> Result<Done> {
        loop {
            if let Some(done) = self.ready.remove(&seq) {
                return Ok(done);
            }
            let done = self
                .loader
                .done
                .recv()
                .map_err(|_| Error::Worker { index: 0, msg: "every loader worker has exited".into() })?;
            self.ready.insert(done.seq, done);
        }
    }
}

impl Iterator for Epoch<'_> {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        if self.failed || self.yielded >= self.batches.len() {
            return None;
        }
        self.dispatch();
        let done = match self.wait_for(self.yielded) {
            Ok(done) => done,
            Err(e) => {
                self.failed = true;
                return Some(Err(e));
            }
        };
        self.yielded += 1;
        if let Err(e) = done.result {
            self.failed = true;
            self.loader.recycle(done.slot);
            return Some(Err(e));
        }
        // Refill before handing over, so the workers run while the consumer computes.
        self.dispatch();
        let mut slot = done.slot;
        let (images, labels) = slot.views();
        // The worker sets the slot's indices anew for every job: hand these over, no copy.
        let indices = std::mem::take(&mut slot.indices);
        let sync_time = std::mem::take(&mut self.loader.synced);
        let batch = match self.loader.device {
            // The views keep the slot's memory alive; the slot itself is never filled again.
            Device::Cpu => Batch { images, labels, indices, copy_time: Default::default(), sync_time },
            device => {
                let t = std::time::Instant::now();
                let images = images.to_device_(device, tch::Kind::Float, true, false);
                let labels = labels.to_device_(device, tch::Kind::Int64, true, false);
                self.loader.in_flight.push(slot);
                Batch { images, labels, indices, copy_time: t.elapsed(), sync_time }
            }
        };
        Some(Ok(batch))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = if self.failed { 0 } else { self.remaining() };
        (n, Some(n))
    }
}

impl Drop for Epoch<'_> {
    /// Collects the batches still in the workers' hands, so the next epoch starts clean.
    fn drop(&mut self) {
        let mut outstanding = self.dispatched - self.yielded - self.ready.len();
        for (_, done) in std::mem::take(&mut self.ready) {
            self.loader.recycle(done.slot);
        }
        while outstanding > 0 {
            match self.loader.done.recv() {
                Ok(done) => {
                    self.loader.recycle(done.slot);
                    outstanding -= 1;
                }
                Err(_) => break,
            }
        }
    }
}
