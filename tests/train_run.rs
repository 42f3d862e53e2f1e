//! `cifar-train` as a user meets it: data fetched when there is none, checkpoints never
//! overwritten by accident, early stops that still evaluate, numbering, charts, and the
//! trained model taken to PyTorch (the checkpoint, and the TorchScript export).
mod common;

use std::path::Path;
use std::process::Command;

use common::*;

fn train_in(cwd: &Path, exe: &str, args: &[&str]) -> std::process::Output {
    Command::new(exe)
        .current_dir(cwd)
        .args(["--device", "cpu", "--threads", "1"])
        .args(args)
        .output()
        .unwrap()
}

fn md5_hex(bytes: &[u8]) -> String {
    use md5::Digest;
    md5::Md5::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn with_no_data_the_tarball_is_downloaded_verified_and_prepared_once() {
    let dir = scratch("run_download");
    let tgz = dir.join("served.tar.gz");
    tar_gz(&tgz, &cifar10_members(4, 4, true));
    let body = std::fs::read(&tgz).unwrap();
    let md5 = md5_hex(&body).to_uppercase(); // compared in either case
    let url = serve_once(body);
    let o =
        train_in(&dir, train_exe(), &["--download-url", &url, "--download-md5", &md5, "--max-steps", "3"]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(out.contains(&format!("downloading {url}")) && out.contains("verified"), "{out}");
    assert!(
        dir.join("data/cifar-10-python.tar.gz").exists()
            && dir.join("data/cifar10-train.safetensors").exists()
    );
    assert!(out.contains("Accuracy of the network on the 4 test images"), "{out}");
    // Prepared once: the next run neither downloads (nothing serves now) nor converts.
    let o = train_in(&dir, train_exe(), &["--download-url", &dead_url(), "--max-steps", "1"]);
    assert!(
        o.status.success() && !text(&o).contains("downloading") && !text(&o).contains("preparing"),
        "{}",
        text(&o)
    );
}

/// `root/cifar-10-jpeg.tar.gz` as `../shared/data` holds it, with `n` images a class and split.
fn fake_shared_jpegs(tarball: &Path, n: u32) {
    let tmp = tarball.with_extension("src");
    for split in ["train", "test"] {
        for (c, class) in cifar_fast::prep::layout::CIFAR10_CLASSES.iter().enumerate() {
            for i in 0..n {
                write_image(
                    &tmp.join(split).join(class).join(format!("{i:04}.jpg")),
                    32,
                    32,
                    i + 7 * c as u32,
                );
            }
        }
    }
    std::fs::create_dir_all(tarball.parent().unwrap()).unwrap();
    tar_gz_dir(&tmp, "cifar-10-jpeg", tarball);
}

#[test]
fn without_network_the_real_images_beside_the_checkout_are_used_and_else_one_clear_error() {
    let dir = scratch("run_offline");
    fake_shared_jpegs(&dir.join("shared/data/cifar-10-jpeg.tar.gz"), 3);
    // The binary where a build leaves it in a checkout beside `shared/`; the working directory
    // elsewhere, beside a decoy that is not taken for the images.
    let exe = dir.join("checkout/target/release/cifar-train");
    std::fs::create_dir_all(exe.parent().unwrap()).unwrap();
    std::fs::copy(train_exe(), &exe).unwrap();
    let work = dir.join("elsewhere/work");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::create_dir_all(dir.join("elsewhere/shared/data")).unwrap();
    std::fs::write(dir.join("elsewhere/shared/data/cifar-10-jpeg.tar.gz"), b"a decoy").unwrap();
    let o = train_in(&work, exe.to_str().unwrap(), &["--download-url", &dead_url(), "--max-steps", "2"]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    let beside = dir.join("shared/data/cifar-10-jpeg.tar.gz").canonicalize().unwrap();
    assert!(
        out.contains(&format!("using the real CIFAR-10 images in {} instead", beside.display())),
        "{out}"
    );
    let f = cifar_fast::TensorFile::open(work.join("data/cifar10-train.safetensors")).unwrap();
    assert_eq!((f.len(), f.classes().len()), (30, 10));
    assert!(out.contains("Accuracy of the network on the 30 test images"), "{out}");

    // No network and no images beside it (this binary, copied away from the checkout, finds
    // none beside itself either): one error saying what to do, and nothing half made.
    let alone = dir.join("alone");
    std::fs::create_dir_all(alone.join("bin")).unwrap();
    std::fs::create_dir_all(alone.join("work")).unwrap();
    let exe = alone.join("bin/cifar-train");
    std::fs::copy(train_exe(), &exe).unwrap();
    let o = train_in(&alone.join("work"), exe.to_str().unwrap(), &["--download-url", &dead_url()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(err.contains("download of") && err.contains("Put cifar-10-python.tar.gz in data"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    let left: Vec<_> = std::fs::read_dir(alone.join("work/data")).unwrap().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn a_checkpoint_is_never_overwritten_by_a_fresh_run() {
    let dir = learnable_data(&scratch("run_overwrite"), 4);
    let ck = dir.join("ck");
    let args = ["--data", dir.to_str().unwrap(), "--epochs", "1", "--checkpoint", ck.to_str().unwrap()];
    let o = train_in(&dir, train_exe(), &args);
    assert!(o.status.success(), "{}", text(&o));
    let before = checkpoint_weights(&ck);
    let o = train_in(&dir, train_exe(), &[&args[..], &["--seed", "5"]].concat());
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("holds a checkpoint") && err.contains("--resume") && err.contains("--overwrite"),
        "{err}"
    );
    assert_eq!(checkpoint_weights(&ck), before);
    let o = train_in(&dir, train_exe(), &[&args[..], &["--seed", "5", "--overwrite"]].concat());
    assert!(o.status.success(), "{}", text(&o));
    assert_ne!(checkpoint_weights(&ck), before);
}

fn json_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn an_early_stop_evaluates_and_numbers_epochs_as_the_console_does() {
    let dir = learnable_data(&scratch("run_early"), 8); // 40 images: 10 steps of 4 an epoch
    let m = dir.join("m.jsonl");
    let plots = dir.join("plots");
    let base = ["--data", dir.to_str().unwrap(), "--log-every", "5", "--metrics", m.to_str().unwrap()];
    let o = train_in(
        &dir,
        train_exe(),
        &[&base[..], &["--max-steps", "15", "--plot", plots.to_str().unwrap()]].concat(),
    );
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("stopped at epoch 2, step 5: test accuracy"), "{out}");
    assert!(out.contains("Accuracy of the network on the 8 test images"), "{out}");
    assert!(out.contains("s per epoch"), "one whole epoch in 15 steps, timed: {out}");
    let lines = json_lines(&m);
    let loss: Vec<(u64, u64)> = lines
        .iter()
        .filter(|l| l["type"] == "loss")
        .map(|l| (l["epoch"].as_u64().unwrap(), l["step"].as_u64().unwrap()))
        .collect();
    assert_eq!(loss, [(1, 5), (1, 10), (2, 5)]);
    for (e, s) in &loss {
        assert!(out.contains(&format!("[{e}, {s:5}] loss:")), "{out}");
    }
    let epoch: Vec<_> = lines.iter().filter(|l| l["type"] == "epoch").collect();
    assert_eq!(epoch.len(), 1);
    assert_eq!(epoch[0]["epoch"], 1);
    assert!(out.contains("epoch 1: test accuracy"), "{out}");
    let s = lines.last().unwrap();
    assert_eq!((s["epoch"].as_u64(), s["step"].as_u64()), (Some(2), Some(5)), "{s}");
    assert!(s["test_accuracy"].is_number(), "{s}");
    // One epoch of 10 steps took under a second here: no chart of two points, said with why.
    assert!(out.contains("not drawn: loss.svg: ") || plots.join("loss.svg").exists(), "{out}");
    assert!(plots.join("accuracy.svg").exists() && plots.join("confusion.svg").exists(), "{out}");

    // Stopped before any epoch ended: no seconds per epoch at all, and --no-eval means none.
    let o = train_in(
        &dir,
        train_exe(),
        &[&base[..], &["--max-steps", "3", "--no-eval", "--plot", plots.to_str().unwrap()]].concat(),
    );
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(!out.contains("Accuracy") && !out.contains("per epoch"), "{out}");
    let s = json_lines(&m).pop().unwrap();
    assert!(s.get("epoch_seconds").is_none() && s.get("test_accuracy").is_none(), "{s}");
    assert!(out.contains("not drawn: accuracy.svg: no epoch finished"), "{out}");
    assert!(out.contains("not drawn: confusion.svg: the model was not evaluated"), "{out}");
}

/// The Python block of docs/cli.md that loads a checkpoint into the tutorial's `Net`.
fn readme_snippet() -> String {
    let readme = std::fs::read_to_string(workspace().join("docs/cli.md")).unwrap();
    let start = readme.find("<!-- checkpoint-snippet -->").expect("docs/cli.md's snippet marker");
    let block = &readme[start..];
    let code = &block[block.find("```python\n").unwrap() + 10..];
    code[..code.find("```").unwrap()].to_string()
}

#[test]
fn the_trained_model_runs_in_pytorch_from_the_checkpoint_and_from_the_export() {
    for model in ["lenet", "resnet"] {
        let dir = learnable_data(&scratch(&format!("run_export_{model}")), 12);
        let (ck, pt, m) = (dir.join("checkpoints"), dir.join("model.pt"), dir.join("m.jsonl"));
        let o = train_in(
            &dir,
            train_exe(),
            &[
                "--data",
                dir.to_str().unwrap(),
                "--model",
                model,
                "--epochs",
                "2",
                "--batch-size",
                "8",
                "--lr",
                "0.01",
                "--checkpoint",
                ck.to_str().unwrap(),
                "--export",
                pt.to_str().unwrap(),
                "--metrics",
                m.to_str().unwrap(),
            ],
        );
        assert!(o.status.success(), "{}", text(&o));
        assert!(text(&o).contains(&format!("wrote {}", pt.display())), "{}", text(&o));
        let accuracy = json_lines(&m).pop().unwrap()["test_accuracy"].as_f64().unwrap();
        let snippet = if model == "lenet" { readme_snippet() } else { String::new() };
        let check = Command::new(python())
            .current_dir(&dir)
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/check_model.py"))
            .args([&dir.join("cifar10-test.safetensors"), &pt])
            .arg(accuracy.to_string())
            .arg(snippet)
            .output()
            .unwrap();
        assert!(check.status.success(), "{model}: {}", text(&check));
        let report = text(&check);
        assert!(report.contains("torchscript: ") && report.contains(" of 12 correct"), "{model}: {report}");
        assert_eq!(report.contains("checkpoint: "), model == "lenet", "{model}: {report}");
    }
}
