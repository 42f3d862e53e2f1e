//! Data-parallel `cifar-train` on 127.0.0.1 with 2 ranks: the same weights as one process on
//! the global batch, settings refused when they differ, a dead or hung rank named within the
//! timeout, Ctrl-C on the launcher checkpointing every rank, resuming at another world size.
mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Below the ephemeral range, where Gloo's own listeners cannot take it first.
fn free_port() -> u16 {
    cifar_fast::dist::launch::free_port().unwrap()
}

fn base_args(dir: &Path) -> Vec<String> {
    ["--data", dir.to_str().unwrap(), "--device", "cpu", "--threads", "1"].map(String::from).to_vec()
}

fn cifar_train(args: &[String]) -> std::process::Output {
    Command::new(train_exe()).args(args).output().unwrap()
}

/// Rank `rank` of `world`, started by hand as torchrun would (its variables set).
fn rank(rank: usize, world: usize, port: u16, args: &[String]) -> Child {
    cifar_fast::dist::launch::rank_command(train_exe(), rank, world, port)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The f32 values of a checkpoint's model tensors, by name.
fn weights(ck: &Path) -> Vec<(String, Vec<f32>)> {
    checkpoint_weights(ck)
        .into_iter()
        .filter(|(n, _)| !n.starts_with("momentum"))
        .map(|(n, b)| (n, b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()))
        .collect()
}

/// The largest difference between two sets of weights, relative to the largest weight.
fn max_difference(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> f32 {
    assert_eq!(a.len(), b.len());
    let mut diff = 0f32;
    let mut scale = 0f32;
    for ((na, va), (nb, vb)) in a.iter().zip(b) {
        assert_eq!(na, nb);
        for (x, y) in va.iter().zip(vb) {
            diff = diff.max((x - y).abs());
            scale = scale.max(x.abs());
        }
    }
    diff / scale
}

#[test]
fn two_ranks_of_16_train_the_weights_of_one_process_of_32() {
    // 505 training images: a last global batch of 25, 13 on rank 0 and 12 on rank 1, weighted
    // by their share; 50 steps are three epochs and more, with augmentation.
    let dir = learnable_data(&scratch("dist_same"), 101);
    let run = |name: &str, batch: &str, nproc: &str| {
        let ck = dir.join(name);
        let mut args = base_args(&dir);
        args.extend(
            [
                "--batch-size",
                batch,
                "--max-steps",
                "50",
                "--augment",
                "--lr",
                "0.01",
                "--nproc-per-node",
                nproc,
            ]
            .map(String::from),
        );
        args.extend(["--checkpoint".into(), ck.to_str().unwrap().into()]);
        let o = cifar_train(&args);
        assert!(o.status.success(), "{}", text(&o));
        (weights(&ck), text(&o))
    };
    let (one, _) = run("one32", "32", "1");
    let (two, out) = run("two16", "16", "2");
    let (small, _) = run("one16", "16", "1");
    assert!(out.contains("× 2 ranks (gloo)") && out.contains("communication"), "{out}");
    let same = max_difference(&one, &two);
    let other = max_difference(&one, &small);
    // Float sums in another order only; a different batch moves the weights far more.
    assert!(same < 1e-4, "2 ranks × 16 differ from 1 × 32 by {same} (relative)");
    assert!(
        other > 100.0 * same.max(1e-6),
        "1 × 16 differs from 1 × 32 by only {other}: the test cannot tell"
    );
    // The test split's accuracy was counted in shards and summed: rank 0 reports the whole split.
    assert!(out.contains("Accuracy of the network on the 101 test images"), "{out}");
}

#[test]
fn ranks_started_with_different_settings_are_refused_naming_the_difference() {
    let dir = learnable_data(&scratch("dist_settings"), 8);
    let port = free_port();
    let with = |batch: &str| {
        let mut a = base_args(&dir);
        a.extend(["--batch-size", batch, "--epochs", "1"].map(String::from));
        a
    };
    let children = [rank(0, 2, port, &with("4")), rank(1, 2, port, &with("8"))];
    for (r, c) in children.into_iter().enumerate() {
        let o = c.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "rank {r}: {}", text(&o));
        assert!(
            err.contains("different settings") && err.contains("batch_size: 4 on rank 0, 8 on rank 1"),
            "rank {r}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
}

/// Ranks 0 and 1 of one job, the same arguments but for `extra` on rank 1 alone; their
/// outputs, and the time until both ended.
fn with_rank_1_given(name: &str, extra: &[&str]) -> (Vec<std::process::Output>, Duration) {
    let dir = learnable_data(&scratch(name), 8);
    let port = free_port();
    let mut good = base_args(&dir);
    good.extend(["--epochs", "1"].map(String::from));
    let mut bad = good.clone();
    bad.extend(extra.iter().map(|s| s.to_string()));
    let t = Instant::now();
    let children = [rank(0, 2, port, &good), rank(1, 2, port, &bad)];
    let outs = children.into_iter().map(|c| c.wait_with_output().unwrap()).collect();
    (outs, t.elapsed())
}

#[test]
fn a_rank_that_cannot_start_stops_the_others_naming_itself() {
    let (outs, _) = with_rank_1_given("dist_missing", &["--dataset", "elsewhere"]);
    let err0 = String::from_utf8_lossy(&outs[0].stderr);
    assert_eq!(outs[0].status.code(), Some(1), "{}", text(&outs[0]));
    assert!(err0.contains("rank 1: no prepared dataset \"elsewhere\""), "{err0}");
    assert_eq!(outs[1].status.code(), Some(1), "{}", text(&outs[1]));
}

#[test]
fn a_setting_refused_on_one_rank_stops_the_other_at_once() {
    let (outs, took) = with_rank_1_given("dist_bad_setting", &["--lr", "-1"]);
    let err0 = String::from_utf8_lossy(&outs[0].stderr);
    assert_eq!(outs[0].status.code(), Some(1), "{}", text(&outs[0]));
    assert!(err0.contains("rank 1: invalid setting: --lr -1"), "{err0}");
    assert_eq!(outs[1].status.code(), Some(1), "{}", text(&outs[1]));
    // Not after the 30 s the ranks would wait for each other.
    assert!(took < Duration::from_secs(15), "took {took:?}");
}

/// Two ranks training for long; returns them once rank 0 has printed its second epoch.
fn two_ranks_training(dir: &Path, timeout: &str) -> (Child, BufReader<std::process::ChildStdout>, Child) {
    let port = free_port();
    let mut args = base_args(dir);
    args.extend(["--epochs", "100000", "--no-eval", "--dist-timeout", timeout].map(String::from));
    let mut r0 = rank(0, 2, port, &args);
    let r1 = rank(1, 2, port, &args);
    let mut out = BufReader::new(r0.stdout.take().unwrap());
    let mut line = String::new();
    while out.read_line(&mut line).unwrap() > 0 && !line.contains("epoch 2:") {}
    assert!(line.contains("epoch 2:"), "rank 0 did not train: {line}");
    (r0, out, r1)
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: `kill` only sends a signal to our own child's pid, not yet reaped.
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
}

/// Waits for `child` at most `limit`, returning its exit code and stderr.
fn wait_within(mut child: Child, limit: Duration) -> (Option<i32>, String, Duration) {
    let t = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
            return (status.code(), err, t.elapsed());
        }
        if t.elapsed() > limit {
            let _ = child.kill();
            panic!("still running after {limit:?}: a hang");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_killed_rank_is_named_by_the_others_at_once() {
    let dir = learnable_data(&scratch("dist_killed"), 8);
    let (r0, _out, mut r1) = two_ranks_training(&dir, "20");
    signal(&r1, libc::SIGKILL);
    let _ = r1.wait();
    let (code, err, took) = wait_within(r0, Duration::from_secs(40));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("rank 1 stopped answering"), "{err}");
    // A dead peer's socket closes: no need to wait for the timeout.
    assert!(took < Duration::from_secs(15), "took {took:?}");
}

#[test]
fn a_hung_rank_is_named_after_the_timeout() {
    let dir = learnable_data(&scratch("dist_hung"), 8);
    let (r0, _out, mut r1) = two_ranks_training(&dir, "4");
    signal(&r1, libc::SIGSTOP);
    let (code, err, took) = wait_within(r0, Duration::from_secs(30));
    signal(&r1, libc::SIGKILL);
    let _ = r1.wait();
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("rank 1 stopped answering"), "{err}");
    assert!(took >= Duration::from_secs(3), "took {took:?}: before the timeout");
}

fn launcher(dir: &Path, ck: &Path, extra: &[&str]) -> Child {
    let mut args = base_args(dir);
    args.extend(["--no-eval", "--checkpoint", ck.to_str().unwrap()].map(String::from));
    args.extend(extra.iter().map(|s| s.to_string()));
    Command::new(train_exe()).args(&args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
}

fn position(ck: &Path) -> (u64, u64) {
    let bytes = std::fs::read(ck.join("checkpoint.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap();
    let pos: serde_json::Value = serde_json::from_str(&meta["position"]).unwrap();
    (pos["epoch"].as_u64().unwrap(), pos["step"].as_u64().unwrap())
}

#[test]
fn ctrl_c_on_the_launcher_checkpoints_and_the_run_resumes_at_any_world_of_the_same_global_batch() {
    let dir = learnable_data(&scratch("dist_ctrl_c"), 40); // 200 images: 13 steps of 16 an epoch
    let ck = dir.join("ck");
    let mut child =
        launcher(&dir, &ck, &["--nproc-per-node", "2", "--batch-size", "8", "--epochs", "100000"]);
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while out.read_line(&mut line).unwrap() > 0 && !line.contains("epoch 3:") {}
    // The launcher alone gets it (not a terminal's process group): it passes it on.
    signal(&child, libc::SIGINT);
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    let (code, err, _) = wait_within(child, Duration::from_secs(30));
    assert_eq!(code, Some(130), "{rest}\n{err}");
    assert!(rest.contains("continue with --resume"), "{rest}");
    let (epoch, step) = position(&ck);
    assert!(epoch >= 2, "stopped at epoch {epoch}");

    // One rank of 16 is the same global batch: it continues the run (re-sharded).
    let target = (epoch + 2).to_string();
    let mut args = base_args(&dir);
    args.extend(
        [
            "--no-eval",
            "--batch-size",
            "16",
            "--epochs",
            &target,
            "--resume",
            "--checkpoint",
            ck.to_str().unwrap(),
        ]
        .map(String::from),
    );
    let o = cifar_train(&args);
    assert!(o.status.success(), "{}", text(&o));
    let steps_left = (epoch + 2) * 13 - (epoch * 13 + step);
    assert!(text(&o).contains(&format!("{steps_left} steps,")), "{}", text(&o));
    assert_eq!(position(&ck), (epoch + 2, 0));

    // 2 ranks of 16 is another global batch: refused, naming both.
    let mut args = base_args(&dir);
    args.extend(
        ["--no-eval", "--batch-size", "16", "--epochs", "100", "--resume", "--nproc-per-node", "2"]
            .map(String::from),
    );
    args.extend(["--checkpoint".into(), ck.to_str().unwrap().into()]);
    let o = cifar_train(&args);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("global batch: 1 rank × 16 vs 2 ranks × 16"), "{}", text(&o));
}

#[test]
fn torchrun_launches_ranks_as_it_launches_pytorch_scripts() {
    let torchrun = python().with_file_name("torchrun");
    if !torchrun.exists() {
        eprintln!("skipped: no torchrun beside {} (run tools/setup)", python().display());
        return;
    }
    let dir = learnable_data(&scratch("dist_torchrun"), 20);
    let ck: PathBuf = dir.join("ck");
    let o = Command::new(&torchrun)
        .args(["--nproc-per-node", "2", "--no-python", train_exe()])
        .args(base_args(&dir))
        .args(["--batch-size", "5", "--epochs", "2", "--checkpoint", ck.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    // Rank 0 alone reports: one summary line.
    assert_eq!(out.matches("images/s (all 2 ranks)").count(), 1, "{out}");
    assert_eq!(position(&ck), (2, 0));
}

#[test]
fn a_two_rank_resnet_evaluates_as_one_process_does_from_its_checkpoint() {
    // Batch norms: each rank's running statistics come from its own shard. The ranks' sharded
    // evaluation must be the model the checkpoint holds (rank 0's buffers), as DDP's
    // broadcast_buffers makes it.
    let dir = learnable_data(&scratch("dist_buffers"), 20); // 100 training images, 20 test
    let ck = dir.join("ck");
    let (m2, m1) = (dir.join("two.jsonl"), dir.join("one.jsonl"));
    let mut args = base_args(&dir);
    let common = ["--model", "resnet", "--epochs", "1", "--lr", "0.05", "--checkpoint", ck.to_str().unwrap()];
    args.extend(common.map(String::from));
    let two = [
        &args[..],
        &["--batch-size", "8", "--nproc-per-node", "2", "--metrics", m2.to_str().unwrap()].map(String::from),
    ]
    .concat();
    let o = cifar_train(&two);
    assert!(o.status.success(), "{}", text(&o));
    let one =
        [&args[..], &["--batch-size", "16", "--resume", "--metrics", m1.to_str().unwrap()].map(String::from)]
            .concat();
    let o = cifar_train(&one);
    assert!(o.status.success(), "{}", text(&o));
    let summary = |m: &Path| -> serde_json::Value {
        serde_json::from_str(std::fs::read_to_string(m).unwrap().lines().last().unwrap()).unwrap()
    };
    let (two, one) = (summary(&m2), summary(&m1));
    assert_eq!(one["steps"], 0, "{one}");
    for key in ["test_accuracy", "per_class_accuracy"] {
        assert_eq!(two[key], one[key], "{key}: 2 ranks {} vs 1 process {}", two[key], one[key]);
    }
}
