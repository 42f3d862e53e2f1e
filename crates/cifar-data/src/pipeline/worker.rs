//! The worker threads: each takes a job (an epoch's batch of indices and perhaps a buffer),
//! gathers the samples straight into the buffer, augments them, and sends it back numbered.
use std::cell::Cell;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};

use super::buffer::{Buffer, Filled};
use crate::augment::Augment;
use crate::error::{Error, Result};
use crate::source::Source;

/// A batch to make: its place in the epoch, the samples, and where to put them: a buffer from
/// the front, or `None` for a fresh one the worker makes (off the consumer's thread).
pub(crate) struct Job<B> {
    pub seq: usize,
    pub epoch: u64,
    pub indices: Vec<usize>,
    pub buffer: Option<B>,
}

/// A worker's answer: the buffer, filled or not.
pub(crate) struct Done<B> {
    pub filled: Filled<B>,
    pub result: Result<()>,
}

/// What every worker shares.
#[derive(Clone)]
pub(crate) struct Recipe {
    pub source: Arc<dyn Source>,
    pub augment: Augment,
    pub seed: u64,
    pub shape: [usize; 3],
    /// Samples a buffer holds.
    pub capacity: usize,
}

impl Recipe {
    /// Fills the job's buffer, turning a failure or panic on a sample into an error naming it.
    pub fn run<B: Buffer>(&self, job: Job<B>, scratch: &mut Vec<f32>) -> Done<B> {
        let Job { seq, epoch, indices, buffer } = job;
        let mut buffer = buffer.unwrap_or_else(|| B::new(self.capacity, self.shape));
        let current = Cell::new(None);
        let result =
            catch_unwind(AssertUnwindSafe(|| self.fill(epoch, &indices, &mut buffer, scratch, &current)));
        let result = match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Error::Worker { index: current.get().unwrap_or(0), msg: e.to_string() }),
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown panic".into());
                Err(Error::Worker { index: current.get().unwrap_or(0), msg: format!("panicked: {msg}") })
            }
        };
        Done { filled: Filled { buffer, len: indices.len(), indices, step: seq }, result }
    }

    fn fill<B: Buffer>(
        &self,
        epoch: u64,
        indices: &[usize],
        buffer: &mut B,
        scratch: &mut Vec<f32>,
        current: &Cell<Option<usize>>,
    ) -> Result<()> {
        let size: usize = self.shape.iter().product();
        scratch.resize(size, 0.0);
        // SAFETY: a buffer reaches a worker only fresh or back from every user of it (the
        // fronts' contract with `Buffers::take`), so nothing else touches it while it is filled.
        let (images, labels) = unsafe { buffer.parts_mut() };
        for (k, &i) in indices.iter().enumerate() {
            current.set(Some(i));
            let out = &mut images[k * size..(k + 1) * size];
            labels[k] = if self.augment.is_identity() {
                self.source.read_into(i, out)?
            } else {
                let label = self.source.read_into(i, scratch)?;
                self.augment.apply(self.seed, epoch, i, self.shape, scratch, out);
                label
            };
        }
        Ok(())
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
/// step waiting on data, though the batch it waited for was ready (the README's loader section
/// has the figures). A failure (a sandbox that forbids the call) only costs that, so it is
/// ignored.
///
/// Written against libc: the `thread-priority` crate sets the niceness along with the policy
/// and so would reset a user's `nice`.
fn run_as_batch_work() {
    #[cfg(target_os = "linux")]
    // SAFETY: `sched_setscheduler` only reads the `sched_param` passed by reference, which
    // lives across the call; pid 0 names the calling thread.
    unsafe {
        let param = libc::sched_param { sched_priority: 0 };
        libc::sched_setscheduler(0, libc::SCHED_BATCH, &param);
    }
}
