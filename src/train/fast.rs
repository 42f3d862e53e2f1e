//! The fast recipe (`--recipe fast`): the training of the fastest public CIFAR-10 trainer,
//! airbench94 (94.01% in 2.59 s on an A100), written here from its public description. Its
//! parts, each below by name:
//!
//! - [`net`]: a frozen **whitening** first layer (2×2 patches, from the training images'
//!   patch covariance, [`init_whitening`]), then three conv groups (conv, max-pool, batch norm,
//!   GELU, conv, batch norm, GELU; 64, 256, 256 channels; the first filters of each conv start
//!   as identities), a 3×3 max-pool and a linear head scaled by 1/9. Batch norms learn a bias
//!   only (weight fixed at 1, eps 1e-12, running statistics with momentum 0.4).
//! - **Label smoothing** 0.2, the loss **summed** over the batch; **Nesterov SGD** (momentum
//!   0.85) with lr 11.5 and weight decay 0.0153 per 1,024 samples, both divided by
//!   `1024·(1 + 1/(1 − momentum))`; batch-norm biases at 64× the rate (`Groups`); the
//!   whitening bias trained for the first 3 epochs only.
//! - A **schedule** ([`lr_factor`]): from 0.2× up to 1× over the first 23% of the steps, then
//!   down to 0.07×; 9.9 epochs of 1,024 (the last partial batch dropped).
//! - **Lookahead** ([`Lookahead`]): every 5 steps the weights are pulled into an exponential
//!   average with decay `0.95⁵·(step/total)³`, and replaced by it at the end.
//! - Data: **flip and translate** by up to 2 pixels (reflect), the split resident on the
//!   device; **test-time augmentation** ([`tta_logits`]): the mean of the image's and its
//!   mirror's logits, and of those of the image moved one pixel up-left and down-right.
use std::sync::Arc;

use tch::nn::{self, ModuleT};
use tch::{Device, Kind, Tensor};

use super::sgd::Sgd;
use crate::error::Result;
use crate::loader::Loader;
use crate::source::Dataset;

/// Samples per batch.
pub const BATCH_SIZE: usize = 1024;
/// Epochs, a fraction of the last one included.
pub const EPOCHS: f64 = 9.9;
/// Learning rate per 1,024 samples (before the momentum scaling).
pub const LR: f64 = 11.5;
/// Nesterov momentum.
pub const MOMENTUM: f64 = 0.85;
/// Weight decay per 1,024 samples (decoupled from the learning rate).
pub const WEIGHT_DECAY: f64 = 0.0153;
/// How much faster batch-norm biases learn.
pub const BIAS_SCALER: f64 = 64.0;
/// Label smoothing.
pub const LABEL_SMOOTHING: f64 = 0.2;
/// Epochs the whitening layer's bias is trained before it is frozen.
pub const WHITEN_BIAS_EPOCHS: u64 = 3;
/// Translation of the augmentation, pixels.
pub const TRANSLATE: usize = 2;
/// Training images the whitening layer is computed from.
pub const WHITEN_IMAGES: usize = 5000;

const WIDTHS: [i64; 3] = [64, 256, 256];
const WHITEN_WIDTH: i64 = 2 * 3 * 2 * 2;
const BN_MOMENTUM: f64 = 0.4;
const BN_EPS: f64 = 1e-12;

/// The learning rate and weight decay `torch.optim.SGD` is given for batches of `batch`
/// (airbench's `lr / kilostep_scale` and `wd · batch / kilostep_scale`; the weight decay is
/// then divided by each group's rate, so that rate × decay is the same for all).
pub fn sgd_rates(batch: usize, lr: f64, momentum: f64, weight_decay: f64) -> (f64, f64) {
    let kilostep = 1024.0 * (1.0 + 1.0 / (1.0 - momentum));
    (lr / kilostep, weight_decay * batch as f64 / kilostep)
}

/// The multiplier of the learning rate at `step` of `total`.
pub fn lr_factor(step: usize, total: usize) -> f64 {
    let warmup = (total as f64 * 0.23) as usize;
    if step < warmup {
        let f = step as f64 / warmup as f64;
        0.2 * (1.0 - f) + f
    } else {
        let f = (step - warmup) as f64 / (total - warmup).max(1) as f64;
        (1.0 - f) + 0.07 * f
    }
}

/// A 3×3 "same" convolution without bias, its first `c_in` filters starting as identities.
fn conv(vs: &nn::Path, c_in: i64, c_out: i64) -> nn::Conv2D {
    let c = super::model::conv2d(
        vs,
        c_in,
        c_out,
        3,
        nn::ConvConfig { padding: 1, bias: false, ..Default::default() },
    );
    tch::no_grad(|| {
        let n = c_in.min(c_out);
        let mut first = c.ws.narrow(0, 0, n);
        let _ = first.zero_();
        for i in 0..n {
            let _ = first.get(i).get(i).get(1).get(1).fill_(1.0);
        }
    });
    c
}

/// Batch norm with a fixed weight of 1 and a learned bias.
fn norm(vs: &nn::Path, c: i64) -> impl ModuleT + use<> {
    let bias = vs.zeros("bias", &[c]);
    let mean = vs.zeros_no_train("running_mean", &[c]);
    let var = vs.ones_no_train("running_var", &[c]);
    nn::func_t(move |x, train| {
        x.batch_norm(None::<&Tensor>, Some(&bias), Some(&mean), Some(&var), train, BN_MOMENTUM, BN_EPS, true)
    })
}

fn group(vs: &nn::Path, c_in: i64, c_out: i64) -> impl ModuleT + use<> {
    let (conv1, norm1) = (conv(&(vs / "conv1"), c_in, c_out), norm(&(vs / "norm1"), c_out));
    let (conv2, norm2) = (conv(&(vs / "conv2"), c_out, c_out), norm(&(vs / "norm2"), c_out));
    nn::func_t(move |x, train| {
        let x = x.apply(&conv1).max_pool2d_default(2).apply_t(&norm1, train).gelu("none");
        x.apply(&conv2).apply_t(&norm2, train).gelu("none")
    })
}

/// The network. Its whitening weight is frozen: set it with [`init_whitening`].
pub fn net(vs: &nn::Path, classes: i64) -> impl ModuleT + use<> {
    let whiten_vs = vs / "whiten";
    let whiten_w = whiten_vs.zeros_no_train("weight", &[WHITEN_WIDTH, 3, 2, 2]);
    let whiten_b = whiten_vs.zeros("bias", &[WHITEN_WIDTH]);
    let groups: Vec<_> = [WHITEN_WIDTH, WIDTHS[0], WIDTHS[1]]
        .iter()
        .zip(WIDTHS)
        .enumerate()
        .map(|(i, (&c_in, c_out))| group(&(vs / format!("group{}", i + 1)), c_in, c_out))
        .collect();
    let head = super::model::linear(vs / "head", WIDTHS[2], classes, false);
    nn::func_t(move |x, train| {
        let mut x = x.conv2d(&whiten_w, Some(&whiten_b), [1], [0], [1], 1).gelu("none");
        for g in &groups {
            x = x.apply_t(g, train);
        }
        x.max_pool2d_default(3).flatten(1, -1).apply(&head) * (1.0 / 9.0)
    })
}

/// Sets the whitening layer of [`net`] in `vs` from `images` `[N, 3, H, W]`: the eigenvectors
/// of their 2×2 patches' covariance, each divided by the square root of its eigenvalue (+
/// `eps`), and their negatives, largest first, so that the layer's first 12 outputs over these
/// patches have about the identity covariance.
pub fn init_whitening(vs: &nn::VarStore, images: &Tensor, eps: f64) {
    let images = images.to_kind(Kind::Float).to_device(vs.device());
    let c = images.size()[1];
    let patches = images.unfold(2, 2, 1).unfold(3, 2, 1).transpose(1, 3).reshape([-1, c, 2, 2]);
    let n = patches.size()[0];
    let flat = patches.reshape([n, -1]);
    let cov = flat.transpose(0, 1).matmul(&flat) / n as f64;
    let (values, vectors) = cov.to_kind(Kind::Double).linalg_eigh("U");
    let values = values.flip([0]).view([-1, 1, 1, 1]);
    let vectors = vectors.transpose(0, 1).reshape([c * 4, c, 2, 2]).flip([0]);
    let scaled = (vectors / (values + eps).sqrt()).to_kind(Kind::Float);
    let mut weight = vs.variables()["whiten.weight"].shallow_clone();
    tch::no_grad(|| weight.copy_(&Tensor::cat(&[&scaled, &-&scaled], 0)));
}

/// Logits with test-time augmentation: `level` 0 none, 1 the mean with the mirror image's,
/// 2 that averaged with the mirror means of the image moved one pixel up-left and one pixel
/// down-right (reflect padding).
pub fn tta_logits(net: &dyn ModuleT, x: &Tensor, level: u8) -> Tensor {
    let mirror = |x: &Tensor| (net.forward_t(x, false) + net.forward_t(&x.flip([3]), false)) * 0.5;
    match level {
        0 => net.forward_t(x, false),
        1 => mirror(x),
        _ => {
            let (h, w) = (x.size()[2], x.size()[3]);
            let padded = x.reflection_pad2d([1, 1, 1, 1]);
            let moved = |dy: i64, dx: i64| padded.narrow(2, dy, h).narrow(3, dx, w);
            let translated = (mirror(&moved(0, 0)) + mirror(&moved(2, 2))) * 0.5;
            (mirror(x) + translated) * 0.5
        }
    }
}

/// Which of a flat parameter list (in name order) learn at the batch-norm bias rate, and
/// which is the whitening bias.
struct Groups {
    /// `(numel, is_norm_bias, is_whiten_bias)` per variable, in the flat buffer's order.
    spans: Vec<(i64, bool, bool)>,
}

impl Groups {
    /// Over `opt`'s variables, in the order of its flat buffer.
    fn of(opt: &Sgd) -> Groups {
        let spans = opt.layout().map(|(name, n)| (n, name.contains("norm"), name == "whiten.bias")).collect();
        Groups { spans }
    }

    /// Per element of the flat buffer: the learning-rate multiplier (64 for batch-norm
    /// biases, 0 for the whitening bias once frozen, else 1).
    fn lr_scale(&self, whiten_bias_trains: bool) -> Vec<f32> {
        let mut out = Vec::new();
        for &(n, norm, whiten) in &self.spans {
            let s = if whiten && !whiten_bias_trains {
                0.0
            } else if norm {
                BIAS_SCALER as f32
            } else {
                1.0
            };
            out.extend(std::iter::repeat_n(s, n as usize));
        }
        out
    }
}

/// Lookahead: an exponential average of all float variables (running statistics included),
/// which the weights are replaced by at each update.
pub struct Lookahead {
    /// `(name, average, variable)` in name order.
    pairs: Vec<(String, Tensor, Tensor)>,
}

impl Lookahead {
    /// Starts the average at `vs`'s values.
    pub fn new(vs: &nn::VarStore) -> Lookahead {
        let pairs = super::model::variables_by_name(vs)
            .into_iter()
            .map(|(name, v)| (name, v.detach().copy(), v))
            .collect();
        Lookahead { pairs }
    }

    /// `ema ← decay·ema + (1 − decay)·w; w ← ema`.
    pub fn update(&mut self, decay: f64) {
        tch::no_grad(|| {
            for (_, ema, v) in &mut self.pairs {
                let _ = ema.lerp_(v, 1.0 - decay);
                v.copy_(ema);
            }
        });
    }

    /// The average by variable name (for a checkpoint).
    pub fn state(&self) -> Vec<(String, Tensor)> {
        self.pairs.iter().map(|(name, ema, _)| (name.clone(), ema.shallow_clone())).collect()
    }

    /// Restores what [`Lookahead::state`] saved: the average of every variable.
    pub fn load(&mut self, state: Vec<(String, Tensor)>) -> std::result::Result<(), String> {
        if state.len() != self.pairs.len() {
            return Err(format!(
                "holds a lookahead average of {} tensors, the model has {}",
                state.len(),
                self.pairs.len()
            ));
        }
        tch::no_grad(|| {
            for (name, t) in state {
                let Some((_, ema, _)) = self.pairs.iter_mut().find(|(n, ..)| *n == name) else {
                    return Err(format!("holds a lookahead average of {name}, which this model lacks"));
                };
                if ema.size() != t.size() {
                    return Err(format!("its lookahead average of {name} has shape {:?}", t.size()));
                }
                ema.copy_(&t.to_device(ema.device()));
            }
            Ok(())
        })
    }

    /// The decay at `step` of `total`: `0.95⁵·(step/total)³`.
    pub fn decay(step: usize, total: usize) -> f64 {
        0.95f64.powi(5) * (step as f64 / total as f64).powi(3)
    }
}

/// The recipe's state across a run: the rates, the parameter groups, the schedule's length,
/// the lookahead average.
pub(crate) struct Schedule {
    lr: f64,
    total: usize,
    groups: Groups,
    lookahead: Lookahead,
    device: Device,
}

impl Schedule {
    /// Sets `opt` up for the recipe (Nesterov, each group's decay) over `total` steps of
    /// `batch` samples, with `lr`, `momentum` and `weight_decay` in airbench's units; starts
    /// the lookahead average at `vs`'s weights (call it after they are set or resumed).
    pub fn new(
        vs: &nn::VarStore,
        opt: &mut Sgd,
        batch: usize,
        (lr, weight_decay): (f64, f64),
        total: usize,
    ) -> Schedule {
        let (lr, wd) = sgd_rates(batch, lr, opt.momentum, weight_decay);
        let groups = Groups::of(opt);
        // Each group's decay is wd / its rate, as airbench gives torch's SGD, so that
        // rate × decay is wd for all; nothing for the frozen whitening bias.
        let decay: Vec<f32> = groups
            .lr_scale(true)
            .iter()
            .map(|&s| if s == 0.0 { 0.0 } else { (wd / (lr * s as f64)) as f32 })
            .collect();
        let device = vs.device();
        opt.nesterov = true;
        opt.decay = Some(Tensor::from_slice(&decay).to_device(device));
        Schedule { lr, total, groups, lookahead: Lookahead::new(vs), device }
    }

    /// The lookahead average.
    pub fn lookahead(&self) -> &Lookahead {
        &self.lookahead
    }

    /// The lookahead average, to restore a resumed run's.
    pub fn lookahead_mut(&mut self) -> &mut Lookahead {
        &mut self.lookahead
    }

    /// At the start of `epoch`: the whitening bias trains in the first epochs only.
    pub fn epoch(&self, opt: &mut Sgd, epoch: u64) {
        let scale = self.groups.lr_scale(epoch < WHITEN_BIAS_EPOCHS);
        opt.lr_scale = Some(Tensor::from_slice(&scale).to_device(self.device));
    }

    /// Before step `step` (counted from 0 over the run): the scheduled rate.
    pub fn step(&self, opt: &mut Sgd, step: usize) {
        opt.lr = self.lr * lr_factor(step, self.total);
    }

    /// After `done` steps: the lookahead every 5, and the average itself after the last.
    pub fn after(&mut self, done: usize) {
        if done >= self.total {
            self.lookahead.update(1.0);
        } else if done.is_multiple_of(5) {
            self.lookahead.update(Lookahead::decay(done, self.total));
        }
    }
}

/// The first `n` images of `train` (fewer if it has fewer), normalized as the loader gives
/// them, on `device`: what the whitening layer is computed from.
pub fn first_images(train: &Arc<Dataset>, n: usize, device: Device) -> Result<Tensor> {
    let mut loader = Loader::builder_arc(train.clone())
        .batch_size(n)
        .shuffle(false)
        .num_workers(0)
        .device(device)
        .build()?;
    let first = loader.iter().next().expect("a dataset that is not empty has a first batch")?;
    Ok(first.images)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whitened_patches_have_the_identity_covariance() {
        tch::manual_seed(1);
        // Correlated channels and neighbours: a smooth image plus noise, mixed across channels.
        let base = Tensor::randn([64, 1, 16, 16], (Kind::Float, Device::Cpu)).avg_pool2d(
            [3, 3],
            [1, 1],
            [1, 1],
            false,
            true,
            None::<i64>,
        );
        let images = Tensor::cat(&[&base, &(&base * 0.5 + 0.1), &(-&base * 0.3)], 1)
            + Tensor::randn([64, 3, 16, 16], (Kind::Float, Device::Cpu)) * 0.2;
        let vs = nn::VarStore::new(Device::Cpu);
        let _ = net(&vs.root(), 10);
        init_whitening(&vs, &images, 1e-8);
        let w = vs.variables()["whiten.weight"].narrow(0, 0, 12);
        let out = images.conv2d(&w, None::<&Tensor>, [1], [0], [1], 1); // [N, 12, 15, 15]
        let flat = out.transpose(0, 1).reshape([12, -1]);
        let cov = flat.matmul(&flat.transpose(0, 1)) / flat.size()[1] as f64;
        let off = (&cov - Tensor::eye(12, (Kind::Float, Device::Cpu))).abs().max().double_value(&[]);
        assert!(off < 1e-2, "covariance differs from the identity by {off}");
        // The other 12 filters are the negatives.
        let all = vs.variables()["whiten.weight"].shallow_clone();
        assert!(all.narrow(0, 12, 12).equal(&-all.narrow(0, 0, 12)));
    }

    #[test]
    fn the_schedule_rises_then_falls() {
        let total = 476;
        assert!((lr_factor(0, total) - 0.2).abs() < 1e-12);
        let top = (total as f64 * 0.23) as usize;
        assert!((lr_factor(top, total) - 1.0).abs() < 1e-12);
        assert!((lr_factor(total, total) - 0.07).abs() < 1e-12);
        assert!(lr_factor(top / 2, total) > 0.2 && lr_factor(top / 2, total) < 1.0);
    }

    #[test]
    fn tta_averages_the_mirror_and_the_shifted_images() {
        tch::manual_seed(2);
        let vs = nn::VarStore::new(Device::Cpu);
        let lin = nn::linear(vs.root(), 3 * 4 * 4, 2, Default::default());
        let f = nn::func_t(move |x, _| x.flatten(1, -1).apply(&lin));
        let x = Tensor::randn([2, 3, 4, 4], (Kind::Float, Device::Cpu));
        let plain = f.forward_t(&x, false);
        let mirrored = f.forward_t(&x.flip([3]), false);
        assert!(tta_logits(&f, &x, 0).allclose(&plain, 1e-6, 1e-6, false));
        assert!(tta_logits(&f, &x, 1).allclose(&((&plain + &mirrored) * 0.5), 1e-6, 1e-6, false));
        let l2 = tta_logits(&f, &x, 2);
        assert!(!l2.allclose(&tta_logits(&f, &x, 1), 1e-6, 1e-6, false), "level 2 adds the shifted images");
    }

    #[test]
    fn lookahead_pulls_the_weights_into_the_average() {
        let vs = nn::VarStore::new(Device::Cpu);
        let mut w = vs.root().var("w", &[2], nn::Init::Const(1.0));
        let mut la = Lookahead::new(&vs);
        tch::no_grad(|| w.copy_(&Tensor::from_slice(&[3.0f32, 5.0])));
        la.update(0.75);
        // 0.75·1 + 0.25·w
        assert_eq!(Vec::<f32>::try_from(&w).unwrap(), [1.5, 2.0]);
        assert!((Lookahead::decay(1, 1) - 0.95f64.powi(5)).abs() < 1e-12);
    }

    #[test]
    fn a_few_steps_train_on_the_cpu() {
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        let model = net(&vs.root(), 10);
        let x = Tensor::randn([8, 3, 32, 32], (Kind::Float, Device::Cpu));
        let y = Tensor::from_slice(&[0i64, 1, 2, 3, 4, 5, 6, 7]);
        init_whitening(&vs, &x, 5e-4);
        let (lr, wd) = sgd_rates(8, LR, MOMENTUM, WEIGHT_DECAY);
        let mut opt = super::super::sgd::Sgd::new(&vs, lr, MOMENTUM, wd / lr);
        opt.nesterov = true;
        let mut losses = Vec::new();
        for _ in 0..8 {
            let loss = model.forward_t(&x, true).cross_entropy_loss(
                &y,
                None::<Tensor>,
                tch::Reduction::Sum,
                -100,
                0.2,
            );
            opt.zero_grad();
            loss.backward();
            opt.step();
            losses.push(loss.double_value(&[]));
        }
        assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
        assert!(losses[7] < losses[0], "the loss did not fall: {losses:?}");
        assert_eq!(tta_logits(&model, &x, 2).size(), [8, 10]);
    }
}
