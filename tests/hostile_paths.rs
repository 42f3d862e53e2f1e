//! Paths that collide and checkpoints that lie: an input named as its own output, two outputs
//! of one run at one place, two runs on one checkpoint directory, a checkpoint's position or
//! weights that no run could have written. Each is refused before anything is overwritten.
mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::*;

fn train(data: &Path, args: &[&str]) -> std::process::Output {
    Command::new(train_exe())
        .args(["--data", data.to_str().unwrap(), "--device", "cpu", "--threads", "1"])
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn an_input_named_as_its_own_output_is_refused_and_kept() {
    let dir = scratch("paths_input_is_output");
    // An image-folder archive saved under the name its conversion writes.
    let root = dir.join("src");
    for (split, i) in [("train", 0), ("test", 1)] {
        for class in ["a", "b"] {
            write_image(&root.join(format!("{split}/{class}/{i}.png")), 8, 8, i);
        }
    }
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let archive = out.join("set-train.safetensors");
    tar_gz_dir(&root, "set", &archive);
    let before = std::fs::read(&archive).unwrap();
    let o = run(prep_exe(), &[&archive, &"--out", &out, &"--name", &"set"]);
    assert_refused(&o, &["set-train.safetensors", "replaced by its own output"]);
    assert_eq!(std::fs::read(&archive).unwrap(), before, "the input was changed");

    // A CIFAR tarball named as the test split.
    let tgz = out.join("cifar10-test.safetensors");
    tar_gz(&tgz, &cifar10_members(10, 10, false));
    let before = std::fs::read(&tgz).unwrap();
    let o = run(prep_exe(), &[&tgz, &"--out", &out]);
    assert_refused(&o, &["cifar10-test.safetensors", "replaced by its own output"]);
    assert_eq!(std::fs::read(&tgz).unwrap(), before, "the input was changed");
}

#[test]
fn two_outputs_of_one_run_at_one_place_are_refused_before_training() {
    let dir = scratch("paths_two_outputs");
    tensor_file(&dir, 10, cifar_fast::prep::StoreDtype::U8);
    let f = dir.join("out.json");
    // Two spellings of one file: absolute, and relative to the working directory.
    let o = Command::new(train_exe())
        .current_dir(&dir)
        .args(["--data", ".", "--device", "cpu", "--threads", "1", "--max-steps", "2"])
        .args(["--metrics", f.to_str().unwrap(), "--export", "./out.json"])
        .output()
        .unwrap();
    assert_refused(&o, &["--metrics", "--export", "one file"]);
    assert!(!f.exists(), "written before it was refused");
    let o = train(
        &dir,
        &["--max-steps", "2", "--export", dir.join("cifar10-train.safetensors").to_str().unwrap()],
    );
    assert_refused(&o, &["--export", "the training split", "one file"]);
    assert!(cifar_fast::TensorFile::open(dir.join("cifar10-train.safetensors")).is_ok());
}

#[test]
fn a_second_run_on_a_checkpoint_directory_in_use_is_refused() {
    let dir = scratch("paths_checkpoint_lock");
    tensor_file(&dir, 10, cifar_fast::prep::StoreDtype::U8);
    let ck = dir.join("ck");
    let mut first = Command::new(train_exe())
        .args(["--data", dir.to_str().unwrap(), "--device", "cpu", "--threads", "1", "--epochs", "100000"])
        .args(["--checkpoint", ck.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The first run holds the lock from its start: wait for it.
    let start = std::time::Instant::now();
    while !ck.join(".lock").exists() && start.elapsed().as_secs() < 60 {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    // Even --overwrite does not replace the checkpoints of a run still going.
    let o = train(&dir, &["--max-steps", "2", "--checkpoint", ck.to_str().unwrap(), "--overwrite"]);
    let _ = first.kill();
    let _ = first.wait();
    assert_refused(&o, &["ck", "another run"]);
}

/// The checkpoint in `dir` with its header's JSON changed by `edit` and its tensor bytes by
/// `data`.
fn edit_checkpoint(
    dir: &Path,
    edit: impl FnOnce(&mut serde_json::Value),
    data: impl FnOnce(&serde_json::Value, &mut Vec<u8>),
) {
    let path = dir.join("checkpoint.safetensors");
    rewrite_safetensors(&path, &path, edit, data);
}

#[test]
fn a_checkpoint_whose_position_or_weights_no_run_could_write_is_refused() {
    let dir = scratch("paths_lying_checkpoint");
    tensor_file(&dir, 10, cifar_fast::prep::StoreDtype::U8);
    let good = dir.join("good");
    // 50 images, batch 4: 13 steps an epoch; stopped at step 3 of epoch 1.
    let o = train(&dir, &["--max-steps", "3", "--checkpoint", good.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let position = |epoch: u64, step: u64, global: u64| {
        move |h: &mut serde_json::Value| {
            h["__metadata__"]["position"] =
                serde_json::json!({"epoch": epoch, "step": step, "global_step": global}).to_string().into();
        }
    };
    type Edit = Box<dyn FnOnce(&mut serde_json::Value)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        ("step-beyond", Box::new(position(0, 1000, 1000)), "step 1000 of an epoch of 13 steps"),
        ("wrapping", Box::new(position(0, 3, u64::MAX)), "counts 18446744073709551615 steps"),
        ("far-epoch", Box::new(position(1_000_000_000_000_000_000, 0, 0)), "corrupt"),
        ("beyond-run", Box::new(position(11, 0, 143)), "beyond this run's 130 steps"),
    ];
    for (name, edit, says) in cases {
        let ck = dir.join(name);
        std::fs::create_dir_all(&ck).unwrap();
        std::fs::copy(good.join("checkpoint.safetensors"), ck.join("checkpoint.safetensors")).unwrap();
        edit_checkpoint(&ck, edit, |_, _| {});
        let o = train(&dir, &["--checkpoint", ck.to_str().unwrap(), "--resume"]);
        assert_refused(&o, &["checkpoint.safetensors", says]);
    }
    // A NaN weight.
    let ck = dir.join("nan");
    std::fs::create_dir_all(&ck).unwrap();
    std::fs::copy(good.join("checkpoint.safetensors"), ck.join("checkpoint.safetensors")).unwrap();
    edit_checkpoint(
        &ck,
        |_| {},
        |h, body| {
            let at = h["model/fc2.bias"]["data_offsets"][0].as_u64().unwrap() as usize;
            body[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
        },
    );
    let o = train(&dir, &["--checkpoint", ck.to_str().unwrap(), "--resume"]);
    assert_refused(&o, &["checkpoint.safetensors", "model/fc2.bias", "non-finite"]);
    // The good one resumes.
    let o = train(&dir, &["--checkpoint", good.to_str().unwrap(), "--resume", "--max-steps", "5"]);
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn a_conversion_failing_between_its_renames_leaves_the_earlier_pair() {
    let dir = scratch("paths_split_pair");
    let out = dir.join("out");
    let (a, b) = (dir.join("a.tar.gz"), dir.join("b.tar.gz"));
    tar_gz(&a, &cifar10_members(10, 10, false));
    tar_gz(&b, &cifar10_members(12, 10, false));
    let o = run(prep_exe(), &[&a, &"--out", &out]);
    assert!(o.status.success(), "{}", text(&o));
    let train_a = std::fs::read(out.join("cifar10-train.safetensors")).unwrap();
    // The test split's rename fails (a directory is in its place) after the train split's
    // succeeded: the train split renamed is put back.
    std::fs::remove_file(out.join("cifar10-test.safetensors")).unwrap();
    std::fs::create_dir_all(out.join("cifar10-test.safetensors/x")).unwrap();
    let o = run(prep_exe(), &[&b, &"--out", &out]);
    assert_refused(&o, &["cifar10-test.safetensors"]);
    assert_eq!(std::fs::read(out.join("cifar10-train.safetensors")).unwrap(), train_a, "a mix was left");
    let left: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("journal") || n.contains("backup") || n.ends_with(".tmp"))
        .collect();
    assert!(left.is_empty(), "{left:?}");

    // Conversions racing into one directory leave one conversion's pair, whichever.
    std::fs::remove_dir_all(out.join("cifar10-test.safetensors")).unwrap();
    for _ in 0..6 {
        let spawn = |input: &Path| {
            Command::new(prep_exe())
                .arg(input)
                .args(["--force", "--out"])
                .arg(&out)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        };
        let (mut x, mut y) = (spawn(&a), spawn(&b));
        assert!(x.wait().unwrap().success() && y.wait().unwrap().success());
        let files: Vec<cifar_fast::TensorFile> = ["train", "test"]
            .iter()
            .map(|s| cifar_fast::TensorFile::open(out.join(format!("cifar10-{s}.safetensors"))).unwrap())
            .collect();
        assert!(cifar_fast::prep::same_conversion(&files), "a mixed pair");
    }
}

#[test]
fn a_plot_directory_with_nothing_to_draw_is_not_left_behind() {
    let dir = scratch("paths_empty_plot");
    tensor_file(&dir, 10, cifar_fast::prep::StoreDtype::U8);
    let plot = dir.join("charts");
    // One step and no evaluation: no chart has data.
    let o = train(&dir, &["--max-steps", "1", "--no-eval", "--plot", plot.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(!plot.exists(), "an empty {} was left", plot.display());
}
