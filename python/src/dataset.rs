//! [`Dataset`]: a source of samples (a tensor file read as pixels, or an image folder) with the
//! transform the workers run natively, and map-style access one sample at a time.
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use cifar_data::error::try_zeroed;
use cifar_data::source::Pixels;
use cifar_data::{Augment, ImageFolder, Padding, SizePolicy, Source};
use pyo3::exceptions::{PyIndexError, PyTypeError, PyValueError};
use pyo3::prelude::*;

use crate::array::{Array, Owner};
use crate::errors::to_py;

/// `(mean, std)`, each three floats, from Python.
type Norm = Option<([f32; 3], [f32; 3])>;

/// The transform as the Python half reads it (`_transforms.Native.kwargs()`): a normalization,
/// a crop after padding, its fill (normalized), and the flip.
#[derive(FromPyObject)]
#[pyo3(from_item_all)]
pub struct Transform {
    norm: Norm,
    crop_padding: usize,
    padding_mode: String,
    fill: [f32; 3],
    flip: bool,
    crop_size: Option<(usize, usize)>,
}

impl Transform {
    fn augment(&self) -> PyResult<Augment> {
        let padding = match self.padding_mode.as_str() {
            "constant" if self.fill == [0.0; 3] => Padding::Zero,
            "constant" => Padding::Constant(self.fill),
            "reflect" => Padding::Reflect,
            "symmetric" => Padding::Symmetric,
            "edge" => Padding::Edge,
            other => {
                return Err(PyValueError::new_err(format!(
                    "padding_mode {other:?}: one of 'constant', 'edge', 'reflect', 'symmetric'"
                )));
            }
        };
        Ok(Augment { crop_padding: self.crop_padding, padding: Some(padding), flip: self.flip })
    }

    /// A RandomCrop of `crop_size` (`(h, w)`) after `crop_padding`, checked against the images:
    /// the native crop gives back the image's size, and a padding as wide as the image would
    /// read outside it.
    fn check_crop(&self, source: &dyn Source) -> PyResult<()> {
        let [_, h, w] = source.sample_shape();
        if let Some((ch, cw)) = self.crop_size
            && (ch, cw) != (h, w)
        {
            return Err(PyTypeError::new_err(format!(
                "transform RandomCrop({ch}, {cw}) is not run by cifar_fast: it crops to {ch}x{cw}, the images \
                 are {h}x{w}: only a crop back to the image's size (after padding) is run natively; supported: \
                 see cifar_fast.SUPPORTED_TRANSFORMS"
            )));
        }
        let padding = self.crop_padding;
        if padding > 0 && padding >= h.min(w) {
            return Err(PyValueError::new_err(format!(
                "RandomCrop padding {padding} must be smaller than the images' {w}x{h}"
            )));
        }
        Ok(())
    }
}

/// Where a sample comes from, and what the workers do to it.
pub struct Recipe {
    pub source: Arc<dyn Source>,
    pub labels: Vec<i64>,
    pub augment: Augment,
}

/// How the dataset was made, to make it again with another transform.
enum Origin {
    File(PathBuf),
    Folder {
        root: PathBuf,
        classes: Vec<String>,
        samples: Arc<[(PathBuf, i64)]>,
        size: (u32, u32),
        resize: bool,
    },
}

/// A dataset the package can load: samples, labels, class names, and the native transform.
#[pyclass(module = "cifar_fast._native", frozen)]
pub struct Dataset {
    recipe: Arc<Recipe>,
    origin: Origin,
    /// `get` calls that drew their own crop and flip (none was given).
    draws: AtomicU64,
}

impl Dataset {
    pub fn recipe(&self) -> &Arc<Recipe> {
        &self.recipe
    }

    fn open(py: Python<'_>, origin: Origin, transform: &Transform) -> PyResult<Dataset> {
        let augment = transform.augment()?;
        let (source, labels): (Arc<dyn Source>, Vec<i64>) = match &origin {
            Origin::File(path) => {
                let pixels = py.detach(|| Pixels::open(path, transform.norm)).map_err(to_py)?;
                let labels = pixels.labels().to_vec();
                (Arc::new(pixels), labels)
            }
            Origin::Folder { classes, samples, size, resize, .. } => {
                let (mean, std) = transform.norm.unwrap_or(([0.0; 3], [1.0; 3]));
                let mut folder = ImageFolder::with_samples(classes.clone(), samples.clone())
                    .normalize(mean, std)
                    .size(size.0, size.1);
                if *resize {
                    folder = folder.policy(SizePolicy::Resize);
                }
                let labels = folder.samples().iter().map(|(_, l)| *l).collect();
                (Arc::new(folder), labels)
            }
        };
        transform.check_crop(source.as_ref())?;
        Ok(Dataset { recipe: Arc::new(Recipe { source, labels, augment }), origin, draws: AtomicU64::new(0) })
    }
}

fn folder_size(size: Option<(u32, u32)>) -> PyResult<(u32, u32)> {
    match size {
        Some((w, h)) if w == 0 || h == 0 => {
            Err(PyValueError::new_err(format!("size {w}x{h}: both sides must be positive")))
        }
        Some(size) => Ok(size),
        None => Ok((32, 32)),
    }
}

#[pymethods]
impl Dataset {
    /// A prepared tensor file, read as pixels normalized by the transform's `norm` (`None`: the
    /// file's own).
    #[staticmethod]
    fn tensor_file(py: Python<'_>, path: PathBuf, transform: Transform) -> PyResult<Dataset> {
        Dataset::open(py, Origin::File(path), &transform)
    }

    /// An image folder (`root/<class>/**/<image>`), decoded by the workers, at `size`
    /// (`(width, height)`; `None`: 32×32), resized to it or refused when another size
    /// (`resize`). A class without images is refused unless `allow_empty`.
    #[staticmethod]
    #[pyo3(signature = (root, transform, size=None, resize=false, allow_empty=false))]
    fn image_folder(
        py: Python<'_>,
        root: PathBuf,
        transform: Transform,
        size: Option<(u32, u32)>,
        resize: bool,
        allow_empty: bool,
    ) -> PyResult<Dataset> {
        let size = folder_size(size)?;
        let folder = py.detach(|| ImageFolder::list(&root, allow_empty)).map_err(to_py)?;
        let (classes, samples) = (folder.class_names().to_vec(), folder.shared_samples());
        Dataset::open(py, Origin::Folder { root, classes, samples, size, resize }, &transform)
    }

    /// An image folder already listed (`listing()` of another), as unpickling makes it.
    #[staticmethod]
    #[pyo3(signature = (root, classes, samples, transform, size=None, resize=false))]
    fn image_folder_listed(
        py: Python<'_>,
        root: PathBuf,
        classes: Vec<String>,
        samples: Vec<(PathBuf, i64)>,
        transform: Transform,
        size: Option<(u32, u32)>,
        resize: bool,
    ) -> PyResult<Dataset> {
        let size = folder_size(size)?;
        let samples: Arc<[(PathBuf, i64)]> = samples.into();
        Dataset::open(py, Origin::Folder { root, classes, samples, size, resize }, &transform)
    }

    /// The same samples under another transform (a folder is not listed again).
    fn with_transform(&self, py: Python<'_>, transform: Transform) -> PyResult<Dataset> {
        let origin = match &self.origin {
            Origin::File(path) => Origin::File(path.clone()),
            Origin::Folder { root, classes, samples, size, resize } => Origin::Folder {
                root: root.clone(),
                classes: classes.clone(),
                samples: samples.clone(),
                size: *size,
                resize: *resize,
            },
        };
        Dataset::open(py, origin, &transform)
    }

    /// A folder's `(classes, [(path, label)])`; `None` for a tensor file.
    #[allow(clippy::type_complexity)] // the Python tuple, as it is
    fn listing(&self) -> Option<(Vec<String>, Vec<(PathBuf, i64)>)> {
        match &self.origin {
            Origin::File(_) => None,
            Origin::Folder { classes, samples, .. } => Some((classes.clone(), samples.to_vec())),
        }
    }

    fn __len__(&self) -> usize {
        self.recipe.source.len()
    }

    /// `[C, H, W]` of a sample.
    #[getter]
    fn shape(&self) -> [usize; 3] {
        self.recipe.source.sample_shape()
    }

    /// Class names in label order (empty where the data names none).
    #[getter]
    fn classes(&self) -> Vec<String> {
        self.recipe.source.classes()
    }

    /// Every sample's label.
    #[getter]
    fn targets(&self) -> Vec<i64> {
        self.recipe.labels.clone()
    }

    /// The file or folder read.
    #[getter]
    fn path(&self) -> PathBuf {
        match &self.origin {
            Origin::File(path) => path.clone(),
            Origin::Folder { root, .. } => root.clone(),
        }
    }

    /// Sample `index` (negative counts from the end) as `(Array [C, H, W] f32, label)`, cropped
    /// and flipped as `draw` `(dy, dx, flip)` says where the transform has a random crop or
    /// flip (`None`: drawn here, anew each call).
    #[pyo3(signature = (index, draw=None))]
    fn get(
        &self,
        py: Python<'_>,
        index: isize,
        draw: Option<(usize, usize, bool)>,
    ) -> PyResult<(Array, i64)> {
        let recipe = &self.recipe;
        let n = recipe.source.len();
        let i = if index < 0 { index + n as isize } else { index };
        if i < 0 || i as usize >= n {
            return Err(PyIndexError::new_err(format!("index {index} is out of range for {n} samples")));
        }
        let i = i as usize;
        let shape = recipe.source.sample_shape();
        let size: usize = shape.iter().product();
        let augment = recipe.augment;
        let draw = draw.unwrap_or_else(|| {
            // A fresh draw each call: the call count stands for the seed.
            augment.draw(self.draws.fetch_add(1, Ordering::Relaxed), 0, i)
        });
        let (values, label) = py
            .detach(|| -> cifar_data::Result<(Vec<f32>, i64)> {
                let mut out = try_zeroed(size, "a sample")?;
                let label = if augment.is_identity() {
                    recipe.source.read_into(i, &mut out)?
                } else {
                    let mut raw = try_zeroed(size, "a sample")?;
                    let label = recipe.source.read_into(i, &mut raw)?;
                    augment.apply_drawn(draw, shape, &raw, &mut out);
                    label
                };
                recipe.source.check_intact()?;
                Ok((out, label))
            })
            .map_err(to_py)?;
        Ok((Array::new(Owner::Sample(values), shape.map(|d| d as i64).to_vec()), label))
    }
}
