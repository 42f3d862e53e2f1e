//! Where samples come from: the [`Source`] trait (no tensors here), and [`Dataset`], the source
//! over a prepared tensor file.
use std::path::Path;

use crate::error::Result;
use crate::prep::{Normalize, StoreDtype};
use crate::store::TensorFile;

/// A random-access set of labelled samples, read by the loader's worker threads.
///
/// The contract, as burn's `Dataset::get` writes it down: `read_into` is called with
/// `index < len()` only, from several threads at once; it returns `Err` only for a real read
/// failure (a corrupt image, an I/O error), which the loader reports naming the sample.
pub trait Source: Send + Sync {
    /// Number of samples.
    fn len(&self) -> usize;

    /// Whether there are none.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The shape of one sample, `[channels, height, width]`.
    fn sample_shape(&self) -> [usize; 3];

    /// Writes sample `index`, normalized, as `C*H*W` f32 values into `out` (exactly that long),
    /// and returns its label.
    fn read_into(&self, index: usize, out: &mut [f32]) -> Result<i64>;

    /// Class names in label order, where the source knows them.
    fn classes(&self) -> Vec<String> {
        Vec::new()
    }
}

/// A prepared split (`cifar-prep`'s output) as a [`Source`]: rows are read straight from the
/// memory map; u8 files are normalized on the fly with the mean and std of their metadata.
pub struct Dataset {
    file: TensorFile,
    norm: Normalize,
}

impl std::fmt::Debug for Dataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataset").field("file", &self.file).finish()
    }
}

impl Dataset {
    /// Opens and validates a tensor file (see [`TensorFile::open`]).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let file = TensorFile::open(path)?;
        let norm = Normalize::new(file.mean(), file.std());
        Ok(Dataset { file, norm })
    }

    /// The underlying file.
    pub fn file(&self) -> &TensorFile {
        &self.file
    }
}

impl Source for Dataset {
    fn len(&self) -> usize {
        self.file.len()
    }

    fn sample_shape(&self) -> [usize; 3] {
        self.file.image_shape()
    }

    #[inline]
    fn read_into(&self, index: usize, out: &mut [f32]) -> Result<i64> {
        let bytes = self.file.image_bytes(index);
        match self.file.dtype() {
            // Rows are 4-byte aligned (checked at open), so this is a plain memcpy from the map.
            StoreDtype::F32 => out.copy_from_slice(bytemuck::cast_slice(bytes)),
            StoreDtype::U8 => self.norm.image(bytes, out),
        }
        Ok(self.file.labels()[index])
    }

    fn classes(&self) -> Vec<String> {
        self.file.classes().to_vec()
    }
}

impl<S: Source + ?Sized> Source for std::sync::Arc<S> {
    fn len(&self) -> usize {
        (**self).len()
    }
    fn sample_shape(&self) -> [usize; 3] {
        (**self).sample_shape()
    }
    fn read_into(&self, index: usize, out: &mut [f32]) -> Result<i64> {
        (**self).read_into(index, out)
    }
    fn classes(&self) -> Vec<String> {
        (**self).classes()
    }
}
