//! The models: the tutorial's LeNet-style net, and a small residual net as the stronger option.
use std::borrow::Borrow;

use tch::nn::{self, ModuleT};
use tch::{Device, Tensor};

/// Which network to train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// conv 3→6 5×5, pool, conv 6→16 5×5, pool, fc 400→120→84→classes (the tutorial's `Net`).
    Lenet,
    /// A small ResNet: a stem and three stages of two basic blocks (32, 64, 128 channels).
    Resnet,
    /// The fast recipe's net (airbench94's): see [`super::fast`].
    Airbench,
    /// torchvision's ResNet-18 (tch's `resnet18`), for images of 32 pixels and more a side
    /// (ImageNet's 224 for the images an encoded split keeps).
    Resnet18,
}

impl ModelKind {
    /// The name, as on the command line.
    pub fn name(self) -> &'static str {
        match self {
            ModelKind::Lenet => "lenet",
            ModelKind::Resnet => "resnet",
            ModelKind::Airbench => "airbench",
            ModelKind::Resnet18 => "resnet18",
        }
    }
}

impl ModelKind {
    /// The image sides (height and width, each) the net takes, smallest and largest: the LeNet's
    /// first linear layer is sized for 32×32; airbench's head for one 3×3 pool window after
    /// its 2×2 whitening and three halvings; the ResNet pools adaptively.
    pub fn sides(self) -> std::ops::RangeInclusive<usize> {
        match self {
            ModelKind::Lenet => 32..=32,
            ModelKind::Airbench => 25..=48,
            ModelKind::Resnet => 4..=usize::MAX,
            ModelKind::Resnet18 => 32..=usize::MAX,
        }
    }
}

/// `vs`'s variables sorted by name: the one order of the optimizer's flat buffer, checkpoints,
/// the lookahead average and the ranks' broadcasts.
pub fn variables_by_name(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named
}

/// Builds `kind` for `classes` outputs under `vs`'s root.
pub fn build(kind: ModelKind, vs: &nn::Path, classes: i64) -> Box<dyn ModuleT> {
    match kind {
        ModelKind::Lenet => Box::new(lenet(vs, classes)),
        ModelKind::Resnet => Box::new(resnet(vs, classes)),
        ModelKind::Airbench => Box::new(super::fast::net(vs, classes)),
        ModelKind::Resnet18 => Box::new(tch::vision::resnet::resnet18(vs, classes)),
    }
}

/// The bound `1/√fan_in` of PyTorch's default initialisation of `Conv2d` and `Linear`: their
/// `reset_parameters` draw the weight with `kaiming_uniform_(a=√5)` (gain `√(2/(1+5))`, so
/// the bound `gain·√3/√fan_in` is `1/√fan_in`) and the bias from the same interval. tch's own
/// defaults differ (Kaiming with the ReLU gain, `√6/√fan_in`, and zero conv biases), which
/// trains the tutorial's net to a different accuracy.
pub fn pytorch_bound(fan_in: i64) -> f64 {
    1.0 / (fan_in as f64).sqrt()
}

fn pytorch_uniform(fan_in: i64) -> nn::Init {
    let b = pytorch_bound(fan_in);
    nn::Init::Uniform { lo: -b, up: b }
}

/// `nn.Conv2d(c_in, c_out, k, stride, padding, bias)` as PyTorch initialises it.
pub fn conv2d<'a>(
    vs: impl Borrow<nn::Path<'a>>,
    c_in: i64,
    c_out: i64,
    k: i64,
    cfg: nn::ConvConfig,
) -> nn::Conv2D {
    let init = pytorch_uniform(c_in / cfg.groups * k * k);
    nn::conv2d(vs, c_in, c_out, k, nn::ConvConfig { ws_init: init, bs_init: init, ..cfg })
}

/// `nn.Linear(c_in, c_out, bias)` as PyTorch initialises it.
pub fn linear<'a>(vs: impl Borrow<nn::Path<'a>>, c_in: i64, c_out: i64, bias: bool) -> nn::Linear {
    let init = pytorch_uniform(c_in);
    nn::linear(vs, c_in, c_out, nn::LinearConfig { ws_init: init, bs_init: bias.then_some(init), bias })
}

/// `nn.BatchNorm2d(c)` as PyTorch initialises it: weight 1, bias 0 (tch draws the weight from
/// U(0, 1)), running mean 0 and variance 1.
pub fn batch_norm2d<'a>(vs: impl Borrow<nn::Path<'a>>, c: i64) -> nn::BatchNorm {
    let cfg = nn::BatchNormConfig {
        ws_init: nn::Init::Const(1.0),
        bs_init: nn::Init::Const(0.0),
        ..Default::default()
    };
    nn::batch_norm2d(vs, c, cfg)
}

/// The tutorial's net, layer for layer, initialised as PyTorch initialises its layers.
pub fn lenet(vs: &nn::Path, classes: i64) -> impl ModuleT + use<> {
    let conv1 = conv2d(vs / "conv1", 3, 6, 5, Default::default());
    let conv2 = conv2d(vs / "conv2", 6, 16, 5, Default::default());
    let fc1 = linear(vs / "fc1", 16 * 5 * 5, 120, true);
    let fc2 = linear(vs / "fc2", 120, 84, true);
    let fc3 = linear(vs / "fc3", 84, classes, true);
    nn::func(move |x: &Tensor| {
        let x = if x.device() == Device::Cpu { channels_last(x) } else { x.shallow_clone() };
        x.apply(&conv1)
            .relu()
            .max_pool2d_default(2)
            .apply(&conv2)
            .relu()
            .max_pool2d_default(2)
            .flatten(1, -1)
            .apply(&fc1)
            .relu()
            .apply(&fc2)
            .relu()
            .apply(&fc3)
    })
}

/// `x` `[N, C, H, W]` with its values laid out channels-last (`[N, H, W, C]` in memory), which
/// libtorch's CPU kernels follow through the convolutions and pools.
///
/// Its NCHW max-pool kernel is scalar, a fifth of a LeNet step at batch 32 (measured with
/// `perf`); channels-last it runs vectorized across channels, and oneDNN's convolutions skip
/// their reorders. The same step ran 1.03–1.19× faster at batches 4 to 256 on this 2-core
/// machine, with the same logits to the bit (a test below holds the values and gradients). Not
/// on CUDA, where it is unmeasured.
fn channels_last(x: &Tensor) -> Tensor {
    x.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
}

fn conv_bn(vs: &nn::Path, c_in: i64, c_out: i64, stride: i64) -> nn::SequentialT {
    let conv = nn::ConvConfig { stride, padding: 1, bias: false, ..Default::default() };
    nn::seq_t().add(conv2d(vs / "conv", c_in, c_out, 3, conv)).add(batch_norm2d(vs / "bn", c_out))
}

fn block(vs: &nn::Path, c_in: i64, c_out: i64, stride: i64) -> impl ModuleT + use<> {
    let a = conv_bn(&(vs / "a"), c_in, c_out, stride);
    let b = conv_bn(&(vs / "b"), c_out, c_out, 1);
    let shortcut = (stride != 1 || c_in != c_out).then(|| {
        let conv = nn::ConvConfig { stride, bias: false, ..Default::default() };
        nn::seq_t()
            .add(conv2d(vs / "short" / "conv", c_in, c_out, 1, conv))
            .add(batch_norm2d(vs / "short" / "bn", c_out))
    });
    nn::func_t(move |x, train| {
        let y = x.apply_t(&a, train).relu().apply_t(&b, train);
        let s = match &shortcut {
            Some(s) => x.apply_t(s, train),
            None => x.shallow_clone(),
        };
        (y + s).relu()
    })
}

/// A residual net of about 2.8 M parameters, for the accuracy the LeNet cannot reach.
pub fn resnet(vs: &nn::Path, classes: i64) -> impl ModuleT + use<> {
    let stem = conv_bn(&(vs / "stem"), 3, 32, 1);
    let mut stages = nn::seq_t();
    let mut c_in = 32;
    for (i, &c) in [32i64, 64, 128].iter().enumerate() {
        let stride = if i == 0 { 1 } else { 2 };
        stages = stages.add(block(&(vs / format!("s{i}b0")), c_in, c, stride)).add(block(
            &(vs / format!("s{i}b1")),
            c,
            c,
            1,
        ));
        c_in = c;
    }
    let fc = linear(vs / "fc", 128, classes, true);
    nn::func_t(move |x, train| {
        x.apply_t(&stem, train)
            .relu()
            .apply_t(&stages, train)
            .adaptive_avg_pool2d([1, 1])
            .flatten(1, -1)
            .apply(&fc)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    /// The tutorial's forward pass in plain NCHW, from the same variables.
    fn reference(vs: &nn::VarStore, x: &Tensor) -> Tensor {
        let v = vs.variables();
        let conv = |x: &Tensor, l: &str| {
            x.conv2d(&v[&format!("{l}.weight")], Some(&v[&format!("{l}.bias")]), [1], [0], [1], 1)
        };
        let fc = |x: &Tensor, l: &str| x.linear(&v[&format!("{l}.weight")], Some(&v[&format!("{l}.bias")]));
        let x = conv(x, "conv1").relu().max_pool2d_default(2);
        let x = conv(&x, "conv2").relu().max_pool2d_default(2).flatten(1, -1);
        fc(&fc(&fc(&x, "fc1").relu(), "fc2").relu(), "fc3")
    }

    #[test]
    fn the_channels_last_lenet_computes_the_tutorials_values_and_gradients() {
        tch::manual_seed(3);
        let vs = nn::VarStore::new(Device::Cpu);
        let net = lenet(&vs.root(), 10);
        let x = Tensor::randn([8, 3, 32, 32], (Kind::Float, Device::Cpu));
        let y = Tensor::randint(10, [8], (Kind::Int64, Device::Cpu));
        let grads = |logits: Tensor| {
            for (_, mut v) in vs.variables() {
                v.zero_grad();
            }
            logits.cross_entropy_for_logits(&y).backward();
            let mut g: Vec<(String, Tensor)> =
                vs.variables().into_iter().map(|(k, v)| (k, v.grad().copy())).collect();
            g.sort_by(|a, b| a.0.cmp(&b.0));
            (logits.detach(), g)
        };
        let (ours, ours_g) = grads(net.forward_t(&x, true));
        let (theirs, theirs_g) = grads(reference(&vs, &x));
        assert!(ours.allclose(&theirs, 1e-5, 1e-6, false), "logits differ");
        assert_eq!(ours_g.len(), 10);
        for ((name, a), (_, b)) in ours_g.iter().zip(&theirs_g) {
            let diff = (a - b).abs().max().double_value(&[]);
            assert!(a.allclose(b, 1e-4, 1e-6, false), "{name}: gradients differ by {diff}");
        }
    }

    /// Every layer as PyTorch's `reset_parameters` leaves it: conv and linear weights and
    /// biases from U(±1/√fan_in) (so a standard deviation of bound/√3, and biases not zero),
    /// batch norms with weight 1, bias 0, running mean 0 and variance 1.
    #[test]
    fn layers_start_as_pytorchs_modules_initialise_themselves() {
        let fans: [(&str, i64); 5] =
            [("conv1", 3 * 25), ("conv2", 6 * 25), ("fc1", 400), ("fc2", 120), ("fc3", 84)];
        tch::manual_seed(11);
        let vs = nn::VarStore::new(Device::Cpu);
        let _net = lenet(&vs.root(), 10);
        let v = vs.variables();
        for (layer, fan_in) in fans {
            let bound = 1.0 / (fan_in as f64).sqrt();
            for part in ["weight", "bias"] {
                let t = &v[&format!("{layer}.{part}")];
                let max = t.abs().max().double_value(&[]);
                assert!(max <= bound, "{layer}.{part}: |value| up to {max}, bound {bound}");
                assert!(max > 0.5 * bound, "{layer}.{part}: all within {max} of 0 (bound {bound})");
                if part == "weight" {
                    let std = t.std(true).double_value(&[]);
                    let want = bound / 3f64.sqrt();
                    assert!((std / want - 1.0).abs() < 0.1, "{layer}.weight: std {std}, PyTorch's {want}");
                }
            }
        }
        let vs = nn::VarStore::new(Device::Cpu);
        let _net = resnet(&vs.root(), 10);
        let v = vs.variables();
        let mut checked = 0;
        for (name, t) in &v {
            let (min, max) = (t.min().double_value(&[]), t.max().double_value(&[]));
            if name.contains(".bn.") {
                let want = match name.rsplit('.').next().unwrap() {
                    "weight" | "running_var" => 1.0,
                    _ => 0.0,
                };
                assert!(min == want && max == want, "{name}: from {min} to {max}, PyTorch's {want}");
            } else if name.ends_with("conv.weight") {
                let [_, c_in, k, _] = t.size()[..] else { panic!("{name}: {:?}", t.size()) };
                let bound = 1.0 / ((c_in * k * k) as f64).sqrt();
                let std = t.std(true).double_value(&[]);
                assert!(min >= -bound && max <= bound, "{name}: from {min} to {max}, bound {bound}");
                assert!((std / (bound / 3f64.sqrt()) - 1.0).abs() < 0.1, "{name}: std {std}");
            } else {
                assert!(name.starts_with("fc."), "{name}: not checked");
                let bound = 1.0 / 128f64.sqrt();
                assert!(min >= -bound && max <= bound && max > 0.5 * bound, "{name}: {min} to {max}");
            }
            checked += 1;
        }
        assert!(checked > 40, "only {checked} ResNet tensors");
    }
}
