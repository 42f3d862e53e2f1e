//! `train::run` called from Rust, as a library user calls it: on small generated data, its
//! summary, its progress lines, an interrupt handed to it.
mod common;

use cifar_fast::Interrupt;
use cifar_fast::train::{self, Progress, TrainConfig};
use common::*;

/// Progress that keeps what it is told.
#[derive(Default)]
struct Kept {
    epochs: Vec<(u64, usize)>,
    steps: usize,
    lines: Vec<String>,
}

impl Progress for Kept {
    fn epoch(&mut self, epoch: u64, steps: usize) {
        self.epochs.push((epoch, steps));
    }
    fn step(&mut self, _: f64) {
        self.steps += 1;
    }
    fn line(&mut self, line: &str) {
        self.lines.push(line.to_string());
    }
}

fn config(dir: &std::path::Path) -> TrainConfig {
    let mut cfg = TrainConfig::tutorial(
        dir.join("cifar10-train.safetensors"),
        Some(dir.join("cifar10-test.safetensors")),
    );
    cfg.batch_size = 8;
    cfg.epochs = 2.0;
    cfg.lr = 0.01;
    cfg.log_every = Some(5);
    cfg
}

#[test]
fn run_trains_the_configured_steps_and_summarises_them() {
    let dir = learnable_data(&scratch("lib_run"), 8); // 40 training images, 8 test
    let mut kept = Kept::default();
    let s = train::run(&config(&dir), None, &mut kept, &Interrupt::new()).unwrap();
    assert_eq!(s.steps, 10, "2 epochs of 5 batches of 8");
    assert!(!s.stopped_early);
    assert_eq!((s.position.epoch, s.position.step, s.position.global_step), (2, 0, 10));
    assert_eq!(s.classes.len(), 10);
    let e = s.eval.as_ref().expect("an evaluation after the last epoch");
    assert_eq!(e.confusion.iter().flatten().sum::<u64>(), 8);
    assert!((0.0..=1.0).contains(&e.accuracy));
    assert!(s.images_per_s > 0.0 && s.final_loss.is_finite());
    assert_eq!(kept.epochs, [(0, 5), (1, 5)]);
    assert_eq!(kept.steps, 10);
    assert!(kept.lines.iter().any(|l| l.starts_with("[2,     5] loss: ")), "{:?}", kept.lines);
    assert!(kept.lines.iter().any(|l| l.starts_with("epoch 2: test accuracy ")), "{:?}", kept.lines);
}

#[test]
fn an_interrupt_handed_to_run_stops_it_after_one_step() {
    let dir = learnable_data(&scratch("lib_interrupt"), 8);
    let interrupt = Interrupt::new();
    assert!(interrupt.request(), "the first request");
    assert!(!interrupt.clone().request(), "a clone sees the same request");
    let mut cfg = config(&dir);
    cfg.checkpoint = Some(dir.join("ck"));
    let s = train::run(&cfg, None, &mut train::Silent, &interrupt).unwrap();
    assert!(s.stopped_early);
    assert_eq!(s.steps, 1);
    assert!(s.eval.is_none(), "an interrupted run is not evaluated");
    assert!(dir.join("ck/checkpoint.safetensors").is_file(), "an interrupted run checkpoints");
    // Another run, with its own interrupt, is not stopped by the first's.
    cfg.checkpoint = None;
    let s = train::run(&cfg, None, &mut train::Silent, &Interrupt::new()).unwrap();
    assert_eq!(s.steps, 10);
}

#[test]
fn settings_that_cannot_work_are_refused_naming_them() {
    let dir = learnable_data(&scratch("lib_refused"), 4);
    let mut cfg = config(&dir);
    cfg.epochs = f64::NAN;
    let e = train::run(&cfg, None, &mut train::Silent, &Interrupt::new()).unwrap_err();
    assert!(e.to_string().contains("--epochs NaN: must be a finite number"), "{e}");
    let mut cfg = TrainConfig::fast(cfg.train.clone(), cfg.test.clone());
    cfg.batch_size = 8;
    cfg.model = train::ModelKind::Lenet;
    let e = train::run(&cfg, None, &mut train::Silent, &Interrupt::new()).unwrap_err();
    assert!(e.to_string().contains("--recipe fast trains its own net"), "{e}");
}
