//! A [`Source`] over a folder of images, `root/<class>/**/*.{png,jpg,...}`, like torchvision's
//! `ImageFolder`: classes are the sub-folders in sorted order, a class's images every image
//! file below its folder in torchvision's order, decoded by the loader's workers with
//! `cifar-prep`'s decoder ([`crate::prep::image::decode`]), so the values are torchvision's and
//! those of a converted file. A file that is not a regular one (a FIFO, a device) or is too
//! large to be an image is refused before it is read.
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
    /// Shared: a folder re-made with other settings keeps one listing.
    samples: std::sync::Arc<[(PathBuf, i64)]>,
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
    /// Lists `root`'s class folders and their images in torchvision's `ImageFolder` order:
    /// classes are the sub-folders (links followed) in sorted order; a class's images are
    /// every file below its folder, sub-folders included (`os.walk(followlinks=True)`), folder
    /// by folder in sorted order and sorted within each, that ends in one of
    /// [`IMG_EXTENSIONS`](crate::prep::folder::IMG_EXTENSIONS). A root without class folders,
    /// or a class without images, is refused as torchvision refuses it. By default images must
    /// be 32×32 (`SizePolicy::Reject`) and are normalized with the tutorial's mean = std = 0.5.
    pub fn new(root: impl AsRef<Path>) -> Result<Self> {
        Self::list(root.as_ref(), false)
    }

    /// As [`ImageFolder::new`], with torchvision's `allow_empty`: whether a class folder
    /// without images is taken (as a class no sample has) rather than refused.
    pub fn list(root: &Path, allow_empty: bool) -> Result<Self> {
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
        if classes.is_empty() {
            return Err(Error::NotFound {
                path: root.to_path_buf(),
                msg: format!("Couldn't find any class folder in {}.", root.display()),
            });
        }
        classes.sort();
        let mut samples = Vec::new();
        let mut empty = Vec::new();
        for (label, class) in classes.iter().enumerate() {
            let before = samples.len();
            for file in walk(&root.join(class))? {
                samples.push((file, label as i64));
            }
            if samples.len() == before {
                empty.push(class.as_str());
            }
        }
        if !empty.is_empty() && !allow_empty {
            return Err(Error::NotFound {
                path: root.to_path_buf(),
                msg: format!(
                    "{}: Found no valid file for the classes {}. Supported extensions are: {}",
                    root.display(),
                    empty.join(", "),
                    crate::prep::folder::IMG_EXTENSIONS.join(", ")
                ),
            });
        }
        Ok(Self::with_samples(classes, samples))
    }

    /// A folder already listed: `samples` (image files and labels, in index order) of
    /// `classes`, as [`ImageFolder::samples`] gave them. With [`ImageFolder::new`]'s defaults.
    pub fn with_samples(classes: Vec<String>, samples: impl Into<std::sync::Arc<[(PathBuf, i64)]>>) -> Self {
        ImageFolder {
            samples: samples.into(),
            classes,
            side: (32, 32),
            policy: SizePolicy::Reject,
            norm: std::sync::Arc::new(NormalizeBox(Normalize::new([0.5; 3], [0.5; 3]))),
        }
    }

    /// Class names, in label order.
    pub fn class_names(&self) -> &[String] {
        &self.classes
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

    /// The listing, shared (to make the same folder with other settings).
    pub fn shared_samples(&self) -> std::sync::Arc<[(PathBuf, i64)]> {
        self.samples.clone()
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
        let bytes = crate::files::read_regular(path, crate::prep::layout::MAX_MEMBER_BYTES)?;
        let (w, h) = self.side;
        let resize = (self.policy == SizePolicy::Resize).then_some((h, w));
        // The same decoder as `cifar-prep`'s image folders: the same pixels as torchvision's.
        let (ih, iw, chw) =
            crate::prep::image::decode(&bytes, resize, crate::prep::image::MAX_IMAGE_PIXELS, path)?;
        if (iw, ih) != (w, h) {
            return Err(Error::format(
                path,
                format!("is {iw}x{ih}, expected {w}x{h}: a batch holds one size (resize them to one)"),
            ));
        }
        self.norm.0.image(&chw, out);
        Ok(*label)
    }

    fn classes(&self) -> Vec<String> {
        self.classes.clone()
    }
}

/// The image files below `dir` in the order of torchvision's `make_dataset`: every folder of
/// `os.walk(dir, followlinks=True)`, sorted by path, and each one's image files sorted by name.
/// A link back to a folder that contains it (a loop) is refused, naming it.
fn walk(dir: &Path) -> Result<Vec<PathBuf>> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::MetadataExt;
    let mut folders: Vec<(PathBuf, Vec<PathBuf>)> = Vec::new();
    // (folder, the (device, inode) of it and of every folder above it)
    let mut todo: Vec<(PathBuf, Vec<(u64, u64)>)> = Vec::new();
    let top = std::fs::metadata(dir).at(dir)?;
    todo.push((dir.to_path_buf(), vec![(top.dev(), top.ino())]));
    while let Some((folder, above)) = todo.pop() {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(&folder).at(&folder)? {
            let entry = entry.at(&folder)?;
            let path = entry.path();
            let kind = entry.file_type().at(&path)?;
            // A link counts as what it points to (a dangling one as a file, as os.walk has it).
            let meta = if kind.is_symlink() { std::fs::metadata(&path).ok() } else { None };
            let is_dir = kind.is_dir() || meta.as_ref().is_some_and(|m| m.is_dir());
            if is_dir {
                let m = match meta {
                    Some(m) => m,
                    None => std::fs::metadata(&path).at(&path)?,
                };
                if above.contains(&(m.dev(), m.ino())) {
                    return Err(Error::format(&path, "links to a folder that contains it (a loop)"));
                }
                let mut below = above.clone();
                below.push((m.dev(), m.ino()));
                todo.push((path, below));
            } else if crate::prep::folder::is_image_name(&entry.file_name().to_string_lossy()) {
                files.push(path);
            }
        }
        files.sort_by(|a, b| a.as_os_str().as_bytes().cmp(b.as_os_str().as_bytes()));
        folders.push((folder, files));
    }
    // os.walk's folders sorted as Python sorts their paths: as strings, not component-wise.
    folders.sort_by(|a, b| a.0.as_os_str().as_bytes().cmp(b.0.as_os_str().as_bytes()));
    Ok(folders.into_iter().flat_map(|(_, files)| files).collect())
}
