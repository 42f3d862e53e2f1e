//! The batch buffers the Python front lends out: a [`Pool`] of plain allocations shared by a
//! loader's epochs, a [`Lease`] per batch handed out (the buffer goes back when the last view
//! of the batch is freed), and [`PoolBuffers`], what the pipeline asks buffers of.
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use cifar_data::pipeline::{Buffers, Dtype, HeapBuffer, Lender, default_prefetch};

use crate::fork;

/// A buffer's `(capacity, [C, H, W], dtype)`.
pub type Spec = (usize, [usize; 3], Dtype);

/// Free buffers, shared by a loader's epochs and the leases of their batches. At most `keep`
/// are kept: a user who held many batches and then let them go gets the memory back.
pub struct Pool {
    free: Mutex<Vec<HeapBuffer>>,
    keep: AtomicUsize,
    /// The buffers' `(capacity, shape, dtype)`, once known: a pool serves one size.
    spec: Mutex<Option<Spec>>,
    /// The process generation that made it: a forked child leaves its lock alone (a thread of
    /// the parent may have held it at the fork) and lets the buffers go instead.
    generation: u64,
}

impl Pool {
    pub fn new(keep: usize) -> Arc<Pool> {
        Arc::new(Pool {
            free: Mutex::new(Vec::new()),
            keep: AtomicUsize::new(keep),
            spec: Mutex::new(None),
            generation: fork::generation(),
        })
    }

    /// The size of buffer this pool serves, once set.
    pub fn spec(&self) -> Option<Spec> {
        *self.spec.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets the size of buffer this pool serves (a fresh pool's, before any is put in it).
    pub fn set_spec(&self, spec: Spec) {
        *self.spec.lock().unwrap_or_else(|p| p.into_inner()) = Some(spec);
    }

    /// Keeps at least `n` free buffers from now on (an epoch with more workers needs more).
    pub fn keep_at_least(&self, n: usize) {
        self.keep.fetch_max(n, Ordering::Relaxed);
    }

    /// Whether this process made the pool (it is not a copy a fork left in a child).
    pub fn is_ours(&self) -> bool {
        self.generation == fork::generation()
    }

    pub fn put(&self, b: HeapBuffer) {
        if !self.is_ours() {
            return;
        }
        // A poisoned lock only means a panic elsewhere while pushing; the list is still whole.
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        if free.len() < self.keep.load(Ordering::Relaxed) {
            free.push(b);
        }
    }

    fn take(&self) -> Option<HeapBuffer> {
        if !self.is_ours() {
            return None;
        }
        self.free.lock().unwrap_or_else(|p| p.into_inner()).pop()
    }
}

impl Lender<HeapBuffer> for Pool {
    fn lend(&self) -> Option<HeapBuffer> {
        self.take()
    }
}

/// A buffer lent out with a batch; dropping it gives the buffer back to its pool.
pub struct Lease {
    buffer: Option<HeapBuffer>,
    pool: Arc<Pool>,
}

impl Lease {
    pub fn new(buffer: HeapBuffer, pool: Arc<Pool>) -> Lease {
        Lease { buffer: Some(buffer), pool }
    }

    pub fn buffer(&self) -> &HeapBuffer {
        self.buffer.as_ref().expect("a lease holds its buffer until dropped")
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(b) = self.buffer.take() {
            self.pool.put(b);
        }
    }
}

/// The Python front's [`Buffers`]: plain allocations from the shared pool, else fresh ones
/// made by the workers (the pool grows rather than blocks while the user keeps batches).
pub struct PoolBuffers {
    pub pool: Arc<Pool>,
    pub host_step: bool,
    pub workers: usize,
}

impl Buffers for PoolBuffers {
    type Buffer = HeapBuffer;

    fn take(&mut self) -> Option<HeapBuffer> {
        self.pool.take()
    }

    fn give_back(&mut self, b: HeapBuffer) {
        self.pool.put(b);
    }

    fn lender(&self) -> Option<Arc<dyn Lender<HeapBuffer>>> {
        Some(self.pool.clone())
    }

    /// The Rust loader's depth, and at least two batches a worker (torch's `prefetch_factor=2`),
    /// so that every worker has a batch to fill: the byte cap alone leaves one batch of 256 on
    /// its way, and one worker of two busy.
    fn default_prefetch(&self, capacity: usize, batch_bytes: usize) -> usize {
        default_prefetch(capacity, batch_bytes, self.host_step).max(2 * self.workers)
    }
}
