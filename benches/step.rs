//! The bound for `tools/bench-train`: the tutorial's training step on tensors already in memory
//! (no loader at all), with this crate's model and optimizer. One JSON line out.
//!
//!     cargo bench --bench step -- [--batch-size 32] [--steps 500] [--device cpu|cuda]
use std::time::Instant;

use cifar_fast::train::{model, sgd::Sgd};
use tch::{Device, Kind, Tensor, nn};

fn arg(args: &[String], name: &str, default: &str) -> String {
    args.iter().position(|a| a == name).map_or(default.to_string(), |i| args[i + 1].clone())
}

/// The same allocator as `cifar-train`, so the bound is measured alike.
#[cfg(target_os = "linux")]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let b: i64 = arg(&args, "--batch-size", "32").parse().unwrap();
    let steps: usize = arg(&args, "--steps", "500").parse().unwrap();
    let device = if arg(&args, "--device", "cpu") == "cuda" { Device::Cuda(0) } else { Device::Cpu };
    tch::manual_seed(0);
    let vs = nn::VarStore::new(device);
    let net = model::lenet(&vs.root(), 10);
    let mut opt = Sgd::new(&vs, 0.001, 0.9, 0.0);
    // 64 distinct batches, cycled: in memory, on the device, already normalized.
    let xs: Vec<Tensor> = (0..64).map(|_| Tensor::randn([b, 3, 32, 32], (Kind::Float, device))).collect();
    let ys: Vec<Tensor> = (0..64).map(|_| Tensor::randint(10, [b], (Kind::Int64, device))).collect();
    let step = |i: usize, opt: &mut Sgd| {
        let loss = nn::ModuleT::forward_t(&net, &xs[i % 64], true).cross_entropy_for_logits(&ys[i % 64]);
        opt.zero_grad();
        loss.backward();
        opt.step();
        loss
    };
    for i in 0..20 {
        let _ = step(i, &mut opt);
    }
    let t = Instant::now();
    let mut last = Tensor::zeros([], (Kind::Float, device));
    for i in 0..steps {
        last = step(i, &mut opt);
    }
    let _ = last.double_value(&[]);
    let secs = t.elapsed().as_secs_f64();
    println!(
        "{{\"mode\": \"in-memory step\", \"batch_size\": {b}, \"steps\": {steps}, \"seconds\": {secs:.3}, \
         \"images_per_s\": {:.1}, \"threads\": {}}}",
        (steps as i64 * b) as f64 / secs,
        tch::get_num_threads()
    );
}
