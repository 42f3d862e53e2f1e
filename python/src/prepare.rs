//! Preparing data from Python: a torchvision-style `root` found or prepared once, and
//! `cifar-prep`'s conversion as a function.
use std::path::PathBuf;

use cifar_data::prep::root::{Front, Root, find_or_prepare, offline_images_beside};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::errors::to_py;

/// `(mean, std)`, each three floats, from Python.
type Norm = Option<([f32; 3], [f32; 3])>;

/// Prepares `root` as `cifar-train`'s first run does (prepared files, a tarball or
/// torchvision's extracted folder there, then with `download` the official download with its
/// md5, or where offline the real images beside the checkout) and returns the `(train, test)`
/// paths. Each thing done is said on stderr, as torchvision says "Files already downloaded and
/// verified"; errors name `cifar_fast.prepare`, not a binary a pip user lacks.
#[pyfunction]
#[pyo3(signature = (root, dataset=None, download=true))]
pub fn prepare_root(
    py: Python<'_>,
    root: PathBuf,
    dataset: Option<String>,
    download: bool,
) -> PyResult<(PathBuf, PathBuf)> {
    let mut r = Root::new(root);
    r.dataset = dataset;
    r.download = download;
    r.front = Front::Python;
    // The interpreter runs from elsewhere: the checkout is the one this extension was built in
    // (`python/` in it), where there is one.
    r.offline = offline_images_beside(std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/..")));
    let found = py
        .detach(|| {
            let bar = indicatif::ProgressBar::new(0);
            find_or_prepare(&r, &mut |line| eprintln!("cifar_fast: {line}"), &bar)
        })
        .map_err(to_py)?;
    Ok((found.train, found.test))
}

/// `cifar-prep` from Python: converts `input` (a CIFAR tarball, an image folder or archive)
/// into tensor files in `out`, returning `{split: path}`.
#[pyfunction]
#[pyo3(signature = (input, out, dtype="f32", norm=None, dataset_stats=false, size=None, name=None, force=false,
                    max_image_pixels=cifar_data::prep::image::MAX_IMAGE_PIXELS, store=None, max_side=None, quality=90))]
#[allow(clippy::too_many_arguments)] // one per Python keyword
pub fn prepare(
    py: Python<'_>,
    input: PathBuf,
    out: PathBuf,
    dtype: &str,
    norm: Norm,
    dataset_stats: bool,
    size: Option<(u32, u32)>,
    name: Option<String>,
    force: bool,
    max_image_pixels: u64,
    store: Option<&str>,
    max_side: Option<u32>,
    quality: u8,
) -> PyResult<Vec<(String, PathBuf)>> {
    use cifar_data::prep::{Norm as PrepNorm, PrepOptions, Store, StoreDtype};
    let store = match store {
        None => Store::Auto,
        Some("dense") => Store::Dense,
        Some("encoded") => Store::Encoded,
        Some(other) => return Err(PyValueError::new_err(format!("store {other:?}: 'dense' or 'encoded'"))),
    };
    if max_side == Some(0) || !(1..=100).contains(&quality) {
        return Err(PyValueError::new_err("max_side must be at least 1, and quality 1 to 100"));
    }
    let dtype = match dtype {
        "f32" | "float32" => StoreDtype::F32,
        "u8" | "uint8" => StoreDtype::U8,
        other => return Err(PyValueError::new_err(format!("dtype {other:?}: 'f32' or 'u8'"))),
    };
    let norm = match (norm, dataset_stats) {
        (Some(_), true) => return Err(PyValueError::new_err("give norm or dataset_stats=True, not both")),
        (Some((mean, std)), false) => PrepNorm::Custom { mean, std },
        (None, true) => PrepNorm::Dataset,
        (None, false) => PrepNorm::Half,
    };
    if let PrepNorm::Custom { std, .. } = norm
        && std.iter().any(|s| s.is_nan() || *s <= 0.0 || s.is_infinite())
    {
        return Err(PyValueError::new_err(format!("norm std {std:?}: every value must be positive")));
    }
    if max_image_pixels == 0 {
        return Err(PyValueError::new_err("max_image_pixels must be at least 1"));
    }
    let opts = PrepOptions {
        dtype,
        norm,
        force,
        size: size.map(|(w, h)| (h, w)),
        name,
        max_image_pixels,
        store,
        max_side,
        quality,
    };
    let summary = py
        .detach(|| cifar_data::prep::prepare(&input, &out, &opts, &indicatif::ProgressBar::new(0)))
        .map_err(to_py)?;
    Ok(summary.splits.into_iter().map(|s| (s.split, s.path)).collect())
}
