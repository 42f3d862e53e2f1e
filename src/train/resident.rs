//! GPU-resident data: the whole split uploaded once, then each batch gathered, normalized and
//! augmented on the device, as the fastest CIFAR trainers do. Batches are the very ones the
//! pipelined loader makes (same sampler, same per-sample draws), so the two modes agree.
use std::sync::Arc;

use tch::{Device, Kind, Tensor};

use crate::augment::{Augment, Padding};
use crate::error::Result;
use crate::prep::StoreDtype;
use crate::source::Dataset;

/// One epoch's order and augmentation draws, on the device.
pub struct EpochPlan {
    indices: Tensor,
    dy: Tensor,
    dx: Tensor,
    flip: Tensor,
    /// `(start, len)` of each batch in the flat tensors.
    batches: Vec<(i64, i64)>,
}

impl EpochPlan {
    /// Batches in the epoch.
    pub fn len(&self) -> usize {
        self.batches.len()
    }
}

/// A split held on the device.
pub struct Resident {
    images: Tensor,
    labels: Tensor,
    normalize: Option<(Tensor, Tensor)>,
    augment: Augment,
    seed: u64,
    device: Device,
    /// `(height, width)` of an image.
    side: (i64, i64),
    /// Keeps the memory map alive under the CPU tensors that view it.
    _source: Arc<Dataset>,
}

impl Resident {
    /// Uploads `data` (its stored dtype: u8 stays u8, 4× smaller) to `device`.
    pub fn new(data: Arc<Dataset>, augment: Augment, seed: u64, device: Device) -> Result<Self> {
        let file = data.file();
        let n = file.len() as i64;
        let kind = match file.dtype() {
            StoreDtype::F32 => Kind::Float,
            StoreDtype::U8 => Kind::Uint8,
        };
        let bytes = file.all_image_bytes();
        // SAFETY: the bytes live in the read-only memory map, which `_source` keeps alive as long
        // as this struct (and the view is dropped or copied before it: `to_device` copies, and on
        // the CPU every use below is a read — `index_select` makes new tensors). The extent and
        // alignment were checked when the file was opened.
        let [c, h, w] = file.image_shape().map(|d| d as i64);
        let view = unsafe { Tensor::from_blob(bytes.as_ptr(), &[n, c, h, w], &[], kind, Device::Cpu) };
        let images = if device == Device::Cpu { view } else { view.to_device(device) };
        let labels = Tensor::from_slice(file.labels()).to_device(device);
        let normalize = (kind == Kind::Uint8).then(|| {
            let t = |v: [f32; 3]| Tensor::from_slice(&v).view([1, 3, 1, 1]).to_device(device);
            (t(file.mean()), t(file.std()))
        });
        Ok(Resident { images, labels, normalize, augment, seed, device, side: (h, w), _source: data })
    }

    /// Plans `epoch` from its batches: the indices and the augmentation draws of every sample,
    /// uploaded in one go, so the steps themselves send nothing to the device (a small upload
    /// from pageable memory would wait for the GPU's queue to drain, every step).
    pub fn plan(&self, epoch: u64, batches: &[Vec<usize>]) -> EpochPlan {
        let flat: Vec<usize> = batches.iter().flatten().copied().collect();
        let upload = |v: Vec<i64>| Tensor::from_slice(&v).to_device(self.device);
        let draws: Vec<(usize, usize, bool)> =
            flat.iter().map(|&i| self.augment.draw(self.seed, epoch, i)).collect();
        let mut starts = Vec::with_capacity(batches.len());
        let mut at = 0;
        for b in batches {
            starts.push((at as i64, b.len() as i64));
            at += b.len();
        }
        EpochPlan {
            indices: upload(flat.iter().map(|&i| i as i64).collect()),
            dy: upload(draws.iter().map(|d| d.0 as i64).collect()),
            dx: upload(draws.iter().map(|d| d.1 as i64).collect()),
            flip: upload(draws.iter().map(|d| d.2 as i64).collect()).to_kind(Kind::Bool),
            batches: starts,
        }
    }

    /// Batch `k` of a plan: `[B, 3, H, W]` f32 and `[B]` i64 on the device.
    pub fn batch(&self, plan: &EpochPlan, k: usize) -> (Tensor, Tensor) {
        let (start, b) = plan.batches[k];
        let idx = plan.indices.narrow(0, start, b);
        let mut x = self.images.index_select(0, &idx);
        if let Some((mean, std)) = &self.normalize {
            x = (x.to_kind(Kind::Float) / 255.0 - mean) / std;
        }
        let labels = self.labels.index_select(0, &idx);
        let p = self.augment.crop_padding as i64;
        if p > 0 {
            let pad = [p, p, p, p];
            x = match self.augment.padding {
                Some(Padding::Reflect) => x.reflection_pad2d(pad),
                Some(Padding::Edge) => x.replication_pad2d(pad),
                Some(Padding::Symmetric) => symmetric_pad(&x, p),
                Some(Padding::Constant(fill)) => {
                    let fill = Tensor::from_slice(&fill).view([1, 3, 1, 1]).to_device(self.device);
                    (&x - &fill).constant_pad_nd(pad) + fill
                }
                Some(Padding::Zero) | None => x.constant_pad_nd(pad),
            };
            let (h, w) = self.side;
            let range = |n: i64| Tensor::arange(n, (Kind::Int64, self.device));
            let rows = (plan.dy.narrow(0, start, b).view([b, 1]) + range(h).view([1, h])).view([b, 1, h, 1]);
            let cols = (plan.dx.narrow(0, start, b).view([b, 1]) + range(w).view([1, w])).view([b, 1, 1, w]);
            x = x.gather(2, &rows.expand([b, 3, h, w + 2 * p], false), false);
            x = x.gather(3, &cols.expand([b, 3, h, w], false), false);
        }
        if self.augment.flip {
            let mask = plan.flip.narrow(0, start, b).view([b, 1, 1, 1]);
            x = x.flip([3]).where_self(&mask, &x);
        }
        (x, labels)
    }
}

/// `x` (`[B, C, H, W]`) padded by `p` on each side with its edges mirrored, the edge pixel
/// repeated (numpy's `symmetric`), which libtorch has no kernel for.
fn symmetric_pad(x: &Tensor, p: i64) -> Tensor {
    let side = |x: &Tensor, dim: i64| {
        let n = x.size()[dim as usize];
        let first = x.narrow(dim, 0, p).flip([dim]);
        let last = x.narrow(dim, n - p, p).flip([dim]);
        Tensor::cat(&[first, x.shallow_clone(), last], dim)
    };
    side(&side(x, 3), 2)
}
