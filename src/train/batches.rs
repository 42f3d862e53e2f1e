//! Where a run's training batches come from: the pipelined loader, or the split held on the
//! device (`--resident`). Both give the same batches in the same order; the training loop sees
//! one iterator and the time each batch cost it.
use std::time::Duration;

use tch::Tensor;

use super::checkpoint::Position;
use super::config::TrainConfig;
use super::plan::Plan;
use super::resident::{EpochPlan, Resident};
use super::splits::Split;
use crate::error::Result;
use crate::loader::{Epoch, Loader};
use crate::sampler::Sampler;

/// A run's source of training batches.
pub enum Batches {
    /// Worker threads fill (pinned) buffers from the memory-mapped file.
    Pipelined(Loader),
    /// Uploaded once; gathered and augmented on the device.
    Resident(Resident, Sampler),
}

/// One training batch, ready for the step.
pub struct Fetched {
    /// `[B, 3, 32, 32]` f32 on the run's device.
    pub images: Tensor,
    /// `[B]` i64.
    pub labels: Tensor,
    /// Samples in it.
    pub len: usize,
    /// Host time spent issuing its copy to the device.
    pub copy: Duration,
    /// Host time spent, while fetching it, waiting for the device's earlier work: the device
    /// computing, not the data late.
    pub device_wait: Duration,
}

impl Batches {
    /// The source `cfg` asks for, as `plan` augments and batches, for shard `rank` of `world`,
    /// positioned at `start`.
    pub fn new(
        cfg: &TrainConfig,
        plan: &Plan,
        (rank, world): (usize, usize),
        train: &Split,
        start: Position,
    ) -> Result<Self> {
        // A data-parallel rank takes its shard: every world-th sample of the epoch's order, so
        // that the ranks' batches at a step together make one process's batch of world × batch.
        let (augment, drop_last) = (plan.augment, plan.drop_last);
        let own =
            Sampler { rank, world, drop_last, ..Sampler::shuffled(train.len(), cfg.batch_size, cfg.seed) };
        if let (true, Some(dense)) = (cfg.resident, train.dense()) {
            // The order the pipelined loader below would give (its defaults), batched on the device.
            return Ok(Batches::Resident(Resident::new(dense.clone(), augment, cfg.seed, cfg.device)?, own));
        }
        let mut builder = train
            .loader(cfg.image_size, true, cfg.augment)
            .batch_size(cfg.batch_size)
            .seed(cfg.seed)
            .num_workers(cfg.workers)
            .device(cfg.device)
            .augment(augment)
            .shard(rank, world)
            .drop_last(drop_last)
            // A shard may have one batch fewer than rank 0's, which sets the epoch's steps.
            .start_at(start.epoch, start.step.min(own.batches_per_epoch()));
        if let Some(n) = cfg.prefetch {
            builder = builder.prefetch(n);
        }
        Ok(Batches::Pipelined(builder.build()?))
    }

    /// The batches of `epoch` from step `first` on. (The loader was built to start where the
    /// run resumes, so it skips by itself.)
    pub fn epoch(&mut self, epoch: u64, first: usize) -> EpochBatches<'_> {
        match self {
            Batches::Pipelined(loader) => EpochBatches::Pipelined(loader.epoch(epoch)),
            Batches::Resident(data, sampler) => {
                let plan = data.plan(epoch, &sampler.batches(epoch));
                let steps = first..plan.len();
                EpochBatches::Resident { data, plan, steps }
            }
        }
    }
}

/// One epoch's batches.
pub enum EpochBatches<'a> {
    /// From the loader.
    Pipelined(Epoch<'a>),
    /// Gathered on the device from the epoch's plan.
    Resident {
        /// The split on the device.
        data: &'a Resident,
        /// The epoch's order and augmentation draws.
        plan: EpochPlan,
        /// The steps still to come.
        steps: std::ops::Range<usize>,
    },
}

impl Iterator for EpochBatches<'_> {
    type Item = Result<Fetched>;

    fn next(&mut self) -> Option<Result<Fetched>> {
        match self {
            EpochBatches::Pipelined(epoch) => Some(epoch.next()?.map(|b| Fetched {
                len: b.len(),
                copy: b.copy_time(),
                device_wait: b.sync_time(),
                images: b.images,
                labels: b.labels,
            })),
            EpochBatches::Resident { data, plan, steps } => {
                let (images, labels) = data.batch(plan, steps.next()?);
                let len = labels.size()[0] as usize;
                Some(Ok(Fetched { images, labels, len, copy: Duration::ZERO, device_wait: Duration::ZERO }))
            }
        }
    }
}
