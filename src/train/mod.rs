//! The training loop of `cifar-train`: the tutorial's experiment on the prefetch pipeline (or
//! on GPU-resident data), timing where every second of a step goes.
pub mod checkpoint;
pub mod metrics;
pub mod model;
pub mod plots;
pub mod resident;
pub mod sgd;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor, nn};

use self::checkpoint::{Checkpoint, Position, RunSettings};
use self::metrics::{Metrics, StepTimes};
pub use self::model::ModelKind;
use self::resident::Resident;
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
    /// Epochs (the tutorial: 2).
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
    /// JSON-lines metrics file.
    pub metrics: Option<PathBuf>,
    /// Print the running loss every this many steps.
    pub log_every: usize,
    /// Stop after this many steps in all (checkpointing first).
    pub max_steps: Option<usize>,
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
            epochs: 2,
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
            metrics: None,
            log_every: 2000,
            max_steps: None,
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
    /// Mean wall time of the completed epochs' training steps, seconds.
    pub epoch_seconds: f64,
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
    /// Pictures written (`--preview-batch`, `--plot`).
    pub files: Vec<PathBuf>,
}

/// Keeps freed tensor memory in the process instead of returning it to the OS.
///
/// glibc serves blocks over its (adaptive) mmap threshold with a fresh `mmap` and unmaps them on
/// free, so every step's activations and gradients (600 KB for LeNet's first conv at batch 32)
/// are page-faulted in anew: measured here, 600 faults a step and a LeNet CPU step 1.5× slower,
/// and erratic, depending on where the threshold had drifted. Fixing the thresholds keeps those
/// blocks on the heap for reuse, as PyTorch users get from jemalloc or tcmalloc. Call it first
/// thing in `main`, before any thread allocates. (`cifar-train` goes further and links jemalloc
/// as the process's allocator, which libtorch then uses too: see its source.)
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` only sets allocator parameters; it is called before other threads exist
    // (the documented use) and with values in range.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

/// Set by the binary's Ctrl-C handler; the loop finishes its step, checkpoints and returns.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Progress reporting, so the library stays free of terminal concerns.
pub trait Progress {
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
    if cfg.batch_size == 0 {
        return Err(Error::Config("--batch-size must be at least 1".into()));
    }
    if cfg.log_every == 0 {
        return Err(Error::Config("--log-every must be at least 1".into()));
    }
    if let Device::Cuda(i) = cfg.device
        && (i as i64) >= tch::Cuda::device_count()
    {
        return Err(Error::Config(format!(
            "CUDA device {i} does not exist ({} CUDA devices here)",
            tch::Cuda::device_count()
        )));
    }
    let train = Arc::new(Dataset::open(&cfg.train)?);
    let test = cfg.test.as_ref().map(Dataset::open).transpose()?.map(Arc::new);
    let classes = train.classes();
    let n_classes = classes.len().max(1 + *train.file().labels().iter().max().unwrap_or(&0) as usize) as i64;
    let settings = settings_of(cfg, n_classes, train.len());
    let augment = if cfg.augment { Augment::standard() } else { Augment::default() };

    tch::manual_seed(cfg.seed as i64);
    let vs = nn::VarStore::new(cfg.device);
    let net = model::build(cfg.model, &vs.root(), n_classes);
    let mut opt = Sgd::new(&vs, cfg.lr, cfg.momentum, cfg.weight_decay);

    let mut start = Position { epoch: 0, step: 0, global_step: 0 };
    if cfg.resume {
        let dir =
            cfg.checkpoint.as_ref().ok_or_else(|| Error::Config("--resume needs --checkpoint DIR".into()))?;
        let ck = Checkpoint::load(dir)?;
        let diff = ck.settings.differences(&settings);
        if !diff.is_empty() {
            return Err(Error::format(
                checkpoint::path_in(dir),
                format!("was made with other settings ({}): cannot resume this run", diff.join("; ")),
            ));
        }
        load_weights(&vs, ck.weights).map_err(|m| Error::format(checkpoint::path_in(dir), m))?;
        opt.load_state(ck.momentum).map_err(|m| Error::format(checkpoint::path_in(dir), m))?;
        start = ck.position;
    }

    // Like torchvision's CIFAR10, which reads the split into memory before training, so that
    // the first epoch's reads do not page-fault on the cores training runs on. Timed apart.
    let mut populate_seconds = 0.0;
    if !cfg.resident {
        let t = Instant::now();
        if train.file().populate() {
            populate_seconds = t.elapsed().as_secs_f64();
            progress.line(&format!(
                "training data: {:.0} MB entered into memory in {:.0} ms",
                train.file().all_image_bytes().len() as f64 / 1e6,
                1e3 * populate_seconds
            ));
        }
    }

    // The training batches come from one of these.
    let (mut loader, resident) = if cfg.resident {
        // The order the pipelined loader below would give (its defaults), batched on the device.
        let sampler = crate::sampler::Sampler::shuffled(train.len(), cfg.batch_size, cfg.seed);
        (None, Some((Resident::new(train.clone(), augment, cfg.seed, cfg.device)?, sampler)))
    } else {
        let mut builder = Loader::builder_arc(train.clone())
            .batch_size(cfg.batch_size)
            .seed(cfg.seed)
            .num_workers(cfg.workers)
            .device(cfg.device)
            .augment(augment)
            .start_at(start.epoch, start.step);
        if let Some(n) = cfg.prefetch {
            builder = builder.prefetch(n);
        }
        let loader = builder.build()?;
        (Some(loader), None)
    };
    let mut metrics = Metrics::create(cfg.metrics.as_deref())?;
    let mut times = StepTimes::default();
    let mut pos = start;
    let mut final_loss = f64::NAN;
    let mut eval = None;
    let mut epoch_secs = Vec::new();
    let mut steps_here = 0usize;
    let mut warmup = StepTimes::default();
    let mut stopped_early = false;
    let mut history = plots::History::default();
    let mut files = Vec::new();
    let sync = || {
        if let Device::Cuda(i) = cfg.device {
            tch::Cuda::synchronize(i as i64);
        }
    };

    'epochs: while pos.epoch < cfg.epochs {
        let epoch = pos.epoch;
        let first_step = pos.step;
        let batches = match (&loader, &resident) {
            (Some(l), _) => l.len(),
            (_, Some((_, s))) => s.batches_per_epoch(),
            _ => unreachable!(),
        };
        progress.epoch(epoch, batches - first_step);
        let mut running = Tensor::zeros([], (Kind::Float, cfg.device));
        let mut running_n = 0usize;
        let mut epoch_times = StepTimes::default();
        let plan = resident.as_ref().map(|(r, s)| r.plan(epoch, &s.batches(epoch)));
        let mut resident_batches = first_step..plan.as_ref().map_or(0, |p| p.len());
        let mut pipelined = loader.as_mut().map(|l| l.epoch(epoch));
        let mut last = Instant::now();
        loop {
            // Data: the wait for the next batch (and its device copy) is what we measure.
            let t0 = Instant::now();
            let (mut copy, mut gpu) = (Duration::ZERO, Duration::ZERO);
            let (images, labels, n, held) = match (&mut pipelined, &resident) {
                (Some(it), _) => match it.next() {
                    None => break,
                    Some(b) => {
                        let b = b?;
                        copy = b.copy_time();
                        gpu = b.sync_time();
                        (b.images.shallow_clone(), b.labels.shallow_clone(), b.len(), Some(b))
                    }
                },
                (None, Some((r, _))) => match resident_batches.next() {
                    None => break,
                    Some(k) => {
                        let (x, y) = r.batch(plan.as_ref().unwrap(), k);
                        let n = y.size()[0] as usize;
                        (x, y, n, None)
                    }
                },
                _ => unreachable!(),
            };
            // Waiting for the device inside the loader is the device computing, not data late.
            let waited = t0.elapsed().saturating_sub(copy + gpu);
            if steps_here == 0
                && let Some(png) = &cfg.preview_batch
            {
                save_batch_preview(&images, train.file(), png)?;
                files.push(png.clone());
            }
            // Compute: forward, backward, update.
            let logits = if cfg.amp {
                tch::autocast(true, || net.forward_t(&images, true))
            } else {
                net.forward_t(&images, true)
            };
            let loss = logits.to_kind(Kind::Float).cross_entropy_for_logits(&labels);
            opt.zero_grad();
            loss.backward();
            opt.step();
            running += loss.detach();
            running_n += 1;
            drop(held);
            let now = Instant::now();
            epoch_times.add(waited, copy, (now - t0).saturating_sub(waited + copy), now - last, n);
            if steps_here == 0 {
                warmup = epoch_times;
            }
            last = now;
            pos.step += 1;
            pos.global_step += 1;
            steps_here += 1;
            progress.step(epoch_times.images as f64 / epoch_times.total.as_secs_f64());
            let stop =
                INTERRUPTED.load(Ordering::SeqCst) || cfg.max_steps.is_some_and(|m| pos.global_step >= m);
            if pos.step.is_multiple_of(cfg.log_every) || stop {
                // One sync per log line: the tutorial's `loss.item()` every step would stall
                // the GPU's queue every step.
                let mean = running.double_value(&[]) / running_n as f64;
                final_loss = mean;
                progress.line(&format!("[{}, {:5}] loss: {:.3}", epoch + 1, pos.step, mean));
                let speed = epoch_times.images as f64 / epoch_times.total.as_secs_f64();
                history.loss.push((pos.global_step, mean));
                history.speed.push((pos.global_step, speed, epoch_times.wait_share()));
                metrics.log(&serde_json::json!({
                    "type": "loss", "epoch": epoch, "step": pos.step, "global_step": pos.global_step,
                    "loss": mean, "images_per_s": epoch_times.images as f64 / epoch_times.total.as_secs_f64(),
                    "data_wait_share": epoch_times.wait_share(),
                }))?;
                running = Tensor::zeros([], (Kind::Float, cfg.device));
                running_n = 0;
            }
            if stop {
                drop(pipelined.take());
                sync();
                times.merge(&epoch_times);
                stopped_early = true;
                if let Some(dir) = &cfg.checkpoint {
                    save(dir, &vs, &opt, &settings, pos)?;
                }
                break 'epochs;
            }
        }
        drop(pipelined);
        sync();
        if running_n > 0 {
            final_loss = running.double_value(&[]) / running_n as f64;
        }
        epoch_secs.push(epoch_times.total.as_secs_f64());
        times.merge(&epoch_times);
        pos = Position { epoch: epoch + 1, step: 0, global_step: pos.global_step };
        if let Some(test) = &test {
            let e = evaluate(&*net, test, cfg.batch_size.max(500), cfg.workers, cfg.device)?;
            progress.line(&format!("epoch {}: test accuracy {:.2}%", epoch + 1, 100.0 * e.accuracy));
            history.accuracy.push((epoch, e.accuracy));
            metrics.log(&serde_json::json!({
                "type": "epoch", "epoch": epoch, "test_accuracy": e.accuracy, "per_class": e.per_class,
                "epoch_seconds": epoch_times.total.as_secs_f64(),
                "images_per_s": epoch_times.images as f64 / epoch_times.total.as_secs_f64(),
                "data_wait_share": epoch_times.wait_share(), "confusion": e.confusion,
            }))?;
            eval = Some(e);
        }
        if let Some(dir) = &cfg.checkpoint {
            save(dir, &vs, &opt, &settings, pos)?;
        }
    }
    if let Some(dir) = &cfg.plot {
        files.extend(plots::write_all(dir, &history, eval.as_ref(), &classes)?);
    }
    let after_first = (times.total.saturating_sub(warmup.total), times.images - warmup.images);
    let summary = Summary {
        images_per_s: times.images as f64 / times.total.as_secs_f64().max(1e-9),
        steady_images_per_s: (steps_here > 1)
            .then(|| after_first.1 as f64 / after_first.0.as_secs_f64().max(1e-9)),
        first_step_seconds: warmup.total.as_secs_f64(),
        populate_seconds,
        data_wait_share: times.wait_share(),
        epoch_seconds: if epoch_secs.is_empty() {
            times.total.as_secs_f64()
        } else {
            epoch_secs.iter().sum::<f64>() / epoch_secs.len() as f64
        },
        times,
        steps: steps_here,
        final_loss,
        eval,
        classes,
        stopped_early,
        position: pos,
        files,
    };
    metrics.summary(&summary)?;
    Ok(summary)
}

/// The batch as the model gets it (augmented, normalized), back to bytes, 8 to a row, x3.
fn save_batch_preview(images: &Tensor, file: &crate::store::TensorFile, png: &std::path::Path) -> Result<()> {
    let values = Vec::<f32>::try_from(images.to_device(Device::Cpu).contiguous().flatten(0, -1))
        .map_err(|e| Error::Shape(format!("batch preview: {e}")))?;
    let per = values.len() / images.size()[0] as usize;
    let pictures: Vec<Vec<u8>> =
        values.chunks(per).map(|v| crate::preview::denormalize(v, file.mean(), file.std())).collect();
    crate::preview::save_png(&crate::preview::image_grid(&pictures, 8, 3), png)
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

/// Accuracy on `test`, overall and per class, and the confusion matrix.
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
