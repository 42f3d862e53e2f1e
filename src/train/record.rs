//! The recorder: what a run writes as it goes — the console's loss and accuracy lines (through
//! [`Progress`]), the metrics file's lines, the charts' points, where each step's time went —
//! and the [`Summary`] it ends with.
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};

use super::batches::Fetched;
use super::checkpoint::Position;
use super::evaluate::Evaluation;
use super::metrics::{Metrics, StepTimes};
use super::plots;
use super::step::Stepped;
use crate::error::Result;

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

/// Progress that shows nothing (ranks other than 0, tests, library callers that want none).
pub struct Silent;

impl Progress for Silent {
    fn epoch(&mut self, _: u64, _: usize) {}
    fn step(&mut self, _: f64) {}
    fn line(&mut self, _: &str) {}
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
    /// Stopped (`max_steps`, an interrupt) before the run's planned end: `resume` continues it.
    pub stopped_early: bool,
    /// Where it stopped.
    pub position: Position,
    /// Steps in a whole epoch, for numbering `position` as the console does
    /// ([`Position::numbered`]).
    pub per_epoch: usize,
    /// Files written (`--preview-batch`, `--plot`, `--export`).
    pub files: Vec<PathBuf>,
    /// Charts `--plot` could not draw, and why.
    pub not_drawn: Vec<(String, String)>,
}

/// Training time between two points of the `--plot` charts.
const CHART_EVERY: Duration = Duration::from_secs(1);

/// What a run records as it goes; turned into the [`Summary`] at the end.
pub(crate) struct Record {
    metrics: Metrics,
    pub history: plots::History,
    /// The finished epochs' (and a stop's) steps.
    times: StepTimes,
    /// The run's first step, which pays for warm-up.
    first_step: StepTimes,
    steps: usize,
    epoch_seconds: Vec<f64>,
    final_loss: f64,
    pub eval: Option<Evaluation>,
    pub files: Vec<PathBuf>,
    pub not_drawn: Vec<(String, String)>,
    per_epoch: usize,
    log_every: usize,
    device: Device,
    /// The epoch in progress: its steps' times, the loss since the last line, the loss since
    /// the last chart point, the epoch's times at that point, the end of the last step.
    epoch: StepTimes,
    running: RunningLoss,
    window: RunningLoss,
    charted: StepTimes,
    last: Instant,
}

impl Record {
    /// Writing metrics to `metrics` (appended to with `append`, for a resumed run), a loss
    /// line every `log_every` steps of `per_epoch`.
    pub fn new(
        metrics: Option<&Path>,
        append: bool,
        per_epoch: usize,
        log_every: usize,
        device: Device,
    ) -> Result<Self> {
        Ok(Record {
            metrics: Metrics::create(metrics, append)?,
            history: Default::default(),
            times: Default::default(),
            first_step: Default::default(),
            steps: 0,
            epoch_seconds: Vec::new(),
            final_loss: f64::NAN,
            eval: None,
            files: Vec::new(),
            not_drawn: Vec::new(),
            per_epoch,
            log_every,
            device,
            epoch: Default::default(),
            running: RunningLoss::new(device),
            window: RunningLoss::new(device),
            charted: Default::default(),
            last: Instant::now(),
        })
    }

    /// An epoch's steps begin.
    pub fn begin_epoch(&mut self) {
        self.epoch = StepTimes::default();
        self.running = RunningLoss::new(self.device);
        self.window = RunningLoss::new(self.device);
        self.last = Instant::now();
    }

    /// The next batch of `batches`, the wait for it timed; `None` where a data-parallel rank's
    /// shard has one batch fewer than the epoch's steps (it joins the step with none).
    pub fn fetch(
        &mut self,
        batches: &mut dyn Iterator<Item = Result<Fetched>>,
    ) -> Result<(Option<Fetched>, Timed)> {
        let t0 = Instant::now();
        let batch = batches.next().transpose()?;
        // Waiting for the device inside the loader is the device computing, not data late.
        let (copy, device_wait) = batch.as_ref().map_or(Default::default(), |b| (b.copy, b.device_wait));
        let waited = t0.elapsed().saturating_sub(copy + device_wait);
        Ok((batch, Timed { t0, waited, copy }))
    }

    /// Whether no step was recorded yet.
    pub fn first(&self) -> bool {
        self.steps == 0
    }

    /// Step `at` (the position after it) trained `samples` samples as `stepped`; the loss
    /// line when one is due or the run stops (`stop`).
    pub fn step(
        &mut self,
        progress: &mut dyn Progress,
        at: Position,
        timed: Timed,
        stepped: &Stepped,
        samples: usize,
        stop: bool,
    ) -> Result<()> {
        self.running.add(&stepped.loss);
        self.window.add(&stepped.loss);
        let now = Instant::now();
        let Timed { t0, waited, copy } = timed;
        let compute = (now - t0).saturating_sub(waited + copy + stepped.comm);
        self.epoch.add(waited, copy, compute, now - self.last, samples);
        self.epoch.comm += stepped.comm;
        self.last = now;
        if self.steps == 0 {
            self.first_step = self.epoch;
        }
        self.steps += 1;
        self.chart_point(at, false);
        progress.step(self.epoch.images as f64 / self.epoch.total.as_secs_f64());
        if (at.step.is_multiple_of(self.log_every) || stop)
            && let Some(mean) = self.running.take_mean()
        {
            self.loss_line(progress, at, mean)?;
        }
        Ok(())
    }

    /// The epoch's steps end at `at`: `whole` when it trained all the steps planned for it
    /// (its time then counts as an epoch's), else at a stop.
    pub fn end_epoch(&mut self, at: Position, whole: bool) {
        self.chart_point(at, true);
        if whole {
            if let Some(mean) = self.running.take_mean() {
                self.final_loss = mean;
            }
            // (An epoch resumed exactly at its end trained none of its steps here.)
            if self.epoch.steps > 0 {
                self.epoch_seconds.push(self.epoch.total.as_secs_f64());
            }
        }
        self.times.merge(&self.epoch);
    }

    /// A point of the charts, when a second of training has passed since the last one or the
    /// epoch ends (`last`): the mean loss, images/s and data wait over that stretch.
    fn chart_point(&mut self, at: Position, last: bool) {
        let epoch = &self.epoch;
        let since = epoch.total.saturating_sub(self.charted.total);
        if !(last || since >= CHART_EVERY) {
            return;
        }
        if let Some(mean) = self.window.take_mean() {
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
    fn loss_line(&mut self, progress: &mut dyn Progress, at: Position, mean: f64) -> Result<()> {
        self.final_loss = mean;
        progress.line(&format!("[{}, {:5}] loss: {:.3}", at.epoch + 1, at.step, mean));
        let speed = self.epoch.images as f64 / self.epoch.total.as_secs_f64();
        self.metrics.log(&serde_json::json!({
            "type": "loss", "epoch": at.epoch + 1, "step": at.step, "global_step": at.global_step,
            "loss": mean, "images_per_s": speed, "data_wait_share": self.epoch.wait_share(),
        }))
    }

    /// The test accuracy after `epoch`, whose steps just ended.
    pub fn evaluation(&mut self, progress: &mut dyn Progress, epoch: u64, e: Evaluation) -> Result<()> {
        let times = &self.epoch;
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

    /// The test accuracy at a stop before the end, at `at`.
    pub fn stopped_evaluation(&mut self, progress: &mut dyn Progress, at: Position, e: Evaluation) {
        let (epoch, step) = at.numbered(self.per_epoch);
        progress.line(&format!(
            "stopped at epoch {epoch}, step {step}: test accuracy {:.2}%",
            100.0 * e.accuracy
        ));
        self.eval = Some(e);
    }

    /// The summary, also written as the metrics file's last line.
    pub fn finish(
        mut self,
        classes: Vec<String>,
        position: Position,
        stopped_early: bool,
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
            stopped_early,
            position,
            per_epoch: self.per_epoch,
            files: self.files,
            not_drawn: self.not_drawn,
        };
        self.metrics.summary(&summary)?;
        Ok(summary)
    }
}

/// When a step began, and the parts of it spent waiting for its batch and issuing its copy.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timed {
    t0: Instant,
    waited: Duration,
    copy: Duration,
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
