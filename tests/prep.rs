//! `cifar-prep` end to end on small tarballs made here: both layouts, both datasets, every
//! documented kind of bad input, and `--download` from a local server.
mod common;

use std::collections::HashMap;
use std::path::Path;

use cifar_fast::TensorFile;
use common::*;

fn listing(dir: &Path) -> HashMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            let bytes = if p.is_file() { std::fs::read(&p).unwrap() } else { Vec::new() };
            (p.file_name().unwrap().to_string_lossy().into_owned(), bytes)
        })
        .collect()
}

fn expected_pixel(x: u8) -> f32 {
    (x as f32 / 255.0 - 0.5) / 0.5
}

#[test]
fn binary_and_python_tarballs_give_the_same_tensors_in_torchvision_order() {
    let dir = scratch("prep_layouts");
    let mut files = Vec::new();
    for pickled in [false, true] {
        let tgz = dir.join(if pickled { "py.tar.gz" } else { "bin.tar.gz" });
        let mut members = cifar10_members(3, 4, pickled);
        members.reverse(); // archive order must not matter
        tar_gz(&tgz, &members);
        let out = dir.join(if pickled { "out-py" } else { "out-bin" });
        let o = run(prep_exe(), &[&tgz, &"--out", &out]);
        assert!(o.status.success(), "{}", text(&o));
        assert!(text(&o).contains("not an official CIFAR tarball"), "{}", text(&o));
        files.push(out);
    }
    for split in ["train", "test"] {
        let a = TensorFile::open(files[0].join(format!("cifar10-{split}.safetensors"))).unwrap();
        let b = TensorFile::open(files[1].join(format!("cifar10-{split}.safetensors"))).unwrap();
        assert_eq!(a.all_image_bytes(), b.all_image_bytes());
        assert_eq!(a.labels(), b.labels());
        assert_eq!(a.classes()[3], "cat");
    }
    let train = TensorFile::open(files[0].join("cifar10-train.safetensors")).unwrap();
    assert_eq!(train.len(), 15);
    // Image 7 is record 1 of data_batch_3.
    let (labels, pixels) = records(2, 3, 10);
    assert_eq!(train.labels()[7], labels[1] as i64);
    let row: &[f32] = bytemuck::cast_slice(train.image_bytes(7));
    for (got, &px) in row.iter().zip(&pixels[IMG..2 * IMG]) {
        assert_eq!(*got, expected_pixel(px));
    }
    assert_eq!(TensorFile::open(files[0].join("cifar10-test.safetensors")).unwrap().len(), 4);
}

#[test]
fn u8_files_and_extracted_directories() {
    let dir = scratch("prep_u8_dir");
    let extracted = dir.join("cifar-10-batches-bin");
    std::fs::create_dir_all(&extracted).unwrap();
    for (name, bytes) in cifar10_members(2, 2, false) {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
    let o = run(prep_exe(), &[&extracted, &"--out", &dir, &"--dtype", &"u8", &"--norm", &"dataset"]);
    assert!(o.status.success(), "{}", text(&o));
    let f = TensorFile::open(dir.join("cifar10-train.safetensors")).unwrap();
    assert_eq!(f.dtype(), cifar_fast::prep::StoreDtype::U8);
    let (_, pixels) = records(0, 2, 10);
    assert_eq!(f.image_bytes(1), &pixels[IMG..]);
    // --norm dataset: the mean of channel 0 over the 10 train images.
    let mut sum = 0f64;
    for i in 0..f.len() {
        sum += f.image_bytes(i)[..1024].iter().map(|&x| x as f64).sum::<f64>();
    }
    let mean0 = sum / (f.len() * 1024) as f64 / 255.0;
    assert!((f.mean()[0] as f64 - mean0).abs() < 1e-6, "{} vs {mean0}", f.mean()[0]);
    // The default input is found in the data directory.
    let o = run(prep_exe(), &[&"--out", &dir, &"--force"]);
    assert!(o.status.success() && text(&o).contains("cifar-10-batches-bin"), "{}", text(&o));
}

#[test]
fn a_rerun_skips_unless_forced() {
    let dir = scratch("prep_rerun");
    let tgz = dir.join("c.tar.gz");
    tar_gz(&tgz, &cifar10_members(1, 1, false));
    let first = run(prep_exe(), &[&tgz, &"--out", &dir]);
    assert!(first.status.success());
    let before = std::fs::metadata(dir.join("cifar10-train.safetensors")).unwrap().modified().unwrap();
    let again = run(prep_exe(), &[&tgz, &"--out", &dir]);
    assert!(text(&again).contains("up to date"), "{}", text(&again));
    assert_eq!(before, std::fs::metadata(dir.join("cifar10-train.safetensors")).unwrap().modified().unwrap());
    // Other options are other output.
    let u8 = run(prep_exe(), &[&tgz, &"--out", &dir, &"--dtype", &"u8"]);
    assert!(!text(&u8).contains("up to date"), "{}", text(&u8));
    let forced = run(prep_exe(), &[&tgz, &"--out", &dir, &"--dtype", &"u8", &"--force"]);
    assert!(!text(&forced).contains("up to date"), "{}", text(&forced));
}

#[test]
fn cifar100_binary_keeps_coarse_labels() {
    let dir = scratch("prep_c100");
    let mut members = Vec::new();
    for (split, n) in [("train", 5), ("test", 3)] {
        let mut data = Vec::new();
        for i in 0..n {
            data.push((i % 20) as u8); // coarse
            data.push((i * 7 % 100) as u8); // fine
            data.extend((0..IMG).map(|p| (p + i) as u8));
        }
        members.push((format!("cifar-100-binary/{split}.bin"), data));
    }
    members.push((
        "cifar-100-binary/coarse_label_names.txt".into(),
        (0..20).map(|i| format!("c{i}\n")).collect::<String>().into_bytes(),
    ));
    members.push((
        "cifar-100-binary/fine_label_names.txt".into(),
        (0..100).map(|i| format!("f{i}\n")).collect::<String>().into_bytes(),
    ));
    let tgz = dir.join("cifar-100-binary.tar.gz");
    tar_gz(&tgz, &members);
    let o = run(prep_exe(), &[&tgz, &"--out", &dir]);
    assert!(o.status.success(), "{}", text(&o));
    let f = TensorFile::open(dir.join("cifar100-train.safetensors")).unwrap();
    assert_eq!(f.labels(), &[0, 7, 14, 21, 28]);
    assert_eq!(f.coarse_labels().unwrap(), &[0, 1, 2, 3, 4]);
    assert_eq!(f.classes()[7], "f7");
    assert_eq!(f.metadata()["coarse_classes"].matches('"').count(), 40);
}

#[test]
fn cifar100_python_reads_fine_and_coarse_labels() {
    let dir = scratch("prep_c100_py");
    let mut members = Vec::new();
    for (split, n) in [("train", 4usize), ("test", 2)] {
        let fine: Vec<u8> = (0..n).map(|i| (i * 31 % 100) as u8).collect();
        let coarse: Vec<u8> = (0..n).map(|i| (i * 3 % 20) as u8).collect();
        let (_, pixels) = records(7, n, 10);
        let data =
            pickled_with(&[("fine_labels", &fine), ("coarse_labels", &coarse)], &pixels, &Default::default());
        members.push((format!("cifar-100-python/{split}"), data));
    }
    let tgz = dir.join("cifar-100-python.tar.gz");
    tar_gz(&tgz, &members);
    let o = run(prep_exe(), &[&tgz, &"--out", &dir, &"--dtype", &"u8"]);
    assert!(o.status.success(), "{}", text(&o));
    let f = TensorFile::open(dir.join("cifar100-train.safetensors")).unwrap();
    assert_eq!(f.labels(), &[0, 31, 62, 93]);
    assert_eq!(f.coarse_labels().unwrap(), &[0, 3, 6, 9]);
    assert_eq!(f.image_bytes(3), &records(7, 4, 10).1[3 * IMG..]);
    assert_eq!(TensorFile::open(dir.join("cifar100-test.safetensors")).unwrap().len(), 2);
}

/// Runs a bad conversion into a directory holding good output, and checks the contract: a
/// non-zero exit, one message naming `names` and the problem, earlier output untouched and
/// nothing new left behind.
fn refuses(case: &str, members: Option<Vec<(String, Vec<u8>)>>, raw: Option<Vec<u8>>, problem: &str) {
    let dir = scratch(&format!("prep_bad_{case}"));
    let good = dir.join("good.tar.gz");
    tar_gz(&good, &cifar10_members(1, 1, false));
    assert!(run(prep_exe(), &[&good, &"--out", &dir]).status.success());
    std::fs::remove_file(&good).unwrap();
    let bad = dir.join(format!("{case}.tar.gz"));
    match (members, raw) {
        (Some(m), _) => tar_gz(&bad, &m),
        (_, Some(bytes)) => std::fs::write(&bad, bytes).unwrap(),
        _ => unreachable!(),
    }
    let before = listing(&dir);
    let o = run(prep_exe(), &[&bad, &"--out", &dir, &"--force"]);
    let msg = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(1), "{case}: {}", text(&o));
    assert!(msg.contains(&format!("{case}.tar.gz")), "{case}: message does not name the file: {msg}");
    assert!(msg.contains(problem), "{case}: expected {problem:?} in {msg}");
    assert_eq!(msg.trim().lines().count(), 1, "{case}: one line, got {msg}");
    assert!(!msg.contains("panicked"), "{msg}");
    assert_eq!(listing(&dir), before, "{case}: the data directory changed");
}

fn replace(mut members: Vec<(String, Vec<u8>)>, index: usize, data: Vec<u8>) -> Vec<(String, Vec<u8>)> {
    members[index].1 = data;
    members
}

#[test]
fn bad_archives_are_refused_cleanly() {
    let dir = scratch("prep_bad_make");
    let tgz = dir.join("x.tar.gz");
    tar_gz(&tgz, &cifar10_members(2, 2, false));
    let whole = std::fs::read(&tgz).unwrap();
    refuses("truncated", None, Some(whole[..whole.len() / 2].to_vec()), "corrupt or truncated archive");
    refuses(
        "notgzip",
        None,
        Some(b"hello, this is no archive at all".repeat(40)),
        "not a gzip file, a tar archive",
    );
    refuses("nocifar", Some(vec![("readme.txt".into(), b"hi".to_vec())]), None, "holds no CIFAR batches");
    let mut missing = cifar10_members(2, 2, false);
    missing.remove(2);
    refuses("missing", Some(missing), None, "batch data_batch_3 is missing");
    refuses(
        "ragged",
        Some(replace(cifar10_members(2, 2, false), 1, vec![0u8; 3073 * 2 + 5])),
        None,
        "is not a whole number of 3073-byte",
    );
    let mut label = binary_batch(&[3, 12], &[0u8; 2 * IMG]);
    label.truncate(2 * 3073);
    refuses(
        "label",
        Some(replace(cifar10_members(2, 2, false), 0, label)),
        None,
        "label 12 of record 1 is out of range 0..10",
    );
}

#[test]
fn hostile_and_malformed_pickles_are_refused_cleanly() {
    let (labels, pixels) = records(0, 2, 10);
    let with =
        |flaws: PickleFlaws| replace(cifar10_members(2, 2, true), 0, pickled_batch(&labels, &pixels, &flaws));
    refuses(
        "global",
        Some(with(PickleFlaws { global: Some(("os", "system")), ..Default::default() })),
        None,
        "refusing global os.system",
    );
    refuses(
        "opcode",
        Some(with(PickleFlaws { trailing_opcode: Some(0xf0), ..Default::default() })),
        None,
        "unsupported opcode 0xf0",
    );
    let short = (pixels.len() / 4, 1);
    refuses(
        "dtype",
        Some(with(PickleFlaws { dtype: Some("f4"), shape: Some(short), ..Default::default() })),
        None,
        "dtype f4, expected uint8",
    );
    refuses(
        "shape",
        Some(with(PickleFlaws { shape: Some((1, 2 * IMG)), ..Default::default() })),
        None,
        "'data' has shape [1, 6144]",
    );
}

#[test]
fn an_unwritable_output_directory_is_one_clear_error() {
    let dir = scratch("prep_unwritable");
    let tgz = dir.join("c.tar.gz");
    tar_gz(&tgz, &cifar10_members(1, 1, false));
    let blocker = dir.join("not-a-dir");
    std::fs::write(&blocker, b"x").unwrap();
    let o = run(prep_exe(), &[&tgz, &"--out", &blocker.join("out")]);
    let msg = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1));
    assert!(msg.contains("not-a-dir/out") && msg.contains("Not a directory"), "{msg}");
}

/// Serves `body` once over HTTP on 127.0.0.1; returns the URL.
#[test]
fn download_checks_md5_and_then_converts() {
    use md5::Digest;
    let dir = scratch("prep_download");
    let tgz = dir.join("src.tar.gz");
    tar_gz(&tgz, &cifar10_members(1, 1, true));
    let body = std::fs::read(&tgz).unwrap();
    let md5: String = md5::Md5::digest(&body).iter().map(|b| format!("{b:02x}")).collect();
    let data = dir.join("data");

    let wrong = run(prep_exe(), &[&"--download", &"--url", &serve_once(body.clone()), &"--out", &data]);
    assert_eq!(wrong.status.code(), Some(1));
    assert!(
        text(&wrong).contains("does not match the expected c58f30108f718f92721af3b95e74349a"),
        "{}",
        text(&wrong)
    );
    assert!(listing(&data).is_empty(), "a failed download leaves nothing: {:?}", listing(&data).keys());

    let ok = run(prep_exe(), &[&"--download", &"--url", &serve_once(body), &"--md5", &md5, &"--out", &data]);
    assert!(ok.status.success(), "{}", text(&ok));
    assert!(
        data.join("cifar-10-python.tar.gz").exists() && !data.join("cifar-10-python.tar.gz.part").exists()
    );
    assert_eq!(TensorFile::open(data.join("cifar10-train.safetensors")).unwrap().len(), 5);
}

#[test]
fn a_closed_stdout_ends_the_run_quietly_after_the_files_are_written() {
    let dir = scratch("prep_closed_stdout");
    let tgz = dir.join("c.tar.gz");
    tar_gz(&tgz, &cifar10_members(1, 1, false));
    let o = run_with_stdout_closed(prep_exe(), &[&tgz, &"--out", &dir]);
    // SIGPIPE's status, as `cmd | head` gives a C program; no panic message.
    assert_eq!(o.status.code(), Some(141), "{}", text(&o));
    assert!(o.stderr.is_empty(), "{}", text(&o));
    assert_eq!(TensorFile::open(dir.join("cifar10-train.safetensors")).unwrap().len(), 5);
}

#[test]
fn mean_and_std_take_the_documented_r_g_b_form() {
    let dir = scratch("prep_mean_std");
    let tgz = dir.join("c.tar.gz");
    tar_gz(&tgz, &cifar10_members(1, 1, false));
    let out = dir.join("out");
    let o = run(
        prep_exe(),
        &[&tgz, &"--out", &out, &"--mean", &"-0.25,0.5,0.75", &"--std", &"0.2470,0.2435,0.2616"],
    );
    assert!(o.status.success(), "{}", text(&o));
    let f = cifar_fast::TensorFile::open(out.join("cifar10-train.safetensors")).unwrap();
    assert_eq!((f.mean(), f.std()), ([-0.25, 0.5, 0.75], [0.2470, 0.2435, 0.2616]));
    for (mean, std, problem) in [
        ("0.5,0.5", "1,1,1", "three comma-separated values"),
        ("0.5,0.5,x", "1,1,1", "\"x\" is not a number"),
        ("0.5,0.5,NaN", "1,1,1", "not a finite number"),
        ("0.5,0.5,0.5", "1,0,1", "every std must be positive"),
    ] {
        let o = run(prep_exe(), &[&tgz, &"--out", &dir.join("bad"), &"--mean", &mean, &"--std", &std]);
        assert_eq!(o.status.code(), Some(1), "{mean} {std}: {}", text(&o));
        assert!(text(&o).contains(problem), "{mean} {std}: {}", text(&o));
        assert!(!dir.join("bad").exists());
    }
}

#[test]
fn each_binary_names_itself_in_its_version() {
    for exe in [prep_exe(), env!("CARGO_BIN_EXE_cifar-train")] {
        let o = run(exe, &[&"--version"]);
        let name = std::path::Path::new(exe).file_name().unwrap().to_string_lossy().into_owned();
        assert!(o.status.success());
        assert_eq!(text(&o).trim(), format!("{name} {}", env!("CARGO_PKG_VERSION")));
    }
}
