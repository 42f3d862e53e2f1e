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

    /// Called once a batch is read, with the indices it read: an error where what was read
    /// may not be what the source holds (a file cut short while it was read serves zeros that
    /// no single read can tell). By default, `Ok`.
    fn check_intact(&self, indices: &[usize]) -> Result<()> {
        let _ = indices;
        Ok(())
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

/// A prepared split read so that a file truncated under a live loader is an error, not a
/// SIGBUS ([`TensorFile::read_image`]), and normalized anew: what torchvision's
/// `ToTensor()` then `Normalize(mean, std)` make of the same image, bit for bit (the same f32
/// operations in the same order). The Python package's datasets read through this.
///
/// A u8 file holds the pixels; an f32 file holds them normalized with its metadata's mean and
/// std, which is undone exactly where another normalization is wanted (each value is checked to
/// be what a pixel normalizes to, so a file of other values is an error naming it, never a
/// silent approximation) and copied as it is where the same one is.
pub struct Pixels {
    file: TensorFile,
    labels: Vec<i64>,
    stored: Normalize,
    wanted: Normalize,
    /// The file's normalization is the one wanted.
    same: bool,
}

impl Pixels {
    /// Opens `path` (see [`TensorFile::open`]) to read as pixels normalized by `mean` and `std`
    /// (of pixel / 255; 0 and 1 for `ToTensor()` alone; `None` for the file's own).
    pub fn open(path: impl AsRef<Path>, norm: Option<([f32; 3], [f32; 3])>) -> Result<Self> {
        let file = TensorFile::open(path)?.survive_truncation();
        let (mean, std) = norm.unwrap_or((file.mean(), file.std()));
        let same = (mean, std) == (file.mean(), file.std());
        let labels = file.labels().to_vec();
        file.check_whole("reading the labels")?;
        Ok(Pixels {
            labels,
            stored: Normalize::new(file.mean(), file.std()),
            wanted: Normalize::new(mean, std),
            same,
            file,
        })
    }

    /// The underlying file, opened to survive a truncation: read its images with
    /// [`TensorFile::read_image`] only (see `TensorFile::survive_truncation`).
    pub fn file(&self) -> &TensorFile {
        &self.file
    }

    /// Every sample's label, read once at open.
    pub fn labels(&self) -> &[i64] {
        &self.labels
    }

    /// Sample `index`'s pixels (`C*H*W` bytes, planar): a u8 file's own, an f32 file's values
    /// turned back into the pixels they were normalized from (a value that is no pixel is an
    /// error naming the file).
    pub fn read_pixels(&self, index: usize, out: &mut [u8]) -> Result<()> {
        if self.file.dtype() == StoreDtype::U8 {
            return self.file.read_image(index, out);
        }
        let mut stored = vec![0f32; out.len()];
        self.file.read_image(index, bytemuck::cast_slice_mut(&mut stored))?;
        let side = out.len() / 3;
        for (k, (o, &v)) in out.iter_mut().zip(&stored).enumerate() {
            *o = self.stored.pixel(k / side, v).ok_or_else(|| {
                crate::Error::format(
                    self.file.path(),
                    format!("sample {index} holds {v}, which is no 8-bit pixel normalized by the file's mean and std"),
                )
            })?;
        }
        Ok(())
    }
}

thread_local! {
    /// A worker's buffer for one stored image, reused from sample to sample.
    static STORED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Source for Pixels {
    fn len(&self) -> usize {
        self.file.len()
    }

    fn sample_shape(&self) -> [usize; 3] {
        self.file.image_shape()
    }

    fn read_into(&self, index: usize, out: &mut [f32]) -> Result<i64> {
        let f32_file = self.file.dtype() == StoreDtype::F32;
        if f32_file && self.same {
            self.file.read_image(index, bytemuck::cast_slice_mut(out))?;
            return Ok(self.labels[index]);
        }
        STORED.with_borrow_mut(|stored| -> Result<()> {
            // Room for the image in either dtype (a u8 image fills a quarter of it).
            stored.resize(out.len(), 0.0);
            let bytes: &mut [u8] = bytemuck::cast_slice_mut(stored.as_mut_slice());
            if !f32_file {
                let bytes = &mut bytes[..out.len()];
                self.file.read_image(index, bytes)?;
                self.wanted.image(bytes, out);
                return Ok(());
            }
            self.file.read_image(index, bytes)?;
            let side = out.len() / 3;
            for c in 0..3 {
                let plane = c * side..(c + 1) * side;
                for (o, &v) in out[plane.clone()].iter_mut().zip(&stored[plane]) {
                    match self.stored.pixel(c, v) {
                        Some(pixel) => *o = self.wanted.value(c, pixel),
                        None => {
                            return Err(crate::Error::format(
                                self.file.path(),
                                format!(
                                    "sample {index} holds {v}, which is no 8-bit pixel normalized by the \
                                     file's mean and std"
                                ),
                            ));
                        }
                    }
                }
            }
            Ok(())
        })?;
        Ok(self.labels[index])
    }

    fn classes(&self) -> Vec<String> {
        self.file.classes().to_vec()
    }

    /// A cut that left a page in two served zeros without a fault.
    fn check_intact(&self, indices: &[usize]) -> Result<()> {
        self.file.check_images_read("reading a batch", indices)
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
    fn check_intact(&self, indices: &[usize]) -> Result<()> {
        (**self).check_intact(indices)
    }
}
