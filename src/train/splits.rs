//! The splits a run trains and tests on: opened (dense tensor files, or images of every size
//! kept encoded), checked against each other and against the model, with the one class count
//! the model, the evaluation and the checkpoint share, and the loader each is read through.
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use super::config::{Recipe, TrainConfig};
use super::model::ModelKind;
use crate::error::{Error, Result};
use crate::geometry::{ImageTransform, Resample, Window};
use crate::loader::{Loader, LoaderBuilder};
use crate::pipeline::{ImageSettings, Output};
use crate::source::{Dataset, Source};
use crate::{EncodedImages, ImageSource};

/// ImageNet's per-channel mean and std (torchvision's reference recipes), with which images kept
/// encoded are normalized.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// See [`IMAGENET_MEAN`].
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// One split, as a run reads it.
#[derive(Clone)]
pub enum Split {
    /// Dense tensors, every image one size (CIFAR's files).
    Dense(Arc<Dataset>),
    /// Images of every size, kept encoded: each cropped and resized as it is read.
    Encoded(Arc<EncodedImages>),
}

impl Split {
    /// Opens the tensor file at `path`, of either kind.
    pub fn open(path: &Path) -> Result<Split> {
        Ok(if crate::store::is_encoded(path)? {
            Split::Encoded(Arc::new(EncodedImages::open(path, false)?))
        } else {
            Split::Dense(Arc::new(Dataset::open(path)?))
        })
    }

    /// Samples in it.
    pub fn len(&self) -> usize {
        match self {
            Split::Dense(d) => d.len(),
            Split::Encoded(e) => e.len(),
        }
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Class names in label order (empty where it names none).
    pub fn classes(&self) -> Vec<String> {
        match self {
            Split::Dense(d) => d.classes(),
            Split::Encoded(e) => e.classes(),
        }
    }

    /// Every sample's label.
    pub fn labels(&self) -> &[i64] {
        match self {
            Split::Dense(d) => d.file().labels(),
            Split::Encoded(e) => e.file().labels(),
        }
    }

    /// The file's metadata.
    pub fn metadata(&self) -> &HashMap<String, String> {
        match self {
            Split::Dense(d) => d.file().metadata(),
            Split::Encoded(e) => e.file().metadata(),
        }
    }

    /// The dense split, where it is one.
    pub fn dense(&self) -> Option<&Arc<Dataset>> {
        match self {
            Split::Dense(d) => Some(d),
            Split::Encoded(_) => None,
        }
    }

    /// One sample's `[C, H, W]` as the model receives it.
    pub fn sample_shape(&self, cfg: &TrainConfig) -> [usize; 3] {
        match self {
            Split::Dense(d) => d.sample_shape(),
            Split::Encoded(_) => [3, cfg.image_size as usize, cfg.image_size as usize],
        }
    }

    /// The mean and std the model's inputs were normalized with (to undo for a preview).
    pub fn normalization(&self) -> ([f32; 3], [f32; 3]) {
        match self {
            Split::Dense(d) => (d.file().mean(), d.file().std()),
            Split::Encoded(_) => (IMAGENET_MEAN, IMAGENET_STD),
        }
    }

    /// A loader over this split as a run reads it for training (`train`, augmented where
    /// `augment`) or testing: a dense split as it is (the run adds its augmentation); an encoded
    /// one through ImageNet's geometry at `image_size` (see [`TrainConfig::image_size`]),
    /// normalized.
    pub fn loader(&self, image_size: u32, train: bool, augment: bool) -> LoaderBuilder {
        match self {
            Split::Dense(d) => Loader::builder_arc(d.clone()),
            Split::Encoded(e) => {
                let n = image_size;
                let transform = match (train, augment) {
                    (true, true) => ImageTransform {
                        resample: Resample::RandomResizedCrop {
                            size: (n, n),
                            scale: (0.08, 1.0),
                            ratio: (3.0 / 4.0, 4.0 / 3.0),
                        },
                        window: Window::Whole,
                        flip: true,
                    },
                    _ => ImageTransform {
                        resample: Resample::Shorter(if train {
                            n
                        } else {
                            (n as f64 / 0.875).round() as u32
                        }),
                        window: Window::Center(n, n),
                        flip: false,
                    },
                };
                let images = ImageSettings {
                    transform,
                    output: Output::normalized(IMAGENET_MEAN, IMAGENET_STD),
                    decode: Default::default(),
                };
                Loader::builder_images(e.clone(), images)
            }
        }
    }
}

/// The opened splits.
pub(crate) struct Splits {
    pub train: Split,
    pub test: Option<Split>,
    /// The training split's class names (empty where it has none).
    pub classes: Vec<String>,
    /// Outputs of the model: [`class_count`] of the training split.
    pub n_classes: usize,
}

/// Classes a split holds: its class names, or more if a label is beyond them (a split without
/// names: its largest label + 1).
pub fn class_count(d: &Split) -> usize {
    d.classes().len().max(1 + d.labels().iter().max().map_or(0, |&l| l as usize))
}

impl Splits {
    /// Opens `cfg`'s splits and refuses those that cannot train or be evaluated together.
    pub fn open(cfg: &TrainConfig) -> Result<Splits> {
        let train = Split::open(&cfg.train)?;
        let test = cfg.test.as_deref().map(Split::open).transpose()?;
        if train.is_empty() {
            return Err(Error::format(&cfg.train, "holds no images"));
        }
        if let (Some(test), Some(path)) = (&test, &cfg.test) {
            check_test(cfg, &train, path, test)?;
        }
        if let Split::Encoded(_) = train {
            let why = match (cfg.recipe, cfg.resident) {
                (Recipe::Fast, _) => Some("--recipe fast"),
                (_, true) => Some("--resident"),
                _ => None,
            };
            if let Some(flag) = why {
                return Err(Error::Config(format!(
                    "{flag} trains on dense CIFAR-sized tensors; {} keeps its images encoded (prepare the \
                     images with `cifar-prep --size H,W` for a dense file)",
                    cfg.train.display()
                )));
            }
        }
        let [_, h, w] = train.sample_shape(cfg);
        let sides = cfg.model.sides();
        if !sides.contains(&h) || !sides.contains(&w) {
            let takes = match (sides.start(), sides.end()) {
                (a, b) if a == b => format!("{a}x{a} images"),
                (a, &usize::MAX) => format!("images of at least {a}x{a}"),
                (a, b) => format!("images from {a}x{a} to {b}x{b}"),
            };
            let fix = match train {
                Split::Dense(_) => "prepare the data with `cifar-prep --size H,W`",
                Split::Encoded(_) => "give --image-size N",
            };
            return Err(Error::Config(format!(
                "--model {} takes {takes}, and {} gives {w}x{h}: {fix}{}",
                cfg.model.name(),
                cfg.train.display(),
                if matches!(cfg.model, ModelKind::Resnet | ModelKind::Resnet18) {
                    ""
                } else {
                    ", or use --model resnet"
                }
            )));
        }
        if cfg.recipe == Recipe::Fast && cfg.batch_size > train.len() {
            return Err(Error::Config(format!(
                "--batch-size {}: more than the {} training images, and --recipe fast drops a short batch",
                cfg.batch_size,
                train.len()
            )));
        }
        let classes = train.classes();
        let n_classes = class_count(&train);
        Ok(Splits { train, test, classes, n_classes })
    }
}

/// Refuses a test split that is not the training split's: of another conversion, empty, with
/// other class names, labels beyond the training split's classes, or images of another shape.
fn check_test(cfg: &TrainConfig, train: &Split, path: &Path, test: &Split) -> Result<()> {
    let train_path = &cfg.train;
    let (a, b) = (train.metadata().get("conversion"), test.metadata().get("conversion"));
    if a.is_some() && b.is_some() && a != b {
        return Err(Error::format(
            path,
            format!(
                "and {} come from two conversions (one stopped between its renames, or two ran at \
                 once): prepare them again",
                train_path.display()
            ),
        ));
    }
    if test.is_empty() {
        return Err(Error::format(path, "holds no images"));
    }
    let (a, b) = (train.classes(), test.classes());
    if !a.is_empty() && !b.is_empty() && a != b {
        return Err(Error::format(
            path,
            format!("names {} classes, the training split {}: they are not one dataset", b.len(), a.len()),
        ));
    }
    if class_count(test) > class_count(train) {
        return Err(Error::format(
            path,
            format!(
                "has labels up to {}, beyond the training split's {} classes",
                class_count(test) - 1,
                class_count(train)
            ),
        ));
    }
    if test.sample_shape(cfg) != train.sample_shape(cfg) {
        return Err(Error::format(
            train_path,
            format!(
                "holds images of {:?}, and the test split {:?}",
                train.sample_shape(cfg),
                test.sample_shape(cfg)
            ),
        ));
    }
    Ok(())
}
