//! The training loop of `cifar-train`: the tutorial's experiment on the prefetch pipeline (or
//! on GPU-resident data), timing where every second of a step goes.
mod batches;
pub mod checkpoint;
pub mod metrics;
pub mod model;
pub mod plots;
pub mod resident;
pub mod sgd;
pub mod threads;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use tch::{Device, Kind, Tensor, nn};

use self::batches::Batches;
use self::checkpoint::{Checkpoint, Position, RunSettings};
use self::metrics::{Metrics, StepTimes};
pub use self::model::ModelKind;
use self::sgd::Sgd;
use crate::augment::Augment;
use crate::error::{Error, Result};
use crate::loader::Loader;
use crate::source::{Dataset, Source};

/// Everything a run needs, with the tutorial's values by default.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    /// The prepared training split.
    pub train: PathBuf,
    /// The prepared test split (evaluated after each epoch), if any.
    pub test: Option<PathBuf>,
    /// Network.
    pub model: ModelKind,
    /// Samples per batch (the tutorial: 4).
    pub batch_size: usize,
    /// Epochs (the tutorial: 10).
    pub epochs: u64,
    /// Learning rate (0.001).
    pub lr: f64,
    /// Momentum (0.9).
    pub momentum: f64,
    /// Weight decay (0).
    pub weight_decay: f64,
    /// Loader threads.
    pub workers: usize,
    /// Batches prepared ahead (`None`: the loader's default, see `loader::default_prefetch`).
    pub prefetch: Option<usize>,
    /// Where to train.
    pub device: Device,
    /// Seed of the weights, the order and the augmentation.
    pub seed: u64,
    /// Pad-crop and flip the training images.
    pub augment: bool,
    /// bf16/fp16 autocast on CUDA.
    pub amp: bool,
    /// Keep the data on the device.
    pub resident: bool,
    /// Directory for checkpoints.
    pub checkpoint: Option<PathBuf>,
    /// Continue from the checkpoint.
    pub resume: bool,
    /// Start afresh over an existing checkpoint (without it, and without `resume`, a
    /// checkpoint directory that holds one is refused rather than overwritten).
    pub overwrite: bool,
    /// Evaluate on the test split after each epoch and after an early stop.
    pub eval: bool,
    /// Write the trained model here as TorchScript (traced on the CPU).
    pub export: Option<PathBuf>,
    /// JSON-lines metrics file.
    pub metrics: Option<PathBuf>,
    /// Print the running loss every this many steps.
    pub log_every: usize,
    /// Stop after this many steps in all (checkpointing first).
    pub max_steps: Option<usize>,
    /// Fit libtorch's thread count to the cores other programs leave free, looking once a
    /// second ([`threads::Governor`]); off when the user fixed the count.
    pub adapt_threads: bool,
    /// Save the first training batch, as the model receives it, as a PNG grid here.
    pub preview_batch: Option<PathBuf>,
    /// Draw the run's charts (SVG) into this directory at the end.
    pub plot: Option<PathBuf>,
}

impl TrainConfig {
    /// The tutorial's settings for `train`/`test`.
    pub fn tutorial(train: PathBuf, test: Option<PathBuf>) -> Self {
        TrainConfig {
            train,
            test,
            model: ModelKind::Lenet,
            batch_size: 4,
            epochs: 10,
            lr: 0.001,
            momentum: 0.9,
            weight_decay: 0.0,
            workers: 2,
            prefetch: None,
            device: Device::Cpu,
            seed: 0,
            augment: false,
            amp: false,
            resident: false,
            checkpoint: None,
            resume: false,
            overwrite: false,
            eval: true,
            export: None,
            metrics: None,
            log_every: 2000,
            max_steps: None,
            adapt_threads: false,
            preview_batch: None,
            plot: None,
        }
    }
}

/// Test-set accuracy.
#[derive(Debug, Clone)]
pub struct Evaluation {
    /// Correct / total.
    pub accuracy: f64,
    /// Per class, in label order.
    pub per_class: Vec<f64>,
    /// `confusion[true][predicted]` counts.
    pub confusion: Vec<Vec<u64>>,
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct Summary {
    /// Training images per second (the steps' wall time, evaluation excluded).
    pub images_per_s: f64,
    /// Training images per second after the run's first step, which pays for warm-up (the
    /// first batch, libtorch's first allocations, on CUDA its kernel and cuDNN set-up); `None`
    /// for a run of one step.
    pub steady_images_per_s: Option<f64>,
    /// Wall time of the run's first step, seconds.
    pub first_step_seconds: f64,
    /// Time spent before training entering the training split into memory (see
    /// [`crate::store::TensorFile::populate`]), seconds; 0 where it was not done.
    pub populate_seconds: f64,
    /// Share of step time spent waiting on data, 0..1.
    pub data_wait_share: f64,
    /// Where the step time went.
    pub times: StepTimes,
    /// Mean wall time of the completed epochs' training steps, seconds (`None` when no epoch
    /// was completed in this invocation).
    pub epoch_seconds: Option<f64>,
    /// Steps trained in this invocation.
    pub steps: usize,
    /// The last logged running loss.
    pub final_loss: f64,
    /// The last evaluation.
    pub eval: Option<Evaluation>,
    /// Class names.
    pub classes: Vec<String>,
    /// Stopped by `max_steps` or an interrupt before the last epoch ended.
    pub stopped_early: bool,
    /// Where it stopped.
    pub position: Position,
    /// Files written (`--preview-batch`, `--plot`, `--export`).
    pub files: Vec<PathBuf>,
    /// Charts `--plot` could not draw, and why.
    pub not_drawn: Vec<(String, String)>,
}

/// Set by the binary's Ctrl-C handler; the loop finishes its step, checkpoints and returns.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Progress reporting, so the library stays free of terminal concerns.
pub trait Progress {
    /// The run will train `steps` steps in all (this invocation's, all epochs together).
    fn run(&mut self, steps: usize) {
        let _ = steps;
    }
    /// An epoch of `steps` steps begins.
    fn epoch(&mut self, epoch: u64, steps: usize);
    /// A step finished; `images_per_s` over the epoch so far.
    fn step(&mut self, images_per_s: f64);
    /// A line to show (the tutorial's loss lines, accuracies).
    fn line(&mut self, line: &str);
}

fn settings_of(cfg: &TrainConfig, classes: i64, train_len: usize) -> RunSettings {
    RunSettings {
        model: cfg.model.name().into(),
        classes,
        train_len,
        batch_size: cfg.batch_size,
        lr: cfg.lr,
        momentum: cfg.momentum,
        weight_decay: cfg.weight_decay,
        seed: cfg.seed,
        augment: cfg.augment,
    }
}

/// Trains as `cfg` says, reporting to `progress`.
pub fn run(cfg: &TrainConfig, progress: &mut dyn Progress) -> Result<Summary> {
    check(cfg)?;
    let train = Arc::new(Dataset::open(&cfg.train)?);
    let test = cfg.test.as_ref().map(Dataset::open).transpose()?.map(Arc::new);
    check_splits(cfg, &train, test.as_deref())?;
    let classes = train.classes();
    if cfg.model == ModelKind::Lenet && train.sample_shape() != [3, 32, 32] {
        return Err(Error::Config(format!(
            "the LeNet takes 32x32 images, and {} holds {:?}: use --model resnet, or prepare the \
             data with `cifar-prep --size 32,32`",
            cfg.train.display(),
            train.sample_shape()
        )));
    }
    if let Some(test) = &test
        && test.sample_shape() != train.sample_shape()
    {
        return Err(Error::format(
            &cfg.train,
            format!(
                "holds images of {:?}, and the test split {:?}",
                train.sample_shape(),
                test.sample_shape()
            ),
        ));
    }
    let n_classes = classes.len().max(1 + *train.file().labels().iter().max().unwrap_or(&0) as usize) as i64;
    let settings = settings_of(cfg, n_classes, train.len());

    tch::manual_seed(cfg.seed as i64);
    let vs = nn::VarStore::new(cfg.device);
    let net = model::build(cfg.model, &vs.root(), n_classes);
    let mut opt = Sgd::new(&vs, cfg.lr, cfg.momentum, cfg.weight_decay);
    let mut pos = Position { epoch: 0, step: 0, global_step: 0 };
    if cfg.resume {
        pos = resume(cfg, &vs, &mut opt, &settings)?;
    }
    // Only where the steps read from the mapping: a CUDA-resident split is read once, in order.
    let reads_mapping = !cfg.resident || cfg.device == Device::Cpu;
    let populate_seconds = if reads_mapping { populate(&train, progress) } else { 0.0 };
    let augment = if cfg.augment { Augment::standard() } else { Augment::default() };
    let mut batches = Batches::new(cfg, &train, augment, pos)?;
    let mut record = Record::new(cfg.metrics.as_deref(), batches.per_epoch())?;
    let remaining =
        (cfg.epochs.saturating_sub(pos.epoch) as usize * batches.per_epoch()).saturating_sub(pos.step);
    progress.run(cfg.max_steps.map_or(remaining, |m| remaining.min(m.saturating_sub(pos.global_step))));

    let mut governor = if cfg.adapt_threads && cfg.device == Device::Cpu {
        threads::Governor::start(std::time::Duration::from_millis(300))
    } else {
        None
    };
    if let Some(g) = &governor {
        progress.line(&format!("libtorch threads: {} (the cores other programs leave free)", g.threads()));
    }
    // `--max-steps 0` (or a resumed run already past it) trains no step.
    let no_steps = cfg.max_steps.is_some_and(|m| pos.global_step >= m);
    'epochs: while pos.epoch < cfg.epochs && !no_steps {
        let epoch = pos.epoch;
        progress.epoch(epoch, batches.per_epoch() - pos.step);
        let mut running = RunningLoss::new(cfg.device);
        let mut window = RunningLoss::new(cfg.device);
        let mut times = StepTimes::default();
        let mut fetch = batches.epoch(epoch, pos.step);
        let mut last = Instant::now();
        loop {
            // Data: the wait for the next batch (and its device copy) is what we measure.
            let t0 = Instant::now();
            let Some(batch) = fetch.next() else { break };
            let batch = batch?;
            // Waiting for the device inside the loader is the device computing, not data late.
            let waited = t0.elapsed().saturating_sub(batch.copy + batch.device_wait);
            if record.steps == 0
                && let Some(png) = &cfg.preview_batch
            {
                save_batch_preview(&batch.images, &batch.labels, train.file(), png)?;
                record.files.push(png.clone());
            }
            let loss = train_step(&*net, &mut opt, &batch.images, &batch.labels, cfg.amp);
            running.add(&loss);
            window.add(&loss);
            let (n, copy) = (batch.len, batch.copy);
            drop(batch);
            let now = Instant::now();
            times.add(waited, copy, (now - t0).saturating_sub(waited + copy), now - last, n);
            last = now;
            record.step(&times);
            if let Some(g) = &mut governor {
                g.tick();
            }
            pos.step += 1;
            pos.global_step += 1;
            record.chart_point(pos, &mut window, &times, false);
            progress.step(times.images as f64 / times.total.as_secs_f64());
            let stop =
                INTERRUPTED.load(Ordering::SeqCst) || cfg.max_steps.is_some_and(|m| pos.global_step >= m);
            if (pos.step.is_multiple_of(cfg.log_every) || stop)
                && let Some(mean) = running.take_mean()
            {
                record.loss(progress, pos, mean, &times)?;
            }
            if stop {
                drop(fetch);
                sync(cfg.device);
                record.chart_point(pos, &mut window, &times, true);
                record.stopped_early = true;
                record.times.merge(&times);
                if let Some(dir) = &cfg.checkpoint {
                    save(dir, &vs, &opt, &settings, pos)?;
                }
                // An early stop still reports the model's accuracy, unless interrupted.
                if let Some(test) = test.as_ref().filter(|_| cfg.eval && !INTERRUPTED.load(Ordering::SeqCst))
                {
                    let e = evaluate(&*net, test, cfg.batch_size.max(500), cfg.workers, cfg.device)?;
                    progress.line(&format!(
                        "stopped at epoch {}, step {}: test accuracy {:.2}%",
                        pos.epoch + 1,
                        pos.step,
                        100.0 * e.accuracy
                    ));
                    record.eval = Some(e);
                }
                break 'epochs;
            }
        }
        drop(fetch);
        sync(cfg.device);
        record.chart_point(pos, &mut window, &times, true);
        if let Some(mean) = running.take_mean() {
            record.final_loss = mean;
        }
        record.epoch_seconds.push(times.total.as_secs_f64());
        record.times.merge(&times);
        pos = Position { epoch: epoch + 1, step: 0, global_step: pos.global_step };
        if let Some(dir) = &cfg.checkpoint {
            save(dir, &vs, &opt, &settings, pos)?;
        }
        if let Some(test) = test.as_ref().filter(|_| cfg.eval) {
            match evaluate(&*net, test, cfg.batch_size.max(500), cfg.workers, cfg.device) {
                Ok(e) => record.evaluation(progress, epoch, e, &times)?,
                // Ctrl-C during the evaluation: the epoch is checkpointed, the run ends now.
                Err(Error::Interrupted) => {
                    record.stopped_early = pos.epoch < cfg.epochs;
                    break 'epochs;
                }
                Err(e) => return Err(e),
            }
        }
    }
    if no_steps {
        record.stopped_early = true;
        if let Some(test) = test.as_ref().filter(|_| cfg.eval) {
            record.eval = Some(evaluate(&*net, test, cfg.batch_size.max(500), cfg.workers, cfg.device)?);
        }
    }
    if let Some(dir) = &cfg.plot {
        let (files, not_drawn) = plots::write_all(dir, &record.history, record.eval.as_ref(), &classes)?;
        record.files.extend(files);
        record.not_drawn = not_drawn;
    }
    if let Some(path) = &cfg.export {
        export(cfg.model, &vs, n_classes, train.sample_shape(), path)?;
        record.files.push(path.clone());
    }
    record.finish(classes, pos, populate_seconds)
}

/// Writes the model in `vs` as TorchScript to `path`: traced on the CPU in evaluation mode (a
/// copy of the weights, wherever they trained), so `torch.jit.load(path)` runs it with no code
/// of ours, on any device it is moved to. The batch dimension stays free.
pub fn export(
    kind: ModelKind,
    vs: &nn::VarStore,
    classes: i64,
    sample: [usize; 3],
    path: &std::path::Path,
) -> Result<()> {
    let mut cpu = nn::VarStore::new(Device::Cpu);
    let net = model::build(kind, &cpu.root(), classes);
    cpu.copy(vs).map_err(|e| Error::format(path, format!("cannot copy the weights for export: {e}")))?;
    // Weights enter the trace as constants, which must not require gradients.
    cpu.freeze();
    let [c, h, w] = sample.map(|d| d as i64);
    let example = Tensor::zeros([2, c, h, w], (Kind::Float, Device::Cpu));
    let module = tch::no_grad(|| {
        tch::CModule::create_by_tracing(kind.name(), "forward", &[example], &mut |x| {
            vec![net.forward_t(&x[0], false)]
        })
    })
    .map_err(|e| Error::format(path, format!("cannot trace the model: {e}")))?;
    let tmp = path.with_file_name(format!(
        ".{}.{}.tmp",
        path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        std::process::id()
    ));
    let saved = module
        .save(&tmp)
        .map_err(|e| Error::format(path, format!("cannot write TorchScript: {e}")))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e)));
    if saved.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    saved
}

/// One training step: forward, loss, backward, update. Returns the loss (not synchronised).
fn train_step(net: &dyn nn::ModuleT, opt: &mut Sgd, images: &Tensor, labels: &Tensor, amp: bool) -> Tensor {
    // Under autocast the logits may be bf16/fp16: the loss is taken in f32.
    let logits = if amp {
        tch::autocast(true, || net.forward_t(images, true)).to_kind(Kind::Float)
    } else {
        net.forward_t(images, true)
    };
    let loss = logits.cross_entropy_for_logits(labels);
    opt.zero_grad();
    loss.backward();
    opt.step();
    loss
}

/// The mean training loss since the last log line.
///
/// On a GPU the losses are summed on the device and read once per log line: the tutorial's
/// `loss.item()` every step would stall the GPU's queue every step. On the CPU reading the
/// value costs less than adding tensors, so it is summed on the host.
enum RunningLoss {
    Device(Tensor, usize),
    Host(f64, usize),
}

impl RunningLoss {
    fn new(device: Device) -> Self {
        match device {
            Device::Cpu => RunningLoss::Host(0.0, 0),
            _ => RunningLoss::Device(Tensor::zeros([], (Kind::Float, device)), 0),
        }
    }

    fn add(&mut self, loss: &Tensor) {
        match self {
            RunningLoss::Device(sum, n) => {
                *sum += loss.detach();
                *n += 1;
            }
            RunningLoss::Host(sum, n) => {
                *sum += loss.double_value(&[]);
                *n += 1;
            }
        }
    }

    /// The mean of the losses added since the last call (`None` if there were none).
    fn take_mean(&mut self) -> Option<f64> {
        let (sum, n) = match self {
            RunningLoss::Device(sum, n) => {
                let total = sum.double_value(&[]);
                let _ = sum.zero_();
                (total, std::mem::take(n))
            }
            RunningLoss::Host(sum, n) => (std::mem::take(sum), std::mem::take(n)),
        };
        (n > 0).then(|| sum / n as f64)
    }
}

impl TrainConfig {
    /// Refuses settings that cannot work, before any data is read (`run` calls it first; a
    /// front end may call it before fetching or preparing data).
    pub fn check(&self) -> Result<()> {
        check(self)
    }
}

/// Loader threads a run may ask for: beyond this, threads only cost memory and switches.
pub const MAX_WORKERS: usize = 256;

/// The settings `run` refuses before touching any data.
fn check(cfg: &TrainConfig) -> Result<()> {
    if cfg.batch_size == 0 {
        return Err(Error::Config("--batch-size must be at least 1".into()));
    }
    for (flag, value, ok) in [
        ("--lr", cfg.lr, cfg.lr >= 0.0),
        ("--momentum", cfg.momentum, cfg.momentum >= 0.0),
        ("--weight-decay", cfg.weight_decay, cfg.weight_decay >= 0.0),
    ] {
        if !(ok && value.is_finite()) {
            return Err(Error::Config(format!("{flag} {value}: must be a finite number, 0 or more")));
        }
    }
    if cfg.prefetch == Some(0) {
        return Err(Error::Config("--prefetch must be at least 1".into()));
    }
    if cfg.workers > MAX_WORKERS {
        return Err(Error::Config(format!("--workers {}: at most {MAX_WORKERS}", cfg.workers)));
    }
    if cfg.log_every == 0 {
        return Err(Error::Config("--log-every must be at least 1".into()));
    }
    if let Some(dir) = cfg.checkpoint.as_ref().filter(|_| !cfg.resume && !cfg.overwrite)
        && checkpoint::path_in(dir).exists()
    {
        return Err(Error::Config(format!(
            "{} holds a checkpoint: continue it with --resume, or start afresh over it with --overwrite",
            dir.display()
        )));
    }
    if let Device::Cuda(i) = cfg.device
        && (i as i64) >= tch::Cuda::device_count()
    {
        return Err(Error::Config(format!(
            "CUDA device {i} does not exist ({} CUDA devices here)",
            tch::Cuda::device_count()
        )));
    }
    Ok(())
}

/// Refuses splits that cannot train or be evaluated together: an empty one, or a test split
/// whose classes are not the training split's.
fn check_splits(cfg: &TrainConfig, train: &Dataset, test: Option<&Dataset>) -> Result<()> {
    if train.is_empty() {
        return Err(Error::format(&cfg.train, "holds no images"));
    }
    let Some(test) = test else { return Ok(()) };
    let path = cfg.test.as_deref().unwrap_or(std::path::Path::new("test split"));
    if !crate::prep::same_conversion([train.file(), test.file()]) {
        return Err(Error::format(
            path,
            format!(
                "and {} come from two conversions (one stopped between its renames, or two ran at \
                 once): prepare them again",
                cfg.train.display()
            ),
        ));
    }
    if test.is_empty() {
        return Err(Error::format(path, "holds no images"));
    }
    let (a, b) = (train.classes(), test.classes());
    if !a.is_empty() && !b.is_empty() && a != b {
        return Err(Error::format(
            path,
            format!("names {} classes, the training split {}: they are not one dataset", b.len(), a.len()),
        ));
    }
    let count =
        |d: &Dataset| d.classes().len().max(1 + *d.file().labels().iter().max().unwrap_or(&0) as usize);
    if count(test) > count(train) {
        return Err(Error::format(
            path,
            format!(
                "has labels up to {}, beyond the training split's {} classes",
                count(test) - 1,
                count(train)
            ),
        ));
    }
    Ok(())
}

/// Loads the checkpoint in `cfg.checkpoint` into the model and optimizer, after checking it was
/// made with these settings; returns where it stopped.
fn resume(cfg: &TrainConfig, vs: &nn::VarStore, opt: &mut Sgd, settings: &RunSettings) -> Result<Position> {
    let dir =
        cfg.checkpoint.as_ref().ok_or_else(|| Error::Config("--resume needs --checkpoint DIR".into()))?;
    let ck = Checkpoint::load(dir)?;
    let diff = ck.settings.differences(settings);
    if !diff.is_empty() {
        return Err(Error::format(
            checkpoint::path_in(dir),
            format!("was made with other settings ({}): cannot resume this run", diff.join("; ")),
        ));
    }
    load_weights(vs, ck.weights).map_err(|m| Error::format(checkpoint::path_in(dir), m))?;
    opt.load_state(ck.momentum).map_err(|m| Error::format(checkpoint::path_in(dir), m))?;
    Ok(ck.position)
}

/// Enters the training split into memory before the steps, as torchvision's CIFAR10 reads it
/// in, so that the first epoch's reads do not page-fault on the cores training runs on. Timed
/// apart from the steps; returns the seconds it took (0 where it was not done).
fn populate(train: &Dataset, progress: &mut dyn Progress) -> f64 {
    let t = Instant::now();
    if !train.file().populate() {
        return 0.0;
    }
    let seconds = t.elapsed().as_secs_f64();
    progress.line(&format!(
        "training data: {:.0} MB entered into memory in {:.0} ms",
        train.file().all_image_bytes().len() as f64 / 1e6,
        1e3 * seconds
    ));
    seconds
}

/// Waits for the device's queue (a no-op on the CPU), so that times and checkpoints are real.
fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// What a run records as it goes: times, losses, evaluations, the metrics file, the charts'
/// history; turned into the [`Summary`] at the end.
struct Record {
    metrics: Metrics,
    history: plots::History,
    /// The finished epochs' (and an early stop's) steps.
    times: StepTimes,
    /// The run's first step, which pays for warm-up.
    first_step: StepTimes,
    steps: usize,
    epoch_seconds: Vec<f64>,
    final_loss: f64,
    eval: Option<Evaluation>,
    stopped_early: bool,
    files: Vec<PathBuf>,
    not_drawn: Vec<(String, String)>,
    /// Steps an epoch.
    per_epoch: usize,
    /// The epoch's step times at the last chart point.
    charted: StepTimes,
}

/// Training time between two points of the `--plot` charts.
const CHART_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

impl Record {
    fn new(metrics: Option<&std::path::Path>, per_epoch: usize) -> Result<Self> {
        Ok(Record {
            not_drawn: Vec::new(),
            per_epoch,
            charted: Default::default(),
            metrics: Metrics::create(metrics)?,
            history: Default::default(),
            times: Default::default(),
            first_step: Default::default(),
            steps: 0,
            epoch_seconds: Vec::new(),
            final_loss: f64::NAN,
            eval: None,
            stopped_early: false,
            files: Vec::new(),
        })
    }

    /// A step ended; `epoch` holds the epoch's steps so far.
    fn step(&mut self, epoch: &StepTimes) {
        if self.steps == 0 {
            self.first_step = *epoch;
        }
        self.steps += 1;
    }

    /// A point of the charts, when a second of training has passed since the last one or the
    /// epoch ends (`last`): the mean loss, images/s and data wait over that stretch.
    fn chart_point(&mut self, at: Position, window: &mut RunningLoss, epoch: &StepTimes, last: bool) {
        let since = epoch.total.saturating_sub(self.charted.total);
        if !(last || since >= CHART_EVERY) {
            return;
        }
        if let Some(mean) = window.take_mean() {
            let secs = since.as_secs_f64().max(1e-9);
            let wait = epoch.wait.saturating_sub(self.charted.wait).as_secs_f64();
            self.history.loss.push((at.global_step, mean));
            self.history.speed.push((
                at.global_step,
                (epoch.images - self.charted.images) as f64 / secs,
                wait / secs,
            ));
        }
        self.charted = if last { StepTimes::default() } else { *epoch };
    }

    /// The tutorial's loss line, and its metrics line.
    fn loss(
        &mut self,
        progress: &mut dyn Progress,
        at: Position,
        mean: f64,
        epoch: &StepTimes,
    ) -> Result<()> {
        self.final_loss = mean;
        progress.line(&format!("[{}, {:5}] loss: {:.3}", at.epoch + 1, at.step, mean));
        let speed = epoch.images as f64 / epoch.total.as_secs_f64();
        self.metrics.log(&serde_json::json!({
            "type": "loss", "epoch": at.epoch + 1, "step": at.step, "global_step": at.global_step,
            "loss": mean, "images_per_s": speed, "data_wait_share": epoch.wait_share(),
        }))
    }

    /// The test accuracy after `epoch`, whose steps `times` holds.
    fn evaluation(
        &mut self,
        progress: &mut dyn Progress,
        epoch: u64,
        e: Evaluation,
        times: &StepTimes,
    ) -> Result<()> {
        progress.line(&format!("epoch {}: test accuracy {:.2}%", epoch + 1, 100.0 * e.accuracy));
        self.history.accuracy.push((epoch, e.accuracy));
        self.metrics.log(&serde_json::json!({
            "type": "epoch", "epoch": epoch + 1, "test_accuracy": e.accuracy, "per_class": e.per_class,
            "epoch_seconds": times.total.as_secs_f64(),
            "images_per_s": times.images as f64 / times.total.as_secs_f64(),
            "data_wait_share": times.wait_share(), "confusion": e.confusion,
        }))?;
        self.eval = Some(e);
        Ok(())
    }

    /// The summary, also written as the metrics file's last line.
    fn finish(mut self, classes: Vec<String>, position: Position, populate_seconds: f64) -> Result<Summary> {
        let times = self.times;
        let after_first =
            (times.total.saturating_sub(self.first_step.total), times.images - self.first_step.images);
        let summary = Summary {
            images_per_s: times.images as f64 / times.total.as_secs_f64().max(1e-9),
            steady_images_per_s: (self.steps > 1)
                .then(|| after_first.1 as f64 / after_first.0.as_secs_f64().max(1e-9)),
            first_step_seconds: self.first_step.total.as_secs_f64(),
            populate_seconds,
            data_wait_share: times.wait_share(),
            epoch_seconds: (!self.epoch_seconds.is_empty())
                .then(|| self.epoch_seconds.iter().sum::<f64>() / self.epoch_seconds.len() as f64),
            times,
            steps: self.steps,
            final_loss: self.final_loss,
            eval: self.eval,
            classes,
            stopped_early: self.stopped_early,
            position,
            files: self.files,
            not_drawn: self.not_drawn,
        };
        self.metrics.summary(&summary, self.per_epoch)?;
        Ok(summary)
    }
}

/// The batch as the model gets it (augmented, normalized), back to bytes, 8 to a row, x3,
/// each image captioned with its label's class name.
fn save_batch_preview(
    images: &Tensor,
    labels: &Tensor,
    file: &crate::store::TensorFile,
    png: &std::path::Path,
) -> Result<()> {
    let values = Vec::<f32>::try_from(images.to_device(Device::Cpu).contiguous().flatten(0, -1))
        .map_err(|e| Error::Shape(format!("batch preview: {e}")))?;
    let labels = Vec::<i64>::try_from(labels.to_device(Device::Cpu))
        .map_err(|e| Error::Shape(format!("batch preview: {e}")))?;
    let [_, _, h, w] = images.size()[..] else {
        return Err(Error::Shape(format!("batch preview: images of shape {:?}", images.size())));
    };
    let per = values.len() / labels.len().max(1);
    let pictures: Vec<Vec<u8>> = values
        .chunks(per)
        .map(|v| {
            crate::preview::to_cell(
                &crate::preview::denormalize(v, file.mean(), file.std()),
                h as usize,
                w as usize,
            )
        })
        .collect();
    let captions: Vec<String> = labels
        .iter()
        .map(|&l| file.classes().get(l as usize).cloned().unwrap_or_else(|| l.to_string()))
        .collect();
    crate::preview::save_png(&crate::preview::labelled_grid(&pictures, &captions, 8, 3), png)
}

fn save(
    dir: &std::path::Path,
    vs: &nn::VarStore,
    opt: &Sgd,
    settings: &RunSettings,
    position: Position,
) -> Result<()> {
    let mut weights: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    weights.sort_by(|a, b| a.0.cmp(&b.0));
    Checkpoint { settings: settings.clone(), position, weights, momentum: opt.state() }.save(dir)?;
    Ok(())
}

fn load_weights(vs: &nn::VarStore, weights: Vec<(String, Tensor)>) -> std::result::Result<(), String> {
    let mut vars = vs.variables();
    if weights.len() != vars.len() {
        return Err(format!("holds {} model tensors, this model has {}", weights.len(), vars.len()));
    }
    tch::no_grad(|| {
        for (name, t) in weights {
            let v = vars.get_mut(&name).ok_or_else(|| format!("holds {name}, which this model lacks"))?;
            if v.size() != t.size() {
                return Err(format!("{name} has shape {:?}, the model's is {:?}", t.size(), v.size()));
            }
            v.copy_(&t.to_kind(v.kind()));
        }
        Ok(())
    })
}

/// Accuracy on `test`, overall and per class, and the confusion matrix. Ends with
/// [`Error::Interrupted`] as soon as [`INTERRUPTED`] is set.
pub fn evaluate(
    net: &dyn nn::ModuleT,
    test: &Arc<Dataset>,
    batch_size: usize,
    workers: usize,
    device: Device,
) -> Result<Evaluation> {
    let classes = test.classes().len().max(1 + *test.file().labels().iter().max().unwrap_or(&0) as usize);
    let mut confusion = vec![vec![0u64; classes]; classes];
    // The split opened once by `run`, not re-opened and re-validated every epoch.
    let mut loader = Loader::builder_arc(test.clone())
        .batch_size(batch_size)
        .shuffle(false)
        .num_workers(workers)
        .device(device)
        .build()?;
    tch::no_grad(|| -> Result<()> {
        for b in loader.iter() {
            // Acted on within a batch: a Ctrl-C need not wait for the whole test split.
            if INTERRUPTED.load(Ordering::SeqCst) {
                return Err(Error::Interrupted);
            }
            let b = b?;
            let pred = net.forward_t(&b.images, false).argmax(1, false).to_device(Device::Cpu);
            let pred = Vec::<i64>::try_from(&pred).expect("i64 predictions");
            let truth = Vec::<i64>::try_from(&b.labels.to_device(Device::Cpu)).expect("i64 labels");
            for (t, p) in truth.into_iter().zip(pred) {
                confusion[t as usize][p as usize] += 1;
            }
        }
        Ok(())
    })?;
    let total: u64 = confusion.iter().flatten().sum();
    let correct: u64 = (0..classes).map(|c| confusion[c][c]).sum();
    let per_class = (0..classes)
        .map(|c| {
            let n: u64 = confusion[c].iter().sum();
            if n == 0 { 0.0 } else { confusion[c][c] as f64 / n as f64 }
        })
        .collect();
    Ok(Evaluation { accuracy: correct as f64 / total.max(1) as f64, per_class, confusion })
}
