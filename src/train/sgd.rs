//! SGD with momentum and weight decay, as `torch.optim.SGD` computes it. Written here rather
//! than taken from `tch::nn::Sgd` because that one keeps its momentum inside libtorch where a
//! checkpoint cannot reach it, and a resumed run must continue with the same momentum.
use tch::{Tensor, nn};

/// The optimizer's settings and its momentum buffers, one per trainable variable by name.
pub struct Sgd {
    /// Learning rate.
    pub lr: f64,
    /// Momentum factor (0 for none).
    pub momentum: f64,
    /// L2 penalty added to the gradients.
    pub weight_decay: f64,
    params: Vec<(String, Tensor)>,
    buffers: Vec<Option<Tensor>>,
}

impl Sgd {
    /// Over `vs`'s trainable variables, in name order.
    pub fn new(vs: &nn::VarStore, lr: f64, momentum: f64, weight_decay: f64) -> Self {
        let mut params: Vec<(String, Tensor)> =
            vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
        params.sort_by(|a, b| a.0.cmp(&b.0));
        let buffers = params.iter().map(|_| None).collect();
        Sgd { lr, momentum, weight_decay, params, buffers }
    }

    /// Clears the gradients.
    pub fn zero_grad(&mut self) {
        for (_, p) in &mut self.params {
            p.zero_grad();
        }
    }

    /// One update: `d = g + wd·p; buf = m·buf + d (buf = d at first); p -= lr·buf`.
    pub fn step(&mut self) {
        tch::no_grad(|| {
            for ((_, p), buf) in self.params.iter_mut().zip(&mut self.buffers) {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let mut d = if self.weight_decay != 0.0 { g + p.g_mul_scalar(self.weight_decay) } else { g };
                if self.momentum != 0.0 {
                    match buf {
                        Some(b) => {
                            let _ = b.g_mul_scalar_(self.momentum).g_add_(&d);
                        }
                        None => *buf = Some(d.detach().copy()),
                    }
                    d = buf.as_ref().unwrap().shallow_clone();
                }
                let _ = p.g_add_(&d.g_mul_scalar(-self.lr));
            }
        });
    }

    /// The momentum buffers that exist, by variable name (for a checkpoint).
    pub fn state(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .zip(&self.buffers)
            .filter_map(|((n, _), b)| b.as_ref().map(|b| (n.clone(), b.shallow_clone())))
            .collect()
    }

    /// Restores buffers saved by [`Sgd::state`]; unknown names or shapes are an error.
    pub fn load_state(&mut self, state: Vec<(String, Tensor)>) -> Result<(), String> {
        for (name, t) in state {
            let Some(i) = self.params.iter().position(|(n, _)| *n == name) else {
                return Err(format!("momentum for unknown variable {name}"));
            };
            if t.size() != self.params[i].1.size() {
                return Err(format!("momentum for {name} has shape {:?}", t.size()));
            }
            self.buffers[i] = Some(t.to_device(self.params[i].1.device()));
        }
        Ok(())
    }
}
