//! What a run leaves besides its checkpoint: the trained model as TorchScript (`--export`),
//! the first batch as the model saw it (`--preview-batch`), the charts (`--plot`).
use std::path::Path;

use tch::{Device, Kind, Tensor, nn};

use super::config::TrainConfig;
use super::model::{self, ModelKind};
use super::plots;
use super::record::Record;
use crate::error::{Error, Result};

/// The files a run writes at its end, as `cfg` asks: the charts of `record`'s history, then
/// the model in `vs` as TorchScript. Each file written is added to `record.files`.
pub(crate) fn write_at_end(
    cfg: &TrainConfig,
    record: &mut Record,
    vs: &nn::VarStore,
    classes: &[String],
    n_classes: usize,
    sample: [usize; 3],
) -> Result<()> {
    if let Some(dir) = &cfg.plot {
        let (files, not_drawn) = plots::write_all(dir, &record.history, record.eval.as_ref(), classes)?;
        record.files.extend(files);
        record.not_drawn = not_drawn;
    }
    if let Some(path) = &cfg.export {
        export(cfg.model, vs, n_classes as i64, sample, path)?;
        record.files.push(path.clone());
    }
    Ok(())
}

/// The batch as the model gets it (augmented, normalized), back to bytes, 8 to a row, x3,
/// each image captioned with its label's class name.
pub(crate) fn save_batch_preview(
    images: &Tensor,
    labels: &Tensor,
    split: &super::splits::Split,
    png: &Path,
) -> Result<()> {
    let (mean, std) = split.normalization();
    let classes = split.classes();
    let values = Vec::<f32>::try_from(images.to_device(Device::Cpu).contiguous().flatten(0, -1))
        .map_err(|e| Error::Shape(format!("batch preview: {e}")))?;
    let labels = Vec::<i64>::try_from(labels.to_device(Device::Cpu))
        .map_err(|e| Error::Shape(format!("batch preview: {e}")))?;
    let [_, _, h, w] = images.size()[..] else {
        return Err(Error::Shape(format!("batch preview: images of shape {:?}", images.size())));
    };
    let per = values.len() / labels.len().max(1);
    let pictures: Vec<Vec<u8>> = values
        .chunks(per)
        .map(|v| crate::preview::to_cell(&crate::preview::denormalize(v, mean, std), h as usize, w as usize))
        .collect();
    let captions: Vec<String> =
        labels.iter().map(|&l| classes.get(l as usize).cloned().unwrap_or_else(|| l.to_string())).collect();
    crate::preview::save_png(&crate::preview::labelled_grid(&pictures, &captions, 8, 3), png)
}

/// Writes the model in `vs` as TorchScript to `path`: traced on the CPU in evaluation mode (a
/// copy of the weights, wherever they trained), so `torch.jit.load(path)` runs it with no code
/// of ours, on any device it is moved to. The batch dimension stays free.
pub fn export(
    kind: ModelKind,
    vs: &nn::VarStore,
    classes: i64,
    sample: [usize; 3],
    path: &Path,
) -> Result<()> {
    let mut cpu = nn::VarStore::new(Device::Cpu);
    let net = model::build(kind, &cpu.root(), classes);
    cpu.copy(vs).map_err(|e| Error::format(path, format!("cannot copy the weights for export: {e}")))?;
    // Weights enter the trace as constants, which must not require gradients.
    cpu.freeze();
    let [c, h, w] = sample.map(|d| d as i64);
    let example = Tensor::zeros([2, c, h, w], (Kind::Float, Device::Cpu));
    let module = tch::no_grad(|| {
        tch::CModule::create_by_tracing(kind.name(), "forward", &[example], &mut |x| {
            vec![net.forward_t(&x[0], false)]
        })
    })
    .map_err(|e| Error::format(path, format!("cannot trace the model: {e}")))?;
    crate::files::write_atomically(path, |tmp| {
        module.save(tmp).map_err(|e| Error::format(path, format!("cannot write TorchScript: {e}")))
    })
}
