//! The training step — forward, loss, backward, update — in one process or as one rank of a
//! data-parallel job, chosen once for the run.
use std::time::{Duration, Instant};

use tch::{Kind, Tensor, nn};

use super::batches::Fetched;
use super::sgd::Sgd;
use crate::dist::ProcessGroup;
use crate::error::Result;
use crate::interrupt::Interrupt;

/// The loss a run trains on: the mean cross-entropy, label-smoothed as configured.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Loss {
    /// `nn.CrossEntropyLoss(label_smoothing=...)`.
    pub label_smoothing: f64,
    /// The forward pass under autocast (CUDA).
    pub amp: bool,
    /// Backward from the sum over the batch rather than the mean (the fast recipe's rates are
    /// for the summed loss); the mean is what is reported either way.
    pub summed: bool,
}

impl Loss {
    /// The training forward pass and its mean loss.
    pub fn forward(&self, net: &dyn nn::ModuleT, images: &Tensor, labels: &Tensor) -> Tensor {
        // Under autocast the logits may be bf16/fp16: the loss is taken in f32.
        let logits = if self.amp {
            tch::autocast(true, || net.forward_t(images, true)).to_kind(Kind::Float)
        } else {
            net.forward_t(images, true)
        };
        if self.label_smoothing == 0.0 {
            logits.cross_entropy_for_logits(labels)
        } else {
            logits.cross_entropy_loss(
                labels,
                None::<Tensor>,
                tch::Reduction::Mean,
                -100,
                self.label_smoothing,
            )
        }
    }

    /// The backward pass from `mean`, the mean loss over this batch's `n` samples, which are
    /// `share` of the step's (a rank's part of the global batch, 1 in one process); returns
    /// the mean weighted by `share`, detached, which summed over the ranks is the step's mean.
    fn backward(&self, mean: &Tensor, n: usize, share: f64) -> Tensor {
        let scale = if self.summed { n as f64 } else { share };
        if scale == 1.0 {
            mean.backward();
            return mean.detach();
        }
        let scaled = mean * scale;
        scaled.backward();
        match (self.summed, share == 1.0) {
            (false, _) => scaled.detach(),
            (true, true) => mean.detach(),
            (true, false) => mean.detach() * share,
        }
    }
}

/// What a step did.
pub(crate) struct Stepped {
    /// The mean loss over the step's samples (on every rank, the global batch's).
    pub loss: Tensor,
    /// Time spent averaging gradients over the ranks.
    pub comm: Duration,
    /// Some rank was interrupted: every rank stops after this step.
    pub interrupted: bool,
}

/// How a run steps.
pub(crate) enum Step<'g> {
    /// One process: its batch is the whole step.
    Single,
    /// One rank of `group`: its shard of the global batch, then one all-reduce of the flat
    /// gradient (weighted by the rank's share, so the update is one process's on the global
    /// batch) that also carries the loss and the ranks' interrupt flags.
    Parallel(&'g ProcessGroup),
}

impl Step<'_> {
    /// One step on `batch` (`None`: a rank with no samples at this step) of a global batch of
    /// `global` samples.
    pub fn run(
        &self,
        net: &dyn nn::ModuleT,
        opt: &mut Sgd,
        loss_fn: &Loss,
        batch: Option<&Fetched>,
        global: usize,
        interrupt: &Interrupt,
    ) -> Result<Stepped> {
        match self {
            Step::Single => {
                let b = batch.expect("one process has a batch each step");
                let mean = loss_fn.forward(net, &b.images, &b.labels);
                opt.zero_grad();
                let loss = loss_fn.backward(&mean, b.len, 1.0);
                opt.step();
                Ok(Stepped { loss, comm: Duration::ZERO, interrupted: interrupt.requested() })
            }
            Step::Parallel(g) => parallel(g, net, opt, loss_fn, batch, global, interrupt),
        }
    }
}

fn parallel(
    g: &ProcessGroup,
    net: &dyn nn::ModuleT,
    opt: &mut Sgd,
    loss_fn: &Loss,
    batch: Option<&Fetched>,
    global: usize,
    interrupt: &Interrupt,
) -> Result<Stepped> {
    opt.zero_grad();
    let device = opt.flat_params().device();
    let share = batch.map_or(0, |b| b.len) as f64 / global as f64;
    // Scaled before the backward pass, so the gradients come out already weighted by this
    // rank's share of the global batch: their sum over the ranks is the global batch's mean.
    let loss = match batch {
        Some(b) => loss_fn.backward(&loss_fn.forward(net, &b.images, &b.labels), b.len, share),
        None => Tensor::zeros([], (Kind::Float, device)),
    };
    let flag = Tensor::from(interrupt.requested() as u8 as f32).to_device(device);
    let mut comm = Duration::ZERO;
    let extras = opt.step_with(&[loss, flag], |flat| -> Result<()> {
        let t = Instant::now();
        g.all_reduce_sum(flat)?;
        comm = t.elapsed();
        Ok(())
    })?;
    let interrupted = extras.double_value(&[1]) > 0.0;
    let loss = extras.narrow(0, 0, 1).reshape([]);
    Ok(Stepped { loss, comm, interrupted })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// `nn.CrossEntropyLoss(label_smoothing=ε)`: `(1-ε)·(-log p_y) + ε·mean_k(-log p_k)`,
    /// averaged over the batch.
    #[test]
    fn label_smoothing_is_pytorchs() {
        let logits = (Tensor::arange(12, (Kind::Float, Device::Cpu)) * 0.37).sin().view([3, 4]);
        let labels = Tensor::from_slice(&[2i64, 0, 3]);
        let identity = nn::func_t(|x, _| x.shallow_clone());
        for eps in [0.0, 0.2, 1.0] {
            let loss = Loss { label_smoothing: eps, amp: false, summed: false };
            let ours = loss.forward(&identity, &logits, &labels).double_value(&[]);
            let logp = Vec::<f64>::try_from(logits.log_softmax(1, Kind::Double).flatten(0, -1)).unwrap();
            let mut want = 0.0;
            for (row, &y) in [2usize, 0, 3].iter().enumerate() {
                let p = &logp[row * 4..row * 4 + 4];
                want += (1.0 - eps) * -p[y] + eps * p.iter().map(|v| -v).sum::<f64>() / 4.0;
            }
            want /= 3.0;
            assert!((ours - want).abs() < 1e-6, "ε {eps}: {ours} vs {want}");
        }
    }
}
