//! The batch buffers the workers fill: host tensors libtorch owns. For the CPU a fresh pair
//! for every batch, which the batch's tensors then keep alive however long the user does; for
//! CUDA page-locked ("pinned") staging buffers, reused once their asynchronous copy is done.
use tch::{Device, Kind, Tensor};

/// One batch's host memory: `images [capacity, C, H, W]` f32 and `labels [capacity]` i64.
pub(crate) struct Slot {
    // Private: every tensor sharing this memory is made by `views`, so the contract of
    // `images_mut` is all that stands between a view and a write.
    images: Tensor,
    labels: Tensor,
    /// Samples filled (the last batch of an epoch may be short).
    pub len: usize,
    /// The dataset indices of the filled samples.
    pub indices: Vec<usize>,
    capacity: usize,
    sample: usize,
}

impl Slot {
    /// A buffer for `capacity` samples of `shape`; pinned for `pin_for` (a CUDA device).
    /// Not zeroed: only the filled part (`len` samples, all written) is ever read.
    pub fn new(capacity: usize, shape: [usize; 3], pin_for: Option<Device>) -> Self {
        let dims = [capacity as i64, shape[0] as i64, shape[1] as i64, shape[2] as i64];
        let mut images = Tensor::empty(dims, (Kind::Float, Device::Cpu));
        let mut labels = Tensor::empty([capacity as i64], (Kind::Int64, Device::Cpu));
        if let Some(device) = pin_for {
            images = images.pin_memory(device);
            labels = labels.pin_memory(device);
        }
        assert!(images.is_contiguous() && labels.is_contiguous());
        Slot {
            images,
            labels,
            len: 0,
            indices: Vec::with_capacity(capacity),
            capacity,
            sample: shape.iter().product(),
        }
    }

    /// The image memory as one flat slice, for the worker that owns this slot.
    ///
    /// # Safety
    /// While the slice lives, no other tensor may read or write this slot's memory: no tensor
    /// made by [`Slot::views`] may still exist (the loader fills a CPU slot once, before its
    /// views are made, and never again), and no device copy from a pinned slot may still be in
    /// flight (the loader reuses one only once its copy is known to be complete).
    pub unsafe fn images_mut(&mut self) -> &mut [f32] {
        // SAFETY: `images` is a contiguous f32 CPU tensor of `capacity * sample` elements that
        // this slot owns and keeps alive; the slot is `&mut`, so exactly one thread writes it,
        // and the caller guarantees that no other tensor shares its memory meanwhile.
        unsafe {
            std::slice::from_raw_parts_mut(self.images.data_ptr() as *mut f32, self.capacity * self.sample)
        }
    }

    /// The label memory.
    ///
    /// # Safety
    /// As for [`Slot::images_mut`].
    pub unsafe fn labels_mut(&mut self) -> &mut [i64] {
        // SAFETY: as for `images_mut`: a contiguous i64 tensor of `capacity` elements owned here.
        unsafe { std::slice::from_raw_parts_mut(self.labels.data_ptr() as *mut i64, self.capacity) }
    }

    /// The filled part, as views of the buffer (no copy).
    pub fn views(&self) -> (Tensor, Tensor) {
        let n = self.len as i64;
        (self.images.narrow(0, 0, n), self.labels.narrow(0, 0, n))
    }
}
