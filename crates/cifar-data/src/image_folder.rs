//! A [`Source`] over a folder of images, `root/<class>/*.{png,jpg,...}`, like torchvision's
//! `ImageFolder`: classes are the sub-folders in sorted order, images are decoded by the
//! loader's workers with `cifar-prep`'s decoder ([`crate::prep::image::decode`]), so the
//! values are torchvision's and those of a converted file.
use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};
use crate::prep::Normalize;
use crate::source::Source;

/// What to do with an image whose size is not the expected one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizePolicy {
    /// Refuse it: reading it is an error naming the file and both sizes.
    Reject,
    /// Resize it (bilinear) to the expected size.
    Resize,
}

/// Images in class folders.
#[derive(Debug)]
pub struct ImageFolder {
    samples: Vec<(PathBuf, i64)>,
    classes: Vec<String>,
    side: (u32, u32),
    policy: SizePolicy,
    norm: std::sync::Arc<NormalizeBox>,
}

/// `Normalize` is large (3 KiB of tables); one shared copy serves every worker.
struct NormalizeBox(Normalize);

impl std::fmt::Debug for NormalizeBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Normalize")
    }
}

impl ImageFolder {
    /// Lists `root`'s class folders and their images (sorted, so the index order is stable).
    /// By default images must be 32×32 (`SizePolicy::Reject`) and are normalized with the
    /// tutorial's mean = std = 0.5.
    pub fn new(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref();
        let mut classes: Vec<String> = Vec::new();
        for e in std::fs::read_dir(root).at(root)? {
            let p = e.at(root)?.path();
            if p.is_dir() {
                // Two names that are not UTF-8 would become one lossy class name.
                let name = p.file_name().unwrap().to_str().ok_or_else(|| {
                    Error::format(
                        &p,
                        "is a class folder whose name is not UTF-8: rename it (e.g. with convmv)",
                    )
                })?;
                classes.push(name.to_string());
            }
        }
        classes.sort();
        let mut samples = Vec::new();
        for (label, class) in classes.iter().enumerate() {
            let dir = root.join(class);
            let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
                .at(&dir)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name().is_some_and(|n| crate::prep::folder::is_image_name(&n.to_string_lossy()))
                })
                .collect();
            files.sort();
            samples.extend(files.into_iter().map(|p| (p, label as i64)));
        }
        if samples.is_empty() {
            return Err(Error::format(root, "no images in class sub-folders (expected root/<class>/*.png)"));
        }
        Ok(ImageFolder {
            samples,
            classes,
            side: (32, 32),
            policy: SizePolicy::Reject,
            norm: std::sync::Arc::new(NormalizeBox(Normalize::new([0.5; 3], [0.5; 3]))),
        })
    }

    /// The expected `(width, height)`. By default, 32×32.
    pub fn size(mut self, width: u32, height: u32) -> Self {
        self.side = (width, height);
        self
    }

    /// What to do with other sizes. By default, `Reject`.
    pub fn policy(mut self, policy: SizePolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Per-channel mean and std (of pixel / 255). By default, 0.5 and 0.5.
    pub fn normalize(mut self, mean: [f32; 3], std: [f32; 3]) -> Self {
        self.norm = std::sync::Arc::new(NormalizeBox(Normalize::new(mean, std)));
        self
    }

    /// The image files and labels, in index order.
    pub fn samples(&self) -> &[(PathBuf, i64)] {
        &self.samples
    }
}

impl Source for ImageFolder {
    fn len(&self) -> usize {
        self.samples.len()
    }

    fn sample_shape(&self) -> [usize; 3] {
        [3, self.side.1 as usize, self.side.0 as usize]
    }

    fn read_into(&self, index: usize, out: &mut [f32]) -> Result<i64> {
        let (path, label) = &self.samples[index];
        let bytes = std::fs::read(path).at(path)?;
        let (w, h) = self.side;
        let resize = (self.policy == SizePolicy::Resize).then_some((h, w));
        // The same decoder as `cifar-prep`'s image folders: the same pixels as torchvision's.
        let (ih, iw, chw) =
            crate::prep::image::decode(&bytes, resize, crate::prep::image::MAX_IMAGE_PIXELS, path)?;
        if (iw, ih) != (w, h) {
            return Err(Error::format(path, format!("is {iw}x{ih}, expected {w}x{h}")));
        }
        self.norm.0.image(&chw, out);
        Ok(*label)
    }

    fn classes(&self) -> Vec<String> {
        self.classes.clone()
    }
}
