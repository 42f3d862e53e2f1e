//! `cifar-train`: the PyTorch CIFAR-10 tutorial's training, on the prefetch pipeline. See `--help`.
//! Arguments become a configuration, the library runs it, the summary is reported.
mod common;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use cifar_fast::Interrupt;
use cifar_fast::dist::{Launch, ProcessGroup, launch};
use cifar_fast::prep::root::{self, Prepared, Root};
use cifar_fast::train::{self, ModelKind, Progress, Summary, TrainConfig};
use clap::{Parser, ValueEnum};
use common::say;
use tch::Device;

/// jemalloc serves the whole process, libtorch included: with the `unprefixed` feature its
/// `malloc`/`free` replace glibc's, and libtorch binds to them at load. A LeNet step allocates
/// and frees every activation and gradient, and glibc's bins spent a fifth of the training
/// thread's time in `malloc_consolidate` and `_int_free` (perf, batch 4); see docs/benchmarks.md's
/// benchmarks for what it gains.
#[cfg(target_os = "linux")]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Train the tutorial's net on CIFAR, and show where every second went.
///
/// With no arguments: the data in ./data (prepared from a tarball there, or downloaded first,
/// like `download=True`), CUDA when available, and the tutorial's settings (batch 4, 10
/// epochs, SGD lr 0.001 momentum 0.9).
#[derive(Parser, Debug)]
#[command(name = "cifar-train", version, about, args_override_self = true)]
struct Args {
    /// The data directory (torchvision's `root`): the tensor files, or a tarball to make them.
    /// With neither, CIFAR-10 is downloaded into it.
    #[arg(long, default_value = "data")]
    data: PathBuf,
    /// Which prepared data in --data to train on: NAME-train.safetensors and
    /// NAME-test.safetensors (default: cifar10, cifar100, or the only pair there).
    #[arg(long, value_name = "NAME")]
    dataset: Option<String>,
    /// Where to download CIFAR-10 from when --data holds none (default: the official URL).
    #[arg(long, value_name = "URL")]
    download_url: Option<String>,
    /// The md5 that download must have (default: the official tarball's).
    #[arg(long, value_name = "HEX", requires = "download_url", value_parser = common::parse_md5)]
    download_md5: Option<String>,
    /// Samples per batch [default: 4; --recipe fast: 1024].
    #[arg(long)]
    batch_size: Option<usize>,
    /// Epochs, the tutorial's `range(10)`; a fraction trains part of the last [default: 10;
    /// --recipe fast: 9.9].
    #[arg(long, allow_negative_numbers = true)]
    epochs: Option<f64>,
    /// Learning rate [default: 0.001; --recipe fast: 11.5 per 1,024 samples].
    #[arg(long, allow_negative_numbers = true)]
    lr: Option<f64>,
    /// SGD momentum [default: 0.9; --recipe fast: 0.85].
    #[arg(long, allow_negative_numbers = true)]
    momentum: Option<f64>,
    /// L2 weight decay [default: 0; --recipe fast: 0.0153 per 1,024 samples].
    #[arg(long, allow_negative_numbers = true)]
    weight_decay: Option<f64>,
    /// Nesterov momentum (`torch.optim.SGD(nesterov=True)`; on in --recipe fast).
    #[arg(long)]
    nesterov: bool,
    /// Label smoothing of the loss, 0 to 1 (`nn.CrossEntropyLoss(label_smoothing=...)`)
    /// [default: 0; --recipe fast: 0.2].
    #[arg(long, allow_negative_numbers = true)]
    label_smoothing: Option<f64>,
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
    /// Random crop (pad 4, reflect) and horizontal flip (--recipe fast: flip and translate 2;
    /// images kept encoded: RandomResizedCrop and flip).
    #[arg(long)]
    augment: bool,
    /// Data whose images are kept encoded (photographs of every size): the side of the square
    /// the model receives (ImageNet's recipe: Resize + CenterCrop, or with --augment
    /// RandomResizedCrop + flip; testing Resize to 1/0.875 of it + CenterCrop).
    #[arg(long, value_name = "N", default_value_t = 224)]
    image_size: u32,
    /// Network [default: lenet; --recipe fast: airbench].
    #[arg(long, value_enum)]
    model: Option<ModelArg>,
    /// The training recipe. `fast` is airbench94's (see docs/cli.md): the airbench net, batch
    /// 1024, 9.9 epochs, lr 11.5 and weight decay 0.0153 per 1,024 samples, Nesterov
    /// momentum 0.85, label smoothing 0.2, flip and translate 2, test-time augmentation;
    /// options given explicitly override its values.
    #[arg(long, value_enum, default_value_t = RecipeArg::Tutorial)]
    recipe: RecipeArg,
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
    #[arg(long, requires = "checkpoint", conflicts_with = "overwrite")]
    resume: bool,
    /// Start afresh even though --checkpoint holds a checkpoint, replacing it.
    #[arg(long, requires = "checkpoint")]
    overwrite: bool,
    /// Write metrics as JSON lines to this file (the last line is the summary).
    #[arg(long)]
    metrics: Option<PathBuf>,
    /// Print the running loss every N steps (default: every 8,000 images, as the tutorial's
    /// 2,000 steps of 4, rounded up to a whole step).
    #[arg(long)]
    log_every: Option<usize>,
    /// CPU threads for libtorch (default: the cores other programs leave free, looked at once a
    /// second).
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..))]
    threads: Option<i32>,
    /// Stop after N steps in all (checkpointing first, if --checkpoint), then evaluate.
    #[arg(long)]
    max_steps: Option<usize>,
    /// Do not evaluate on the test split (neither after each epoch nor at an early stop).
    #[arg(long)]
    no_eval: bool,
    /// Write the trained model as TorchScript to this file, for `torch.jit.load`.
    #[arg(long, value_name = "FILE")]
    export: Option<PathBuf>,
    /// Save the first training batch as the model receives it (augmented), as a PNG grid.
    #[arg(long, value_name = "PNG")]
    preview_batch: Option<PathBuf>,
    /// Draw SVG charts of the run into DIR: loss, accuracy, speed, data wait, confusion matrix.
    #[arg(long, value_name = "DIR")]
    plot: Option<PathBuf>,
    /// Start N ranks on this machine and train data-parallel, as `torchrun --standalone
    /// --nproc-per-node N` would (--batch-size is each rank's). Under torchrun or srun leave it
    /// out: their variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, ...) are read.
    #[arg(long, visible_alias = "nproc_per_node", value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..))]
    nproc_per_node: Option<u16>,
    /// With --nproc-per-node: start more CPU ranks than this machine has cores (as MPI's
    /// --oversubscribe); each then trains slower than one process would.
    #[arg(long, requires = "nproc_per_node")]
    oversubscribe: bool,
    /// Data-parallel runs: seconds a rank waits for the others (to join, and at each step)
    /// before naming the rank that is gone or hangs and ending with an error.
    #[arg(long, value_name = "SECONDS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..))]
    dist_timeout: u64,
    /// Data-parallel runs: do not pin each rank to its share of this machine's cores.
    #[arg(long)]
    no_pin: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ModelArg {
    Lenet,
    Resnet,
    Airbench,
    Resnet18,
}

#[derive(Clone, Copy, Debug, PartialEq, ValueEnum)]
enum RecipeArg {
    Tutorial,
    Fast,
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

/// A progress bar on a terminal, over the whole run so its ETA is the run's; plain lines
/// otherwise.
struct Report {
    bar: Option<indicatif::ProgressBar>,
    epoch: u64,
}

impl Progress for Report {
    fn run(&mut self, steps: usize) {
        if std::io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::new(steps as u64);
            // `wide_bar` takes what the terminal's width leaves, so the line never wraps.
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg} [{wide_bar}] {human_pos}/{human_len} eta {eta}",
                )
                .expect("a valid template")
                .progress_chars("=> "),
            );
            self.bar = Some(bar);
        }
    }

    fn epoch(&mut self, epoch: u64, steps: usize) {
        self.epoch = epoch;
        match &self.bar {
            Some(bar) => bar.set_message(format!("epoch {}", epoch + 1)),
            None => say!("epoch {}: {steps} steps", epoch + 1),
        }
    }

    fn step(&mut self, images_per_s: f64) {
        if let Some(bar) = &self.bar {
            bar.inc(1);
            if bar.position() % 500 == 0 {
                bar.set_message(format!("epoch {} {images_per_s:.0} img/s", self.epoch + 1));
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
    let args = common::parse_args::<Args>();
    let interrupt = Interrupt::new();
    match run(args, &interrupt) {
        Ok(()) if interrupt.requested() => std::process::exit(130),
        Ok(()) => {}
        Err(e) if matches!(e.downcast_ref::<cifar_fast::Error>(), Some(cifar_fast::Error::Interrupted)) => {
            std::process::exit(130)
        }
        Err(e) => {
            // A rank of a data-parallel job says which it is.
            let rank = std::env::var("WORLD_SIZE").ok().and(std::env::var("RANK").ok());
            match rank {
                Some(r) => eprintln!("cifar-train: rank {r}: error: {e:#}"),
                None => eprintln!("cifar-train: error: {e:#}"),
            }
            std::process::exit(1);
        }
    }
}

/// The configuration the arguments give: the recipe's settings, with the options given
/// explicitly over them; the data paths are set once the data is found.
fn config(args: &Args, device: Device, adapt_threads: bool) -> TrainConfig {
    let mut cfg = match args.recipe {
        RecipeArg::Tutorial => TrainConfig::tutorial(PathBuf::new(), None),
        RecipeArg::Fast => TrainConfig::fast(PathBuf::new(), None),
    };
    if let Some(m) = args.model {
        cfg.model = match m {
            ModelArg::Lenet => ModelKind::Lenet,
            ModelArg::Resnet => ModelKind::Resnet,
            ModelArg::Airbench => ModelKind::Airbench,
            ModelArg::Resnet18 => ModelKind::Resnet18,
        };
    }
    cfg.batch_size = args.batch_size.unwrap_or(cfg.batch_size);
    cfg.epochs = args.epochs.unwrap_or(cfg.epochs);
    cfg.lr = args.lr.unwrap_or(cfg.lr);
    cfg.momentum = args.momentum.unwrap_or(cfg.momentum);
    cfg.weight_decay = args.weight_decay.unwrap_or(cfg.weight_decay);
    cfg.label_smoothing = args.label_smoothing.unwrap_or(cfg.label_smoothing);
    cfg.nesterov |= args.nesterov;
    cfg.augment |= args.augment;
    cfg.image_size = args.image_size;
    cfg.workers = args.workers;
    cfg.prefetch = args.prefetch;
    cfg.device = device;
    cfg.seed = args.seed;
    cfg.amp = args.amp;
    cfg.resident = match args.resident {
        Resident::On => true,
        Resident::Off => false,
        // CIFAR-10 is 614 MB as f32 (154 MB as u8): it fits any CUDA device we would train on.
        // Images kept encoded are decoded by the loader's workers instead.
        Resident::Auto => device.is_cuda() && !cifar_fast::store::is_encoded(&cfg.train).unwrap_or(false),
    };
    cfg.checkpoint = args.checkpoint.clone();
    cfg.resume = args.resume;
    cfg.overwrite = args.overwrite;
    cfg.eval = !args.no_eval;
    cfg.export = args.export.clone();
    cfg.metrics = args.metrics.clone();
    cfg.log_every = args.log_every;
    cfg.max_steps = args.max_steps;
    cfg.adapt_threads = adapt_threads;
    cfg.preview_batch = args.preview_batch.clone();
    cfg.plot = args.plot.clone();
    cfg
}

/// The data directory as `--data`, `--dataset` and the download options describe it.
fn data_root(args: &Args) -> Root {
    let mut root = Root::new(&args.data);
    root.dataset = args.dataset.clone();
    if let Some(url) = &args.download_url {
        let md5 =
            args.download_md5.clone().unwrap_or_else(|| root::official(args.dataset.as_deref()).md5.into());
        root.download_from = Some((url.clone(), md5));
    }
    root
}

/// The prepared splits in `--data`, found or made there once (`download=True`).
fn find_data(args: &Args) -> anyhow::Result<Prepared> {
    let bar = common::progress_bar(0, "data");
    let found = root::find_or_prepare(&data_root(args), &mut |line| say!("{line}"), &bar);
    bar.finish_and_clear();
    Ok(found?)
}

fn run(args: Args, interrupt: &Interrupt) -> anyhow::Result<()> {
    let launch = Launch::from_env()?;
    let nproc = args.nproc_per_node.map_or(1, usize::from);
    if nproc > 1 && launch.is_some() {
        bail!(
            "--nproc-per-node starts ranks itself: leave it out under torchrun or srun (RANK and \
             WORLD_SIZE are set here)"
        );
    }
    // A rank on CUDA trains on its own GPU, LOCAL_RANK.
    let device = parse_device(&args.device)?;
    let device = launch.as_ref().map_or(device, |l| l.device(device));
    let local_ranks = launch.as_ref().map_or(nproc, |l| l.local_world);
    // Before any thread of ours starts, so that all of them inherit the pinning.
    let threads = train::set_up_threads(launch.as_ref(), local_ranks, args.threads, !args.no_pin);
    let mut cfg = config(&args, device, threads.adapt);
    // Settings and paths are checked before any data is fetched, prepared or trained on; a
    // rank's verdict reaches the other ranks once it has joined them (below), so that one
    // rank's bad setting stops them all at once, naming it.
    let checked = cfg.check();
    let main = launch.as_ref().is_none_or(|l| l.rank == 0);
    let on_signal = interrupt.clone();
    ctrlc::set_handler(move || {
        // Once, and from one process: every rank of a local job gets the terminal's Ctrl-C.
        if on_signal.request() && main {
            eprintln!("\ninterrupted: finishing this step, then checkpointing");
        }
    })
    .context("installing the Ctrl-C handler")?;
    if nproc > 1 {
        checked?;
        if args.recipe == RecipeArg::Fast {
            bail!("--recipe fast trains in one process: leave out --nproc-per-node");
        }
        if !device.is_cuda() {
            launch::check_local_ranks(nproc, args.oversubscribe)?;
        }
        if device.is_cuda() && nproc as i64 > tch::Cuda::device_count() {
            bail!(
                "--nproc-per-node {nproc} on CUDA takes one GPU a rank, and there are {} here (use \
                 --device cpu, or fewer ranks)",
                tch::Cuda::device_count()
            );
        }
        // The launcher: the data is made once, here, before the ranks look for it. Past the
        // timeout the ranks name the failed one themselves; a few seconds more for that.
        find_data(&args)?;
        let grace = Duration::from_secs(args.dist_timeout + 10);
        return Ok(launch::relaunch_self(nproc, grace, interrupt)?);
    }
    let (group, data) = match &launch {
        None => {
            checked?;
            (None, find_data(&args)?)
        }
        Some(l) => {
            let g = ProcessGroup::join_within(l, device, Duration::from_secs(args.dist_timeout), interrupt)?;
            g.exchange("check", checked.map(|()| String::new()).map_err(|e| e.to_string()))?;
            let data = rank_data(&g, l.local_rank == 0, &args)?;
            (Some(g), data)
        }
    };
    (cfg.train, cfg.test) = (data.train, Some(data.test));
    if main {
        announce(&cfg, group.as_ref(), threads.pinned.as_deref());
    }
    let mut report = Report { bar: None, epoch: 0 };
    let s = match train::run(&cfg, group.as_ref(), &mut report, interrupt) {
        Ok(s) => s,
        Err(e) => {
            // The others will name this rank, with why, when their next step fails.
            if let Some(g) = group.as_ref().filter(|_| !matches!(e, cifar_fast::Error::Distributed(_))) {
                g.report_failure(&e.to_string());
            }
            return Err(e.into());
        }
    };
    if let Some(bar) = &report.bar {
        bar.finish_and_clear();
    }
    if main {
        summarize(&s, &cfg);
    }
    Ok(())
}

/// A rank's data: one rank a machine prepares what is not there yet, the others wait for it,
/// then look. Either step failing on any rank ends every rank, naming it.
fn rank_data(g: &ProcessGroup, prepares: bool, args: &Args) -> anyhow::Result<Prepared> {
    let outcome = |d: &anyhow::Result<Prepared>| match d {
        Ok(_) => Ok(String::new()),
        Err(e) => Err(format!("{e:#}")),
    };
    let prepared = prepares.then(|| find_data(args));
    g.exchange("prepared", prepared.as_ref().map_or(Ok(String::new()), outcome))?;
    let found = prepared.unwrap_or_else(|| find_data(args));
    g.exchange("data", outcome(&found))?;
    found
}

/// The run's first line: what trains where, how.
fn announce(cfg: &TrainConfig, group: Option<&ProcessGroup>, pinned: Option<&[usize]>) {
    let ranks = match group {
        Some(g) => format!(" per rank × {} ranks ({})", g.world(), g.backend()),
        None => String::new(),
    };
    let threads = tch::get_num_threads();
    say!(
        "training {} on {:?} ({}), batch {}{ranks}, {} epochs, {threads} thread{}{}",
        cfg.model.name(),
        cfg.device,
        if cfg.resident { "data resident on the device" } else { "pipelined loader" },
        cfg.batch_size,
        cfg.epochs,
        if threads == 1 { "" } else { "s" },
        if group.is_some() { " each" } else { "" }
    );
    if let Some(cores) = pinned {
        say!("ranks pinned to their share of the cores (rank 0: {cores:?}; --no-pin to leave them free)");
    }
}

/// The tutorial's closing lines (accuracy overall and per class), then where the time went.
fn summarize(s: &Summary, cfg: &TrainConfig) {
    if let Some(e) = &s.eval {
        say!("Accuracy of the network on the {} test images: {:.1} %", e.total, 100.0 * e.accuracy);
        for (c, a) in s.classes.iter().zip(&e.per_class) {
            say!("Accuracy for class: {c:10} is {:.1} %", 100.0 * a);
        }
    }
    let t = &s.times;
    let per_epoch = s.epoch_seconds.map(|e| format!(", {e:.2} s per epoch")).unwrap_or_default();
    let job = if s.ranks > 1 { format!(" (all {} ranks)", s.ranks) } else { String::new() };
    say!("{} steps, {:.0} images/s{job}{per_epoch}; final loss {:.3}", s.steps, s.images_per_s, s.final_loss);
    if let Some(steady) = s.steady_images_per_s {
        say!(
            "warm-up: the first step took {:.1} ms; {steady:.0} images/s after it",
            1e3 * s.first_step_seconds
        );
    }
    let comm =
        if s.ranks > 1 { format!(" | communication {:.2}%", 100.0 * t.comm_share()) } else { String::new() };
    say!(
        "step time: waiting on data {:.2}% | host-to-device copy {:.2}% | compute {:.2}%{comm}",
        100.0 * s.data_wait_share,
        100.0 * t.copy_share(),
        100.0 * t.compute_share()
    );
    for f in &s.files {
        say!("wrote {}", f.display());
    }
    for (chart, why) in &s.not_drawn {
        say!("not drawn: {chart}: {why}");
    }
    if s.stopped_early {
        let (epoch, step) = s.position.numbered(s.per_epoch);
        match &cfg.checkpoint {
            Some(dir) => say!(
                "stopped at epoch {epoch}, step {step}; checkpoint in {} (continue with --resume)",
                dir.display()
            ),
            None => say!("stopped at epoch {epoch}, step {step} (no --checkpoint given)"),
        }
    }
}
