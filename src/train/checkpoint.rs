//! Checkpoints: weights, momentum, the loader's position and the settings, in one safetensors
//! file written atomically, so `--resume` continues the same run exactly.
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, View};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::error::{Error, IoContext, Result};

/// The settings a run must keep to be resumed: anything that changes the weights' trajectory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSettings {
    /// The model's name.
    pub model: String,
    /// Classes of the output layer.
    pub classes: i64,
    /// Samples in the training split.
    pub train_len: usize,
    /// Batch size (of each rank).
    pub batch_size: usize,
    /// Ranks training together (1 for one process; absent from checkpoints made before
    /// data-parallel training, which were all one process).
    #[serde(default = "one")]
    pub world: usize,
    /// Learning rate.
    pub lr: f64,
    /// Momentum.
    pub momentum: f64,
    /// Weight decay.
    pub weight_decay: f64,
    /// Seed of the order, the augmentation and the initial weights.
    pub seed: u64,
    /// Whether the standard augmentation is on.
    pub augment: bool,
    /// Label smoothing of the loss (0 in checkpoints made before it existed).
    #[serde(default)]
    pub label_smoothing: f64,
    /// Nesterov momentum (off in checkpoints made before it existed).
    #[serde(default)]
    pub nesterov: bool,
    /// The recipe (the tutorial's in checkpoints made before there were others).
    #[serde(default)]
    pub recipe: super::Recipe,
}

impl RunSettings {
    /// The fields in which `self` (a checkpoint's) differs from `now`, as `name: a vs b`.
    ///
    /// The batch is compared as the global batch, `world × batch_size`: ranks × batch that
    /// multiply to the same number train on the same samples step for step, so a checkpoint
    /// of 2 ranks × 16 resumes as 1 × 32 or 4 × 8 (re-sharded), and not as 2 × 32.
    pub fn differences(&self, now: &RunSettings) -> Vec<String> {
        let a = serde_json::to_value(self).unwrap();
        let b = serde_json::to_value(now).unwrap();
        let (a, b) = (a.as_object().unwrap(), b.as_object().unwrap());
        let mut out: Vec<String> = a
            .iter()
            .filter(|(k, v)| !matches!(k.as_str(), "batch_size" | "world") && b.get(*k) != Some(v))
            .map(|(k, v)| format!("{k}: {v} vs {}", b[k]))
            .collect();
        if self.world * self.batch_size != now.world * now.batch_size {
            out.push(if self.world == 1 && now.world == 1 {
                format!("batch_size: {} vs {}", self.batch_size, now.batch_size)
            } else {
                let ranks = |n: usize| if n == 1 { "1 rank".to_string() } else { format!("{n} ranks") };
                format!(
                    "global batch: {} × {} vs {} × {}",
                    ranks(self.world),
                    self.batch_size,
                    ranks(now.world),
                    now.batch_size
                )
            });
        }
        out
    }
}

fn one() -> usize {
    1
}

/// Where a run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    /// The epoch in progress (or the next one, when `step` is 0).
    pub epoch: u64,
    /// Batches of `epoch` already trained on.
    pub step: usize,
    /// Steps trained in all.
    pub global_step: usize,
}

/// A checkpoint's content.
pub struct Checkpoint {
    /// Settings of the run.
    pub settings: RunSettings,
    /// Position.
    pub position: Position,
    /// Model variables by name.
    pub weights: Vec<(String, Tensor)>,
    /// Momentum buffers by variable name.
    pub momentum: Vec<(String, Tensor)>,
}

/// The checkpoint file in `dir`.
pub fn path_in(dir: &Path) -> PathBuf {
    dir.join("checkpoint.safetensors")
}

struct Bytes {
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for &Bytes {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn to_bytes(t: &Tensor) -> Bytes {
    let t = t.to_device(Device::Cpu).to_kind(Kind::Float).contiguous();
    let shape = t.size().iter().map(|&d| d as usize).collect();
    let values = Vec::<f32>::try_from(t.flatten(0, -1)).expect("f32 tensor");
    Bytes { shape, data: bytemuck::cast_slice(&values).to_vec() }
}

impl Checkpoint {
    /// Writes `dir/checkpoint.safetensors` through a temporary file and a rename.
    pub fn save(&self, dir: &Path) -> Result<PathBuf> {
        std::fs::create_dir_all(dir).at(dir)?;
        let mut tensors: Vec<(String, Bytes)> = Vec::new();
        for (n, t) in &self.weights {
            tensors.push((format!("model/{n}"), to_bytes(t)));
        }
        for (n, t) in &self.momentum {
            tensors.push((format!("momentum/{n}"), to_bytes(t)));
        }
        let meta = HashMap::from([
            ("settings".to_string(), serde_json::to_string(&self.settings).unwrap()),
            ("position".to_string(), serde_json::to_string(&self.position).unwrap()),
        ]);
        let path = path_in(dir);
        let tmp = dir.join(format!(".checkpoint.{}.tmp", std::process::id()));
        let result =
            safetensors::serialize_to_file(tensors.iter().map(|(n, b)| (n.as_str(), b)), Some(meta), &tmp)
                .map_err(|e| Error::format(&tmp, e.to_string()))
                .and_then(|()| std::fs::File::open(&tmp).and_then(|f| f.sync_all()).at(&tmp))
                .and_then(|()| std::fs::rename(&tmp, &path).at(&path));
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result.map(|()| path)
    }

    /// Reads `dir/checkpoint.safetensors`.
    pub fn load(dir: &Path) -> Result<Checkpoint> {
        let path = path_in(dir);
        crate::files::regular_file(&path)?;
        let bytes = std::fs::read(&path).at(&path)?;
        let bad = |msg: String| Error::format(&path, msg);
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| bad(format!("not a checkpoint: {e}")))?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
        let meta = header.metadata().clone().unwrap_or_default();
        let field =
            |k: &str| meta.get(k).ok_or_else(|| bad(format!("no '{k}' in the checkpoint's metadata")));
        let settings = serde_json::from_str(field("settings")?).map_err(|e| bad(format!("settings: {e}")))?;
        let position = serde_json::from_str(field("position")?).map_err(|e| bad(format!("position: {e}")))?;
        let (mut weights, mut momentum) = (Vec::new(), Vec::new());
        for (name, view) in st.tensors() {
            if view.dtype() != Dtype::F32 {
                return Err(bad(format!("{name} is {:?}, expected F32", view.dtype())));
            }
            let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
            let t = Tensor::from_data_size(view.data(), &shape, Kind::Float);
            match name.split_once('/') {
                Some(("model", n)) => weights.push((n.to_string(), t)),
                Some(("momentum", n)) => momentum.push((n.to_string(), t)),
                _ => return Err(bad(format!("unexpected tensor {name}"))),
            }
        }
        Ok(Checkpoint { settings, position, weights, momentum })
    }
}
