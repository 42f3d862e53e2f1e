//! Filling a batch: a job (an epoch's batch of indices and perhaps a buffer) is gathered
//! straight into its buffer, augmented, and sent back numbered. Worker threads fill whole jobs
//! of dense samples (images are shared among them: [`super::team`]); without workers the
//! consumer fills the one it waits for a few samples at a time
//! ([`Recipe::fill_some`] with a deadline), so that it can answer Ctrl-C between samples and
//! go on where it stopped.
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};

use super::buffer::{Buffer, Dtype, Lender};
use super::{ImageSettings, Output};
use crate::augment::Augment;
use crate::decode::Out;
use crate::error::{Error, Result};
use crate::images::ImageSource;
use crate::source::Source;

/// A batch to make: its place in the epoch, the samples, and where to put them: a buffer from
/// the front, or `None` for one the worker takes from `lender` when it starts, else makes
/// fresh (off the consumer's thread).
pub(crate) struct Job<B> {
    pub seq: usize,
    pub epoch: u64,
    pub indices: Vec<usize>,
    pub buffer: Option<B>,
    pub lender: Option<Arc<dyn Lender<B>>>,
    /// Set when the epoch is dropped: the job's remaining samples are not worth filling.
    pub abandoned: Arc<AtomicBool>,
}

/// A job's outcome: its buffer (filled where `result` is `Ok`; `None` only when none could be
/// allocated) and the error that failed it, naming the sample.
pub(crate) struct Done<B> {
    pub seq: usize,
    pub indices: Vec<usize>,
    pub buffer: Option<B>,
    pub result: Result<()>,
}

/// A job under way: its buffer and the samples written so far.
pub(crate) struct Partial<B> {
    job: Job<B>,
    filled: usize,
}

/// Where samples come from, and what is done to each.
#[derive(Clone)]
pub(crate) enum Samples {
    /// Fixed-size samples read whole (normalized `f32`), then padded, cropped and flipped.
    Dense { source: Arc<dyn Source>, augment: Augment },
    /// Images of any size, each decoded straight into its geometry, drawn from its size.
    Images { source: Arc<dyn ImageSource>, settings: Arc<ImageSettings> },
}

impl Samples {
    pub fn len(&self) -> usize {
        match self {
            Samples::Dense { source, .. } => source.len(),
            Samples::Images { source, .. } => source.len(),
        }
    }

    pub fn check_intact(&self, indices: &[usize]) -> Result<()> {
        match self {
            Samples::Dense { source, .. } => source.check_intact(indices),
            Samples::Images { source, .. } => source.check_intact(indices),
        }
    }
}

/// What every worker shares.
#[derive(Clone)]
pub(crate) struct Recipe {
    pub samples: Samples,
    pub seed: u64,
    /// One output sample's `[C, H, W]`.
    pub shape: [usize; 3],
    pub dtype: Dtype,
    /// Samples a buffer holds.
    pub capacity: usize,
}

impl Recipe {
    /// Fills the whole job.
    pub fn run<B: Buffer>(&self, job: Job<B>, scratch: &mut Vec<f32>) -> Done<B> {
        match self.start(job) {
            Ok(mut partial) => {
                let failed = self.fill_some(&mut partial, None, scratch);
                Self::finish(partial, failed)
            }
            Err(done) => done,
        }
    }

    /// The job with its buffer, to be filled from its first sample (see [`Recipe::equip`]).
    pub fn start<B: Buffer>(&self, job: Job<B>) -> std::result::Result<Partial<B>, Done<B>> {
        self.equip(job).map(|job| Partial { job, filled: 0 })
    }

    /// The job with its buffer: the front's, else its lender's, else a fresh one (a failed
    /// allocation fails it).
    pub fn equip<B: Buffer>(&self, mut job: Job<B>) -> std::result::Result<Job<B>, Done<B>> {
        if job.buffer.is_none() {
            job.buffer = job.lender.take().and_then(|l| l.lend());
        }
        if job.buffer.is_none() {
            match B::new(self.capacity, self.shape, self.dtype) {
                Ok(b) => job.buffer = Some(b),
                Err(e) => {
                    let index = job.indices.first().copied().unwrap_or(0);
                    let result = Err(Error::Worker { index, cause: Box::new(e) });
                    return Err(Done { seq: job.seq, indices: job.indices, buffer: None, result });
                }
            }
        }
        Ok(job)
    }

    /// Fills the job's next samples, at least one, until all are written or `deadline` has
    /// passed. Returns the error that failed the job, if one did (the job is then over);
    /// [`Partial::is_complete`] tells whether it is over otherwise.
    pub fn fill_some<B: Buffer>(
        &self,
        partial: &mut Partial<B>,
        deadline: Option<Instant>,
        scratch: &mut Vec<f32>,
    ) -> Option<Error> {
        let size: usize = self.shape.iter().product();
        let Partial { job, filled } = partial;
        let buffer = job.buffer.as_mut().expect("a started job has its buffer");
        // SAFETY: a buffer reaches a job only fresh or back from every user of it (the fronts'
        // contract with `Buffers::take`), so nothing else touches it while it is filled.
        let (images, labels) = unsafe { buffer.parts_mut() };
        let result = catch_unwind(AssertUnwindSafe(|| -> Result<()> {
            while *filled < job.indices.len() {
                // An abandoned job ends between samples, so that dropping an epoch (Ctrl-C
                // leaving a loop) waits for one sample per worker, not a whole batch.
                if job.abandoned.load(Ordering::Relaxed) {
                    return Ok(());
                }
                let (k, i) = (*filled, job.indices[*filled]);
                labels[k] =
                    self.sample(job.epoch, i, &mut images[k * size * self.dtype.size()..], scratch)?;
                *filled += 1;
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
            }
            if *filled == job.indices.len() {
                // What was read is checked once for the batch: a file cut meanwhile may have
                // served zeros where no read could tell.
                self.samples.check_intact(&job.indices)?;
            }
            Ok(())
        }));
        let index = job.indices.get(*filled).or(job.indices.last()).copied().unwrap_or(0);
        let cause = match result {
            Ok(Ok(())) => return None,
            Ok(Err(e)) => e,
            Err(panic) => Error::Panic(panic_message(&*panic)),
        };
        // Over: nothing more is filled into this job.
        *filled = job.indices.len();
        Some(Error::Worker { index, cause: Box::new(cause) })
    }

    /// Writes sample `index` of epoch `epoch` at the start of `out` (the bytes from its place
    /// in the batch on) and returns its label.
    pub fn sample(&self, epoch: u64, index: usize, out: &mut [u8], scratch: &mut Vec<f32>) -> Result<i64> {
        let size: usize = self.shape.iter().product();
        match &self.samples {
            Samples::Dense { source, augment } => {
                let out = &mut bytemuck::cast_slice_mut::<u8, f32>(&mut out[..4 * size])[..];
                if augment.is_identity() {
                    source.read_into(index, out)
                } else {
                    scratch.resize(size, 0.0);
                    let label = source.read_into(index, scratch)?;
                    augment.apply(self.seed, epoch, index, self.shape, scratch, out);
                    Ok(label)
                }
            }
            Samples::Images { source, settings } => {
                let image = source.image(index)?;
                let geometry = settings.transform.draw(self.seed, epoch, index, image.size)?;
                let want = (self.shape[1] as u32, self.shape[2] as u32);
                if geometry.output() != want {
                    return Err(Error::Shape(format!(
                        "the transform made a {}x{} sample where the batch holds {}x{}",
                        geometry.output().1,
                        geometry.output().0,
                        want.1,
                        want.0
                    )));
                }
                let out = match &settings.output {
                    Output::U8 => Out::U8(&mut out[..size]),
                    Output::F32(norm) => Out::F32(bytemuck::cast_slice_mut(&mut out[..4 * size]), norm),
                };
                crate::images::render(source.as_ref(), index, &image, &geometry, out, &settings.decode)?;
                Ok(source.label(index))
            }
        }
    }

    /// The job's outcome, once [`Recipe::fill_some`] has completed or failed it.
    pub fn finish<B: Buffer>(partial: Partial<B>, failed: Option<Error>) -> Done<B> {
        let Job { seq, indices, buffer, .. } = partial.job;
        Done { seq, indices, buffer, result: failed.map_or(Ok(()), Err) }
    }
}

/// A panic's message, where it carries one.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into())
}

impl<B> Partial<B> {
    /// Whether every sample is written.
    pub fn is_complete(&self) -> bool {
        self.filled == self.job.indices.len()
    }

    /// The job's buffer, to give back when the job is abandoned.
    pub fn into_buffer(self) -> Option<B> {
        self.job.buffer
    }
}

/// A worker thread's life: jobs in, filled buffers out, until the job channel closes.
pub(crate) fn work<B: Buffer>(recipe: Recipe, jobs: Receiver<Job<B>>, done: Sender<Done<B>>) {
    run_as_batch_work();
    let mut scratch = Vec::new();
    for job in jobs {
        if done.send(recipe.run(job, &mut scratch)).is_err() {
            break;
        }
    }
}

/// Asks Linux to schedule the calling worker as batch work (`SCHED_BATCH`, same share of the
/// CPU, same niceness) so that waking it never preempts the thread that woke it.
///
/// Handing out a batch wakes a worker with the next job. Where every core is busy (libtorch's
/// threads spin between kernels), an ordinary woken thread preempts the one that woke it, which
/// is the training thread waiting for its batch: the worker's whole fill was then counted as the
/// step waiting on data, though the batch it waited for was ready (docs/benchmarks.md's loader section
/// has the figures). A failure (a sandbox that forbids the call) only costs that, so it is
/// ignored.
///
/// Written against libc: the `thread-priority` crate sets the niceness along with the policy
/// and so would reset a user's `nice`.
pub(crate) fn run_as_batch_work() {
    #[cfg(target_os = "linux")]
    // SAFETY: `sched_setscheduler` only reads the `sched_param` passed by reference, which
    // lives across the call; pid 0 names the calling thread.
    unsafe {
        let param = libc::sched_param { sched_priority: 0 };
        libc::sched_setscheduler(0, libc::SCHED_BATCH, &param);
    }
}
