//! Where a run starts, and what the ranks of a data-parallel run agree on first: their
//! settings (refused, naming each difference, when they differ), then rank 0's checkpoint
//! position, weights, momentum and buffers, so that all begin equal as DDP's ranks do.
use tch::nn;

use super::checkpoint::{self, Position, Resumed, RunSettings};
use super::config::TrainConfig;
use super::plan::Plan;
use super::sgd::Sgd;
use super::splits::Splits;
use crate::dist::ProcessGroup;
use crate::error::{Error, Result};

/// The start of a fresh run.
const FRESH: Position = Position { epoch: 0, step: 0, global_step: 0 };

/// Every rank's verdict on its own start (`opened`: its splits, or why it cannot start) reaches
/// the others, so that a rank that cannot start stops them all at once, naming itself, and
/// settings that differ are refused on every rank.
pub(crate) fn settings(
    g: &ProcessGroup,
    cfg: &TrainConfig,
    opened: &Result<(Splits, RunSettings, Plan)>,
) -> Result<()> {
    let mine =
        opened.as_ref().map(|(s, settings, _)| agreed_settings(cfg, s, settings)).map_err(|e| e.to_string());
    let all = g.exchange("settings", mine);
    if opened.is_ok() {
        check_agreement(&all?)?;
    }
    Ok(())
}

/// What every rank of a data-parallel run must agree on: anything that changes the weights,
/// the number of steps or the collectives made (workers, prefetch and the files rank 0 writes
/// may differ). One flat object: the checkpoint's settings and the rest beside them.
fn agreed_settings(cfg: &TrainConfig, s: &Splits, settings: &RunSettings) -> String {
    let conversion = s.train.metadata().get("conversion").cloned();
    let mut all = serde_json::to_value(settings).expect("settings serialize");
    let extra = serde_json::json!({
        "epochs": cfg.epochs, "max_steps": cfg.max_steps, "amp": cfg.amp,
        "resident": cfg.resident, "eval": cfg.eval, "device": format!("{:?}", cfg.device).split('(').next(),
        "resume": cfg.resume, "test_len": s.test.as_ref().map(|t| t.len()),
        "sample_shape": s.train.sample_shape(cfg), "train_conversion": conversion,
    });
    if let (Some(all), Some(extra)) = (all.as_object_mut(), extra.as_object()) {
        all.extend(extra.clone());
    }
    all.to_string()
}

/// Refuses ranks whose settings differ from rank 0's, naming each difference.
fn check_agreement(all: &[String]) -> Result<()> {
    type Settings = serde_json::Map<String, serde_json::Value>;
    let parse = |s: &String| serde_json::from_str::<Settings>(s).unwrap_or_default();
    let first = parse(&all[0]);
    let mut diffs = Vec::new();
    for (r, s) in all.iter().enumerate().skip(1) {
        let theirs = parse(s);
        for (k, mine) in &first {
            let t = theirs.get(k).unwrap_or(&serde_json::Value::Null);
            if t != mine {
                diffs.push(format!("{k}: {mine} on rank 0, {t} on rank {r}"));
            }
        }
    }
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(Error::Distributed(format!(
            "the ranks were started with different settings: {}",
            diffs.join("; ")
        )))
    }
}

/// Where the run starts: afresh, or from `cfg`'s checkpoint (loaded into `vs` and `opt`). With
/// a group, rank 0 alone reads the checkpoint, then gives the others its position, weights,
/// momentum and buffers.
pub(crate) fn start(
    cfg: &TrainConfig,
    group: Option<&ProcessGroup>,
    vs: &nn::VarStore,
    opt: &mut Sgd,
    settings: &RunSettings,
) -> Result<Resumed> {
    let mut resume = || match &cfg.checkpoint {
        Some(dir) if cfg.resume => checkpoint::resume(dir, vs, opt, settings),
        _ => Ok(Resumed { position: FRESH, lookahead: Vec::new() }),
    };
    let Some(g) = group else { return resume() };
    let resumed = if g.is_main() { resume() } else { Ok(Resumed { position: FRESH, lookahead: Vec::new() }) };
    let momentum = opt.flat_momentum().is_some();
    let mine = resumed
        .as_ref()
        .map(|r| serde_json::json!((r.position, momentum)).to_string())
        .map_err(|e| e.to_string());
    let all = g.exchange("resume", mine);
    let resumed = resumed?;
    let (position, momentum): (Position, bool) = serde_json::from_str(&all?[0])
        .map_err(|e| Error::Distributed(format!("rank 0 sent an unreadable start position: {e}")))?;
    g.broadcast(opt.flat_params(), 0)?;
    if momentum {
        g.broadcast(opt.ensure_momentum(), 0)?;
    }
    g.broadcast_buffers(vs)?;
    Ok(Resumed { position, lookahead: resumed.lookahead })
}
