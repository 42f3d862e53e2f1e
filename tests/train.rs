//! `cifar-train` on small generated data, on the CPU: it learns, it resumes exactly, its two
//! data paths agree, its metrics are what the README documents, and bad input is one clear error.
mod common;

use common::*;

fn train(data: &std::path::Path, extra: &[&str]) -> std::process::Output {
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"--data", &data, &"--threads", &"1"];
    if !extra.contains(&"--device") {
        args.extend([&"--device" as &dyn AsRef<std::ffi::OsStr>, &"cpu"]);
    }
    let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    for e in &extra {
        args.push(e);
    }
    run(train_exe(), &args)
}

fn json_lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect()
}

#[test]
fn a_few_steps_lower_the_loss_and_the_metrics_are_as_documented() {
    let dir = learnable_data(&scratch("train_learns"), 40);
    let metrics = dir.join("m.jsonl");
    let o = train(
        &dir,
        // The tutorial's rate moves PyTorch's small initial weights slowly: ten times it shows
        // the loss falling within these few steps.
        &[
            "--batch-size",
            "8",
            "--epochs",
            "6",
            "--lr",
            "0.01",
            "--log-every",
            "5",
            "--metrics",
            metrics.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let out = text(&o);
    assert!(out.contains("[1,     5] loss: "), "{out}");
    assert!(out.contains("Accuracy for class: airplane"), "{out}");
    assert!(out.contains("waiting on data"), "{out}");
    let lines = json_lines(&metrics);
    let losses: Vec<f64> =
        lines.iter().filter(|l| l["type"] == "loss").map(|l| l["loss"].as_f64().unwrap()).collect();
    assert!(losses.len() >= 6, "{losses:?}");
    assert!(losses.last().unwrap() < &(losses[0] * 0.7), "the loss did not fall: {losses:?}");
    let epochs: Vec<_> = lines.iter().filter(|l| l["type"] == "epoch").collect();
    assert_eq!(epochs.len(), 6);
    let s = lines.last().unwrap();
    assert_eq!(s["type"], "summary");
    for key in ["images_per_s", "data_wait_share", "epoch_seconds", "steps", "final_loss", "test_accuracy"] {
        assert!(s[key].is_number(), "summary lacks {key}: {s}");
    }
    let share = s["data_wait_share"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&share), "{share}");
    assert_eq!(s["steps"], 150); // 200 images in batches of 8, six times
    // The rates are images over step time: all of it, and all but the first (warm-up) step's.
    let f = |k: &str| s[k].as_f64().unwrap_or_else(|| panic!("summary lacks {k}: {s}"));
    let total = 6.0 * f("epoch_seconds");
    assert!((f("images_per_s") * total / 1200.0 - 1.0).abs() < 1e-6, "{s}");
    assert!(f("first_step_seconds") > 0.0 && f("first_step_seconds") < total, "{s}");
    // The training split was entered into memory before the steps, and timed apart from them.
    assert!(f("populate_seconds") > 0.0, "{s}");
    assert!(out.contains("training data: ") && out.contains("entered into memory in"), "{out}");
    assert!(
        (f("steady_images_per_s") * (total - f("first_step_seconds")) / 1192.0 - 1.0).abs() < 1e-6,
        "{s}"
    );
    let acc = s["test_accuracy"].as_f64().unwrap();
    assert!(acc > 0.5, "a colour per class should be learnt: {acc}");
    // The confusion matrix of the last epoch sums to the test set and matches the accuracy.
    let confusion = epochs[5]["confusion"].as_array().unwrap();
    let total: u64 = confusion.iter().flat_map(|r| r.as_array().unwrap()).map(|v| v.as_u64().unwrap()).sum();
    let diag: u64 = (0..10).map(|c| confusion[c][c].as_u64().unwrap()).sum();
    assert_eq!(total, 40);
    assert_eq!(diag as f64 / 40.0, acc);
}

#[test]
fn an_interrupted_run_resumed_ends_with_the_same_weights() {
    let dir = learnable_data(&scratch("train_resume"), 12);
    let (whole, split) = (dir.join("whole"), dir.join("split"));
    let common = ["--batch-size", "5", "--epochs", "2", "--augment", "--lr", "0.01"];
    let with = |ck: &std::path::Path, more: &[&str]| {
        let mut a: Vec<&str> = common.to_vec();
        a.extend(["--checkpoint", ck.to_str().unwrap()]);
        a.extend(more);
        let o = train(&dir, &a);
        assert!(o.status.success(), "{}", text(&o));
        text(&o)
    };
    with(&whole, &[]);
    let metrics = dir.join("split.jsonl");
    let m = metrics.to_str().unwrap();
    let stopped = with(&split, &["--max-steps", "17", "--metrics", m]); // mid-way through epoch 2 (12 steps an epoch)
    assert!(stopped.contains("stopped at epoch 2, step 5"), "{stopped}");
    assert_ne!(checkpoint_weights(&whole), checkpoint_weights(&split));
    with(&split, &["--resume", "--metrics", m]);
    assert_eq!(checkpoint_weights(&whole), checkpoint_weights(&split));
    // The resumed run's metrics continue the interrupted run's lines, which are kept.
    let summaries: Vec<_> = json_lines(&metrics).into_iter().filter(|l| l["type"] == "summary").collect();
    assert_eq!(summaries.len(), 2, "{summaries:?}");
    assert_eq!(
        (summaries[0]["stopped_early"].as_bool(), summaries[0]["steps"].as_u64()),
        (Some(true), Some(17))
    );
    assert_eq!(
        (summaries[1]["stopped_early"].as_bool(), summaries[1]["steps"].as_u64()),
        (Some(false), Some(7))
    );
    // No step at all still leaves the checkpoint it announces, and resuming it is the whole run.
    let zero = dir.join("zero");
    let none = with(&zero, &["--max-steps", "0"]);
    assert!(none.contains(&format!("checkpoint in {}", zero.display())), "{none}");
    with(&zero, &["--resume"]);
    assert_eq!(checkpoint_weights(&whole), checkpoint_weights(&zero));
    // Stopped exactly at an epoch's end, then resumed: the same too.
    let edge = dir.join("edge");
    let stopped = with(&edge, &["--max-steps", "12"]);
    assert!(stopped.contains("stopped at epoch 1, step 12"), "{stopped}");
    let resumed = with(&edge, &["--resume"]);
    assert!(resumed.contains("12 steps"), "{resumed}");
    assert_eq!(checkpoint_weights(&whole), checkpoint_weights(&edge));
}

#[test]
fn resident_and_pipelined_data_train_the_same_weights() {
    let dir = learnable_data(&scratch("train_resident"), 12);
    let mut weights = Vec::new();
    for mode in ["on", "off"] {
        let ck = dir.join(mode);
        let o = train(
            &dir,
            &[
                "--batch-size",
                "7",
                "--epochs",
                "1",
                "--augment",
                "--resident",
                mode,
                "--checkpoint",
                ck.to_str().unwrap(),
            ],
        );
        assert!(o.status.success(), "{}", text(&o));
        weights.push(checkpoint_weights(&ck));
    }
    assert!(weights[0] == weights[1], "the two data paths gave different batches");
}

fn refused(o: std::process::Output, expect: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(err.contains(expect), "expected {expect:?} in {err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn the_fast_recipe_trains_a_few_steps_on_the_cpu_and_records_itself() {
    let dir = learnable_data(&scratch("train_fast"), 8); // 40 training images, 8 test
    let ck = dir.join("ck");
    let metrics = dir.join("m.jsonl");
    let o = train(
        &dir,
        &[
            "--recipe",
            "fast",
            "--batch-size",
            "8",
            "--max-steps",
            "6",
            "--checkpoint",
            ck.to_str().unwrap(),
            "--metrics",
            metrics.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("training airbench"), "{}", text(&o));
    let summary = json_lines(&metrics).pop().unwrap();
    assert_eq!(summary["steps"], 6);
    assert!(summary["final_loss"].as_f64().unwrap().is_finite());
    assert!(summary["test_accuracy"].as_f64().is_some(), "{summary}");
    // The recipe is part of the run: resuming it as the tutorial's is refused.
    let again = train(
        &dir,
        &["--batch-size", "8", "--model", "airbench", "--resume", "--checkpoint", ck.to_str().unwrap()],
    );
    refused(again, "recipe");
    // Its batch of 1,024 is more than these 40 images, and its short batches are dropped.
    refused(train(&dir, &["--recipe", "fast"]), "--batch-size 1024: more than the 40 training images");
}

#[test]
fn nesterov_and_label_smoothing_train_and_bad_values_are_refused() {
    let dir = learnable_data(&scratch("train_nesterov"), 8);
    let o = train(&dir, &["--batch-size", "8", "--epochs", "1", "--nesterov", "--label-smoothing", "0.2"]);
    assert!(o.status.success(), "{}", text(&o));
    refused(train(&dir, &["--nesterov", "--momentum", "0"]), "--nesterov needs a momentum above 0");
    refused(train(&dir, &["--label-smoothing", "1.5"]), "--label-smoothing 1.5: must be from 0 to 1");
}

#[test]
fn bad_input_is_one_clear_error() {
    let dir = learnable_data(&scratch("train_bad"), 4);
    refused(train(&dir, &["--dataset", "nosuch"]), "no prepared dataset \"nosuch\" in");
    refused(
        train(&dir, &["--metrics", "/no/such/dir/m.jsonl"]),
        "--metrics /no/such/dir/m.jsonl: the directory",
    );
    refused(train(&dir, &["--batch-size", "0"]), "--batch-size must be at least 1");
    refused(train(&dir, &["--device", "cuda:7"]), "CUDA device 7 does not exist");
    refused(train(&dir, &["--device", "tpu"]), "expected auto, cpu, cuda or cuda:N");
    let ck = dir.join("ck");
    let first = train(&dir, &["--epochs", "1", "--checkpoint", ck.to_str().unwrap()]);
    assert!(first.status.success(), "{}", text(&first));
    refused(
        train(&dir, &["--model", "resnet", "--checkpoint", ck.to_str().unwrap(), "--resume"]),
        "model: \"lenet\" vs \"resnet\"",
    );
    refused(
        train(&dir, &["--batch-size", "8", "--checkpoint", ck.to_str().unwrap(), "--resume"]),
        "batch_size: 4 vs 8",
    );
    let test = dir.join("cifar10-test.safetensors");
    let bytes = std::fs::read(&test).unwrap();
    std::fs::write(&test, &bytes[..bytes.len() - 100]).unwrap();
    refused(train(&dir, &[]), "cifar10-test.safetensors: the header describes");
}

#[test]
fn a_closed_stdout_ends_the_run_quietly() {
    let dir = learnable_data(&scratch("train_closed_stdout"), 4);
    let args: [&dyn AsRef<std::ffi::OsStr>; 6] = [&"--data", &dir, &"--device", &"cpu", &"--max-steps", &"1"];
    let o = run_with_stdout_closed(train_exe(), &args);
    assert_eq!(o.status.code(), Some(141), "{}", text(&o));
    assert!(o.stderr.is_empty(), "{}", text(&o));
}

#[test]
fn a_fast_run_of_any_length_ends_with_its_lookahead_average_and_one_evaluation() {
    let dir = learnable_data(&scratch("train_fast_end"), 8); // 40 images: 5 steps of 8 an epoch
    let fast = |ck: &std::path::Path, more: &[&str]| {
        let mut a = vec!["--recipe", "fast", "--batch-size", "8", "--checkpoint", ck.to_str().unwrap()];
        a.extend(more);
        let o = train(&dir, &a);
        assert!(o.status.success(), "{}", text(&o));
        text(&o)
    };
    // Under an epoch, and over one with a part of the next: each is a whole run.
    for (epochs, steps) in [("0.5", 3), ("1.6", 8)] {
        let ck = dir.join(format!("whole-{epochs}"));
        let metrics = dir.join(format!("m-{epochs}.jsonl"));
        let out = fast(&ck, &["--epochs", epochs, "--metrics", metrics.to_str().unwrap()]);
        assert!(!out.contains("stopped at") && !out.contains("--resume"), "{out}");
        assert!(out.contains("Accuracy of the network on the 8 test images"), "{out}");
        let lines = json_lines(&metrics);
        let summary = lines.last().unwrap();
        assert_eq!(
            (summary["steps"].as_u64(), summary["stopped_early"].as_bool()),
            (Some(steps), Some(false))
        );
        assert_eq!(lines.iter().filter(|l| l["type"] == "epoch").count(), 1, "one evaluation, at the end");
        // The weights are the lookahead average, which the checkpoint keeps beside them.
        let all = checkpoint_weights(&ck);
        let model: Vec<_> = all.iter().filter_map(|(n, v)| Some((n.strip_prefix("model/")?, v))).collect();
        let average: Vec<_> =
            all.iter().filter_map(|(n, v)| Some((n.strip_prefix("lookahead/")?, v))).collect();
        assert!(!model.is_empty() && model == average, "the average was not swapped in at the end");
    }
    // Stopped mid-epoch and at an epoch's end, then resumed: bit for bit the whole run, the
    // lookahead average included.
    for stop in ["3", "5", "7"] {
        let ck = dir.join(format!("split-{stop}"));
        let out = fast(&ck, &["--epochs", "1.6", "--max-steps", stop]);
        assert!(out.contains("continue with --resume"), "{out}");
        assert_ne!(checkpoint_weights(&ck), checkpoint_weights(&dir.join("whole-1.6")));
        fast(&ck, &["--epochs", "1.6", "--resume"]);
        assert_eq!(checkpoint_weights(&ck), checkpoint_weights(&dir.join("whole-1.6")), "stopped at {stop}");
    }
    // The schedule is the run's: resuming it over another length is refused, naming it.
    let o = train(
        &dir,
        &[
            "--recipe",
            "fast",
            "--batch-size",
            "8",
            "--epochs",
            "3",
            "--resume",
            "--checkpoint",
            dir.join("split-3").to_str().unwrap(),
        ],
    );
    refused(o, "schedule_steps: 8 vs 15");
}
