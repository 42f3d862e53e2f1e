//! The configuration of a run: the tutorial's settings by default, the fast recipe's from
//! [`TrainConfig::fast`], checked once ([`TrainConfig::check`]) before any data is read.
use std::path::{Path, PathBuf};

use tch::Device;

use super::fast;
use super::model::ModelKind;
use crate::error::{Error, Result};

/// How a run trains, beyond its hyperparameters: what the run's plan (`train::plan`) makes of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Recipe {
    /// The tutorial's loop: a constant rate, the mean loss, an evaluation after each epoch.
    #[default]
    Tutorial,
    /// airbench94's ([`fast`]): whitening initialised from the data, batch-norm biases at 64×
    /// the rate, a warm-up and decay schedule over the run's steps, the summed loss,
    /// lookahead (its average swapped in at the end), the last partial batch dropped, flip and
    /// translate 2, test-time augmentation, one evaluation at the end. `lr` and
    /// `weight_decay` are then per 1,024 samples, as airbench gives them.
    Fast,
}

/// Loader threads a run may ask for: beyond this, threads only cost memory and switches.
pub const MAX_WORKERS: usize = 256;

/// Everything a run needs. [`Default`] is the tutorial on `./data`'s CIFAR-10; set the fields
/// you want to change (`let mut cfg = TrainConfig::tutorial(train, test); cfg.batch_size = 32;`).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct TrainConfig {
    /// The prepared training split.
    pub train: PathBuf,
    /// The prepared test split (evaluated as the recipe says), if any.
    pub test: Option<PathBuf>,
    /// The training recipe.
    pub recipe: Recipe,
    /// Network. By default, the tutorial's LeNet.
    pub model: ModelKind,
    /// Samples per batch (of each rank, when data-parallel). By default, 4.
    pub batch_size: usize,
    /// Epochs; a fraction trains part of the last one (the fast recipe's 9.9). By default, 10.
    pub epochs: f64,
    /// Learning rate. By default, 0.001.
    pub lr: f64,
    /// Momentum. By default, 0.9.
    pub momentum: f64,
    /// Weight decay. By default, 0.
    pub weight_decay: f64,
    /// Nesterov momentum. By default, off (`torch.optim.SGD`'s default).
    pub nesterov: bool,
    /// Label smoothing of the cross-entropy, 0 to 1. By default, 0.
    pub label_smoothing: f64,
    /// Pad-crop and flip the training images (for an encoded split, torchvision's
    /// `RandomResizedCrop` and flip). By default, off.
    pub augment: bool,
    /// Encoded splits (images of every size): the side of the square the model receives,
    /// cropped and resized from each image as torchvision's ImageNet recipe does (training:
    /// `Resize` + `CenterCrop`, or `RandomResizedCrop` + flip with `augment`; testing: `Resize`
    /// to 1/0.875 of it + `CenterCrop`). By default, 224.
    pub image_size: u32,
    /// Loader threads. By default, 2.
    pub workers: usize,
    /// Batches prepared ahead. By default (`None`), [`crate::loader::default_prefetch`].
    pub prefetch: Option<usize>,
    /// Where to train. By default, the CPU.
    pub device: Device,
    /// Seed of the weights, the order and the augmentation. By default, 0.
    pub seed: u64,
    /// bf16/fp16 autocast on CUDA. By default, off.
    pub amp: bool,
    /// Keep the training split on the device and batch there. By default, off.
    pub resident: bool,
    /// Directory for checkpoints (written after each epoch and at a stop). By default, none.
    pub checkpoint: Option<PathBuf>,
    /// Continue from the checkpoint in `checkpoint`.
    pub resume: bool,
    /// Start afresh over an existing checkpoint (without it, and without `resume`, a
    /// checkpoint directory that holds one is refused rather than overwritten).
    pub overwrite: bool,
    /// Evaluate on the test split (when the recipe says). By default, on.
    pub eval: bool,
    /// Write the trained model here as TorchScript (traced on the CPU).
    pub export: Option<PathBuf>,
    /// JSON-lines metrics file (a resumed run appends to it).
    pub metrics: Option<PathBuf>,
    /// Print the running loss every this many steps. By default (`None`), every 8,000 images
    /// (the tutorial's 2,000 steps of 4), rounded up to a whole step.
    pub log_every: Option<usize>,
    /// Stop after this many steps in all, checkpointing first: a stop, which `resume` continues.
    pub max_steps: Option<usize>,
    /// Fit libtorch's thread count to the cores other programs leave free, looking once a
    /// second; off when the user fixed the count.
    pub adapt_threads: bool,
    /// Save the first training batch, as the model receives it, as a PNG grid here.
    pub preview_batch: Option<PathBuf>,
    /// Draw the run's charts (SVG) into this directory at the end.
    pub plot: Option<PathBuf>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig::tutorial(
            "data/cifar10-train.safetensors".into(),
            Some("data/cifar10-test.safetensors".into()),
        )
    }
}

impl TrainConfig {
    /// The tutorial's settings for `train`/`test`.
    pub fn tutorial(train: PathBuf, test: Option<PathBuf>) -> Self {
        TrainConfig {
            train,
            test,
            recipe: Recipe::Tutorial,
            model: ModelKind::Lenet,
            batch_size: 4,
            epochs: 10.0,
            lr: 0.001,
            momentum: 0.9,
            weight_decay: 0.0,
            nesterov: false,
            label_smoothing: 0.0,
            image_size: 224,
            augment: false,
            workers: 2,
            prefetch: None,
            device: Device::Cpu,
            seed: 0,
            amp: false,
            resident: false,
            checkpoint: None,
            resume: false,
            overwrite: false,
            eval: true,
            export: None,
            metrics: None,
            log_every: None,
            max_steps: None,
            adapt_threads: false,
            preview_batch: None,
            plot: None,
        }
    }

    /// airbench94's settings ([`Recipe::Fast`]) for `train`/`test`: its net, batch 1,024, 9.9
    /// epochs, lr 11.5 and weight decay 0.0153 per 1,024 samples, Nesterov momentum 0.85,
    /// label smoothing 0.2, flip and translate 2.
    pub fn fast(train: PathBuf, test: Option<PathBuf>) -> Self {
        TrainConfig {
            recipe: Recipe::Fast,
            model: ModelKind::Airbench,
            batch_size: fast::BATCH_SIZE,
            epochs: fast::EPOCHS,
            lr: fast::LR,
            momentum: fast::MOMENTUM,
            weight_decay: fast::WEIGHT_DECAY,
            nesterov: true,
            label_smoothing: fast::LABEL_SMOOTHING,
            augment: true,
            ..TrainConfig::tutorial(train, test)
        }
    }

    /// Refuses settings that cannot work, before any data is read, naming the setting (as
    /// `cifar-train`'s option): [`super::run`] calls it first; a front end may call it before
    /// fetching or preparing data.
    pub fn check(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Config(msg));
        if self.batch_size == 0 {
            return bad("--batch-size must be at least 1".into());
        }
        for (flag, value, ok) in [
            ("--lr", self.lr, self.lr >= 0.0),
            ("--momentum", self.momentum, self.momentum >= 0.0),
            ("--weight-decay", self.weight_decay, self.weight_decay >= 0.0),
            ("--epochs", self.epochs, self.epochs >= 0.0),
        ] {
            if !(ok && value.is_finite()) {
                return bad(format!("{flag} {value}: must be a finite number, 0 or more"));
            }
        }
        if !(0.0..=1.0).contains(&self.label_smoothing) {
            return bad(format!("--label-smoothing {}: must be from 0 to 1", self.label_smoothing));
        }
        if self.recipe == Recipe::Fast && self.model != ModelKind::Airbench {
            return bad("--recipe fast trains its own net (--model airbench)".into());
        }
        if self.image_size == 0 || self.image_size > 4096 {
            return bad(format!("--image-size {}: from 1 to 4096", self.image_size));
        }
        if self.nesterov && self.momentum <= 0.0 {
            return bad("--nesterov needs a momentum above 0 (--momentum)".into());
        }
        if self.prefetch == Some(0) {
            return bad("--prefetch must be at least 1".into());
        }
        if self.workers > MAX_WORKERS {
            return bad(format!("--workers {}: at most {MAX_WORKERS}", self.workers));
        }
        if self.log_every == Some(0) {
            return bad("--log-every must be at least 1".into());
        }
        if self.resume && self.checkpoint.is_none() {
            return bad("--resume needs --checkpoint DIR".into());
        }
        if let Some(file) = self.checkpoint.as_deref().map(super::checkpoint::path_in)
            && file.is_dir()
        {
            return bad(format!("{}: is a directory, where the checkpoint goes", file.display()));
        }
        if let Some(dir) = self.checkpoint.as_ref().filter(|_| !self.resume && !self.overwrite)
            && super::checkpoint::path_in(dir).exists()
        {
            return bad(format!(
                "{} holds a checkpoint: continue it with --resume, or start afresh over it with --overwrite",
                dir.display()
            ));
        }
        for (flag, path) in [
            ("--metrics", &self.metrics),
            ("--export", &self.export),
            ("--preview-batch", &self.preview_batch),
        ] {
            if let Some(p) = path
                && let Some(parent) = p.parent().filter(|d| !d.as_os_str().is_empty())
                && !parent.is_dir()
            {
                return bad(format!(
                    "{flag} {}: the directory {} does not exist",
                    p.display(),
                    parent.display()
                ));
            }
        }
        for (flag, dir) in [("--plot", &self.plot), ("--checkpoint", &self.checkpoint)] {
            if let Some(d) = dir {
                directory_or_nothing(flag, d)?;
            }
        }
        self.outputs_are_distinct()?;
        if let Device::Cuda(i) = self.device
            && (i as i64) >= tch::Cuda::device_count()
        {
            return bad(format!(
                "CUDA device {i} does not exist ({} CUDA devices here)",
                tch::Cuda::device_count()
            ));
        }
        Ok(())
    }

    /// The loss lines' interval: `log_every`, or every 8,000 images rounded up to a step.
    pub fn log_interval(&self) -> usize {
        self.log_every.unwrap_or(8000usize.div_ceil(self.batch_size.max(1)))
    }
}

impl TrainConfig {
    /// Refuses two outputs of the run at one place (`--metrics F --export F`), or an output
    /// over the data it trains on: the later write would silently replace the earlier.
    fn outputs_are_distinct(&self) -> Result<()> {
        let mut places: Vec<(String, PathBuf)> = Vec::new();
        let mut add = |what: String, p: &Path| places.push((what, same_place(p)));
        add("the training split".into(), &self.train);
        if let Some(t) = &self.test {
            add("the test split".into(), t);
        }
        for (flag, path) in [
            ("--metrics", &self.metrics),
            ("--export", &self.export),
            ("--preview-batch", &self.preview_batch),
        ] {
            if let Some(p) = path {
                add(format!("{flag} {}", p.display()), p);
            }
        }
        if let Some(dir) = &self.checkpoint {
            add(format!("--checkpoint {}", dir.display()), &super::checkpoint::path_in(dir));
        }
        if let Some(dir) = &self.plot {
            for chart in super::plots::CHARTS {
                add(format!("--plot {}", dir.display()), &dir.join(chart));
            }
        }
        for (i, (a, pa)) in places.iter().enumerate() {
            if let Some((b, _)) = places[..i].iter().find(|(_, pb)| pb == pa) {
                return Err(Error::Config(format!(
                    "{a} and {b} are one file ({}): one would overwrite the other",
                    pa.display()
                )));
            }
        }
        Ok(())
    }
}

/// `p` as one spelling of its place: its directory resolved (links, `..`), then its name.
fn same_place(p: &Path) -> PathBuf {
    let parent = p.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let parent = parent.canonicalize().unwrap_or_else(|_| std::path::absolute(parent).unwrap_or_default());
    match p.file_name() {
        Some(name) => parent.join(name),
        None => parent,
    }
}

/// Refuses `dir` (made when first written to) if something other than a directory is there.
fn directory_or_nothing(flag: &str, dir: &Path) -> Result<()> {
    match std::fs::metadata(dir) {
        Ok(m) if !m.is_dir() => Err(Error::Config(format!(
            "{flag} {}: is {}, not a directory",
            dir.display(),
            crate::files::kind_of(&m)
        ))),
        _ => Ok(()),
    }
}
