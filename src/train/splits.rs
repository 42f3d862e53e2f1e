//! The splits a run trains and tests on: opened, checked against each other and against the
//! model, with the one class count the model, the evaluation and the checkpoint share.
use std::path::Path;
use std::sync::Arc;

use super::config::{Recipe, TrainConfig};
use super::model::ModelKind;
use crate::error::{Error, Result};
use crate::source::{Dataset, Source};

/// The opened splits.
pub(crate) struct Splits {
    pub train: Arc<Dataset>,
    pub test: Option<Arc<Dataset>>,
    /// The training split's class names (empty where it has none).
    pub classes: Vec<String>,
    /// Outputs of the model: [`class_count`] of the training split.
    pub n_classes: usize,
}

/// Classes a split holds: its class names, or more if a label is beyond them (a split without
/// names: its largest label + 1).
pub fn class_count(d: &Dataset) -> usize {
    d.classes().len().max(1 + d.file().labels().iter().max().map_or(0, |&l| l as usize))
}

impl Splits {
    /// Opens `cfg`'s splits and refuses those that cannot train or be evaluated together.
    pub fn open(cfg: &TrainConfig) -> Result<Splits> {
        let train = Arc::new(Dataset::open(&cfg.train)?);
        let test = cfg.test.as_ref().map(Dataset::open).transpose()?.map(Arc::new);
        if train.is_empty() {
            return Err(Error::format(&cfg.train, "holds no images"));
        }
        if let (Some(test), Some(path)) = (&test, &cfg.test) {
            check_test(&cfg.train, &train, path, test)?;
        }
        let [_, h, w] = train.sample_shape();
        let sides = cfg.model.sides();
        if !sides.contains(&h) || !sides.contains(&w) {
            let takes = match (sides.start(), sides.end()) {
                (a, b) if a == b => format!("{a}x{a} images"),
                (a, &usize::MAX) => format!("images of at least {a}x{a}"),
                (a, b) => format!("images from {a}x{a} to {b}x{b}"),
            };
            return Err(Error::Config(format!(
                "--model {} takes {takes}, and {} holds {w}x{h}: prepare the data with                  `cifar-prep --size H,W`{}",
                cfg.model.name(),
                cfg.train.display(),
                if cfg.model == ModelKind::Resnet { "" } else { ", or use --model resnet" }
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
fn check_test(train_path: &Path, train: &Dataset, path: &Path, test: &Dataset) -> Result<()> {
    if !crate::prep::same_conversion([train.file(), test.file()]) {
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
    if test.sample_shape() != train.sample_shape() {
        return Err(Error::format(
            train_path,
            format!(
                "holds images of {:?}, and the test split {:?}",
                train.sample_shape(),
                test.sample_shape()
            ),
        ));
    }
    Ok(())
}
