//! SGD with momentum and weight decay, as `torch.optim.SGD` computes it. Written here rather
//! than taken from `tch::nn::Sgd` because that one keeps its momentum inside libtorch where a
//! checkpoint cannot reach it, and a resumed run must continue with the same momentum.
//!
//! All parameters live in one flat buffer (each variable is re-pointed at its slice), so an
//! update is a handful of kernels over the whole model, as PyTorch's `foreach` SGD does,
//! instead of four per variable: on a GPU a LeNet step is bound by kernel launches.
use tch::{Kind, Tensor, nn};

/// The optimizer's settings, the flat parameter buffer and the flat momentum buffer.
pub struct Sgd {
    /// Learning rate.
    pub lr: f64,
    /// Momentum factor (0 for none).
    pub momentum: f64,
    /// L2 penalty added to the gradients.
    pub weight_decay: f64,
    /// Nesterov momentum (`torch.optim.SGD(nesterov=True)`): the step is `d + m·buf` rather
    /// than `buf`. Off by default.
    pub nesterov: bool,
    /// Per element of the flat buffer (name order), a multiplier of `lr` (parameter groups
    /// with their own rates, as the fast recipe's batch-norm biases); `None`: 1 for all.
    pub(crate) lr_scale: Option<Tensor>,
    /// Per element, the weight decay in place of `weight_decay` (a group's own); `None`: the
    /// scalar for all.
    pub(crate) decay: Option<Tensor>,
    /// `(name, variable, offset, numel)` in name order.
    params: Vec<(String, Tensor, i64, i64)>,
    flat: Tensor,
    buffer: Option<Tensor>,
    /// libtorch's own optimizer, used only for `zero_grad`: it sets gradients to none (no
    /// kernel at all) where `Tensor::zero_grad` launches one per variable.
    clear: nn::Optimizer,
    /// `momentum` and `-lr` as 0-dim tensors on the device, the multipliers of the two fused
    /// updates; remade when the public fields change.
    factors: Option<(f64, f64, Tensor, Tensor)>,
}

impl Sgd {
    /// Over `vs`'s trainable variables.
    pub fn new(vs: &nn::VarStore, lr: f64, momentum: f64, weight_decay: f64) -> Self {
        let named: Vec<(String, Tensor)> =
            super::model::variables_by_name(vs).into_iter().filter(|(_, t)| t.requires_grad()).collect();
        let total: i64 = named.iter().map(|(_, t)| t.numel() as i64).sum();
        let flat = Tensor::zeros([total], (Kind::Float, vs.device()));
        let mut params = Vec::with_capacity(named.len());
        let mut offset = 0;
        tch::no_grad(|| {
            for (name, mut t) in named {
                let n = t.numel() as i64;
                let mut slice = flat.narrow(0, offset, n).view(t.size().as_slice());
                slice.copy_(&t);
                t.set_data(&slice);
                params.push((name, t, offset, n));
                offset += n;
            }
        });
        let clear =
            nn::OptimizerConfig::build(nn::Sgd::default(), vs, 0.0).expect("an optimizer over the variables");
        Sgd {
            lr,
            momentum,
            weight_decay,
            nesterov: false,
            lr_scale: None,
            decay: None,
            params,
            flat,
            buffer: None,
            clear,
            factors: None,
        }
    }

    /// Clears the gradients (to none, as PyTorch's `zero_grad()` does).
    pub fn zero_grad(&mut self) {
        self.clear.zero_grad();
    }

    /// One update: `d = g + wd·p; buf = m·buf + d (buf = d at first); p -= lr·buf` (with
    /// [`Sgd::nesterov`], `p -= lr·(d + m·buf)`).
    ///
    /// The momentum and parameter updates are one `addcmul` kernel each (by a 0-dim tensor),
    /// where `mul_`/`add_` and `mul`/`sub_` took two: on the CPU 1.05× the whole batch-4 step,
    /// and two launches fewer on a GPU, where a LeNet step is bound by launches.
    pub fn step(&mut self) {
        let none = |_: &Tensor| Ok::<_, std::convert::Infallible>(());
        let _ = self.step_with(&[], none).unwrap_or_else(|e| match e {});
    }

    /// [`Sgd::step`], with the gradient of all parameters, flat in name order and followed by
    /// the values of `extra` (0-dim tensors), reduced in place by `reduce` first: data-parallel
    /// training sums it over the ranks there, one collective for the whole model and whatever
    /// the ranks must agree on. Returns the reduced extras, `[extra.len()]`. An error from
    /// `reduce` leaves the parameters untouched.
    pub fn step_with<E>(
        &mut self,
        extra: &[Tensor],
        reduce: impl FnOnce(&Tensor) -> Result<(), E>,
    ) -> Result<Tensor, E> {
        if !matches!(&self.factors, Some((m, lr, ..)) if *m == self.momentum && *lr == self.lr) {
            let scalar = |v: f64| Tensor::from(v as f32).to_device(self.flat.device());
            self.factors = Some((self.momentum, self.lr, scalar(self.momentum), scalar(-self.lr)));
        }
        let (.., momentum, neg_lr) = self.factors.as_ref().unwrap();
        tch::no_grad(|| -> Result<Tensor, E> {
            let mut parts: Vec<Tensor> = self
                .params
                .iter()
                .map(|(_, p, _, n)| {
                    let g = p.grad();
                    if g.defined() { g.view([*n]) } else { Tensor::zeros([*n], (Kind::Float, p.device())) }
                })
                .collect();
            parts.extend(extra.iter().map(|t| t.reshape([1])));
            let all = Tensor::cat(&parts, 0);
            reduce(&all)?;
            let n = self.flat.numel() as i64;
            let mut d = all.narrow(0, 0, n);
            match &self.decay {
                Some(w) => {
                    let _ = d.addcmul_(&self.flat, w);
                }
                None if self.weight_decay != 0.0 => {
                    let _ = d.g_add_(&self.flat.g_mul_scalar(self.weight_decay));
                }
                None => {}
            }
            if self.momentum != 0.0 {
                match &mut self.buffer {
                    // buf = d + m·buf, written over buf (an output may alias an input of an
                    // elementwise kernel element for element).
                    Some(b) => {
                        let _ = d.addcmul_out(b, b, momentum);
                    }
                    None => self.buffer = Some(d.copy()),
                }
                let b = self.buffer.as_ref().unwrap();
                if self.nesterov {
                    // d + m·buf, over d (the reduced gradient, no longer needed as such).
                    let _ = d.addcmul_(b, momentum);
                } else {
                    d = b.shallow_clone();
                }
            }
            let _ = match &self.lr_scale {
                Some(scale) => self.flat.addcmul_(&d, &(scale * neg_lr)),
                None => self.flat.addcmul_(&d, neg_lr),
            };
            Ok(all.narrow(0, n, extra.len() as i64))
        })
    }

    /// The variables in the flat buffer's order, with their lengths: `(name, numel)`.
    pub fn layout(&self) -> impl Iterator<Item = (&str, i64)> {
        self.params.iter().map(|(name, _, _, n)| (name.as_str(), *n))
    }

    /// All parameters, flat in name order (a view the variables share: writing it writes them).
    pub fn flat_params(&self) -> &Tensor {
        &self.flat
    }

    /// The momentum buffer, flat in name order (`None` before the first step).
    pub fn flat_momentum(&self) -> Option<&Tensor> {
        self.buffer.as_ref()
    }

    /// Makes the momentum buffer exist (zeros where there was none), so that it can be
    /// overwritten in place, as a broadcast does.
    pub fn ensure_momentum(&mut self) -> &Tensor {
        self.buffer.get_or_insert_with(|| self.flat.zeros_like())
    }

    /// The momentum buffer by variable name (for a checkpoint); empty before the first step.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let Some(b) = &self.buffer else { return Vec::new() };
        self.params
            .iter()
            .map(|(name, p, off, n)| (name.clone(), b.narrow(0, *off, *n).view(p.size().as_slice())))
            .collect()
    }

    /// Restores what [`Sgd::state`] saved: every variable's momentum, or none.
    pub fn load_state(&mut self, state: Vec<(String, Tensor)>) -> Result<(), String> {
        if state.is_empty() {
            self.buffer = None;
            return Ok(());
        }
        let buffer = self.flat.zeros_like();
        let mut seen = 0;
        for (name, t) in state {
            let Some((_, p, off, n)) = self.params.iter().find(|(n, ..)| *n == name) else {
                return Err(format!("momentum for unknown variable {name}"));
            };
            if t.size() != p.size() {
                return Err(format!("momentum for {name} has shape {:?}", t.size()));
            }
            buffer.narrow(0, *off, *n).copy_(&t.view([*n]).to_device(buffer.device()));
            seen += 1;
        }
        if seen != self.params.len() {
            return Err(format!("momentum for {seen} of {} variables", self.params.len()));
        }
        self.buffer = Some(buffer);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `torch.optim.SGD`'s update, written out per variable: `d = g + wd·p`, `buf = m·buf + d`
    /// (`buf = d` on the first step), `p -= lr·buf`.
    #[test]
    fn steps_match_torch_sgd_per_variable() {
        steps_match(false);
    }

    /// With `nesterov=True`: `p -= lr·(d + m·buf)`.
    #[test]
    fn nesterov_steps_match_torch_sgd_per_variable() {
        steps_match(true);
    }

    /// Parameter groups as `torch.optim.SGD` takes them: per group `lr_g` and `wd_g`, here as
    /// per-element multipliers and decays over the flat buffer.
    #[test]
    fn per_element_rates_and_decays_are_parameter_groups() {
        tch::manual_seed(0);
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let net = nn::linear(vs.root() / "fc", 4, 2, Default::default());
        let mut opt = Sgd::new(&vs, 0.1, 0.9, 0.0);
        opt.nesterov = true;
        // Name order: fc.bias (2), then fc.weight (8).
        let (scale, decay) = ([4.0f32, 4.0], [0.02f32, 0.02]);
        let scales: Vec<f32> = scale.iter().copied().chain([1.0; 8]).collect();
        let decays: Vec<f32> = decay.iter().copied().chain([0.01; 8]).collect();
        opt.lr_scale = Some(Tensor::from_slice(&scales));
        opt.decay = Some(Tensor::from_slice(&decays));
        let groups = [("fc.bias", 0.4, 0.02), ("fc.weight", 0.1, 0.01)];
        let mut expected: Vec<Tensor> =
            groups.iter().map(|(n, ..)| vs.variables()[*n].detach().copy()).collect();
        let mut bufs: Vec<Option<Tensor>> = vec![None, None];
        for step in 0..3 {
            let x = (Tensor::arange(12, (Kind::Float, tch::Device::Cpu)) * (0.3 + step as f64))
                .cos()
                .view([3, 4]);
            opt.zero_grad();
            nn::Module::forward(&net, &x).square().sum(Kind::Float).backward();
            let vars = vs.variables();
            for (i, (name, lr, wd)) in groups.iter().enumerate() {
                let d = vars[*name].grad() + &expected[i] * *wd;
                let b = match bufs[i].take() {
                    Some(b) => b * 0.9 + &d,
                    None => d.copy(),
                };
                expected[i] = &expected[i] - (&d + &b * 0.9) * *lr;
                bufs[i] = Some(b);
            }
            opt.step();
        }
        let vars = vs.variables();
        for (i, (name, ..)) in groups.iter().enumerate() {
            // Within rounding (fused kernels round a multiply-add once), as the test above.
            let diff = (&vars[*name] - &expected[i]).abs().max().double_value(&[]);
            let scale = expected[i].abs().max().double_value(&[]);
            assert!(diff <= 1e-5 * (1.0 + scale), "{name} differs by {diff} (values up to {scale})");
        }
    }

    fn steps_match(nesterov: bool) {
        tch::manual_seed(0);
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let net = nn::linear(vs.root() / "fc", 5, 3, Default::default());
        let mut opt = Sgd::new(&vs, 0.1, 0.9, 0.01);
        opt.nesterov = nesterov;
        let mut expected: Vec<(String, Tensor)> =
            vs.variables().into_iter().map(|(n, t)| (n, t.detach().copy())).collect();
        expected.sort_by(|a, b| a.0.cmp(&b.0));
        let mut bufs: Vec<Option<Tensor>> = expected.iter().map(|_| None).collect();
        for step in 0..4 {
            if step == 2 {
                opt.lr = 0.05; // a schedule changing the rate between steps
            }
            // Fixed inputs: the other unit tests share libtorch's global generator.
            let x = (Tensor::arange(40, (Kind::Float, tch::Device::Cpu)) * (0.37 + step as f64))
                .sin()
                .view([8, 5]);
            opt.zero_grad();
            nn::Module::forward(&net, &x).square().sum(Kind::Float).backward();
            let vars = vs.variables();
            for ((name, p), buf) in expected.iter_mut().zip(bufs.iter_mut()) {
                let d = vars[name].grad() + &*p * 0.01;
                let b = match buf.take() {
                    Some(b) => b * 0.9 + &d,
                    None => d.copy(),
                };
                let step = if nesterov { &d + &b * 0.9 } else { b.shallow_clone() };
                *p = &*p - step * opt.lr;
                *buf = Some(b);
            }
            opt.step();
        }
        let vars = vs.variables();
        for (name, p) in &expected {
            // Within rounding: the fused kernels may round a multiply-add once where two ops
            // round twice.
            let diff = (&vars[name] - p).abs().max().double_value(&[]);
            let scale = p.abs().max().double_value(&[]);
            assert!(diff <= 1e-6 * (1.0 + scale), "{name} differs by {diff} (values up to {scale})");
        }
    }
}
