//! Checkpoints: the weights (batch-norm buffers included), the momentum, the fast recipe's
//! lookahead average, the position and the settings, in one safetensors file written
//! atomically, so `--resume` continues the same run exactly: saving, resuming, loading.
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, View};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor, nn};

use super::fast::Lookahead;
use super::sgd::Sgd;
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
    /// The fast recipe's schedule: the steps it runs over (its rates and lookahead depend on
    /// it); absent for the tutorial's.
    #[serde(default)]
    pub schedule_steps: Option<usize>,
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
            .map(|(k, v)| format!("{k}: {v} vs {}", b.get(k).unwrap_or(&serde_json::Value::Null)))
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

impl Position {
    /// Numbered as the console's `[epoch, step]` lines: the epoch from 1 and the steps trained
    /// in it; at an epoch's end, that epoch and its `per_epoch` steps.
    pub fn numbered(&self, per_epoch: usize) -> (u64, usize) {
        match (self.epoch, self.step) {
            (0, 0) => (1, 0),
            (e, 0) => (e, per_epoch),
            (e, k) => (e + 1, k),
        }
    }

    /// The position after one more step.
    pub fn advanced(self) -> Position {
        Position { step: self.step + 1, global_step: self.global_step + 1, ..self }
    }
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
    /// The fast recipe's lookahead average by variable name (empty for the tutorial's).
    pub lookahead: Vec<(String, Tensor)>,
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
        for (n, t) in &self.lookahead {
            tensors.push((format!("lookahead/{n}"), to_bytes(t)));
        }
        let meta = HashMap::from([
            ("settings".to_string(), serde_json::to_string(&self.settings).unwrap()),
            ("position".to_string(), serde_json::to_string(&self.position).unwrap()),
        ]);
        let path = path_in(dir);
        crate::files::write_atomically(&path, |tmp| {
            safetensors::serialize_to_file(tensors.iter().map(|(n, b)| (n.as_str(), b)), Some(meta), tmp)
                .map_err(|e| Error::format(tmp, e.to_string()))
        })?;
        Ok(path)
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
        let (mut weights, mut momentum, mut lookahead) = (Vec::new(), Vec::new(), Vec::new());
        for (name, view) in st.tensors() {
            if view.dtype() != Dtype::F32 {
                return Err(bad(format!("{name} is {:?}, expected F32", view.dtype())));
            }
            // A NaN or infinite weight trains nothing but NaNs: refused, not resumed.
            let values: Vec<f32> =
                view.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
            if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                return Err(bad(format!("{name} holds a non-finite value ({}) at element {i}", values[i])));
            }
            let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
            let t = Tensor::from_data_size(view.data(), &shape, Kind::Float);
            match name.split_once('/') {
                Some(("model", n)) => weights.push((n.to_string(), t)),
                Some(("momentum", n)) => momentum.push((n.to_string(), t)),
                Some(("lookahead", n)) => lookahead.push((n.to_string(), t)),
                _ => return Err(bad(format!("unexpected tensor {name}"))),
            }
        }
        Ok(Checkpoint { settings, position, weights, momentum, lookahead })
    }
}

/// A run's hold on its checkpoint directory (`DIR/.lock`, an exclusive `flock`), for its whole
/// life: a second run on the same directory is refused at its start instead of replacing the
/// first's checkpoints. The kernel drops the lock when the process ends, however it ends.
pub(crate) struct DirLock {
    _file: std::fs::File,
}

impl DirLock {
    /// Takes `dir`'s lock (making `dir`), or says which run holds it. A `fresh` run (neither
    /// resuming nor overwriting) is then refused if a checkpoint is there: another run may
    /// have written one since the settings were checked.
    pub(crate) fn take(dir: &Path, fresh: bool) -> Result<DirLock> {
        use std::os::fd::AsRawFd;
        std::fs::create_dir_all(dir).at(dir)?;
        let path = dir.join(".lock");
        let file =
            std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).at(&path)?;
        // SAFETY: flock on a descriptor this function owns; it touches no memory.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(Error::format(
                dir,
                "is the checkpoint directory of another run still going (it holds DIR/.lock): \
                 wait for it to end, or give this run its own --checkpoint",
            ));
        }
        if fresh && path_in(dir).exists() {
            return Err(Error::format(
                dir,
                "holds a checkpoint (another run wrote it meanwhile): continue it with --resume, or \
                 start afresh over it with --overwrite",
            ));
        }
        Ok(DirLock { _file: file })
    }
}

/// Writes the run's state at `position` into `dir`.
pub(crate) fn save(
    dir: &Path,
    vs: &nn::VarStore,
    opt: &Sgd,
    lookahead: Option<&Lookahead>,
    settings: &RunSettings,
    position: Position,
) -> Result<()> {
    Checkpoint {
        settings: settings.clone(),
        position,
        weights: super::model::variables_by_name(vs),
        momentum: opt.state(),
        lookahead: lookahead.map(Lookahead::state).unwrap_or_default(),
    }
    .save(dir)?;
    Ok(())
}

/// What a resumed run continues from.
pub(crate) struct Resumed {
    /// Where the checkpoint's run stopped.
    pub position: Position,
    /// Its lookahead average (empty where it had none), for [`Lookahead::load`].
    pub lookahead: Vec<(String, Tensor)>,
}

/// Loads the checkpoint in `dir` into the model and optimizer, after checking it was made with
/// these settings.
pub(crate) fn resume(
    dir: &Path,
    vs: &nn::VarStore,
    opt: &mut Sgd,
    settings: &RunSettings,
) -> Result<Resumed> {
    let ck = Checkpoint::load(dir)?;
    let path = path_in(dir);
    let diff = ck.settings.differences(settings);
    if !diff.is_empty() {
        return Err(Error::format(
            &path,
            format!("was made with other settings ({}): cannot resume this run", diff.join("; ")),
        ));
    }
    load_weights(vs, ck.weights).map_err(|m| Error::format(&path, m))?;
    opt.load_state(ck.momentum).map_err(|m| Error::format(&path, m))?;
    Ok(Resumed { position: ck.position, lookahead: ck.lookahead })
}

/// Copies `weights` into `vs`'s variables of the same names and shapes: all of them, or none
/// usable (an error saying which differs).
fn load_weights(vs: &nn::VarStore, weights: Vec<(String, Tensor)>) -> std::result::Result<(), String> {
    let mut vars = vs.variables();
    if weights.len() != vars.len() {
        return Err(format!("holds {} model tensors, this model has {}", weights.len(), vars.len()));
    }
    tch::no_grad(|| {
        for (name, t) in weights {
            let v = vars.get_mut(&name).ok_or_else(|| format!("holds {name}, which this model lacks"))?;
            if v.size() != t.size() {
                return Err(format!("{name} has shape {:?}, the model's is {:?}", t.size(), v.size()));
            }
            v.copy_(&t.to_kind(v.kind()));
        }
        Ok(())
    })
}
