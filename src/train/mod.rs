//! The training side of `cifar-train`: the tutorial's experiment (or the fast recipe) on the
//! prefetch pipeline or on device-resident data, timing where every second of a step goes.
//!
//! A run reads as its stages, one module each: the configuration ([`TrainConfig`]) → the
//! splits, opened and checked → the plan (what the recipe decides, computed once) → where it
//! starts (fresh, or a checkpoint; the ranks agreeing) → the loop below, whose step is one
//! process's or a data-parallel rank's → the recorder (console, metrics, charts, [`Summary`])
//! → checkpoints and the other artifacts (export, batch preview, charts).
//!
//! ```no_run
//! use cifar_fast::Interrupt;
//! use cifar_fast::train::{self, Silent, TrainConfig};
//!
//! let mut cfg = TrainConfig::tutorial("data/cifar10-train.safetensors".into(),
//!                                     Some("data/cifar10-test.safetensors".into()));
//! cfg.batch_size = 32;
//! let summary = train::run(&cfg, None, &mut Silent, &Interrupt::new())?;
//! println!("{:.1}% after {} steps", 100.0 * summary.eval.unwrap().accuracy, summary.steps);
//! # Ok::<(), cifar_fast::Error>(())
//! ```
mod agree;
mod artifacts;
mod batches;
mod checkpoint;
mod config;
mod evaluate;
pub mod fast;
mod metrics;
pub mod model;
mod plan;
mod plots;
mod record;
mod resident;
pub mod sgd;
mod splits;
mod step;
mod threads;

use std::time::Instant;

use tch::{Device, nn};

pub use self::artifacts::export;
pub use self::checkpoint::Position;
pub use self::config::{MAX_WORKERS, Recipe, TrainConfig};
pub use self::evaluate::{Evaluation, evaluate};
pub use self::metrics::StepTimes;
pub use self::model::ModelKind;
pub use self::record::{Progress, Silent, Summary};
pub use self::splits::class_count;
pub use self::threads::{Threads, set_up_threads};

use self::batches::{Batches, Fetched};
use self::checkpoint::RunSettings;
use self::evaluate::Eval;
use self::fast::Schedule;
use self::plan::{Evaluate, Plan};
use self::record::Record;
use self::sgd::Sgd;
use self::splits::{Split, Splits};
use self::step::{Loss, Step};
use crate::dist::ProcessGroup;
use crate::error::{Error, Result};
use crate::interrupt::Interrupt;
use crate::source::Dataset;

/// Trains as `cfg` says — in one process, or as one rank of `group` (then `batch_size` is this
/// rank's, the weights start as rank 0's, each step averages the gradients over the ranks, the
/// test split is evaluated in shards, and only rank 0 reports and writes files) — reporting to
/// `progress`. When `interrupt` is requested the run finishes its step, checkpoints and returns
/// its summary with `stopped_early` (an evaluation under way ends with
/// [`Error::Interrupted`]).
pub fn run(
    cfg: &TrainConfig,
    group: Option<&ProcessGroup>,
    progress: &mut dyn Progress,
    interrupt: &Interrupt,
) -> Result<Summary> {
    let mut silent = Silent;
    let main = group.is_none_or(ProcessGroup::is_main);
    let progress: &mut dyn Progress = if main { progress } else { &mut silent };
    let (mut run, mut data) = Run::start(cfg, group, interrupt, progress)?;
    let mut pos = run.start;
    progress.run(run.plan.last_step().saturating_sub(pos.global_step));
    while pos.global_step < run.plan.last_step() {
        let epoch = pos.epoch;
        let steps = run.plan.steps_in(epoch);
        progress.epoch(epoch, steps - pos.step);
        run.begin_epoch(epoch);
        let mut batches = data.epoch(epoch, pos.step);
        while pos.step < steps {
            let interrupted = run.step(progress, &mut batches, &mut pos)?;
            if interrupted || run.plan.stop_at == Some(pos.global_step) {
                drop(batches);
                return run.stop(progress, pos, interrupted);
            }
        }
        drop(batches);
        pos = run.end_epoch(progress, pos)?;
        if run.interrupted {
            break;
        }
    }
    run.no_step_trained(pos)?;
    let stopped = pos.global_step < run.plan.total;
    run.finish(pos, stopped)
}

/// A run under way: its plan and its parts.
struct Run<'a> {
    cfg: &'a TrainConfig,
    group: Option<&'a ProcessGroup>,
    interrupt: &'a Interrupt,
    main: bool,
    plan: Plan,
    settings: RunSettings,
    train: Split,
    test: Option<Split>,
    classes: Vec<String>,
    n_classes: usize,
    vs: nn::VarStore,
    net: Box<dyn nn::ModuleT>,
    opt: Sgd,
    schedule: Option<Schedule>,
    step: Step<'a>,
    loss: Loss,
    eval: Eval<'a>,
    record: Record,
    governor: Option<threads::Governor>,
    /// Where this invocation started.
    start: checkpoint::Position,
    populate_seconds: f64,
    /// An evaluation was interrupted: the run ends after its checkpoint.
    interrupted: bool,
    /// Rank 0's hold on the checkpoint directory, for the run's life.
    _lock: Option<checkpoint::DirLock>,
}

impl<'a> Run<'a> {
    /// Everything up to the first step: the settings checked, the splits opened and agreed on,
    /// the model made (or resumed), the data source positioned.
    fn start(
        cfg: &'a TrainConfig,
        group: Option<&'a ProcessGroup>,
        interrupt: &'a Interrupt,
        progress: &mut dyn Progress,
    ) -> Result<(Run<'a>, Batches)> {
        let (rank, world) = group.map_or((0, 1), |g| (g.rank(), g.world()));
        // Rank 0 writes the checkpoints, so it holds the directory; its refusal, like any
        // rank's, reaches every rank through the agreement below.
        let mut lock = None;
        let opened = open(cfg, world).and_then(|o| {
            if rank == 0
                && let Some(dir) = &cfg.checkpoint
            {
                lock = Some(checkpoint::DirLock::take(dir, !cfg.resume && !cfg.overwrite)?);
            }
            Ok(o)
        });
        if let Some(g) = group {
            agree::settings(g, cfg, &opened)?;
        }
        let (Splits { train, test, classes, n_classes }, settings, plan) = opened?;
        let main = group.is_none_or(ProcessGroup::is_main);

        tch::manual_seed(cfg.seed as i64);
        let vs = nn::VarStore::new(cfg.device);
        let net = model::build(cfg.model, &vs.root(), n_classes as i64);
        let mut opt = Sgd::new(&vs, cfg.lr, cfg.momentum, cfg.weight_decay);
        opt.nesterov = cfg.nesterov;
        if let (true, false, Some(dense)) = (plan.schedule, cfg.resume, train.dense()) {
            fast::init_whitening(&vs, &fast::first_images(dense, fast::WHITEN_IMAGES, cfg.device)?, 5e-4);
        }
        let resumed = agree::start(cfg, group, &vs, &mut opt, &settings)?;
        if let Some(dir) = cfg.checkpoint.as_deref().filter(|_| cfg.resume) {
            plan.check_position(&resumed.position).map_err(|m| Error::format(checkpoint::path_in(dir), m))?;
        }
        let mut schedule = plan.schedule.then(|| {
            let batch = cfg.batch_size.min(train.len());
            Schedule::new(&vs, &mut opt, batch, (cfg.lr, cfg.weight_decay), plan.total)
        });
        if let Some(s) = schedule.as_mut().filter(|_| !resumed.lookahead.is_empty()) {
            let ck = cfg.checkpoint.as_deref().map(checkpoint::path_in).unwrap_or_default();
            s.lookahead_mut().load(resumed.lookahead).map_err(|m| Error::format(ck, m))?;
        }
        // Only where the steps read from the mapping: a CUDA-resident split is read once, in order.
        let reads_mapping = !cfg.resident || cfg.device == Device::Cpu;
        let populate_seconds = match train.dense() {
            Some(dense) if reads_mapping => populate(dense, progress),
            _ => 0.0,
        };
        let data = Batches::new(cfg, &plan, (rank, world), &train, resumed.position)?;
        let metrics = cfg.metrics.as_deref().filter(|_| main);
        let record = Record::new(metrics, cfg.resume, plan.per_epoch, plan.log_every, cfg.device)?;
        let governor = (cfg.adapt_threads && cfg.device == Device::Cpu)
            .then(|| threads::Governor::start(std::time::Duration::from_millis(300)))
            .flatten();
        if let Some(g) = &governor {
            progress
                .line(&format!("libtorch threads: {} (the cores other programs leave free)", g.threads()));
        }
        let run = Run {
            cfg,
            group,
            interrupt,
            main,
            step: group.map_or(Step::Single, Step::Parallel),
            loss: Loss { label_smoothing: cfg.label_smoothing, amp: cfg.amp, summed: plan.summed_loss },
            eval: Eval {
                batch_size: plan.eval_batch,
                workers: cfg.workers,
                device: cfg.device,
                tta: plan.tta,
                group,
                image_size: cfg.image_size,
            },
            plan,
            settings,
            train,
            test,
            classes,
            n_classes,
            vs,
            net,
            opt,
            schedule,
            record,
            governor,
            start: resumed.position,
            populate_seconds,
            interrupted: false,
            _lock: lock,
        };
        Ok((run, data))
    }

    /// An epoch's steps begin.
    fn begin_epoch(&mut self, epoch: u64) {
        self.record.begin_epoch();
        if let Some(s) = &self.schedule {
            s.epoch(&mut self.opt, epoch);
        }
    }

    /// One step on the next batch; `pos` moves past it. Returns whether some rank was
    /// interrupted (every rank then stops after this step).
    fn step(
        &mut self,
        progress: &mut dyn Progress,
        batches: &mut dyn Iterator<Item = Result<Fetched>>,
        pos: &mut Position,
    ) -> Result<bool> {
        let (batch, timed) = self.record.fetch(batches)?;
        if batch.is_none() && self.group.is_none() {
            return Err(Error::Shape(format!(
                "the loader ended epoch {} before step {}",
                pos.epoch + 1,
                pos.step + 1
            )));
        }
        if self.record.first()
            && self.main
            && let (Some(png), Some(b)) = (&self.cfg.preview_batch, &batch)
        {
            artifacts::save_batch_preview(&b.images, &b.labels, &self.train, png)?;
            self.record.files.push(png.clone());
        }
        if let Some(s) = &self.schedule {
            s.step(&mut self.opt, pos.global_step);
        }
        let samples = match self.group {
            Some(_) => self.plan.samples_at(pos.step, self.train.len()),
            None => batch.as_ref().map_or(0, |b| b.len),
        };
        let stepped =
            self.step.run(&*self.net, &mut self.opt, &self.loss, batch.as_ref(), samples, self.interrupt)?;
        drop(batch);
        *pos = pos.advanced();
        let stop = stepped.interrupted || self.plan.stop_at == Some(pos.global_step);
        self.record.step(progress, *pos, timed, &stepped, samples, stop)?;
        if let Some(g) = &mut self.governor {
            g.tick();
        }
        if let Some(s) = &mut self.schedule {
            s.after(pos.global_step);
        }
        Ok(stepped.interrupted)
    }

    /// The planned steps of `pos`'s epoch are done: recorded, checkpointed, evaluated where the
    /// plan says. Returns the position after it.
    fn end_epoch(&mut self, progress: &mut dyn Progress, pos: Position) -> Result<Position> {
        sync(self.cfg.device);
        self.record.end_epoch(pos, true);
        let epoch = pos.epoch;
        let pos = if pos.step == self.plan.per_epoch {
            Position { epoch: epoch + 1, step: 0, global_step: pos.global_step }
        } else {
            pos
        };
        self.checkpoint(pos)?;
        let due = match self.plan.evaluate {
            Evaluate::EachEpoch => true,
            Evaluate::AtEnd => pos.global_step == self.plan.total,
            Evaluate::Never => false,
        };
        if due {
            match self.evaluate() {
                Ok(e) => self.record.evaluation(progress, epoch, e)?,
                // Ctrl-C during the evaluation: the epoch is checkpointed, the run ends now.
                Err(Error::Interrupted) => self.interrupted = true,
                Err(e) => return Err(e),
            }
        }
        Ok(pos)
    }

    /// A stop before the end, after the step that brought the run to `pos`: recorded,
    /// checkpointed, and (unless interrupted) evaluated.
    fn stop(mut self, progress: &mut dyn Progress, pos: Position, interrupted: bool) -> Result<Summary> {
        sync(self.cfg.device);
        self.record.end_epoch(pos, false);
        self.checkpoint(pos)?;
        if self.plan.evaluate != Evaluate::Never && !interrupted {
            let e = self.evaluate()?;
            self.record.stopped_evaluation(progress, pos, e);
        }
        self.finish(pos, true)
    }

    /// A run that trained no step in this invocation (`max_steps` 0, or resumed at or past its
    /// limit) still checkpoints where it is and reports the model's accuracy.
    fn no_step_trained(&mut self, pos: Position) -> Result<()> {
        if pos != self.start || self.interrupted {
            return Ok(());
        }
        self.checkpoint(pos)?;
        if self.plan.evaluate != Evaluate::Never {
            self.record.eval = Some(self.evaluate()?);
        }
        Ok(())
    }

    /// The test split's accuracy now, every rank's buffers made rank 0's first.
    fn evaluate(&self) -> Result<Evaluation> {
        self.sync_buffers()?;
        let test = self.test.as_ref().expect("a plan that evaluates has a test split");
        self.eval.run(&*self.net, self.n_classes, test, self.interrupt)
    }

    /// The checkpoint at `pos`, if the run keeps one (written by rank 0, after every rank's
    /// buffers are made rank 0's).
    fn checkpoint(&self, pos: Position) -> Result<()> {
        let Some(dir) = &self.cfg.checkpoint else { return Ok(()) };
        self.sync_buffers()?;
        if self.main {
            let lookahead = self.schedule.as_ref().map(Schedule::lookahead);
            checkpoint::save(dir, &self.vs, &self.opt, lookahead, &self.settings, pos)?;
        }
        Ok(())
    }

    /// Data-parallel: every rank's buffers (batch-norm statistics) become rank 0's, where they
    /// are about to be read ([`ProcessGroup::broadcast_buffers`]).
    fn sync_buffers(&self) -> Result<()> {
        self.group.map_or(Ok(()), |g| g.broadcast_buffers(&self.vs))
    }

    /// The files written at the end, and the summary.
    fn finish(mut self, pos: Position, stopped_early: bool) -> Result<Summary> {
        if self.cfg.export.is_some() {
            self.sync_buffers()?;
        }
        if self.main {
            let sample = self.train.sample_shape(self.cfg);
            artifacts::write_at_end(
                self.cfg,
                &mut self.record,
                &self.vs,
                &self.classes,
                self.n_classes,
                sample,
            )?;
        }
        let world = self.settings.world;
        self.record.finish(self.classes, pos, stopped_early, self.populate_seconds, world)
    }
}

/// `cfg`'s settings checked, its splits opened, the settings a checkpoint of the run keeps, and
/// the plan (whose schedule length those settings record).
fn open(cfg: &TrainConfig, world: usize) -> Result<(Splits, RunSettings, Plan)> {
    cfg.check()?;
    if cfg.recipe == Recipe::Fast && world > 1 {
        return Err(Error::Config("--recipe fast trains in one process (no data-parallel runs)".into()));
    }
    let splits = Splits::open(cfg)?;
    let plan = Plan::new(cfg, splits.train.len(), world, splits.test.is_some());
    let settings = RunSettings {
        model: cfg.model.name().into(),
        classes: splits.n_classes as i64,
        train_len: splits.train.len(),
        batch_size: cfg.batch_size,
        world,
        lr: cfg.lr,
        momentum: cfg.momentum,
        weight_decay: cfg.weight_decay,
        seed: cfg.seed,
        augment: cfg.augment,
        label_smoothing: cfg.label_smoothing,
        nesterov: cfg.nesterov,
        recipe: cfg.recipe,
        schedule_steps: plan.schedule.then_some(plan.total),
    };
    Ok((splits, settings, plan))
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
