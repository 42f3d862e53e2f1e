//! Evaluation on the test split: accuracy overall and per class, and the confusion matrix, in
//! one process or shared by the ranks of a data-parallel job.
use tch::{Device, Tensor, nn};

use super::fast;
use super::splits::Split;
use crate::dist::ProcessGroup;
use crate::error::{Error, Result};
use crate::interrupt::Interrupt;

/// Test-set accuracy.
#[derive(Debug, Clone)]
pub struct Evaluation {
    /// Correct / total.
    pub accuracy: f64,
    /// Per class, in label order.
    pub per_class: Vec<f64>,
    /// Test samples counted.
    pub total: u64,
    /// `confusion[true][predicted]` counts; empty above `MAX_CONFUSION_CLASSES` classes.
    pub confusion: Vec<Vec<u64>>,
}

/// The most classes whose confusion matrix is kept (8 MB of counts): it grows with their square,
/// so above it only each class's correct and total are (the chart and the metrics go without).
pub const MAX_CONFUSION_CLASSES: usize = 1000;

/// How to evaluate.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Eval<'a> {
    /// Samples a batch.
    pub batch_size: usize,
    /// Loader threads.
    pub workers: usize,
    /// Where the model is.
    pub device: Device,
    /// Test-time augmentation level ([`fast::tta_logits`]).
    pub tta: u8,
    /// The ranks sharing the work, if any.
    pub group: Option<&'a ProcessGroup>,
    /// An encoded split's crop side ([`super::config::TrainConfig::image_size`]).
    pub image_size: u32,
}

/// The accuracy of `net`, which scores `classes` classes, on `test` (an encoded split cropped to
/// 224, see `Split::loader`): the confusion matrix is
/// `classes` square (or the test split's class count, if larger). Ends with
/// [`Error::Interrupted`] as soon as `interrupt` is requested.
pub fn evaluate(
    net: &dyn nn::ModuleT,
    classes: usize,
    test: &Split,
    batch_size: usize,
    workers: usize,
    device: Device,
    interrupt: &Interrupt,
) -> Result<Evaluation> {
    Eval { batch_size, workers, device, tta: 0, group: None, image_size: 224 }
        .run(net, classes, test, interrupt)
}

impl Eval<'_> {
    /// With a group, each rank counts its shard of the test split and one all-reduce sums the
    /// confusion matrices, so every rank has the whole split's result (one process's) in a
    /// world-th of the time; the evaluation is then not cut short by an interrupt, which the
    /// ranks agree on at the next step.
    pub fn run(
        &self,
        net: &dyn nn::ModuleT,
        classes: usize,
        test: &Split,
        interrupt: &Interrupt,
    ) -> Result<Evaluation> {
        let group = self.group;
        let (rank, world) = group.map_or((0, 1), |g| (g.rank(), g.world()));
        // Predictions range over the model's classes, which a test split may not all hold.
        let classes = classes.max(super::splits::class_count(test));
        let square = if classes <= MAX_CONFUSION_CLASSES { classes } else { 0 };
        let mut confusion = vec![vec![0u64; square]; square];
        // Per class: correct, total.
        let mut counts = vec![[0u64; 2]; classes];
        // The split opened once by the run, not re-opened and re-validated every epoch.
        let mut loader = test
            .loader(self.image_size, false, false)
            .batch_size(self.batch_size)
            .shuffle(false)
            .num_workers(self.workers)
            .device(self.device)
            .shard(rank, world)
            .build()?;
        tch::no_grad(|| -> Result<()> {
            for b in loader.iter() {
                // Acted on within a batch: a Ctrl-C need not wait for the whole test split.
                if group.is_none() && interrupt.requested() {
                    return Err(Error::Interrupted);
                }
                let b = b?;
                let pred = fast::tta_logits(net, &b.images, self.tta).argmax(1, false).to_device(Device::Cpu);
                let pred = Vec::<i64>::try_from(&pred).expect("i64 predictions");
                let truth = Vec::<i64>::try_from(&b.labels.to_device(Device::Cpu)).expect("i64 labels");
                for (t, p) in truth.into_iter().zip(pred) {
                    counts[t as usize][0] += (t == p) as u64;
                    counts[t as usize][1] += 1;
                    if square > 0 {
                        confusion[t as usize][p as usize] += 1;
                    }
                }
            }
            Ok(())
        })?;
        if let Some(g) = group {
            let all: Vec<f64> =
                counts.iter().flatten().chain(confusion.iter().flatten()).map(|&c| c as f64).collect();
            let sum = Tensor::from_slice(&all).to_device(g.device());
            g.all_reduce_sum(&sum)?;
            let sum = Vec::<f64>::try_from(sum.to_device(Device::Cpu)).expect("f64 counts");
            for (c, v) in counts.iter_mut().flatten().chain(confusion.iter_mut().flatten()).zip(sum) {
                *c = v as u64;
            }
        }
        Ok(Evaluation::of_counts(&counts, confusion))
    }
}

impl Evaluation {
    /// The accuracies that each class's `[correct, total]` give (0 for a class with no
    /// samples), with the confusion matrix (or none) they came with.
    fn of_counts(counts: &[[u64; 2]], confusion: Vec<Vec<u64>>) -> Evaluation {
        let total: u64 = counts.iter().map(|c| c[1]).sum();
        let correct: u64 = counts.iter().map(|c| c[0]).sum();
        let per_class =
            counts.iter().map(|&[ok, n]| if n == 0 { 0.0 } else { ok as f64 / n as f64 }).collect();
        Evaluation { accuracy: correct as f64 / total.max(1) as f64, per_class, total, confusion }
    }

    /// The accuracies a confusion matrix gives (0 for a class with no samples).
    pub fn of(confusion: Vec<Vec<u64>>) -> Evaluation {
        let total: u64 = confusion.iter().flatten().sum();
        let correct: u64 = confusion.iter().enumerate().map(|(c, row)| row[c]).sum();
        let per_class = confusion
            .iter()
            .enumerate()
            .map(|(c, row)| {
                let n: u64 = row.iter().sum();
                if n == 0 { 0.0 } else { row[c] as f64 / n as f64 }
            })
            .collect();
        Evaluation { accuracy: correct as f64 / total.max(1) as f64, per_class, total, confusion }
    }
}
