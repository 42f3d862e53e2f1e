//! The training loop of `cifar-train`: the tutorial's experiment on the prefetch pipeline (or
//! on GPU-resident data), timing where every second of a step goes.
mod batches;
pub mod checkpoint;
pub mod fast;
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
use crate::augment::{Augment, Padding};
use crate::dist::ProcessGroup;
use crate::error::{Error, Result};
use crate::loader::Loader;
use crate::sampler::Sampler;
use crate::source::{Dataset, Source};

/// How a run trains, beyond its hyperparameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Recipe {
    /// The tutorial's loop: a constant rate, the mean loss, an evaluation after each epoch.
    #[default]
    Tutorial,
    /// airbench94's ([`fast`]): whitening initialised from the data, batch-norm biases at 64×
    /// the rate, a warm-up and decay schedule, the summed loss, lookahead, the last partial
    /// batch dropped, flip and translate 2, test-time augmentation, one evaluation at the end.
    /// `lr` and `weight_decay` are then per 1,024 samples, as airbench gives them.
    Fast,
}

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
    /// Nesterov momentum (off, as `torch.optim.SGD`'s default).
    pub nesterov: bool,
    /// Label smoothing of the cross-entropy, 0..1 (0, as `nn.CrossEntropyLoss`'s default).
    pub label_smoothing: f64,
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
    /// Train data-parallel as one rank of this process group (see [`crate::dist`]):
    /// `batch_size` is this rank's, the weights start as rank 0's, each step averages the
    /// gradients over the ranks, the test split is evaluated in shards, and only rank 0
    /// reports and writes files. `None`: one process.
    pub group: Option<Arc<ProcessGroup>>,
    /// The training recipe.
    pub recipe: Recipe,
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
            nesterov: false,
            label_smoothing: 0.0,
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
            group: None,
            recipe: Recipe::Tutorial,
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
    /// Processes that trained together (1 for one process); `images_per_s` is the whole job's.
    pub ranks: usize,
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
        world: cfg.group.as_ref().map_or(1, |g| g.world()),
        lr: cfg.lr,
        momentum: cfg.momentum,
        weight_decay: cfg.weight_decay,
        seed: cfg.seed,
        augment: cfg.augment,
        label_smoothing: cfg.label_smoothing,
        nesterov: cfg.nesterov,
        recipe: cfg.recipe,
    }
}

/// The splits a run trains and tests on, opened and checked.
struct Opened {
    train: Arc<Dataset>,
    test: Option<Arc<Dataset>>,
    classes: Vec<String>,
    n_classes: i64,
    settings: RunSettings,
}

/// Opens and checks `cfg`'s splits.
fn open(cfg: &TrainConfig) -> Result<Opened> {
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
    if cfg.recipe == Recipe::Fast && cfg.batch_size > train.len() {
        return Err(Error::Config(format!(
            "--batch-size {}: more than the {} training images, and --recipe fast drops a short batch",
            cfg.batch_size,
            train.len()
        )));
    }
    let n_classes = classes.len().max(1 + *train.file().labels().iter().max().unwrap_or(&0) as usize) as i64;
    let settings = settings_of(cfg, n_classes, train.len());
    Ok(Opened { train, test, classes, n_classes, settings })
}

/// What every rank of a data-parallel run must agree on: anything that changes the weights,
/// the number of steps or the collectives made (workers, prefetch and the files rank 0
/// writes may differ).
fn agreed_settings(cfg: &TrainConfig, o: &Opened) -> String {
    let conversion = o.train.file().metadata().get("conversion").cloned();
    // One flat object: the checkpoint's settings and the rest beside them.
    let mut all = serde_json::to_value(&o.settings).expect("settings serialize");
    let extra = serde_json::json!({
        "epochs": cfg.epochs, "max_steps": cfg.max_steps, "amp": cfg.amp,
        "resident": cfg.resident, "eval": cfg.eval, "device": format!("{:?}", cfg.device).split('(').next(),
        "resume": cfg.resume, "test_len": o.test.as_ref().map(|t| t.len()),
        "sample_shape": o.train.sample_shape(), "train_conversion": conversion,
    });
    if let (Some(all), Some(extra)) = (all.as_object_mut(), extra.as_object()) {
        all.extend(extra.clone());
    }
    all.to_string()
}

/// Refuses ranks whose settings differ from rank 0's, naming each difference.
fn check_agreement(all: &[String]) -> Result<()> {
    type Settings = serde_json::Map<String, serde_json::Value>;
    let parse = |s: &String| serde_json::from_str::<Settings>(s).unwrap_or_default();
    let first = parse(&all[0]);
    let mut diffs = Vec::new();
    for (r, s) in all.iter().enumerate().skip(1) {
        let theirs = parse(s);
        for (k, mine) in &first {
            let t = theirs.get(k).unwrap_or(&serde_json::Value::Null);
            if t != mine {
                diffs.push(format!("{k}: {mine} on rank 0, {t} on rank {r}"));
            }
        }
    }
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(Error::Distributed(format!(
            "the ranks were started with different settings: {}",
            diffs.join("; ")
        )))
    }
}

/// Progress of a rank other than 0: silent.
struct Silent;

impl Progress for Silent {
    fn epoch(&mut self, _: u64, _: usize) {}
    fn step(&mut self, _: f64) {}
    fn line(&mut self, _: &str) {}
}

/// Trains as `cfg` says, reporting to `progress`.
pub fn run(cfg: &TrainConfig, progress: &mut dyn Progress) -> Result<Summary> {
    let group = cfg.group.as_deref();
    let main = group.is_none_or(ProcessGroup::is_main);
    let mut silent = Silent;
    let progress: &mut dyn Progress = if main { progress } else { &mut silent };
    let opened = open(cfg);
    if let Some(g) = group {
        // Each rank's start, good or bad, reaches the others: a rank that cannot start stops
        // them all at once, and settings that differ are refused on every rank.
        let all = g.exchange(
            "settings",
            opened.as_ref().map(|o| agreed_settings(cfg, o)).map_err(|e| e.to_string()),
        );
        if opened.is_ok() {
            check_agreement(&all?)?;
        }
    }
    let Opened { train, test, classes, n_classes, settings } = opened?;

    tch::manual_seed(cfg.seed as i64);
    let vs = nn::VarStore::new(cfg.device);
    let net = model::build(cfg.model, &vs.root(), n_classes);
    let mut opt = Sgd::new(&vs, cfg.lr, cfg.momentum, cfg.weight_decay);
    opt.nesterov = cfg.nesterov;
    let fast = cfg.recipe == Recipe::Fast;
    if fast && !cfg.resume {
        fast::init_whitening(&vs, &fast::first_images(&train, fast::WHITEN_IMAGES, cfg.device)?, 5e-4);
    }
    let mut pos = Position { epoch: 0, step: 0, global_step: 0 };
    match group {
        // Rank 0 alone reads the checkpoint, then gives the others its position and weights.
        Some(g) => pos = start_ranks(cfg, g, &vs, &mut opt, &settings)?,
        None if cfg.resume => pos = resume(cfg, &vs, &mut opt, &settings)?,
        None => {}
    }
    // Only where the steps read from the mapping: a CUDA-resident split is read once, in order.
    let reads_mapping = !cfg.resident || cfg.device == Device::Cpu;
    let populate_seconds = if reads_mapping { populate(&train, progress) } else { 0.0 };
    let augment = match (fast, cfg.augment) {
        (true, _) => Augment { crop_padding: fast::TRANSLATE, padding: Some(Padding::Reflect), flip: true },
        (false, true) => Augment::standard(),
        (false, false) => Augment::default(),
    };
    let mut batches = Batches::new(cfg, &train, augment, pos)?;
    // A data-parallel epoch has rank 0's steps (a shard may have one batch fewer: it then
    // joins the last step with no samples of its own).
    let per_epoch = match group {
        Some(_) => {
            Sampler::shuffled(train.len(), cfg.batch_size * settings.world, cfg.seed).batches_per_epoch()
        }
        None => batches.per_epoch(),
    };
    // The fast recipe runs 9.9 epochs: its last is cut short, and that is its end, not a stop.
    let max_steps = match cfg.max_steps {
        None if fast => Some((fast::EPOCHS * per_epoch as f64).ceil() as usize),
        m => m,
    };
    let mut schedule = fast.then(|| {
        let total = max_steps.unwrap_or(cfg.epochs as usize * per_epoch);
        fast::Schedule::new(&vs, &mut opt, cfg.batch_size.min(train.len()), (cfg.lr, cfg.weight_decay), total)
    });
    let mut record = Record::new(cfg.metrics.as_deref().filter(|_| main), cfg.resume, per_epoch)?;
    let remaining = (cfg.epochs.saturating_sub(pos.epoch) as usize * per_epoch).saturating_sub(pos.step);
    progress.run(max_steps.map_or(remaining, |m| remaining.min(m.saturating_sub(pos.global_step))));
    // Test-time augmentation (and one evaluation, at the end) for the fast recipe.
    let tta = if fast { 2 } else { 0 };

    let mut governor = if cfg.adapt_threads && cfg.device == Device::Cpu {
        threads::Governor::start(std::time::Duration::from_millis(300))
    } else {
        None
    };
    if let Some(g) = &governor {
        progress.line(&format!("libtorch threads: {} (the cores other programs leave free)", g.threads()));
    }
    // `--max-steps 0` (or a resumed run already past it) trains no step.
    let no_steps = max_steps.is_some_and(|m| pos.global_step >= m);
    'epochs: while pos.epoch < cfg.epochs && !no_steps {
        let epoch = pos.epoch;
        progress.epoch(epoch, per_epoch - pos.step);
        let mut running = RunningLoss::new(cfg.device);
        let mut window = RunningLoss::new(cfg.device);
        let mut times = StepTimes::default();
        if let Some(s) = &schedule {
            s.epoch(&mut opt, epoch);
        }
        let mut fetch = batches.epoch(epoch, pos.step);
        let mut last = Instant::now();
        loop {
            // Data: the wait for the next batch (and its device copy) is what we measure.
            let t0 = Instant::now();
            let batch = match fetch.next() {
                Some(batch) => Some(batch?),
                // A shard with one batch fewer than the epoch's steps: it joins the last one empty.
                None if group.is_some() && pos.step < per_epoch => None,
                None => break,
            };
            // Waiting for the device inside the loader is the device computing, not data late.
            let (copy, device_wait) = batch.as_ref().map_or(Default::default(), |b| (b.copy, b.device_wait));
            let waited = t0.elapsed().saturating_sub(copy + device_wait);
            if record.steps == 0
                && main
                && let Some(png) = &cfg.preview_batch
                && let Some(batch) = &batch
            {
                save_batch_preview(&batch.images, &batch.labels, train.file(), png)?;
                record.files.push(png.clone());
            }
            if let Some(s) = &schedule {
                s.step(&mut opt, pos.global_step);
            }
            let (loss, n, comm, interrupted) = match group {
                None => {
                    let b = batch.as_ref().expect("one process has a batch each step");
                    let loss = train_step(&*net, &mut opt, &b.images, &b.labels, cfg);
                    (loss, b.len, Default::default(), INTERRUPTED.load(Ordering::SeqCst))
                }
                Some(g) => {
                    let global =
                        (cfg.batch_size * g.world()).min(train.len() - pos.step * cfg.batch_size * g.world());
                    let step = parallel_step(g, &*net, &mut opt, batch.as_ref(), global, cfg)?;
                    (step.loss, global, step.comm, step.interrupted)
                }
            };
            drop(batch);
            running.add(&loss);
            window.add(&loss);
            let now = Instant::now();
            times.add(waited, copy, (now - t0).saturating_sub(waited + copy + comm), now - last, n);
            times.comm += comm;
            last = now;
            record.step(&times);
            if let Some(g) = &mut governor {
                g.tick();
            }
            pos.step += 1;
            pos.global_step += 1;
            if let Some(s) = &mut schedule {
                s.after(pos.global_step);
            }
            record.chart_point(pos, &mut window, &times, false);
            progress.step(times.images as f64 / times.total.as_secs_f64());
            let stop = interrupted || max_steps.is_some_and(|m| pos.global_step >= m);
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
                if let Some(dir) = cfg.checkpoint.as_ref().filter(|_| main) {
                    save(dir, &vs, &opt, &settings, pos)?;
                }
                // An early stop still reports the model's accuracy, unless interrupted.
                if let Some(test) = test.as_ref().filter(|_| cfg.eval && !interrupted) {
                    let e = evaluate_in(
                        group,
                        &*net,
                        n_classes as usize,
                        test,
                        cfg.batch_size.max(500),
                        cfg.workers,
                        cfg.device,
                        tta,
                    )?;
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
        if let Some(dir) = cfg.checkpoint.as_ref().filter(|_| main) {
            save(dir, &vs, &opt, &settings, pos)?;
        }
        if let Some(test) = test.as_ref().filter(|_| cfg.eval && !fast) {
            match evaluate_in(
                group,
                &*net,
                n_classes as usize,
                test,
                cfg.batch_size.max(500),
                cfg.workers,
                cfg.device,
                tta,
            ) {
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
        // The run is where it was given (its start, or a resumed run already past the limit),
        // and a checkpoint says so, as any early stop's does.
        if let Some(dir) = cfg.checkpoint.as_ref().filter(|_| main) {
            save(dir, &vs, &opt, &settings, pos)?;
        }
        if let Some(test) = test.as_ref().filter(|_| cfg.eval) {
            record.eval = Some(evaluate_in(
                group,
                &*net,
                n_classes as usize,
                test,
                cfg.batch_size.max(500),
                cfg.workers,
                cfg.device,
                tta,
            )?);
        }
    }
    if let Some(dir) = cfg.plot.as_ref().filter(|_| main) {
        let (files, not_drawn) = plots::write_all(dir, &record.history, record.eval.as_ref(), &classes)?;
        record.files.extend(files);
        record.not_drawn = not_drawn;
    }
    if let Some(path) = cfg.export.as_ref().filter(|_| main) {
        export(cfg.model, &vs, n_classes, train.sample_shape(), path)?;
        record.files.push(path.clone());
    }
    record.finish(classes, pos, populate_seconds, settings.world)
}

/// The start of a data-parallel run: rank 0 resumes from the checkpoint (if asked) and every
/// rank takes its position, weights and momentum, so all begin equal as DDP's ranks do.
fn start_ranks(
    cfg: &TrainConfig,
    g: &ProcessGroup,
    vs: &nn::VarStore,
    opt: &mut Sgd,
    settings: &RunSettings,
) -> Result<Position> {
    let resumed = match (g.is_main(), cfg.resume) {
        (true, true) => resume(cfg, vs, opt, settings).map(|p| (p, opt.flat_momentum().is_some())),
        _ => Ok((Position { epoch: 0, step: 0, global_step: 0 }, false)),
    };
    let mine = resumed.as_ref().map(|r| serde_json::json!(r).to_string()).map_err(|e| e.to_string());
    let all = g.exchange("resume", mine);
    let (pos, momentum) = resumed?;
    let (pos, momentum): (Position, bool) = serde_json::from_str(&all?[0])
        .map_err(|e| Error::Distributed(format!("rank 0 sent an unreadable start position: {e}")))
        .map(|(p, m)| if g.is_main() { (pos, momentum) } else { (p, m) })?;
    g.broadcast(opt.flat_params(), 0)?;
    if momentum {
        g.broadcast(opt.ensure_momentum(), 0)?;
    }
    Ok(pos)
}

/// What a data-parallel step returns.
struct ParallelStep {
    /// The mean loss over the global batch (all ranks' samples).
    loss: Tensor,
    /// Time in the all-reduce.
    comm: std::time::Duration,
    /// Some rank was interrupted: every rank stops after this step.
    interrupted: bool,
}

/// One data-parallel step: this rank's forward and backward on its part of the global batch
/// (`None`: no samples this step), then one all-reduce of the flat gradient weighted by the
/// rank's share of the `global` samples — so the update is that of one process on the whole
/// global batch — carrying the loss and the ranks' interrupt flags along.
fn parallel_step(
    g: &ProcessGroup,
    net: &dyn nn::ModuleT,
    opt: &mut Sgd,
    batch: Option<&batches::Fetched>,
    global: usize,
    cfg: &TrainConfig,
) -> Result<ParallelStep> {
    opt.zero_grad();
    let device = opt.flat_params().device();
    let share = batch.map_or(0, |b| b.len) as f64 / global as f64;
    // Scaled before the backward pass, so the gradients come out already weighted by this
    // rank's share of the global batch: their sum over the ranks is the global batch's mean.
    let loss = match batch {
        Some(b) => {
            let loss = forward_loss(net, &b.images, &b.labels, cfg) * share;
            loss.backward();
            loss.detach()
        }
        None => Tensor::zeros([], (Kind::Float, device)),
    };
    let flag = Tensor::from(INTERRUPTED.load(Ordering::SeqCst) as u8 as f32).to_device(device);
    let mut comm = std::time::Duration::ZERO;
    let extras = opt.step_with(&[loss, flag], |flat| -> Result<()> {
        let t = Instant::now();
        g.all_reduce_sum(flat)?;
        comm = t.elapsed();
        Ok(())
    })?;
    let interrupted = extras.double_value(&[1]) > 0.0;
    let loss = extras.narrow(0, 0, 1).reshape([]);
    Ok(ParallelStep { loss, comm, interrupted })
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
fn train_step(
    net: &dyn nn::ModuleT,
    opt: &mut Sgd,
    images: &Tensor,
    labels: &Tensor,
    cfg: &TrainConfig,
) -> Tensor {
    let loss = forward_loss(net, images, labels, cfg);
    opt.zero_grad();
    match cfg.recipe {
        // The recipe's rates are for the loss summed over the batch (the mean is reported).
        Recipe::Fast => (&loss * labels.size()[0] as f64).backward(),
        Recipe::Tutorial => loss.backward(),
    }
    opt.step();
    loss
}

/// The training forward pass and its mean cross-entropy (label-smoothed as `cfg` says).
fn forward_loss(net: &dyn nn::ModuleT, images: &Tensor, labels: &Tensor, cfg: &TrainConfig) -> Tensor {
    // Under autocast the logits may be bf16/fp16: the loss is taken in f32.
    let logits = if cfg.amp {
        tch::autocast(true, || net.forward_t(images, true)).to_kind(Kind::Float)
    } else {
        net.forward_t(images, true)
    };
    if cfg.label_smoothing == 0.0 {
        logits.cross_entropy_for_logits(labels)
    } else {
        logits.cross_entropy_loss(labels, None::<Tensor>, tch::Reduction::Mean, -100, cfg.label_smoothing)
    }
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
    if !(0.0..=1.0).contains(&cfg.label_smoothing) {
        return Err(Error::Config(format!("--label-smoothing {}: must be from 0 to 1", cfg.label_smoothing)));
    }
    if cfg.recipe == Recipe::Fast && cfg.group.is_some() {
        return Err(Error::Config("--recipe fast trains in one process (no data-parallel runs)".into()));
    }
    if cfg.recipe == Recipe::Fast && cfg.model != ModelKind::Airbench {
        return Err(Error::Config("--recipe fast trains its own net (--model airbench)".into()));
    }
    if cfg.nesterov && cfg.momentum <= 0.0 {
        return Err(Error::Config("--nesterov needs a momentum above 0 (--momentum)".into()));
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
    fn new(metrics: Option<&std::path::Path>, append: bool, per_epoch: usize) -> Result<Self> {
        Ok(Record {
            not_drawn: Vec::new(),
            per_epoch,
            charted: Default::default(),
            metrics: Metrics::create(metrics, append)?,
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
    fn finish(
        mut self,
        classes: Vec<String>,
        position: Position,
        populate_seconds: f64,
        ranks: usize,
    ) -> Result<Summary> {
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
            ranks,
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

/// Accuracy on `test` of `net`, which scores `classes` classes, overall and per class, and
/// the confusion matrix (`classes` square, or the test split's class count if larger). Ends
/// with [`Error::Interrupted`] as soon as [`INTERRUPTED`] is set.
pub fn evaluate(
    net: &dyn nn::ModuleT,
    classes: usize,
    test: &Arc<Dataset>,
    batch_size: usize,
    workers: usize,
    device: Device,
) -> Result<Evaluation> {
    evaluate_in(None, net, classes, test, batch_size, workers, device, 0)
}

/// [`evaluate`] with test-time augmentation level `tta` ([`fast::tta_logits`]), shared by
/// the ranks of `group` where there is one: each counts its shard of
/// the test split and one all-reduce sums the confusion matrices, so every rank has the whole
/// split's result (the same as one process's) in a world-th of the time. With a group the
/// evaluation is not cut short by an interrupt, which the ranks agree on at the next step.
#[allow(clippy::too_many_arguments)]
pub fn evaluate_in(
    group: Option<&ProcessGroup>,
    net: &dyn nn::ModuleT,
    classes: usize,
    test: &Arc<Dataset>,
    batch_size: usize,
    workers: usize,
    device: Device,
    tta: u8,
) -> Result<Evaluation> {
    let (rank, world) = group.map_or((0, 1), |g| (g.rank(), g.world()));
    // Predictions range over the model's classes, which a test split may not all hold.
    let classes =
        classes.max(test.classes().len()).max(1 + *test.file().labels().iter().max().unwrap_or(&0) as usize);
    let mut confusion = vec![vec![0u64; classes]; classes];
    // The split opened once by `run`, not re-opened and re-validated every epoch.
    let mut loader = Loader::builder_arc(test.clone())
        .batch_size(batch_size)
        .shuffle(false)
        .num_workers(workers)
        .device(device)
        .shard(rank, world)
        .build()?;
    tch::no_grad(|| -> Result<()> {
        for b in loader.iter() {
            // Acted on within a batch: a Ctrl-C need not wait for the whole test split.
            if group.is_none() && INTERRUPTED.load(Ordering::SeqCst) {
                return Err(Error::Interrupted);
            }
            let b = b?;
            let pred = fast::tta_logits(net, &b.images, tta).argmax(1, false).to_device(Device::Cpu);
            let pred = Vec::<i64>::try_from(&pred).expect("i64 predictions");
            let truth = Vec::<i64>::try_from(&b.labels.to_device(Device::Cpu)).expect("i64 labels");
            for (t, p) in truth.into_iter().zip(pred) {
                confusion[t as usize][p as usize] += 1;
            }
        }
        Ok(())
    })?;
    if let Some(g) = group {
        let counts: Vec<f64> = confusion.iter().flatten().map(|&c| c as f64).collect();
        let sum = Tensor::from_slice(&counts).to_device(g.device());
        g.all_reduce_sum(&sum)?;
        let sum = Vec::<f64>::try_from(sum.to_device(Device::Cpu)).expect("f64 counts");
        for (c, v) in confusion.iter_mut().flatten().zip(sum) {
            *c = v as u64;
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `nn.CrossEntropyLoss(label_smoothing=ε)`: `(1-ε)·(-log p_y) + ε·mean_k(-log p_k)`,
    /// averaged over the batch.
    #[test]
    fn label_smoothing_is_pytorchs() {
        let logits = (Tensor::arange(12, (Kind::Float, Device::Cpu)) * 0.37).sin().view([3, 4]);
        let labels = Tensor::from_slice(&[2i64, 0, 3]);
        let identity = nn::func_t(|x, _| x.shallow_clone());
        for eps in [0.0, 0.2, 1.0] {
            let cfg = TrainConfig { label_smoothing: eps, ..TrainConfig::tutorial(PathBuf::new(), None) };
            let ours = forward_loss(&identity, &logits, &labels, &cfg).double_value(&[]);
            let logp = Vec::<f64>::try_from(logits.log_softmax(1, Kind::Double).flatten(0, -1)).unwrap();
            let mut want = 0.0;
            for (row, &y) in [2usize, 0, 3].iter().enumerate() {
                let p = &logp[row * 4..row * 4 + 4];
                want += (1.0 - eps) * -p[y] + eps * p.iter().map(|v| -v).sum::<f64>() / 4.0;
            }
            want /= 3.0;
            assert!((ours - want).abs() < 1e-6, "ε {eps}: {ours} vs {want}");
        }
    }
}
