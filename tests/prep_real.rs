//! `cifar-prep` on small real tarballs (built by `../shared/tools/make-cifar-tarballs.py
//! --limit`), checked image by image against torchvision from Python.
mod common;

use std::process::Command;

use common::*;

#[test]
fn real_tarballs_match_torchvision_to_1e6() {
    let shared = shared();
    if !shared.join("data/cifar-10-jpeg.tar.gz").exists() {
        assert!(std::env::var_os("CI").is_none(), "CI must have ../shared/data");
        eprintln!("skipped: no ../shared/data/cifar-10-jpeg.tar.gz");
        return;
    }
    let dir = scratch("prep_real");
    let made = Command::new(python())
        .arg(shared.join("tools/make-cifar-tarballs.py"))
        .args([dir.to_str().unwrap(), "--limit", "20"])
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", text(&made));
    let extracted = dir.join("py");
    std::fs::create_dir_all(&extracted).unwrap();
    let untar = Command::new("tar")
        .arg("xzf")
        .arg(dir.join("cifar-10-python.tar.gz"))
        .arg("-C")
        .arg(&extracted)
        .status()
        .unwrap();
    assert!(untar.success());

    let f32_dir = dir.join("f32");
    let u8_dir = dir.join("u8");
    let o = run(prep_exe(), &[&dir.join("cifar-10-binary.tar.gz"), &"--out", &f32_dir]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("train: 200 images"), "{}", text(&o));
    let o = run(prep_exe(), &[&dir.join("cifar-10-python.tar.gz"), &"--out", &u8_dir, &"--dtype", &"u8"]);
    assert!(o.status.success(), "{}", text(&o));

    let check = Command::new(python())
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/check_prep.py"))
        .args([&extracted, &f32_dir, &u8_dir])
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", text(&check));
    let report = text(&check);
    assert!(report.contains("train: 200 images") && report.contains("test: 200 images"), "{report}");
}
