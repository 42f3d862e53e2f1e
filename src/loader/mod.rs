//! The tch front of the loader: a [`Loader`] hands out an epoch's batches in order, as tch
//! tensors on a device, while the worker threads of its [`Pipeline`] fill the next ones.
//!
//! The pipeline (workers, ordering, shutdown) is `cifar_data::pipeline`, shared with the Python
//! package; this front only decides what a buffer is. On the CPU each buffer is a fresh
//! libtorch allocation that becomes the batch's tensors, so no worker ever writes memory a
//! user's tensor can see; the allocator (jemalloc in `cifar-train`) hands the same blocks back
//! batch after batch. On CUDA the buffers are a pool of pinned staging buffers, each reused
//! only after its copy to the device is complete.
mod slots;

use std::sync::Arc;

use cifar_data::ImageSource;
use cifar_data::pipeline::{self, Buffers, Dtype, ImageSettings, Pipeline, Settings};
use tch::{Device, Tensor};

use self::slots::TchBuffers;
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
    /// `[B, C, H, W]` f32, normalized (and augmented), on the loader's device; u8 pixels for an
    /// image loader whose output says so.
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
    input: Input,
    settings: Settings,
    device: Device,
}

/// What a loader reads.
enum Input {
    /// Fixed-size samples.
    Dense(Arc<dyn Source>),
    /// Images of any size, and what to make of each.
    Images(Arc<dyn ImageSource>, ImageSettings),
}

impl LoaderBuilder {
    /// Samples per batch. By default, 32.
    pub fn batch_size(mut self, n: usize) -> Self {
        self.settings.batch_size = n;
        self
    }

    /// Reshuffle every epoch. By default, true.
    pub fn shuffle(mut self, yes: bool) -> Self {
        self.settings.shuffle = yes;
        self
    }

    /// The seed of the order and the augmentations. By default, 0.
    pub fn seed(mut self, seed: u64) -> Self {
        self.settings.seed = seed;
        self
    }

    /// Worker threads; 0 fills batches on the consumer's thread. By default, 2.
    pub fn num_workers(mut self, n: usize) -> Self {
        self.settings.num_workers = n;
        self
    }

    /// Batches made ahead of the one being consumed. By default, [`default_prefetch`]: at
    /// least 4 batches and at least 64 samples, and for CPU training no more than 2 MiB of
    /// batches (at least one). Never more than an epoch's batches; 0 is refused by `build`.
    pub fn prefetch(mut self, n: usize) -> Self {
        self.settings.prefetch = Some(n);
        self
    }

    /// Drop each epoch's last, short batch. By default, false.
    pub fn drop_last(mut self, yes: bool) -> Self {
        self.settings.drop_last = yes;
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
        self.settings.augment = augment;
        self
    }

    /// Load only shard `rank` of `world` (every `world`-th sample of the epoch's permutation).
    /// By default, 0 of 1.
    pub fn shard(mut self, rank: usize, world: usize) -> Self {
        self.settings.rank = rank;
        self.settings.world = world;
        self
    }

    /// Start at `epoch`, skipping its first `step` batches (to resume a run). By default, (0, 0).
    pub fn start_at(mut self, epoch: u64, step: usize) -> Self {
        self.settings.start = (epoch, step);
        self
    }

    /// Checks the settings and starts the workers.
    pub fn build(self) -> Result<Loader> {
        if !matches!(self.device, Device::Cpu | Device::Cuda(_)) {
            return Err(Error::Config(format!(
                "device {:?}: the loader serves the CPU and CUDA only",
                self.device
            )));
        }
        // The slots' size is the pipeline's; CPU slots are made by the workers from it.
        let buffers = TchBuffers::new(self.device, 0, [0; 3], Dtype::F32);
        let mut pipeline = Box::new(match self.input {
            Input::Dense(source) => Pipeline::new(source, &self.settings, buffers)?,
            Input::Images(source, images) => Pipeline::images(source, images, &self.settings, buffers)?,
        });
        let (capacity, shape, dtype) = (pipeline.capacity(), pipeline.sample_shape(), pipeline.dtype());
        // CUDA: the pinned pool a steady epoch needs, allocated now rather than inside the
        // first steps (pinning costs milliseconds a buffer): `prefetch` on their way, one being
        // copied, and those whose copies await their synchronisation. (The CPU has no pool:
        // each batch is a fresh allocation its tensors own.)
        let prefetch = pipeline.prefetch();
        let buffers = pipeline.buffers_mut();
        (buffers.capacity, buffers.shape, buffers.dtype) = (capacity, shape, dtype);
        buffers.max_in_flight = prefetch.max(2);
        if self.device.is_cuda() {
            for _ in 0..prefetch + 1 + buffers.max_in_flight {
                let slot = buffers.new_pinned()?;
                buffers.give_back(slot);
            }
        }
        Ok(Loader { pipeline, device: self.device })
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
    pipeline::default_prefetch(batch_size, batch_bytes, device == Device::Cpu)
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
    /// Boxed: a loader is moved around whole (into the training loop's data source).
    pipeline: Box<Pipeline<TchBuffers>>,
    device: Device,
}

impl Loader {
    /// Settings for a loader over `source`.
    pub fn builder(source: impl Source + 'static) -> LoaderBuilder {
        Self::builder_arc(Arc::new(source))
    }

    /// As [`Loader::builder`], for a source shared with other code.
    pub fn builder_arc(source: Arc<dyn Source>) -> LoaderBuilder {
        LoaderBuilder { input: Input::Dense(source), settings: Settings::default(), device: Device::Cpu }
    }

    /// Settings for a loader over images of any size (an encoded tensor file, a folder), each
    /// decoded straight into the geometry `images` draws for it (`augment` plays no part).
    pub fn builder_images(source: Arc<dyn ImageSource>, images: ImageSettings) -> LoaderBuilder {
        LoaderBuilder {
            input: Input::Images(source, images),
            settings: Settings::default(),
            device: Device::Cpu,
        }
    }

    /// The order of batches.
    pub fn sampler(&self) -> &Sampler {
        self.pipeline.sampler()
    }

    /// The source of fixed-size samples (`None` for a loader of images).
    pub fn source(&self) -> Option<&Arc<dyn Source>> {
        self.pipeline.source()
    }

    /// Batches in a full epoch.
    pub fn len(&self) -> usize {
        self.sampler().batches_per_epoch()
    }

    /// Whether an epoch has no batches (only with `drop_last` and fewer samples than a batch).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Pinned staging buffers allocated for CUDA (made at build: `prefetch`, one being copied
    /// and the copies in flight). 0 on the CPU, where every batch is a fresh allocation that
    /// its tensors own, so at most `prefetch` exist beside those the consumer keeps.
    pub fn buffers(&self) -> usize {
        self.pipeline.buffers().allocated
    }

    /// Batches made ahead of the one being consumed.
    pub fn prefetch(&self) -> usize {
        self.pipeline.prefetch()
    }

    /// The next epoch's batches: the epoch after the last one iterated (or the `start_at`
    /// epoch), like iterating a PyTorch `DataLoader` again.
    pub fn iter(&mut self) -> Epoch<'_> {
        let e = self.pipeline.next_epoch();
        self.epoch(e)
    }

    /// Epoch `epoch`'s batches, in order. If this is the first epoch asked for and `start_at`
    /// named it, its first batches are skipped; every other epoch is whole.
    pub fn epoch(&mut self, epoch: u64) -> Epoch<'_> {
        let device = self.device;
        Epoch { inner: self.pipeline.epoch(epoch), device }
    }
}

impl Drop for Loader {
    /// Waits for the copies still reading pinned buffers (the pipeline then joins its workers).
    fn drop(&mut self) {
        if let Device::Cuda(i) = self.device
            && !self.pipeline.buffers().in_flight.is_empty()
        {
            tch::Cuda::synchronize(i as i64);
        }
    }
}

/// One epoch's batches, in order. Dropping it early waits for the sample each worker is
/// writing (see [`pipeline::Epoch`]).
pub struct Epoch<'a> {
    inner: pipeline::Epoch<TchBuffers, &'a mut Pipeline<TchBuffers>>,
    device: Device,
}

impl Epoch<'_> {
    /// The epoch number.
    pub fn number(&self) -> u64 {
        self.inner.number()
    }

    /// Batches of this epoch not yet yielded.
    pub fn remaining(&self) -> usize {
        self.inner.remaining()
    }
}

impl Iterator for Epoch<'_> {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        let filled = match self.inner.next_batch()? {
            Ok(filled) => filled,
            Err(e) => return Some(Err(e)),
        };
        let (images, labels) = filled.buffer.views(filled.len);
        let indices = filled.indices;
        let buffers = self.inner.pipeline_mut().buffers_mut();
        let sync_time = std::mem::take(&mut buffers.synced);
        let batch = match self.device {
            // The views keep the slot's memory alive; the slot itself is never filled again.
            Device::Cpu => Batch { images, labels, indices, copy_time: Default::default(), sync_time },
            device => {
                let t = std::time::Instant::now();
                let images = images.to_device_(device, images.kind(), true, false);
                let labels = labels.to_device_(device, tch::Kind::Int64, true, false);
                buffers.in_flight.push(filled.buffer);
                Batch { images, labels, indices, copy_time: t.elapsed(), sync_time }
            }
        };
        Some(Ok(batch))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.inner.size_hint()
    }
}
