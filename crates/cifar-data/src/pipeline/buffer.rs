//! What the workers fill: a [`Buffer`] holds one batch's samples and labels, and a front's
//! [`Buffers`] decides where each job's buffer comes from and where an unused one goes.
//!
//! The tch front's buffers are libtorch tensors (a fresh pair for each CPU batch, a pinned
//! pool for CUDA); the Python front's are plain allocations lent out through DLPack and
//! returned to its pool by the capsule's deleter.

/// The element type of a batch's images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    /// `float32` (normalized).
    F32,
    /// `uint8` (pixels, as `ToImage()` gives them).
    U8,
}

impl Dtype {
    /// Bytes an element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::U8 => 1,
        }
    }
}

/// One batch's memory: `capacity` samples of `C*H*W` values of a [`Dtype`] and `capacity` i64
/// labels.
pub trait Buffer: Send + 'static {
    /// A buffer for `capacity` samples of `shape` (`[C, H, W]`) of `dtype`, made on a worker
    /// thread when the front has none to give. Need not be zeroed: only the filled part is ever
    /// read. An allocation that fails is [`crate::Error::OutOfMemory`], which fails the batch.
    fn new(capacity: usize, shape: [usize; 3], dtype: Dtype) -> crate::Result<Self>
    where
        Self: Sized;

    /// The sample and label memory, for the worker that fills this buffer: the images' bytes
    /// (4-byte aligned, `capacity * C*H*W` values of the dtype it was made for) and the labels.
    ///
    /// # Safety
    /// While the slices live, nothing else may read or write this buffer's memory: every view a
    /// front made of it (a tensor, an array) must be gone or never have been made, and no copy
    /// from it may still be in flight. The fronts uphold this by lending a buffer to a worker
    /// only when it is fresh or has come back from every user of it.
    unsafe fn parts_mut(&mut self) -> (&mut [u8], &mut [i64]);
}

/// Where a front's buffers come from and go back to, on the consumer's thread.
pub trait Buffers: Send {
    /// The buffer type.
    type Buffer: Buffer;

    /// A buffer for the next job, or `None` to have the worker make a fresh one with
    /// [`Buffer::new`] (off the consumer's thread).
    fn take(&mut self) -> Option<Self::Buffer>;

    /// A buffer no batch will hand out (an epoch left early, a batch that failed).
    fn give_back(&mut self, buffer: Self::Buffer);

    /// Where a worker takes a free buffer when it starts a job of images, before it makes a
    /// fresh one: for fronts whose buffers come back on other threads (the Python front's,
    /// freed by a capsule's deleter). With one, image jobs are sent without buffers
    /// ([`Buffers::take`] is not asked for them): a job is sent ahead of its turn, often
    /// before the batch the user holds is let go; taken at the job's start instead, that
    /// batch's buffer is used again rather than a fresh one made (whose first fill costs a
    /// page fault a page) or one held idle by a job still waiting. By default, none.
    fn lender(&self) -> Option<std::sync::Arc<dyn Lender<Self::Buffer>>> {
        None
    }

    /// The prefetch depth when the user gives none, for batches of `capacity` samples and
    /// `batch_bytes` bytes. By default, [`default_prefetch`] for training on the same host.
    fn default_prefetch(&self, capacity: usize, batch_bytes: usize) -> usize {
        default_prefetch(capacity, batch_bytes, true)
    }
}

/// Free buffers a worker may take from any thread (see [`Buffers::lender`]).
pub trait Lender<B>: Send + Sync {
    /// A free buffer, one that has come back from every user of it, or `None`.
    fn lend(&self) -> Option<B>;
}

/// The prefetch depth when none is given, for batches of `batch_bytes`: 4 batches, and more
/// for small batches so that at least 64 samples are on their way; where the batches are
/// consumed on the host (`host_step`: training on the CPU), no more batches than fit in 2 MiB
/// (but at least one).
///
/// The queue must outlast the time a woken worker waits for a core, which does not shrink with
/// the batch: on a machine whose cores the training threads keep busy that is up to a scheduler
/// tick (4 ms). Big batches need few ahead, and where the step runs on the host more cost it:
/// each buffer filled ahead is written through the caches the step works in, and a deeper
/// queue lets more workers fill at once beside it (docs/benchmarks.md's loader section has the figures).
/// Where the step runs on a device the buffers are pinned and the cap does not apply.
pub fn default_prefetch(batch_size: usize, batch_bytes: usize, host_step: bool) -> usize {
    let depth = 64usize.div_ceil(batch_size.max(1)).max(4);
    if host_step { depth.min((2 << 20) / batch_bytes.max(1)).max(1) } else { depth }
}

/// A filled buffer, as a worker hands it back: `len` samples (the last batch of an epoch may be
/// short), with the dataset index of each.
pub struct Filled<B> {
    /// The memory; its first `len` samples and labels are written.
    pub buffer: B,
    /// Samples filled.
    pub len: usize,
    /// The dataset index of each filled sample.
    pub indices: Vec<usize>,
    /// The batch's place in its epoch.
    pub step: usize,
}

/// A buffer made of two plain allocations, for fronts that lend memory out themselves (the
/// Python front hands it out through DLPack).
pub struct HeapBuffer {
    /// The images' memory, `f32`s so that it is aligned for them; a `uint8` batch uses the
    /// first quarter-as-many-elements' bytes.
    pub images: Vec<f32>,
    /// `capacity` labels.
    pub labels: Vec<i64>,
    /// The images' bytes.
    pub bytes: usize,
}

impl HeapBuffer {
    /// The images' memory, as bytes.
    pub fn image_bytes(&self) -> &[u8] {
        &bytemuck::cast_slice(&self.images)[..self.bytes]
    }
}

impl Buffer for HeapBuffer {
    fn new(capacity: usize, shape: [usize; 3], dtype: Dtype) -> crate::Result<Self> {
        let bytes = shape.iter().fold(capacity, |n, &d| n.saturating_mul(d)).saturating_mul(dtype.size());
        Ok(HeapBuffer {
            images: crate::error::try_zeroed(bytes.div_ceil(4), "a batch's images")?,
            labels: crate::error::try_zeroed(capacity, "a batch's labels")?,
            bytes,
        })
    }

    unsafe fn parts_mut(&mut self) -> (&mut [u8], &mut [i64]) {
        (&mut bytemuck::cast_slice_mut(&mut self.images)[..self.bytes], &mut self.labels)
    }
}
