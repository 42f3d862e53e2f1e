//! The plan of a run: what the recipe decides, computed once before the first step — the
//! augmentation, the steps (an epoch's, the run's end, an early stop), when to evaluate and
//! with which test-time augmentation, how the loss is reduced, how often a line is logged.
use super::config::{Recipe, TrainConfig};
use super::fast;
use crate::augment::{Augment, Padding};
use crate::sampler::Sampler;

/// When the test split is evaluated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Evaluate {
    /// After each epoch (the tutorial's), and at an early stop.
    EachEpoch,
    /// Once, after the last step (the fast recipe's), and at an early stop.
    AtEnd,
    /// Never (`eval` off, or no test split).
    Never,
}

/// What a run will do, step by step.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    /// The training images' augmentation.
    pub augment: Augment,
    /// Each epoch's last, short batch dropped.
    pub drop_last: bool,
    /// Steps in a whole epoch (of the global batch, when data-parallel).
    pub per_epoch: usize,
    /// Steps of the whole run, at the end of which it has finished: `epochs × per_epoch`,
    /// rounded up (a fraction of an epoch trains its first steps).
    pub total: usize,
    /// Where it stops before its end (`max_steps`), checkpointed and resumable.
    pub stop_at: Option<usize>,
    /// Samples in a step, over all ranks.
    pub global_batch: usize,
    pub evaluate: Evaluate,
    /// Test-time augmentation level ([`fast::tta_logits`]).
    pub tta: u8,
    /// Samples per evaluation batch.
    pub eval_batch: usize,
    /// The loss is summed over the batch for the backward pass (the mean is reported).
    pub summed_loss: bool,
    /// A loss line every this many steps.
    pub log_every: usize,
    /// The fast recipe's schedule and lookahead run.
    pub schedule: bool,
}

/// Samples per evaluation batch: no gradients are kept, so larger than training's.
pub(crate) fn eval_batch_size(batch_size: usize) -> usize {
    batch_size.max(500)
}

impl Plan {
    /// Refuses a checkpoint's position that this plan cannot have reached: a step beyond its
    /// epoch, a step count that is not the epochs' and steps' sum, or more steps than the run has.
    pub fn check_position(&self, p: &super::Position) -> std::result::Result<(), String> {
        // A stop on an epoch's last step is at step `per_epoch` of it.
        if p.step > self.per_epoch {
            return Err(format!(
                "is at step {} of an epoch of {} steps: not a position of this run",
                p.step, self.per_epoch
            ));
        }
        let sum = p.epoch.checked_mul(self.per_epoch as u64).and_then(|s| s.checked_add(p.step as u64));
        if sum != Some(p.global_step as u64) {
            return Err(format!(
                "counts {} steps in all, but epoch {} step {} of {}-step epochs make {}: corrupt",
                p.global_step,
                p.epoch,
                p.step,
                self.per_epoch,
                sum.map_or("more than can be counted".into(), |s| s.to_string())
            ));
        }
        if p.global_step > self.total {
            return Err(format!("is at step {}, beyond this run's {} steps", p.global_step, self.total));
        }
        Ok(())
    }

    /// The plan of `cfg` over `train_len` training samples, on `world` ranks, with or without
    /// a test split.
    pub fn new(cfg: &TrainConfig, train_len: usize, world: usize, has_test: bool) -> Plan {
        let fast = cfg.recipe == Recipe::Fast;
        let augment = match (fast, cfg.augment) {
            (true, _) => {
                Augment { crop_padding: fast::TRANSLATE, padding: Some(Padding::Reflect), flip: true }
            }
            (false, true) => Augment::standard(),
            (false, false) => Augment::default(),
        };
        let global_batch = cfg.batch_size.saturating_mul(world);
        let sampler = Sampler { drop_last: fast, ..Sampler::shuffled(train_len, global_batch, cfg.seed) };
        let per_epoch = sampler.batches_per_epoch();
        let total = (cfg.epochs * per_epoch as f64).ceil() as usize;
        Plan {
            augment,
            drop_last: fast,
            per_epoch,
            total,
            stop_at: cfg.max_steps.filter(|&m| m < total),
            global_batch,
            evaluate: match (cfg.eval && has_test, fast) {
                (false, _) => Evaluate::Never,
                (true, false) => Evaluate::EachEpoch,
                (true, true) => Evaluate::AtEnd,
            },
            tta: if fast { 2 } else { 0 },
            eval_batch: eval_batch_size(cfg.batch_size),
            summed_loss: fast,
            log_every: cfg.log_interval(),
            schedule: fast,
        }
    }

    /// Steps of `epoch` (the run's last may be cut short; 0 past the end).
    pub fn steps_in(&self, epoch: u64) -> usize {
        let start = (epoch as usize).saturating_mul(self.per_epoch);
        self.per_epoch.min(self.total.saturating_sub(start))
    }

    /// Where this invocation ends: the early stop, else the end.
    pub fn last_step(&self) -> usize {
        self.stop_at.unwrap_or(self.total)
    }

    /// The samples of step `step` of an epoch over all ranks (the last batch may be short).
    pub fn samples_at(&self, step: usize, train_len: usize) -> usize {
        self.global_batch.min(train_len.saturating_sub(step * self.global_batch))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fraction_of_an_epoch_trains_its_first_steps_and_max_steps_is_a_stop_before_the_end() {
        let mut cfg = TrainConfig::tutorial("t".into(), None);
        cfg.batch_size = 10;
        cfg.epochs = 2.5;
        let p = Plan::new(&cfg, 100, 1, true);
        assert_eq!((p.per_epoch, p.total), (10, 25));
        assert_eq!((p.steps_in(0), p.steps_in(2), p.steps_in(3)), (10, 5, 0));
        assert_eq!(p.stop_at, None);
        cfg.max_steps = Some(12);
        assert_eq!(Plan::new(&cfg, 100, 1, true).last_step(), 12);
        // A limit at or past the end is no stop: the run ends as planned.
        cfg.max_steps = Some(25);
        assert_eq!(Plan::new(&cfg, 100, 1, true).stop_at, None);
        let f = Plan::new(&TrainConfig::fast("t".into(), None), 50_000, 1, true);
        // airbench's 9.9 epochs of 48 full batches of 1,024.
        assert_eq!((f.per_epoch, f.total, f.evaluate, f.tta), (48, 476, Evaluate::AtEnd, 2));
    }
}
