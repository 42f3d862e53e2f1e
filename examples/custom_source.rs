//! Training from your own data: any type that implements `Source` goes through the same
//! prefetch pipeline as the CIFAR tensor files.
//!
//!     cargo run --release --example custom_source             # a generated "stripes" dataset
//!     cargo run --release --example custom_source -- DIR      # an image folder, DIR/<class>/*.png
//!
//! The real CIFAR-10 images in ../shared/data/cifar-10-jpeg.tar.gz are such a folder once
//! unpacked: `tar xzf cifar-10-jpeg.tar.gz && cargo run --release --example custom_source --
//! cifar-10-jpeg/train`.
use std::sync::Arc;

use cifar_fast::train::{model, sgd::Sgd};
use cifar_fast::{Augment, ImageFolder, Loader, Source};
use tch::nn::ModuleT;
use tch::{Device, nn};

/// 32×32 images of stripes: the class is the stripes' direction and frequency.
struct Stripes {
    len: usize,
}

impl Source for Stripes {
    fn len(&self) -> usize {
        self.len
    }

    fn sample_shape(&self) -> [usize; 3] {
        [3, 32, 32]
    }

    fn read_into(&self, index: usize, out: &mut [f32]) -> cifar_fast::Result<i64> {
        let class = index % 4;
        let freq = 1.0 + (class / 2) as f32 * 2.0;
        let phase = (index / 4) as f32 * 0.37;
        for c in 0..3 {
            for y in 0..32 {
                for x in 0..32 {
                    let t = if class.is_multiple_of(2) { x } else { y } as f32;
                    out[c * 1024 + y * 32 + x] = (t * freq * 0.2 + phase + c as f32).sin();
                }
            }
        }
        Ok(class as i64)
    }

    fn classes(&self) -> Vec<String> {
        ["vertical-wide", "horizontal-wide", "vertical-narrow", "horizontal-narrow"]
            .map(String::from)
            .to_vec()
    }
}

/// As in `cifar-train`: jemalloc for the process, libtorch included.
#[cfg(target_os = "linux")]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> anyhow::Result<()> {
    let source: Arc<dyn Source> = match std::env::args().nth(1) {
        Some(dir) => Arc::new(ImageFolder::new(dir)?),
        None => Arc::new(Stripes { len: 4000 }),
    };
    let classes = source.classes();
    println!(
        "{} samples of {:?} in {} classes: {:?}",
        source.len(),
        source.sample_shape(),
        classes.len(),
        classes
    );

    let device = Device::cuda_if_available();
    let mut loader = Loader::builder_arc(source)
        .batch_size(32)
        .num_workers(2)
        .augment(Augment { flip: true, ..Default::default() })
        .device(device)
        .build()?;
    tch::manual_seed(0);
    let vs = nn::VarStore::new(device);
    let net = model::lenet(&vs.root(), classes.len() as i64);
    let mut opt = Sgd::new(&vs, 0.01, 0.9, 0.0);
    for epoch in 0..3 {
        let (mut loss_sum, mut correct, mut seen) = (0.0, 0i64, 0usize);
        for batch in loader.iter() {
            let batch = batch?;
            let logits = net.forward_t(&batch.images, true);
            let loss = logits.cross_entropy_for_logits(&batch.labels);
            opt.zero_grad();
            loss.backward();
            opt.step();
            loss_sum += loss.double_value(&[]) * batch.len() as f64;
            correct +=
                logits.argmax(1, false).eq_tensor(&batch.labels).sum(tch::Kind::Int64).int64_value(&[]);
            seen += batch.len();
        }
        println!(
            "epoch {}: loss {:.3}, train accuracy {:.1}%",
            epoch + 1,
            loss_sum / seen as f64,
            100.0 * correct as f64 / seen as f64
        );
    }
    Ok(())
}
