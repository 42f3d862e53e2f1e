//! `cifar-train`: the PyTorch CIFAR-10 tutorial's training, on the prefetch pipeline. See `--help`.
mod common;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use cifar_fast::dist::{Launch, ProcessGroup, launch};
use cifar_fast::prep::{self, PrepOptions, download};
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
    #[arg(long, value_name = "HEX", requires = "download_url")]
    download_md5: Option<String>,
    /// Samples per batch.
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// Epochs (the tutorial's `range(10)`).
    #[arg(long, default_value_t = 10)]
    epochs: u64,
    /// Learning rate.
    #[arg(long, default_value_t = 0.001, allow_negative_numbers = true)]
    lr: f64,
    /// SGD momentum.
    #[arg(long, default_value_t = 0.9, allow_negative_numbers = true)]
    momentum: f64,
    /// L2 weight decay.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    weight_decay: f64,
    /// Nesterov momentum (`torch.optim.SGD(nesterov=True)`).
    #[arg(long)]
    nesterov: bool,
    /// Label smoothing of the loss, 0 to 1 (`nn.CrossEntropyLoss(label_smoothing=...)`).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    label_smoothing: f64,
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
    /// The training recipe. `fast` is airbench94's (see the README): the airbench net, batch
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
    /// 2,000 steps of 4).
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

/// Prepared pairs in `dir`: the names NAME with both NAME-train and NAME-test tensor files.
fn prepared_pairs(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().to_str()?.strip_suffix("-train.safetensors").map(String::from))
        .filter(|n| !n.starts_with('.') && dir.join(format!("{n}-test.safetensors")).exists())
        .collect();
    names.sort();
    names
}

/// The CIFAR inputs `cifar-train` prepares by itself when found in the data directory.
const TARBALLS: [&str; 5] = [
    "cifar-10-binary.tar.gz",
    "cifar-10-python.tar.gz",
    "cifar-10-batches-bin",
    "cifar-10-batches-py",
    "cifar-100-python.tar.gz",
];

/// The real CIFAR-10 images beside the checkout (`../shared/data`), for machines without a
/// network: looked for from the working directory, then from the checkout this binary was
/// built in (`<checkout>/target/release/cifar-train`).
fn shared_images() -> Option<PathBuf> {
    let rel = Path::new("../shared/data/cifar-10-jpeg.tar.gz");
    let checkout =
        std::env::current_exe().ok().and_then(|exe| Some(exe.parent()?.parent()?.parent()?.to_path_buf()));
    std::iter::once(rel.to_path_buf()).chain(checkout.map(|c| c.join(rel))).find(|p| p.is_file())
}

/// The train and test files to use: prepared data in `--data`, else made there once, as
/// torchvision's `download=True` does: from a CIFAR tarball already there, else from the
/// official download (md5-checked), else, where the download fails (no network), from the real
/// images in `../shared/data`.
fn find_data(args: &Args) -> anyhow::Result<(PathBuf, PathBuf)> {
    let dir = &args.data;
    let pairs = prepared_pairs(dir);
    let pick = match &args.dataset {
        Some(name) => pairs.iter().find(|n| *n == name),
        None => ["cifar10", "cifar100"]
            .iter()
            .find_map(|want| pairs.iter().find(|n| n == want))
            .or(if pairs.len() == 1 { pairs.first() } else { None }),
    };
    let files = |name: &str| {
        (dir.join(format!("{name}-train.safetensors")), dir.join(format!("{name}-test.safetensors")))
    };
    if let Some(name) = pick {
        return Ok(files(name));
    }
    match args.dataset.as_deref() {
        None if pairs.len() > 1 => {
            bail!(
                "{} holds several prepared datasets ({}): choose one with --dataset NAME",
                dir.display(),
                pairs.join(", ")
            )
        }
        None | Some("cifar10") | Some("cifar100") => {}
        Some(other) => bail!(
            "no prepared dataset {other:?} in {} (no {other}-train.safetensors and {other}-test.safetensors){}",
            dir.display(),
            if pairs.is_empty() { String::new() } else { format!("; there are: {}", pairs.join(", ")) }
        ),
    }
    let prepare = |input: &Path, name: Option<&str>| -> anyhow::Result<(PathBuf, PathBuf)> {
        say!("preparing {} (once) ...", input.display());
        let opts = PrepOptions { name: name.map(String::from), ..PrepOptions::default() };
        let bar = common::progress_bar(0, "prepare");
        let s = prep::prepare(input, dir, &opts, &bar)?;
        bar.finish_and_clear();
        let find = |split: &str| s.splits.iter().find(|x| x.split == split).map(|x| x.path.clone());
        match (find("train"), find("test")) {
            (Some(train), Some(test)) => Ok((train, test)),
            _ => bail!("{}: has no train and test splits", input.display()),
        }
    };
    let want100 = args.dataset.as_deref() == Some("cifar100");
    if let Some(input) = TARBALLS
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.exists() && p.to_string_lossy().contains("100") == want100)
    {
        return prepare(&input, None);
    }
    let official = &download::OFFICIAL[if want100 { 2 } else { 0 }];
    let url = args.download_url.as_deref().unwrap_or(official.url);
    let md5 = args.download_md5.as_deref().unwrap_or(official.md5);
    say!("no CIFAR data in {}: downloading {url}", dir.display());
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let bar = common::progress_bar(0, "download");
    let got = download::download(url, md5, &dir.join(official.file), download::STALL, &bar);
    bar.finish_and_clear();
    match (got, shared_images()) {
        (Ok(tarball), _) => {
            say!("downloaded {} (md5 {md5} verified)", tarball.display());
            prepare(&tarball, None)
        }
        (Err(e), Some(jpeg)) if !want100 => {
            say!("{e}; using the real CIFAR-10 images in {} instead", jpeg.display());
            prepare(&jpeg, Some("cifar10"))
        }
        (Err(e), _) => bail!(
            "no CIFAR data in {dir}, and {e}. Put {file} in {dir} (or any CIFAR tarball), or run \
             `cifar-prep TARBALL --out {dir}`",
            dir = dir.display(),
            file = official.file
        ),
    }
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
    if let Err(e) = run(args) {
        if matches!(e.downcast_ref::<cifar_fast::Error>(), Some(cifar_fast::Error::Interrupted)) {
            std::process::exit(130);
        }
        // A rank of a data-parallel job says which it is.
        let rank = std::env::var("WORLD_SIZE").ok().and(std::env::var("RANK").ok());
        match rank {
            Some(r) => eprintln!("cifar-train: rank {r}: error: {e:#}"),
            None => eprintln!("cifar-train: error: {e:#}"),
        }
        std::process::exit(1);
    }
    if train::INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst) {
        std::process::exit(130);
    }
}

fn run(args: Args) -> anyhow::Result<()> {
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
    // Before any thread of ours starts, so that all of them inherit it.
    let pinned = match &launch {
        Some(l) if l.local_world > 1 && !args.no_pin => {
            cifar_fast::dist::pin_to_share(l.local_rank, l.local_world)
        }
        _ => None,
    };
    match args.threads {
        Some(n) => tch::set_num_threads(n),
        // Ranks on one machine share its cores: OMP_NUM_THREADS where the launcher set it
        // (torchrun sets 1), else each its part, fixed (the governor would take the other
        // ranks for other programs).
        None if local_ranks > 1 => {
            let cores = std::thread::available_parallelism().map_or(1, usize::from);
            let omp = std::env::var("OMP_NUM_THREADS").ok().and_then(|v| v.parse::<usize>().ok());
            let share = pinned.as_ref().map_or(cores / local_ranks, Vec::len);
            tch::set_num_threads(omp.unwrap_or(share).max(1) as i32);
        }
        None => {}
    }
    let resident = match args.resident {
        Resident::On => true,
        Resident::Off => false,
        // CIFAR-10 is 614 MB as f32 (154 MB as u8): it fits any CUDA device we would train on.
        Resident::Auto => device.is_cuda(),
    };
    let mut cfg = TrainConfig {
        model: match args.model {
            ModelArg::Lenet => ModelKind::Lenet,
            ModelArg::Resnet => ModelKind::Resnet,
            ModelArg::Airbench => ModelKind::Airbench,
        },
        batch_size: args.batch_size,
        epochs: args.epochs,
        lr: args.lr,
        momentum: args.momentum,
        weight_decay: args.weight_decay,
        nesterov: args.nesterov,
        label_smoothing: args.label_smoothing,
        workers: args.workers,
        prefetch: args.prefetch,
        device,
        seed: args.seed,
        augment: args.augment,
        amp: args.amp,
        resident,
        checkpoint: args.checkpoint.clone(),
        resume: args.resume,
        overwrite: args.overwrite,
        eval: !args.no_eval,
        export: args.export.clone(),
        metrics: args.metrics.clone(),
        log_every: args.log_every.unwrap_or(8000usize.checked_div(args.batch_size).unwrap_or(1).max(1)),
        max_steps: args.max_steps,
        adapt_threads: args.threads.is_none() && local_ranks == 1,
        preview_batch: args.preview_batch.clone(),
        plot: args.plot.clone(),
        ..TrainConfig::tutorial(PathBuf::new(), None)
    };
    if args.recipe == RecipeArg::Fast {
        fast_recipe(&mut cfg);
    }
    // Settings and paths are checked before any data is fetched, prepared or trained on; a
    // rank's verdict reaches the other ranks once it has joined them (below), so that one
    // rank's bad setting stops them all at once, naming it.
    let checked = match (launch.is_none(), check_settings(&cfg, &args)) {
        (true, verdict) => Ok(verdict?),
        (false, verdict) => verdict.map_err(|e| format!("{e:#}")),
    };
    let main = launch.as_ref().is_none_or(|l| l.rank == 0);
    ctrlc::set_handler(move || {
        // Once, and from one process: every rank of a local job gets the terminal's Ctrl-C.
        if !train::INTERRUPTED.swap(true, std::sync::atomic::Ordering::SeqCst) && main {
            eprintln!("\ninterrupted: finishing this step, then checkpointing");
        }
    })
    .context("installing the Ctrl-C handler")?;
    if nproc > 1 {
        if args.recipe == RecipeArg::Fast {
            bail!("--recipe fast trains in one process: leave out --nproc-per-node");
        }
        if device.is_cuda() && nproc as i64 > tch::Cuda::device_count() {
            bail!(
                "--nproc-per-node {nproc} on CUDA takes one GPU a rank, and there are {} here (use \
                 --device cpu, or fewer ranks)",
                tch::Cuda::device_count()
            );
        }
        // The launcher: the data is made once, here, before the ranks look for it.
        find_data(&args)?;
        return launch_ranks(nproc, Duration::from_secs(args.dist_timeout));
    }
    let group = match &launch {
        Some(l) => Some(Arc::new(ProcessGroup::join(l, device, Duration::from_secs(args.dist_timeout))?)),
        None => None,
    };
    if let Some(g) = &group {
        g.exchange("check", checked.map(|()| String::new()))?;
    }
    // One rank a machine prepares data that is not there yet; the others wait for it, then
    // look. Either step failing on any rank ends every rank, naming it.
    let outcome = |d: &anyhow::Result<(PathBuf, PathBuf)>| match d {
        Ok(_) => Ok(String::new()),
        Err(e) => Err(format!("{e:#}")),
    };
    let prepares = launch.as_ref().is_none_or(|l| l.local_rank == 0);
    let prepared = prepares.then(|| find_data(&args));
    let found = match &group {
        None => prepared.expect("one process prepares its own data"),
        Some(g) => {
            g.exchange("prepared", prepared.as_ref().map_or(Ok(String::new()), outcome))?;
            let found = prepared.unwrap_or_else(|| find_data(&args));
            g.exchange("data", outcome(&found))?;
            found
        }
    };
    let (train_path, test_path) = found?;
    (cfg.train, cfg.test) = (train_path, Some(test_path));
    cfg.group = group.clone();
    let ranks = match &group {
        Some(g) => format!(" per rank × {} ranks ({})", g.world(), g.backend()),
        None => String::new(),
    };
    if main {
        let threads = tch::get_num_threads();
        say!(
            "training {} on {:?} ({}), batch {}{ranks}, {} epochs, {threads} thread{}{}",
            cfg.model.name(),
            device,
            if resident { "data resident on the device" } else { "pipelined loader" },
            cfg.batch_size,
            cfg.epochs,
            if threads == 1 { "" } else { "s" },
            if group.is_some() { " each" } else { "" }
        );
        if let Some(cores) = &pinned {
            say!("ranks pinned to their share of the cores (rank 0: {cores:?}; --no-pin to leave them free)");
        }
    }
    let mut report = Report { bar: None, epoch: 0 };
    let s = match train::run(&cfg, &mut report) {
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
    if !main {
        return Ok(());
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

/// `--nproc-per-node N`: this program again as N ranks (the same arguments without that
/// option); their exits, reported.
fn launch_ranks(n: usize, timeout: Duration) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("finding this program to start its ranks")?;
    let mut args = Vec::new();
    let mut given = std::env::args_os().skip(1);
    while let Some(a) = given.next() {
        let s = a.to_string_lossy();
        if s == "--nproc-per-node" || s == "--nproc_per_node" {
            given.next();
        } else if !(s.starts_with("--nproc-per-node=") || s.starts_with("--nproc_per_node=")) {
            args.push(a);
        }
    }
    // Past the timeout the ranks name the failed one themselves; a few seconds more for that.
    let grace = timeout + Duration::from_secs(10);
    let exits = launch::local(n, &exe, &args, grace, &train::INTERRUPTED)?;
    let problems: Vec<String> = exits
        .iter()
        .filter(|e| {
            !(e.status.code() == Some(130) && train::INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst))
        })
        .filter_map(launch::RankExit::problem)
        .collect();
    if !problems.is_empty() {
        bail!("{}", problems.join("; "));
    }
    Ok(())
}

/// `--recipe fast`: airbench94's settings, except where an option was given explicitly.
fn fast_recipe(cfg: &mut TrainConfig) {
    use cifar_fast::train::fast;
    let given: Vec<String> = std::env::args().collect();
    let explicit = |flag: &str| given.iter().any(|a| a == flag || a.starts_with(&format!("{flag}=")));
    cfg.recipe = train::Recipe::Fast;
    cfg.nesterov = true;
    cfg.augment = true;
    if !explicit("--model") {
        cfg.model = ModelKind::Airbench;
    }
    if !explicit("--batch-size") {
        cfg.batch_size = fast::BATCH_SIZE;
    }
    if !explicit("--epochs") {
        cfg.epochs = fast::EPOCHS.ceil() as u64;
    }
    if !explicit("--lr") {
        cfg.lr = fast::LR;
    }
    if !explicit("--momentum") {
        cfg.momentum = fast::MOMENTUM;
    }
    if !explicit("--weight-decay") {
        cfg.weight_decay = fast::WEIGHT_DECAY;
    }
    if !explicit("--label-smoothing") {
        cfg.label_smoothing = fast::LABEL_SMOOTHING;
    }
    if !explicit("--log-every") {
        cfg.log_every = 8000usize.div_ceil(cfg.batch_size).max(1);
    }
}

/// The settings `cfg.check()` refuses, and output paths in directories that do not exist;
/// makes the `--plot` and `--checkpoint` directories.
fn check_settings(cfg: &TrainConfig, args: &Args) -> anyhow::Result<()> {
    cfg.check()?;
    for (flag, path) in
        [("--metrics", &args.metrics), ("--export", &args.export), ("--preview-batch", &args.preview_batch)]
    {
        if let Some(p) = path
            && let Some(parent) = p.parent().filter(|d| !d.as_os_str().is_empty())
            && !parent.is_dir()
        {
            bail!("{flag} {}: the directory {} does not exist", p.display(), parent.display());
        }
    }
    for (flag, dir) in [("--plot", &args.plot), ("--checkpoint", &args.checkpoint)] {
        if let Some(d) = dir {
            std::fs::create_dir_all(d).with_context(|| format!("{flag} {}", d.display()))?;
        }
    }
    Ok(())
}
