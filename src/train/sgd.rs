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
    /// `(name, variable, offset, numel)` in name order.
    params: Vec<(String, Tensor, i64, i64)>,
    flat: Tensor,
    buffer: Option<Tensor>,
    /// libtorch's own optimizer, used only for `zero_grad`: it sets gradients to none (no
    /// kernel at all) where `Tensor::zero_grad` launches one per variable.
    clear: nn::Optimizer,
}

impl Sgd {
    /// Over `vs`'s trainable variables.
    pub fn new(vs: &nn::VarStore, lr: f64, momentum: f64, weight_decay: f64) -> Self {
        let mut named: Vec<(String, Tensor)> =
            vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
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
        Sgd { lr, momentum, weight_decay, params, flat, buffer: None, clear }
    }

    /// Clears the gradients (to none, as PyTorch's `zero_grad()` does).
    pub fn zero_grad(&mut self) {
        self.clear.zero_grad();
    }

    /// One update: `d = g + wd·p; buf = m·buf + d (buf = d at first); p -= lr·buf`.
    pub fn step(&mut self) {
        tch::no_grad(|| {
            let grads: Vec<Tensor> = self
                .params
                .iter()
                .map(|(_, p, _, n)| {
                    let g = p.grad();
                    if g.defined() { g.view([*n]) } else { Tensor::zeros([*n], (Kind::Float, p.device())) }
                })
                .collect();
            let mut d = Tensor::cat(&grads, 0);
            if self.weight_decay != 0.0 {
                let _ = d.g_add_(&self.flat.g_mul_scalar(self.weight_decay));
            }
            if self.momentum != 0.0 {
                match &mut self.buffer {
                    Some(b) => {
                        let _ = b.g_mul_scalar_(self.momentum).g_add_(&d);
                    }
                    None => self.buffer = Some(d.copy()),
                }
                d = self.buffer.as_ref().unwrap().shallow_clone();
            }
            let _ = self.flat.g_sub_(&d.g_mul_scalar(self.lr));
        });
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
