//! Where the time went, and the JSON-lines metrics file.
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{IoContext, Result};

/// Step time split into its parts, summed over steps.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepTimes {
    /// Blocked waiting for the next batch.
    pub wait: Duration,
    /// Issuing the host-to-device copy.
    pub copy: Duration,
    /// Forward, backward and update (host time; on CUDA, queueing plus any waits on the GPU),
    /// the gradients' all-reduce apart.
    pub compute: Duration,
    /// Averaging the gradients over the ranks (data-parallel runs; zero otherwise).
    pub comm: Duration,
    /// Wall time of the steps, end to end.
    pub total: Duration,
    /// Steps.
    pub steps: usize,
    /// Images.
    pub images: usize,
}

impl StepTimes {
    /// Adds one step.
    pub fn add(&mut self, wait: Duration, copy: Duration, compute: Duration, total: Duration, images: usize) {
        self.wait += wait;
        self.copy += copy;
        self.compute += compute;
        self.total += total;
        self.steps += 1;
        self.images += images;
    }

    /// Adds another span's steps (possibly none).
    pub fn merge(&mut self, o: &StepTimes) {
        self.wait += o.wait;
        self.copy += o.copy;
        self.compute += o.compute;
        self.comm += o.comm;
        self.total += o.total;
        self.steps += o.steps;
        self.images += o.images;
    }

    /// The share of step time spent waiting on data, 0..1.
    pub fn wait_share(&self) -> f64 {
        self.wait.as_secs_f64() / self.total.as_secs_f64().max(1e-12)
    }

    /// The share spent issuing copies.
    pub fn copy_share(&self) -> f64 {
        self.copy.as_secs_f64() / self.total.as_secs_f64().max(1e-12)
    }

    /// The share spent averaging gradients over the ranks.
    pub fn comm_share(&self) -> f64 {
        self.comm.as_secs_f64() / self.total.as_secs_f64().max(1e-12)
    }

    /// The rest: compute and loop overhead.
    pub fn compute_share(&self) -> f64 {
        1.0 - self.wait_share() - self.copy_share() - self.comm_share()
    }
}

/// A JSON-lines file, one object a line, each flushed as written (a crash keeps the lines).
pub struct Metrics {
    out: Option<(PathBuf, std::fs::File)>,
}

impl Metrics {
    /// Creates (truncates) `path`, or with `append` (a resumed run, continuing the lines of
    /// the run it resumes) adds to it; writes nowhere for `None`.
    pub fn create(path: Option<&Path>, append: bool) -> Result<Self> {
        let out = match path {
            Some(p) => {
                let mut f = std::fs::OpenOptions::new();
                f.create(true).write(true).append(append).truncate(!append);
                Some((p.to_path_buf(), f.open(p).at(p)?))
            }
            None => None,
        };
        Ok(Metrics { out })
    }

    /// Appends one line.
    pub fn log(&mut self, value: &serde_json::Value) -> Result<()> {
        if let Some((path, f)) = &mut self.out {
            writeln!(f, "{value}").at(&*path)?;
        }
        Ok(())
    }

    /// The last line: the run's summary. Where the run stopped is numbered as the console's
    /// `[epoch, step]` lines ([`super::Position::numbered`]), and 0, 0 before any step.
    pub fn summary(&mut self, s: &super::Summary) -> Result<()> {
        let at = s.position;
        let (epoch, step) = if at.global_step == 0 { (0, 0) } else { at.numbered(s.per_epoch) };
        let mut v = serde_json::json!({
            "type": "summary",
            "images_per_s": s.images_per_s,
            "steady_images_per_s": s.steady_images_per_s,
            "first_step_seconds": s.first_step_seconds,
            "populate_seconds": s.populate_seconds,
            "data_wait_share": s.data_wait_share,
            "copy_share": s.times.copy_share(),
            "compute_share": s.times.compute_share(),
            "communication_share": s.times.comm_share(),
            "ranks": s.ranks,
            "epoch_seconds": s.epoch_seconds,
            "steps": s.steps,
            "final_loss": s.final_loss,
            "stopped_early": s.stopped_early,
            "epoch": epoch,
            "step": step,
        });
        if s.epoch_seconds.is_none() {
            v.as_object_mut().expect("an object").remove("epoch_seconds");
        }
        if let Some(e) = &s.eval {
            v["test_accuracy"] = e.accuracy.into();
            v["per_class_accuracy"] = serde_json::json!(
                s.classes
                    .iter()
                    .zip(&e.per_class)
                    .map(|(c, a)| (c.clone(), serde_json::Value::from(*a)))
                    .collect::<serde_json::Map<String, serde_json::Value>>()
            );
        }
        self.log(&v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merging_adds_every_field_and_tolerates_an_empty_span() {
        let ms = Duration::from_millis;
        let mut a = StepTimes::default();
        a.add(ms(1), ms(2), ms(7), ms(10), 4);
        let mut b = a;
        b.add(ms(3), ms(0), ms(7), ms(10), 4);
        a.merge(&b);
        a.merge(&StepTimes::default());
        assert_eq!((a.steps, a.images, a.total, a.wait), (3, 12, ms(30), ms(5)));
        assert!((a.wait_share() - 5.0 / 30.0).abs() < 1e-12);
    }
}
