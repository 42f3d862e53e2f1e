//! Where images of every size come from: the [`ImageSource`] trait (an image's bytes, its size
//! and label, by index; no tensors here) over an encoded tensor file ([`EncodedImages`]), a
//! folder of image files read as they are ([`FolderImages`]), or a dense tensor file's pixels
//! ([`DenseImages`], for transforms that resize CIFAR's images too). The loader draws each
//! sample's geometry from its size and hands both to [`crate::decode::render`].
use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::image_folder::ImageFolder;
use crate::source::Pixels;
use crate::store::encoded::EncodedFile;

/// One image as its source holds it.
pub enum ImageData<'a> {
    /// A file's encoded bytes (JPEG, PNG, ...), maybe straight from a memory map.
    Encoded(Cow<'a, [u8]>),
    /// Decoded RGB pixels, rows of `width` pixels of 3 bytes.
    Rgb(Vec<u8>),
}

/// One image, with its size.
pub struct Image<'a> {
    /// Its bytes or pixels.
    pub data: ImageData<'a>,
    /// `(height, width)`.
    pub size: (u32, u32),
}

/// A random-access set of labelled images of any size, read by the loader's worker threads.
///
/// The contract, as [`crate::Source`]'s: `image` and `label` are called with `index < len()`
/// only, from several threads at once; `image` returns `Err` only for a real read failure,
/// which the loader reports naming the sample.
pub trait ImageSource: Send + Sync {
    /// Number of images.
    fn len(&self) -> usize;

    /// Whether there are none.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Image `index`'s bytes and size.
    fn image(&self, index: usize) -> Result<Image<'_>>;

    /// Image `index`'s label.
    fn label(&self, index: usize) -> i64;

    /// What errors about image `index` name: its file, or the tensor file and the index.
    fn name(&self, index: usize) -> PathBuf;

    /// Class names in label order, where the source knows them.
    fn classes(&self) -> Vec<String> {
        Vec::new()
    }

    /// Called once a batch is read, with the indices it read (see
    /// [`crate::Source::check_intact`]). By default, `Ok`.
    fn check_intact(&self, indices: &[usize]) -> Result<()> {
        let _ = indices;
        Ok(())
    }
}

/// An encoded tensor file's images, read from its memory map.
pub struct EncodedImages {
    file: EncodedFile,
}

impl EncodedImages {
    /// Opens `path` (see [`EncodedFile::open`]); `survive`: a truncation under the map is an
    /// error of the batch that finds it, not a SIGBUS (the Python package's way).
    pub fn open(path: impl AsRef<Path>, survive: bool) -> Result<Self> {
        let file = EncodedFile::open(path)?;
        Ok(EncodedImages { file: if survive { file.survive_truncation() } else { file } })
    }

    /// The file.
    pub fn file(&self) -> &EncodedFile {
        &self.file
    }
}

impl ImageSource for EncodedImages {
    fn len(&self) -> usize {
        self.file.len()
    }

    fn image(&self, index: usize) -> Result<Image<'_>> {
        Ok(Image {
            data: ImageData::Encoded(Cow::Borrowed(self.file.image(index))),
            size: self.file.size(index),
        })
    }

    fn label(&self, index: usize) -> i64 {
        self.file.labels()[index]
    }

    fn name(&self, index: usize) -> PathBuf {
        PathBuf::from(format!("{}[{index}]", self.file.path().display()))
    }

    fn classes(&self) -> Vec<String> {
        self.file.classes().to_vec()
    }

    /// A decode costs far more than the length's check, which every batch makes.
    fn check_intact(&self, _indices: &[usize]) -> Result<()> {
        self.file.check_intact("reading a batch")
    }
}

/// A folder's image files (`root/<class>/**/<image>`, as [`ImageFolder`] lists them), each
/// read as it is, whatever its size: no preparation step, as torchvision's `ImageFolder`.
pub struct FolderImages {
    folder: ImageFolder,
    expect: Option<(u32, u32)>,
}

impl FolderImages {
    /// The images `folder` lists.
    pub fn new(folder: ImageFolder) -> Self {
        FolderImages { folder, expect: None }
    }

    /// Refuses images of another `(height, width)` than this, naming the file and both sizes
    /// (as [`crate::SizePolicy::Reject`]). By default, any size.
    pub fn expect_size(mut self, size: (u32, u32)) -> Self {
        self.expect = Some(size);
        self
    }

    /// The folder.
    pub fn folder(&self) -> &ImageFolder {
        &self.folder
    }
}

impl ImageSource for FolderImages {
    fn len(&self) -> usize {
        self.folder.samples().len()
    }

    fn image(&self, index: usize) -> Result<Image<'_>> {
        let path = &self.folder.samples()[index].0;
        let bytes = crate::files::read_regular(path, crate::prep::layout::MAX_MEMBER_BYTES)?;
        let size = crate::decode::size(&bytes, path)?;
        if let Some(want) = self.expect.filter(|&w| w != size) {
            return Err(Error::format(
                path,
                format!(
                    "is {}x{}, expected {}x{} as the other images: a batch holds one size (resize them \
                     to one in the transform)",
                    size.1, size.0, want.1, want.0
                ),
            ));
        }
        Ok(Image { data: ImageData::Encoded(Cow::Owned(bytes)), size })
    }

    fn label(&self, index: usize) -> i64 {
        self.folder.samples()[index].1
    }

    fn name(&self, index: usize) -> PathBuf {
        self.folder.samples()[index].0.clone()
    }

    fn classes(&self) -> Vec<String> {
        self.folder.class_names().to_vec()
    }
}

/// A dense tensor file's images as pixels (its stored bytes, or an f32 file's values turned
/// back into the pixels they were normalized from), for transforms that resize or crop them.
pub struct DenseImages {
    pixels: Arc<Pixels>,
}

impl DenseImages {
    /// The images of `pixels`.
    pub fn new(pixels: Arc<Pixels>) -> Self {
        DenseImages { pixels }
    }
}

impl ImageSource for DenseImages {
    fn len(&self) -> usize {
        crate::Source::len(&*self.pixels)
    }

    fn image(&self, index: usize) -> Result<Image<'_>> {
        let [_, h, w] = crate::Source::sample_shape(&*self.pixels);
        let mut chw = vec![0u8; 3 * h * w];
        self.pixels.read_pixels(index, &mut chw)?;
        let plane = h * w;
        let mut rgb = vec![0u8; 3 * plane];
        for (i, px) in rgb.chunks_exact_mut(3).enumerate() {
            px.copy_from_slice(&[chw[i], chw[plane + i], chw[2 * plane + i]]);
        }
        Ok(Image { data: ImageData::Rgb(rgb), size: (h as u32, w as u32) })
    }

    fn label(&self, index: usize) -> i64 {
        self.pixels.labels()[index]
    }

    fn name(&self, index: usize) -> PathBuf {
        PathBuf::from(format!("{}[{index}]", self.pixels.file().path().display()))
    }

    fn classes(&self) -> Vec<String> {
        crate::Source::classes(&*self.pixels)
    }

    fn check_intact(&self, indices: &[usize]) -> Result<()> {
        crate::Source::check_intact(&*self.pixels, indices)
    }
}

/// Renders image `index` of `source` with `geometry` into `out`: the one step a worker takes
/// for each sample of an image source.
pub fn render(
    source: &dyn ImageSource,
    index: usize,
    image: &Image<'_>,
    geometry: &crate::geometry::Geometry,
    out: crate::decode::Out<'_>,
    opts: &crate::decode::Options,
) -> Result<()> {
    match &image.data {
        ImageData::Encoded(bytes) => crate::decode::render(bytes, geometry, out, opts, &source.name(index)),
        ImageData::Rgb(pixels) => crate::decode::render_rgb(pixels, image.size, geometry, out)
            .map_err(|e| Error::format(source.name(index), e)),
    }
}
