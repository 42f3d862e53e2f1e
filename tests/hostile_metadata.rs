//! Metadata that lies or costs: class lists, labels and headers beyond what any real dataset
//! needs are refused naming the file and the limit; the real label sets that need more header
//! than CIFAR (thousands of classes) convert; an empty split is refused.
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use cifar_fast::TensorFile;
use common::*;

fn train(data: &Path) -> std::process::Output {
    Command::new(train_exe())
        .args(["--data", data.to_str().unwrap(), "--device", "cpu", "--threads", "1", "--epochs", "1"])
        .output()
        .unwrap()
}

/// A data directory holding a good pair, and the path of its train split.
fn good_pair(name: &str) -> (PathBuf, PathBuf) {
    let dir = scratch(name);
    let train = tensor_file(&dir, 20, cifar_fast::prep::StoreDtype::U8);
    (dir, train)
}

#[test]
fn class_lists_and_labels_beyond_the_limit_are_refused_naming_the_file() {
    // A million class names in both splits' metadata (labels 0-9).
    let (dir, train_file) = good_pair("meta_million_classes");
    let names: Vec<String> = (0..1_000_000).map(|i| format!("c{i}")).collect();
    let names = serde_json::to_string(&names).unwrap();
    for split in ["train", "test"] {
        let f = dir.join(format!("cifar10-{split}.safetensors"));
        let names = names.clone();
        rewrite_safetensors(&f, &f, |h| h["__metadata__"]["classes"] = names.into(), |_, _| {});
    }
    assert_refused(&train(&dir), &["cifar10-train.safetensors", "names 1000000 classes", "100000"]);

    // A label of 10^9 in a split without class names.
    let (dir, train_file2) = good_pair("meta_huge_label");
    for split in ["train", "test"] {
        let f = dir.join(format!("cifar10-{split}.safetensors"));
        rewrite_safetensors(
            &f,
            &f,
            |h| {
                h["__metadata__"].as_object_mut().unwrap().remove("classes");
            },
            |h, body| {
                if split == "train" {
                    let at = h["labels"]["data_offsets"][0].as_u64().unwrap() as usize;
                    body[at..at + 8].copy_from_slice(&1_000_000_000i64.to_le_bytes());
                }
            },
        );
    }
    assert_refused(&train(&dir), &["cifar10-train.safetensors", "label 1000000000 of sample 0", "100000"]);

    // A header declared 100 MB long: the limit is the reason, not the file's length.
    let big = dir.join("big.safetensors");
    let mut bytes = std::fs::read(&train_file).unwrap();
    bytes[..8].copy_from_slice(&200_000_000u64.to_le_bytes());
    std::fs::write(&big, bytes).unwrap();
    let err = TensorFile::open(&big).unwrap_err().to_string();
    assert!(err.contains("big.safetensors") && err.contains("more than the 100000000"), "{err}");
    let _ = train_file2;
}

#[test]
fn thousands_of_classes_convert_with_their_names() {
    let dir = scratch("meta_many_classes");
    let root = dir.join("wide");
    let classes = 20_000;
    for c in 0..classes {
        // The same tiny PNG in every class: a real label set's width, not its size.
        let class = dir.join("wide").join(format!("n{c:05}-{}", "x".repeat(c % 40)));
        std::fs::create_dir_all(&class).unwrap();
        if c == 0 {
            write_image(&class.join("a.png"), 4, 4, 1);
        } else {
            std::fs::copy(dir.join("wide/n00000-/a.png"), class.join("a.png")).unwrap();
        }
    }
    let out = dir.join("out");
    let o = run(prep_exe(), &[&root, &"--out", &out, &"--name", &"wide", &"--dtype", &"u8"]);
    assert!(o.status.success(), "{}", text(&o));
    let f = TensorFile::open(out.join("wide-wide.safetensors")).unwrap();
    assert_eq!(f.classes().len(), classes);
    assert_eq!(f.classes()[12_345], format!("n12345-{}", "x".repeat(12_345 % 40)));
    assert_eq!(f.labels()[19_999], 19_999);
}

#[test]
fn a_tarball_whose_test_batch_holds_no_records_is_refused() {
    let dir = scratch("meta_empty_test");
    // A pickled test batch of no records: a well-formed pickle, an empty split.
    let tgz = dir.join("empty-test.tar.gz");
    tar_gz(&tgz, &cifar10_members(10, 0, true));
    let out = dir.join("out");
    let o = run(prep_exe(), &[&tgz, &"--out", &out]);
    assert_refused(&o, &["empty-test.tar.gz", "test batches hold no images"]);
    assert!(
        !out.join("cifar10-test.safetensors").exists() && !out.join("cifar10-train.safetensors").exists()
    );
}
