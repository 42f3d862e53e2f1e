//! `cifar-train`: the PyTorch CIFAR-10 tutorial's training, on the prefetch pipeline. See `--help`.
mod common;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use cifar_fast::prep::{self, PrepOptions};
use cifar_fast::train::{self, ModelKind, Progress, TrainConfig};
use clap::{Parser, ValueEnum};
use common::say;
use tch::Device;

/// jemalloc serves the whole process, libtorch included: with the `unprefixed` feature its
/// `malloc`/`free` replace glibc's, and libtorch binds to them at load. A LeNet step allocates
/// and frees every activation and gradient, and glibc's bins spent a fifth of the training
/// thread's time in `malloc_consolidate` and `_int_free` (perf, batch 4). Measured on this
/// 2-core machine, the in-memory step ran 1.17× faster at batch 4, 1.13× at 32 and 1.12× at 256.
#[cfg(target_os = "linux")]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Train the tutorial's net on CIFAR, and show where every second went.
///
/// With no arguments: the data in ./data (prepared from a tarball there if need be), CUDA when
/// available, and the tutorial's settings (batch 4, 2 epochs, SGD lr 0.001 momentum 0.9).
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// The data directory (torchvision's `root`): the tensor files, or a tarball to make them.
    #[arg(long, default_value = "data")]
    data: PathBuf,
    /// Samples per batch.
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// Epochs.
    #[arg(long, default_value_t = 2)]
    epochs: u64,
    /// Learning rate.
    #[arg(long, default_value_t = 0.001)]
    lr: f64,
    /// SGD momentum.
    #[arg(long, default_value_t = 0.9)]
    momentum: f64,
    /// L2 weight decay.
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Loader threads (0: load on the training thread).
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Batches prepared ahead (default: 4, and at least 64 samples' worth).
    #[arg(long)]
    prefetch: Option<usize>,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Seed of the initial weights, the order and the augmentation.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Random crop (pad 4, reflect) and horizontal flip.
    #[arg(long)]
    augment: bool,
    /// Network.
    #[arg(long, value_enum, default_value_t = ModelArg::Lenet)]
    model: ModelArg,
    /// Mixed precision on CUDA (libtorch's autocast).
    #[arg(long)]
    amp: bool,
    /// Keep the whole split on the device and batch there: auto (on for CUDA), on, off.
    #[arg(long, value_enum, default_value_t = Resident::Auto)]
    resident: Resident,
    /// Directory for checkpoints (written after each epoch and on early stops).
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Continue from the checkpoint in --checkpoint.
    #[arg(long, requires = "checkpoint")]
    resume: bool,
    /// Write metrics as JSON lines to this file (the last line is the summary).
    #[arg(long)]
    metrics: Option<PathBuf>,
    /// Print the running loss every N steps (default: every 8,000 images, as the tutorial's
    /// 2,000 steps of 4).
    #[arg(long)]
    log_every: Option<usize>,
    /// CPU threads for libtorch (default: libtorch's choice).
    #[arg(long)]
    threads: Option<i32>,
    /// Stop after N steps in all (checkpointing first, if --checkpoint).
    #[arg(long)]
    max_steps: Option<usize>,
    /// Save the first training batch as the model receives it (augmented), as a PNG grid.
    #[arg(long, value_name = "PNG")]
    preview_batch: Option<PathBuf>,
    /// Draw SVG charts of the run into DIR: loss, accuracy, speed, data wait, confusion matrix.
    #[arg(long, value_name = "DIR")]
    plot: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ModelArg {
    Lenet,
    Resnet,
}

#[derive(Clone, Copy, Debug, PartialEq, ValueEnum)]
enum Resident {
    Auto,
    On,
    Off,
}

fn parse_device(s: &str) -> anyhow::Result<Device> {
    Ok(match s {
        "auto" => Device::cuda_if_available(),
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(0),
        _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => Device::Cuda(i),
            _ => bail!("--device {s:?}: expected auto, cpu, cuda or cuda:N"),
        },
    })
}

/// The prepared splits in `dir`, made from a tarball there first if they are missing.
fn find_data(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    for name in ["cifar10", "cifar100"] {
        let (train, test) =
            (dir.join(format!("{name}-train.safetensors")), dir.join(format!("{name}-test.safetensors")));
        if train.exists() && test.exists() {
            return Ok((train, test));
        }
    }
    let found = [
        "cifar-10-binary.tar.gz",
        "cifar-10-python.tar.gz",
        "cifar-10-batches-bin",
        "cifar-10-batches-py",
        "cifar-100-python.tar.gz",
    ]
    .iter()
    .map(|n| dir.join(n))
    .find(|p| p.exists());
    let Some(input) = found else {
        bail!(
            "no prepared CIFAR data in {}: run `cifar-prep --download --out {}` to fetch and prepare \
             CIFAR-10, or `cifar-prep TARBALL --out {}`",
            dir.display(),
            dir.display(),
            dir.display()
        );
    };
    say!("preparing {} (once) ...", input.display());
    let s = prep::prepare(&input, dir, &PrepOptions::default(), &indicatif::ProgressBar::hidden())?;
    let path = |i: usize| s.splits[i].path.clone();
    Ok((path(0), path(1)))
}

/// A progress bar on a terminal; plain lines otherwise.
struct Report {
    bar: Option<indicatif::ProgressBar>,
}

impl Progress for Report {
    fn epoch(&mut self, epoch: u64, steps: usize) {
        if std::io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::new(steps as u64);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "epoch {msg} [{bar:30}] {pos}/{len} steps, eta {eta}",
                )
                .unwrap()
                .progress_chars("=> "),
            );
            bar.set_message(format!("{}", epoch + 1));
            self.bar = Some(bar);
        } else {
            say!("epoch {}: {steps} steps", epoch + 1);
        }
    }

    fn step(&mut self, images_per_s: f64) {
        if let Some(bar) = &self.bar {
            bar.inc(1);
            if bar.position() % 50 == 0 {
                bar.set_message(format!(
                    "{} ({images_per_s:.0} img/s)",
                    bar.message().split(' ').next().unwrap_or("")
                ));
            }
        }
    }

    fn line(&mut self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => say!("{line}"),
        }
    }
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(args) {
        eprintln!("cifar-train: error: {e:#}");
        std::process::exit(1);
    }
    if train::INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst) {
        std::process::exit(130);
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let device = parse_device(&args.device)?;
    if let Some(n) = args.threads {
        tch::set_num_threads(n);
    }
    let (train_path, test_path) = find_data(&args.data)?;
    let resident = match args.resident {
        Resident::On => true,
        Resident::Off => false,
        // CIFAR-10 is 614 MB as f32 (154 MB as u8): it fits any CUDA device we would train on.
        Resident::Auto => device.is_cuda(),
    };
    let cfg = TrainConfig {
        model: match args.model {
            ModelArg::Lenet => ModelKind::Lenet,
            ModelArg::Resnet => ModelKind::Resnet,
        },
        batch_size: args.batch_size,
        epochs: args.epochs,
        lr: args.lr,
        momentum: args.momentum,
        weight_decay: args.weight_decay,
        workers: args.workers,
        prefetch: args.prefetch,
        device,
        seed: args.seed,
        augment: args.augment,
        amp: args.amp,
        resident,
        checkpoint: args.checkpoint.clone(),
        resume: args.resume,
        metrics: args.metrics.clone(),
        log_every: args.log_every.unwrap_or((8000 / args.batch_size).max(1)),
        max_steps: args.max_steps,
        preview_batch: args.preview_batch.clone(),
        plot: args.plot.clone(),
        ..TrainConfig::tutorial(train_path, Some(test_path))
    };
    ctrlc::set_handler(|| {
        eprintln!("\ninterrupted: finishing this step, then checkpointing");
        train::INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
    })
    .context("installing the Ctrl-C handler")?;
    say!(
        "training {} on {:?} ({}), batch {}, {} epochs, {} threads",
        cfg.model.name(),
        device,
        if resident { "data resident on the device" } else { "pipelined loader" },
        cfg.batch_size,
        cfg.epochs,
        tch::get_num_threads()
    );
    let mut report = Report { bar: None };
    let s = train::run(&cfg, &mut report)?;
    if let Some(bar) = &report.bar {
        bar.finish_and_clear();
    }
    if let Some(e) = &s.eval {
        say!(
            "Accuracy of the network on the {} test images: {:.1} %",
            e.confusion.iter().flatten().sum::<u64>(),
            100.0 * e.accuracy
        );
        for (c, a) in s.classes.iter().zip(&e.per_class) {
            say!("Accuracy for class: {c:10} is {:.1} %", 100.0 * a);
        }
    }
    let t = &s.times;
    say!(
        "{} steps, {:.0} images/s, {:.2} s per epoch; final loss {:.3}",
        s.steps,
        s.images_per_s,
        s.epoch_seconds,
        s.final_loss
    );
    if let Some(steady) = s.steady_images_per_s {
        say!(
            "warm-up: the first step took {:.1} ms; {steady:.0} images/s after it",
            1e3 * s.first_step_seconds
        );
    }
    say!(
        "step time: waiting on data {:.2}% | host-to-device copy {:.2}% | compute {:.2}%",
        100.0 * s.data_wait_share,
        100.0 * t.copy_share(),
        100.0 * t.compute_share()
    );
    for f in &s.files {
        say!("wrote {}", f.display());
    }
    if s.stopped_early {
        let at = s.position;
        match &cfg.checkpoint {
            Some(dir) => say!(
                "stopped at epoch {}, step {}; checkpoint in {} (continue with --resume)",
                at.epoch + 1,
                at.step,
                dir.display()
            ),
            None => say!("stopped at epoch {}, step {} (no --checkpoint given)", at.epoch + 1, at.step),
        }
    }
    Ok(())
}
