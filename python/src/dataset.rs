//! [`Dataset`]: a source of samples with the transform the workers run natively, and map-style
//! access one sample at a time. Two kinds: fixed-size samples (a dense tensor file read as
//! pixels, or an image folder at one size) with a padded crop and flip after the read, or
//! images of any size (an encoded tensor file, a folder read as it is, or a dense file's
//! pixels) each decoded straight into the geometry drawn for it.
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use cifar_data::decode::Out;
use cifar_data::error::try_zeroed;
use cifar_data::geometry::{Geometry, ImageTransform, Rect, Resample, Window};
use cifar_data::images::{DenseImages, EncodedImages, FolderImages};
use cifar_data::pipeline::{Dtype, ImageSettings, Output};
use cifar_data::source::Pixels;
use cifar_data::{Augment, ImageFolder, ImageSource, Padding, SizePolicy, Source};
use pyo3::exceptions::{PyIndexError, PyTypeError, PyValueError};
use pyo3::prelude::*;

use crate::array::{Array, Owner};
use crate::errors::to_py;

/// `(mean, std)`, each three floats, from Python.
type Norm = Option<([f32; 3], [f32; 3])>;

/// `RandomResizedCrop(size, scale, ratio)` from Python: `((h, w), scale, ratio)`.
type RandomResizedCrop = ((u32, u32), (f64, f64), (f64, f64));

/// The transform as the Python half reads it (`_transforms.Native.kwargs()`): a normalization,
/// a crop after padding and its fill (normalized), the flip; and for images of any size a
/// resize (`Resize`, `RandomResizedCrop`), a window of it (`CenterCrop`, `RandomCrop`), and
/// whether the batch stays `uint8`.
#[derive(FromPyObject)]
#[pyo3(from_item_all)]
pub struct Transform {
    norm: Norm,
    crop_padding: usize,
    padding_mode: String,
    fill: [f32; 3],
    flip: bool,
    crop_size: Option<(usize, usize)>,
    /// `Resize(n)`: `(n,)`; `Resize((h, w))`: `(h, w)`.
    resize: Option<Vec<u32>>,
    /// `RandomResizedCrop`: `((h, w), (scale_lo, scale_hi), (ratio_lo, ratio_hi))`.
    random_resized_crop: Option<RandomResizedCrop>,
    /// `CenterCrop((h, w))`.
    center_crop: Option<(u32, u32)>,
    /// `RandomCrop((h, w))` with no padding, after a resize.
    random_window: Option<(u32, u32)>,
    uint8: bool,
    dct_scaling: bool,
    max_image_pixels: u64,
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

    /// Whether this transform needs the image path: a resize, a window, or `uint8` batches.
    fn on_images(&self) -> bool {
        self.uint8
            || self.resize.is_some()
            || self.random_resized_crop.is_some()
            || self.center_crop.is_some()
            || self.random_window.is_some()
    }

    /// The image path's settings; `fixed`: the one size the source's images have, where a
    /// transform that neither resizes nor crops (`uint8` batches alone) keeps them.
    fn images(&self, fixed: Option<(u32, u32)>) -> PyResult<ImageSettings> {
        let resample = match (&self.random_resized_crop, self.resize.as_deref()) {
            (Some((size, scale, ratio)), None) => {
                Resample::RandomResizedCrop { size: *size, scale: *scale, ratio: *ratio }
            }
            (None, Some([n])) => Resample::Shorter(*n),
            (None, Some([h, w])) => Resample::Exact(*h, *w),
            (None, None) => Resample::None,
            _ => {
                return Err(PyTypeError::new_err("one resize (Resize or RandomResizedCrop) is run natively"));
            }
        };
        let window = match (self.center_crop, self.random_window) {
            (Some((h, w)), None) => Window::Center(h, w),
            (None, Some((h, w))) => Window::Random(h, w),
            (None, None) => match (resample, fixed) {
                // The images as they are, all of one size: that whole size.
                (Resample::None, Some((h, w))) => Window::Center(h, w),
                _ => Window::Whole,
            },
            _ => return Err(PyTypeError::new_err("one crop (CenterCrop or RandomCrop) is run natively")),
        };
        let output = match (self.uint8, self.norm) {
            (true, _) => Output::U8,
            (false, Some((mean, std))) => Output::normalized(mean, std),
            (false, None) => Output::normalized([0.0; 3], [1.0; 3]),
        };
        let decode =
            cifar_data::decode::Options { max_pixels: self.max_image_pixels, dct_scaling: self.dct_scaling };
        Ok(ImageSettings { transform: ImageTransform { resample, window, flip: self.flip }, output, decode })
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

/// Where samples come from, and what the workers do to each.
pub enum Samples {
    /// Fixed-size samples, then a padded crop and flip.
    Dense { source: Arc<dyn Source>, augment: Augment },
    /// Images of any size, decoded into their drawn geometry.
    Images { source: Arc<dyn ImageSource>, settings: ImageSettings },
}

/// A dataset's samples and their labels.
pub struct Recipe {
    pub samples: Samples,
    pub labels: Vec<i64>,
}

impl Recipe {
    fn len(&self) -> usize {
        self.labels.len()
    }
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
    classes: Vec<String>,
    /// `get` calls that drew their own crop and flip (none was given).
    draws: AtomicU64,
}

impl Dataset {
    pub fn recipe(&self) -> &Arc<Recipe> {
        &self.recipe
    }

    fn open(py: Python<'_>, origin: Origin, t: &Transform) -> PyResult<Dataset> {
        let (samples, labels, classes) = match &origin {
            Origin::File(path) => {
                if py.detach(|| cifar_data::store::is_encoded(path)).map_err(to_py)? {
                    let images = py.detach(|| EncodedImages::open(path, true)).map_err(to_py)?;
                    let labels = images.file().labels().to_vec();
                    let classes = images.file().classes().to_vec();
                    (Samples::Images { source: Arc::new(images), settings: t.images(None)? }, labels, classes)
                } else {
                    let pixels = Arc::new(py.detach(|| Pixels::open(path, t.norm)).map_err(to_py)?);
                    let labels = pixels.labels().to_vec();
                    let classes = pixels.classes();
                    if t.on_images() {
                        let [_, h, w] = pixels.sample_shape();
                        let settings = t.images(Some((h as u32, w as u32)))?;
                        let source = Arc::new(DenseImages::new(pixels));
                        (Samples::Images { source, settings }, labels, classes)
                    } else {
                        t.check_crop(pixels.as_ref())?;
                        (Samples::Dense { source: pixels, augment: t.augment()? }, labels, classes)
                    }
                }
            }
            Origin::Folder { classes, samples, size, resize, .. } => {
                let folder = ImageFolder::with_samples(classes.clone(), samples.clone());
                let labels = folder.samples().iter().map(|(_, l)| *l).collect();
                if t.on_images() {
                    // Neither resized nor cropped, images must have the folder's size (as the dense
                    // path refuses others), or are resized to it (`resize`).
                    let keep = t.resize.is_none() && t.random_resized_crop.is_none();
                    let keep = keep && t.center_crop.is_none() && t.random_window.is_none();
                    let mut settings = t.images(Some((size.1, size.0)))?;
                    let source = if keep && *resize {
                        settings.transform.resample = Resample::Exact(size.1, size.0);
                        settings.transform.window = Window::Whole;
                        FolderImages::new(folder)
                    } else if keep {
                        FolderImages::new(folder).expect_size((size.1, size.0))
                    } else {
                        FolderImages::new(folder)
                    };
                    (Samples::Images { source: Arc::new(source), settings }, labels, classes.clone())
                } else {
                    let (mean, std) = t.norm.unwrap_or(([0.0; 3], [1.0; 3]));
                    let mut folder = folder.normalize(mean, std).size(size.0, size.1);
                    if *resize {
                        folder = folder.policy(SizePolicy::Resize);
                    }
                    t.check_crop(&folder)?;
                    (
                        Samples::Dense { source: Arc::new(folder), augment: t.augment()? },
                        labels,
                        classes.clone(),
                    )
                }
            }
        };
        if let Samples::Images { settings, .. } = &samples
            && settings.transform.output_size().is_none()
        {
            return Err(PyTypeError::new_err(
                "the transform leaves each image at a size of its own, which no batch can hold: end it with a crop \
                 or a resize to one size (RandomResizedCrop, CenterCrop, Resize((h, w)))",
            ));
        }
        Ok(Dataset {
            recipe: Arc::new(Recipe { samples, labels }),
            origin,
            classes,
            draws: AtomicU64::new(0),
        })
    }

    /// `[C, H, W]` of a sample and its dtype.
    fn sample(&self) -> ([usize; 3], Dtype) {
        match &self.recipe.samples {
            Samples::Dense { source, .. } => (source.sample_shape(), Dtype::F32),
            Samples::Images { settings, .. } => {
                let (h, w) = settings.transform.output_size().expect("checked at open");
                let dtype = if matches!(settings.output, Output::U8) { Dtype::U8 } else { Dtype::F32 };
                ([3, h as usize, w as usize], dtype)
            }
        }
    }
}

/// The `(width, height)` a folder's images are loaded at: `size`, else the first image's own
/// (torchvision gives each image its size, and a batch holds one: the first's is the one the
/// others must have); 32×32 where no image can be read.
fn folder_size(py: Python<'_>, size: Option<(u32, u32)>, samples: &[(PathBuf, i64)]) -> PyResult<(u32, u32)> {
    match size {
        Some((w, h)) if w == 0 || h == 0 => {
            Err(PyValueError::new_err(format!("size {w}x{h}: both sides must be positive")))
        }
        Some(size) => Ok(size),
        // An image that cannot be read is passed over here: it fails its own batch when loaded,
        // as torchvision's fails when it is opened.
        None => Ok(py.detach(|| {
            samples
                .iter()
                .find_map(|(path, _)| {
                    let bytes =
                        cifar_data::files::read_regular(path, cifar_data::prep::layout::MAX_MEMBER_BYTES)
                            .ok()?;
                    cifar_data::decode::size(&bytes, path).ok()
                })
                .map_or((32, 32), |(h, w)| (w, h))
        })),
    }
}

/// A geometry from Python: `((top, left, height, width), (height, width), (top, left, height,
/// width), flip)` (region, resized, window, flip).
type PyGeometry = ((i64, i64, u32, u32), (u32, u32), (i64, i64, u32, u32), bool);

fn geometry(((t, l, h, w), resized, (wt, wl, wh, ww), flip): PyGeometry) -> Geometry {
    Geometry {
        region: Rect { top: t, left: l, height: h, width: w },
        resized,
        window: Rect { top: wt, left: wl, height: wh, width: ww },
        flip,
    }
}

#[pymethods]
impl Dataset {
    /// A prepared tensor file, dense (read as pixels normalized by the transform's `norm`;
    /// `None`: the file's own) or encoded (images of any size).
    #[staticmethod]
    fn tensor_file(py: Python<'_>, path: PathBuf, transform: Transform) -> PyResult<Dataset> {
        Dataset::open(py, Origin::File(path), &transform)
    }

    /// An image folder (`root/<class>/**/<image>`), decoded by the workers: at `size`
    /// (`(width, height)`; `None`: the first image's), resized to it or refused when another size
    /// (`resize`), unless the transform resizes or crops them itself. A class without images is
    /// refused unless `allow_empty`.
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
        let folder = py.detach(|| ImageFolder::list(&root, allow_empty)).map_err(to_py)?;
        let (classes, samples) = (folder.class_names().to_vec(), folder.shared_samples());
        let size = folder_size(py, size, &samples)?;
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
        let size = folder_size(py, size, &samples)?;
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
        self.recipe.len()
    }

    /// `[C, H, W]` of a sample.
    #[getter]
    fn shape(&self) -> [usize; 3] {
        self.sample().0
    }

    /// Whether samples are decoded into a geometry of their own (images of any size).
    #[getter]
    fn images(&self) -> bool {
        matches!(self.recipe.samples, Samples::Images { .. })
    }

    /// Class names in label order (empty where the data names none).
    #[getter]
    fn classes(&self) -> Vec<String> {
        self.classes.clone()
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

    /// Sample `index` (negative counts from the end) as `(Array [C, H, W], label)`. Its random
    /// choices are `draw(size)`'s, called with the sample's `(height, width)` where there are
    /// any: `(dy, dx, flip)` for a padded crop, a geometry (see `PyGeometry`) for an image; with
    /// no `draw`, drawn here, anew each call.
    #[pyo3(signature = (index, draw=None))]
    fn get(&self, py: Python<'_>, index: isize, draw: Option<Bound<'_, PyAny>>) -> PyResult<(Array, i64)> {
        let recipe = &self.recipe;
        let n = recipe.len();
        let i = if index < 0 { index + n as isize } else { index };
        if i < 0 || i as usize >= n {
            return Err(PyIndexError::new_err(format!("index {index} is out of range for {n} samples")));
        }
        let i = i as usize;
        let (shape, dtype) = self.sample();
        let size: usize = shape.iter().product();
        let own_draw = self.draws.fetch_add(1, Ordering::Relaxed);
        let label = recipe.labels[i];
        let owner = match &recipe.samples {
            Samples::Dense { source, augment } => {
                let drawn = match &draw {
                    Some(f) => f.call1(((shape[1], shape[2]),))?.extract::<(usize, usize, bool)>()?,
                    None => augment.draw(own_draw, 0, i),
                };
                let values = py
                    .detach(|| -> cifar_data::Result<Vec<f32>> {
                        let mut out = try_zeroed(size, "a sample")?;
                        if augment.is_identity() {
                            source.read_into(i, &mut out)?;
                        } else {
                            let mut raw = try_zeroed(size, "a sample")?;
                            source.read_into(i, &mut raw)?;
                            augment.apply_drawn(drawn, shape, &raw, &mut out);
                        }
                        source.check_intact(&[i])?;
                        Ok(out)
                    })
                    .map_err(to_py)?;
                Owner::Sample(values)
            }
            Samples::Images { source, settings } => {
                let image = py.detach(|| source.image(i)).map_err(to_py)?;
                let g = match &draw {
                    Some(f) => geometry(f.call1((image.size,))?.extract::<PyGeometry>()?),
                    None => settings.transform.draw(own_draw, 0, i, image.size).map_err(to_py)?,
                };
                if g.output() != (shape[1] as u32, shape[2] as u32) {
                    return Err(PyValueError::new_err(format!(
                        "the geometry drawn gives {}x{}, the transform {}x{}",
                        g.output().1,
                        g.output().0,
                        shape[2],
                        shape[1]
                    )));
                }
                py.detach(|| -> cifar_data::Result<Owner> {
                    let owner = match (&settings.output, dtype) {
                        (Output::U8, _) => {
                            let mut out = try_zeroed::<u8>(size, "a sample")?;
                            cifar_data::images::render(
                                source.as_ref(),
                                i,
                                &image,
                                &g,
                                Out::U8(&mut out),
                                &settings.decode,
                            )?;
                            Owner::SampleU8(out)
                        }
                        (Output::F32(norm), _) => {
                            let mut out = try_zeroed::<f32>(size, "a sample")?;
                            let out_ref = Out::F32(&mut out, norm);
                            cifar_data::images::render(
                                source.as_ref(),
                                i,
                                &image,
                                &g,
                                out_ref,
                                &settings.decode,
                            )?;
                            Owner::Sample(out)
                        }
                    };
                    source.check_intact(&[i])?;
                    Ok(owner)
                })
                .map_err(to_py)?
            }
        };
        Ok((Array::new(owner, shape.map(|d| d as i64).to_vec()), label))
    }
}
