//! Workers filling one batch together, for samples that each cost a decode (images of any
//! size): the batch the consumer waits for next has every worker on it, a sample at a time, so
//! it is ready in `1/N` of the time one worker takes (the first batch of an epoch included),
//! batches come back one by one rather than `N` at once, and fewer buffers are in use.
//!
//! A job pulled from the channel joins the [`Team`]'s open jobs; a worker takes the oldest
//! open job's next sample, and pulls a job only when no open job has one left. The worker that
//! ends a job's last sample hands the job back. Which worker writes a sample changes nothing
//! in it (a sample depends on `(seed, epoch, index)` alone), so the batches are the same bits
//! as when one worker fills each.
//!
//! Dense samples (microseconds each) keep one worker a job ([`super::worker::work`]): sharing
//! would cost them a lock a sample.
use std::cell::UnsafeCell;
use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use crossbeam_channel::{Receiver, Sender};

use super::buffer::Buffer;
use super::worker::{Done, Job, Recipe, panic_message, run_as_batch_work};
use crate::error::{Error, Result};

/// The open jobs the workers share, and the right to pull the next job from the channel (one
/// worker at a time waits there, so that a job pulled is seen by the others before they pull
/// one of their own).
pub(crate) struct Team<B> {
    open: Mutex<VecDeque<Arc<Shared<B>>>>,
    pulling: Mutex<()>,
}

impl<B: Buffer> Team<B> {
    pub fn new() -> Arc<Team<B>> {
        Arc::new(Team { open: Mutex::new(VecDeque::new()), pulling: Mutex::new(()) })
    }

    fn open(&self) -> MutexGuard<'_, VecDeque<Arc<Shared<B>>>> {
        // A panic while the list was held (none is expected: nothing in it panics) leaves it whole.
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The oldest open job's next sample; jobs with none left leave the list (the workers that
    /// hold their last samples hand them back).
    fn next(&self) -> Next<B> {
        let mut open = self.open();
        while let Some(job) = open.front().cloned() {
            match job.claim() {
                Claim::Sample(k) => return Next::Sample(job, k),
                Claim::None => {
                    open.pop_front();
                }
                Claim::Over => {
                    open.pop_front();
                    return Next::HandBack(job.hand_back());
                }
            }
        }
        Next::Pull
    }
}

/// What a worker does next.
enum Next<B> {
    /// Writes sample `k` of the job.
    Sample(Arc<Shared<B>>, usize),
    /// Hands back a job found abandoned or stopped with no sample in anyone's hands.
    HandBack(Done<B>),
    /// Pulls a job from the channel: no open job has a sample left.
    Pull,
}

/// What a worker gets from a job.
enum Claim {
    /// Sample `k` of the job is this worker's to write.
    Sample(usize),
    /// Nothing left to take; others hold what remains.
    None,
    /// Nothing left and nobody holds any: the caller hands the job back.
    Over,
}

/// A job under way among the workers: its buffer, written a sample at a time by whichever
/// worker claimed the sample, and the count of samples taken and in hands.
struct Shared<B> {
    seq: usize,
    epoch: u64,
    indices: Vec<usize>,
    abandoned: Arc<std::sync::atomic::AtomicBool>,
    /// The buffer, taken out by the worker that hands the job back.
    buffer: UnsafeCell<Option<B>>,
    /// The buffer's images (bytes) and labels, as `parts_mut` gave them once.
    images: (*mut u8, usize),
    labels: (*mut i64, usize),
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The next sample to give out.
    next: usize,
    /// Samples given out and not yet written.
    in_hands: usize,
    /// No more samples are given out: one failed, or the epoch was dropped.
    stopped: bool,
    /// The failed sample of the lowest place in the batch, and why.
    error: Option<(usize, Error)>,
    /// The job was handed back.
    over: bool,
}

// SAFETY: the raw parts point into `buffer`, which the job owns. Each sample's part of them is
// written only by the worker that claimed that sample (claims are unique, under `state`'s
// lock), and the buffer is taken out only once no sample is in anyone's hands and none can be
// claimed again (`over`, under the same lock). `B: Send` (a `Buffer`) may move between threads.
unsafe impl<B: Buffer> Send for Shared<B> {}
// SAFETY: as for `Send`: shared access goes through `state`'s lock, or to disjoint samples.
unsafe impl<B: Buffer> Sync for Shared<B> {}

impl<B: Buffer> Shared<B> {
    /// A started job (its buffer present), ready to be shared.
    fn new(job: Job<B>) -> Arc<Shared<B>> {
        let Job { seq, epoch, indices, buffer, abandoned, .. } = job;
        let mut shared = Arc::new(Shared {
            seq,
            epoch,
            indices,
            abandoned,
            buffer: UnsafeCell::new(buffer),
            images: (std::ptr::null_mut(), 0),
            labels: (std::ptr::null_mut(), 0),
            state: Mutex::new(State::default()),
        });
        let this = Arc::get_mut(&mut shared).expect("a new job is not shared yet");
        let buffer = this.buffer.get_mut().as_mut().expect("a started job has its buffer");
        // SAFETY: a buffer reaches a job only fresh or back from every user of it (the fronts'
        // contract with `Buffers::take`); from here on only the workers that claim its samples
        // write it, each its own samples' bytes.
        let (images, labels) = unsafe { buffer.parts_mut() };
        this.images = (images.as_mut_ptr(), images.len());
        this.labels = (labels.as_mut_ptr(), labels.len());
        shared
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn claim(&self) -> Claim {
        let mut st = self.state();
        if self.abandoned.load(Ordering::Relaxed) {
            st.stopped = true;
        }
        if !st.stopped && st.next < self.indices.len() {
            st.next += 1;
            st.in_hands += 1;
            return Claim::Sample(st.next - 1);
        }
        if st.in_hands == 0 && !st.over {
            st.over = true;
            return Claim::Over;
        }
        Claim::None
    }

    /// Records sample `k` written (or failed); `true` when the job is over and the caller
    /// must hand it back.
    fn written(&self, k: usize, result: Result<()>) -> bool {
        let mut st = self.state();
        st.in_hands -= 1;
        if let Err(e) = result {
            st.stopped = true;
            if st.error.as_ref().is_none_or(|(at, _)| k < *at) {
                st.error = Some((k, e));
            }
        }
        let nothing_left = st.stopped || st.next == self.indices.len();
        if st.in_hands == 0 && nothing_left && !st.over {
            st.over = true;
            return true;
        }
        false
    }

    /// The job's outcome. Called once, by the worker that saw it over.
    fn hand_back(&self) -> Done<B> {
        let mut st = self.state();
        debug_assert!(st.over && st.in_hands == 0);
        // SAFETY: the job is over: no sample is in anyone's hands and none will be claimed, so
        // nothing else reaches the buffer; `over` was set once, so this runs once.
        let buffer = unsafe { (*self.buffer.get()).take() };
        let result = match st.error.take() {
            Some((k, cause)) => Err(Error::Worker { index: self.indices[k], cause: Box::new(cause) }),
            None => Ok(()),
        };
        Done { seq: self.seq, indices: self.indices.clone(), buffer, result }
    }

    /// Writes sample `k`.
    fn write(&self, recipe: &Recipe, k: usize, scratch: &mut Vec<f32>) -> Result<()> {
        let size = recipe.shape.iter().product::<usize>() * recipe.dtype.size();
        assert!((k + 1) * size <= self.images.1 && k < self.labels.1, "a sample lies in its buffer");
        // SAFETY: sample `k` was claimed by this worker alone (see `Shared`'s `Sync`), its bytes
        // lie inside the buffer (asserted), and the buffer lives until the job is handed back,
        // which waits for this sample.
        let out = unsafe { std::slice::from_raw_parts_mut(self.images.0.add(k * size), size) };
        let label = recipe.sample(self.epoch, self.indices[k], out, scratch)?;
        // SAFETY: as above, for the label's one `i64`.
        unsafe { *self.labels.0.add(k) = label };
        Ok(())
    }
}

/// A worker thread's life on a team: the oldest open job's next sample, else a new job from
/// the channel, until the channel closes.
pub(crate) fn work<B: Buffer>(
    recipe: Recipe,
    jobs: Receiver<Job<B>>,
    done: Sender<Done<B>>,
    team: Arc<Team<B>>,
) {
    run_as_batch_work();
    let mut scratch = Vec::new();
    loop {
        let (job, k) = match team.next() {
            Next::Sample(job, k) => (job, k),
            Next::HandBack(over) => {
                if done.send(over).is_err() {
                    return;
                }
                continue;
            }
            Next::Pull => {
                let pulling = team.pulling.lock().unwrap_or_else(|p| p.into_inner());
                // Another worker may have pulled a job while this one waited to pull.
                if !team.open().is_empty() {
                    continue;
                }
                let Ok(job) = jobs.recv() else { return };
                match recipe.equip(job) {
                    Ok(job) => team.open().push_back(Shared::new(job)),
                    Err(failed) => {
                        if done.send(failed).is_err() {
                            return;
                        }
                    }
                }
                drop(pulling);
                continue;
            }
        };
        let result = catch_unwind(AssertUnwindSafe(|| job.write(&recipe, k, &mut scratch)))
            .unwrap_or_else(|panic| Err(Error::Panic(panic_message(&*panic))));
        if job.written(k, result) {
            let mut over = job.hand_back();
            if over.result.is_ok() && !job.abandoned.load(Ordering::Relaxed) {
                // What was read is checked once for the batch, as a lone worker checks it.
                over.result = recipe.samples.check_intact(&over.indices).map_err(|cause| Error::Worker {
                    index: over.indices.last().copied().unwrap_or(0),
                    cause: Box::new(cause),
                });
            }
            if done.send(over).is_err() {
                return;
            }
        }
    }
}
