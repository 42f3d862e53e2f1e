//! The tch front's buffers: host tensors libtorch owns. For the CPU a fresh pair for every
//! batch, which the batch's tensors then keep alive however long the user does; for CUDA a pool
//! of page-locked ("pinned") staging buffers, each reused once its asynchronous copy is done.
use std::time::{Duration, Instant};

use cifar_data::pipeline::{Buffer, Buffers, Dtype, default_prefetch};
use tch::{Device, Kind, Tensor};

/// The tch kind of a batch's images.
pub(crate) fn kind(dtype: Dtype) -> Kind {
    match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::U8 => Kind::Uint8,
    }
}

/// One batch's host memory: `images [capacity, C, H, W]` (f32 or u8) and `labels [capacity]` i64.
pub(crate) struct Slot {
    // Private: every tensor sharing this memory is made by `views`, so the contract of
    // `parts_mut` is all that stands between a view and a write.
    images: Tensor,
    labels: Tensor,
    capacity: usize,
    /// Bytes of one sample.
    sample: usize,
}

impl Slot {
    /// A buffer for `capacity` samples of `shape` of `dtype`; pinned for `pin_for` (a CUDA
    /// device). Not zeroed: only the filled part (all written) is ever read.
    /// A failed allocation is [`cifar_data::Error::OutOfMemory`].
    pub fn new(
        capacity: usize,
        shape: [usize; 3],
        dtype: Dtype,
        pin_for: Option<Device>,
    ) -> cifar_data::Result<Self> {
        let dims = [capacity as i64, shape[0] as i64, shape[1] as i64, shape[2] as i64];
        let sample: usize = shape.iter().product::<usize>() * dtype.size();
        let failed = |what: &str, bytes: usize| cifar_data::Error::OutOfMemory { bytes, what: what.into() };
        let bytes = capacity.saturating_mul(sample);
        let mut images = Tensor::f_empty(dims, (kind(dtype), Device::Cpu))
            .map_err(|_| failed("a batch's images", bytes))?;
        let mut labels = Tensor::f_empty([capacity as i64], (Kind::Int64, Device::Cpu))
            .map_err(|_| failed("a batch's labels", capacity * 8))?;
        if let Some(device) = pin_for {
            images = images.f_pin_memory(device).map_err(|_| failed("a pinned batch's images", bytes))?;
            labels =
                labels.f_pin_memory(device).map_err(|_| failed("a pinned batch's labels", capacity * 8))?;
        }
        assert!(images.is_contiguous() && labels.is_contiguous());
        Ok(Slot { images, labels, capacity, sample })
    }

    /// The first `len` samples, as views of the buffer (no copy).
    pub fn views(&self, len: usize) -> (Tensor, Tensor) {
        let n = len as i64;
        (self.images.narrow(0, 0, n), self.labels.narrow(0, 0, n))
    }
}

impl Buffer for Slot {
    fn new(capacity: usize, shape: [usize; 3], dtype: Dtype) -> cifar_data::Result<Self> {
        Slot::new(capacity, shape, dtype, None)
    }

    unsafe fn parts_mut(&mut self) -> (&mut [u8], &mut [i64]) {
        // SAFETY: `images` and `labels` are contiguous CPU tensors of `capacity * sample` bytes
        // (libtorch aligns every allocation far beyond 4 bytes) and `capacity` i64s that this
        // slot owns and keeps alive, in two separate allocations; the slot is `&mut`, so exactly
        // one thread writes it, and the caller guarantees that no other tensor shares their
        // memory meanwhile.
        unsafe {
            (
                std::slice::from_raw_parts_mut(
                    self.images.data_ptr() as *mut u8,
                    self.capacity * self.sample,
                ),
                std::slice::from_raw_parts_mut(self.labels.data_ptr() as *mut i64, self.capacity),
            )
        }
    }
}

/// Where the tch front's slots come from. On the CPU none are kept: the worker makes a fresh
/// slot, whose views become the batch, and the slot is never filled again. On CUDA, a pool of
/// pinned slots: a slot whose non-blocking copy was issued waits in `in_flight` until a device
/// synchronisation shows the copy done, and only then is filled again.
pub(crate) struct TchBuffers {
    pub device: Device,
    pub capacity: usize,
    pub shape: [usize; 3],
    pub dtype: Dtype,
    free: Vec<Slot>,
    /// Slots whose copy was issued but not yet synchronised.
    pub in_flight: Vec<Slot>,
    /// Copies left in flight before one synchronisation frees their buffers.
    pub max_in_flight: usize,
    /// Pinned slots allocated so far.
    pub allocated: usize,
    /// Time spent in device synchronisations since the last batch was handed out.
    pub synced: Duration,
}

impl TchBuffers {
    pub fn new(device: Device, capacity: usize, shape: [usize; 3], dtype: Dtype) -> Self {
        TchBuffers {
            device,
            capacity,
            shape,
            dtype,
            free: Vec::new(),
            in_flight: Vec::new(),
            max_in_flight: 2,
            allocated: 0,
            synced: Duration::ZERO,
        }
    }

    /// A new pinned slot for the CUDA pool.
    pub fn new_pinned(&mut self) -> cifar_data::Result<Slot> {
        let slot = Slot::new(self.capacity, self.shape, self.dtype, Some(self.device))?;
        self.allocated += 1;
        Ok(slot)
    }
}

impl Buffers for TchBuffers {
    type Buffer = Slot;

    /// On the CPU none (the worker allocates a fresh one); on CUDA one from the pool, else by
    /// synchronising outstanding copies, else a new one.
    fn take(&mut self) -> Option<Slot> {
        let Device::Cuda(i) = self.device else { return None };
        if let Some(slot) = self.free.pop() {
            return Some(slot);
        }
        // The copies read pinned memory after `to_device_` returned; tch offers no CUDA events
        // to wait for one copy, so we wait for the device (which follows every copy issued) and
        // only then give those buffers back. Batching the waits (one per `prefetch` steps)
        // keeps the GPU's queue from draining every step.
        if self.in_flight.len() >= self.max_in_flight {
            let t = Instant::now();
            tch::Cuda::synchronize(i as i64);
            self.synced += t.elapsed();
            let slot = self.in_flight.pop();
            self.free.append(&mut self.in_flight);
            return slot;
        }
        // A pinned slot that cannot be had: the worker tries a plain one, whose failure (if
        // it fails too) fails the batch with the error.
        self.new_pinned().ok()
    }

    /// Back to CUDA's pool; on the CPU the slot is simply freed.
    fn give_back(&mut self, slot: Slot) {
        if self.device.is_cuda() {
            self.free.push(slot);
        }
    }

    fn default_prefetch(&self, capacity: usize, batch_bytes: usize) -> usize {
        default_prefetch(capacity, batch_bytes, self.device == Device::Cpu)
    }
}
