//! Images that decode to more than they weigh, cut short, or of no pixels: `cifar-prep` refuses
//! each with one error naming the file, leaves nothing behind, and converts any folder in
//! bounded memory (it streams into the output).
mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};

use cifar_fast::TensorFile;
use common::*;

/// Runs `cifar-prep` with its address space limited to `limit_mb` (so a decoder that allocates
/// what a header claims dies instead of taking the machine down) and returns its output and
/// peak resident memory in MiB, as the kernel's high-water mark read while it runs (the
/// rusage of a forked child counts the test process it was forked from).
fn prep_within(limit_mb: u64, args: &[&dyn AsRef<std::ffi::OsStr>]) -> (Output, u64) {
    let mut cmd = Command::new("prlimit");
    cmd.arg(format!("--as={}", limit_mb << 20)).arg("--").arg(prep_exe());
    for a in args {
        cmd.arg(a);
    }
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let status_file = format!("/proc/{}/status", child.id());
    let mut peak_kb = 0u64;
    while child.try_wait().unwrap().is_none() {
        let status = std::fs::read_to_string(&status_file).unwrap_or_default();
        if let Some(line) = status.lines().find(|l| l.starts_with("VmHWM:")) {
            peak_kb = peak_kb.max(line.split_whitespace().nth(1).unwrap().parse().unwrap());
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    (child.wait_with_output().unwrap(), peak_kb / 1024)
}

/// The directory holds no temporary or partial file, and only `expected` otherwise.
fn holds_only(dir: &Path, expected: &[&str]) {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.sort();
    assert_eq!(names, expected, "{}", dir.display());
}

/// A small JPEG whose frame header is patched to declare `w`×`h`.
fn jpeg_declaring(w: u16, h: u16) -> Vec<u8> {
    let img = image::RgbImage::from_fn(16, 16, |x, y| image::Rgb([x as u8 * 16, y as u8 * 16, 7]));
    let mut bytes = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Jpeg).unwrap();
    let sof = bytes.windows(2).position(|m| m == [0xFF, 0xC0]).expect("a baseline frame header");
    bytes[sof + 5..sof + 7].copy_from_slice(&h.to_be_bytes());
    bytes[sof + 7..sof + 9].copy_from_slice(&w.to_be_bytes());
    bytes
}

/// A folder `root/train/<class>/` of good 32×32 images, one class.
fn good_folder(root: &Path, n: u32) {
    for i in 0..n {
        write_image(&root.join(format!("train/cat/{i}.png")), 32, 32, i);
    }
}

#[test]
fn images_declaring_more_pixels_than_the_limit_are_refused_from_their_header() {
    let dir = scratch("hostile_bombs");
    // Three 20000×20000 JPEGs of a few hundred bytes: 1.2 GB each once decoded.
    let jpegs = dir.join("jpegs");
    good_folder(&jpegs, 2);
    for i in 0..3 {
        std::fs::write(jpegs.join(format!("train/cat/bomb{i}.jpg")), jpeg_declaring(20000, 20000)).unwrap();
    }
    // A valid 10000×10000 grey PNG: 100 M pixels, a few hundred KB.
    let pngs = dir.join("pngs");
    good_folder(&pngs, 2);
    image::GrayImage::new(10_000, 10_000).save(pngs.join("train/cat/big.png")).unwrap();
    for (input, bad) in [(&jpegs, "bomb"), (&pngs, "big.png")] {
        let out = dir.join(format!("out-{}", input.file_name().unwrap().to_string_lossy()));
        let (o, peak) = prep_within(2048, &[input, &"--out", &out]);
        let msg = text(&o);
        assert_eq!(o.status.code(), Some(1), "{msg}");
        assert!(
            msg.contains(bad) && msg.contains("above the limit") && msg.contains("--max-image-pixels"),
            "{msg}"
        );
        assert_eq!(msg.matches("error").count(), 1, "one error: {msg}");
        assert!(peak < 200, "refused from the header, yet {peak} MiB used");
        holds_only(&out, &[]);
    }
    // The limit is an option: raised, the genuine large PNG converts (resized).
    let out = dir.join("raised");
    let o = run(
        prep_exe(),
        &[&pngs, &"--out", &out, &"--max-image-pixels", &"100000000", &"--size", &"32,32", &"--dtype", &"u8"],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(TensorFile::open(out.join("pngs-train.safetensors")).unwrap().len(), 3);
}

#[test]
fn a_jpeg_cut_short_is_an_error_not_grey_pixels() {
    let dir = scratch("hostile_truncated");
    let root = dir.join("set");
    good_folder(&root, 2);
    // Of the others' size, so that only the cut is wrong with it.
    let img =
        image::RgbImage::from_fn(32, 32, |x, y| image::Rgb([(x * y) as u8, (x ^ y) as u8 * 4, x as u8 * 3]));
    let mut bytes = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Jpeg).unwrap();
    bytes.truncate(bytes.len() * 2 / 3);
    std::fs::write(root.join("train/cat/cut.jpg"), &bytes).unwrap();
    let out = dir.join("out");
    let o = run(prep_exe(), &[&root, &"--out", &out]);
    let msg = text(&o);
    assert_eq!(o.status.code(), Some(1), "{msg}");
    assert!(msg.contains("cut.jpg: cannot be decoded as a JPEG: image file is truncated"), "{msg}");
    holds_only(&out, &[]);
    // The same image whole converts: the error is the cut, not the image.
    img.write_to(
        &mut std::fs::File::create(root.join("train/cat/cut.jpg")).unwrap(),
        image::ImageFormat::Jpeg,
    )
    .unwrap();
    let o = run(prep_exe(), &[&root, &"--out", &out]);
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn degenerate_sizes_are_refused_or_converted_in_memory_that_scales_with_one_image() {
    let dir = scratch("hostile_sizes");
    // 0×0 images.
    let empty = dir.join("empty");
    for i in 0..3 {
        let p = empty.join(format!("train/cat/{i}.ppm"));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, b"P6\n0 0\n255\n").unwrap();
    }
    let out = dir.join("out");
    let o = run(prep_exe(), &[&empty, &"--out", &out]);
    let msg = text(&o);
    assert_eq!(o.status.code(), Some(1), "{msg}");
    assert!(msg.contains("0.ppm") && !msg.contains("panicked"), "{msg}");
    holds_only(&out, &[]);

    // The largest documented --size, f32: one image's buffers, not 256 images'.
    let one = dir.join("one");
    write_image(&one.join("cat/a.png"), 8, 8, 1);
    let (o, peak) = prep_within(3072, &[&one, &"--out", &out, &"--size", &"4096,4096", &"--name", &"one"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(peak < 1024, "{peak} MiB for one 4096x4096 image");
    let f = TensorFile::open(out.join("one-one.safetensors")).unwrap();
    assert_eq!(f.image_shape(), [3, 4096, 4096]);
    drop(f);
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn a_folder_converts_in_memory_bounded_whatever_its_size() {
    let dir = scratch("hostile_streaming");
    let root = dir.join("many");
    for i in 0..200 {
        write_image(&root.join(format!("train/c{}/{i}.png", i % 4)), 16, 16, i);
    }
    let out = dir.join("out");
    // 200 images resized to 384×384 are 88 MB of pixels: held at once before they were written
    // at their places as they were decoded.
    let (o, peak) = prep_within(4096, &[&root, &"--out", &out, &"--size", &"384,384", &"--dtype", &"u8"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(peak < 60, "peak {peak} MiB: the decoded images were held");
    let f = TensorFile::open(out.join("many-train.safetensors")).unwrap();
    assert_eq!((f.len(), f.image_shape()), (200, [3, 384, 384]));
    // In index order (class, then file name as text), each at its place.
    let mut names: Vec<(u32, String)> = (0..200).map(|i| (i % 4, format!("{i}.png"))).collect();
    names.sort();
    for (index, (class, file)) in names.iter().enumerate().step_by(37) {
        let img = image::open(root.join(format!("train/c{class}/{file}"))).unwrap().into_rgb8();
        let img = image::imageops::resize(&img, 384, 384, image::imageops::FilterType::Triangle);
        let stored = f.image_bytes(index);
        assert_eq!(stored[0], img.get_pixel(0, 0).0[0], "image {index}");
        assert_eq!(stored[384 * 384 + 5], img.get_pixel(5, 0).0[1], "image {index}");
        assert_eq!(f.labels()[index], *class as i64);
    }
}

#[test]
fn a_model_refuses_images_too_small_or_too_large_for_it_naming_what_it_takes() {
    let dir = scratch("hostile_model_sizes");
    let root = dir.join("tiny");
    for split in ["train", "test"] {
        for (c, class) in ["a", "b"].iter().enumerate() {
            for i in 0..4 {
                write_image(&root.join(format!("{split}/{class}/{i}.png")), 2, 2, i + 10 * c as u32);
            }
        }
    }
    let data = dir.join("data");
    let o = run(prep_exe(), &[&root, &"--out", &data]);
    assert!(o.status.success(), "{}", text(&o));
    for (model, takes) in [
        ("airbench", "takes images from 25x25 to 48x48"),
        ("lenet", "takes 32x32 images"),
        ("resnet", "takes images of at least 4x4"),
    ] {
        let o = Command::new(train_exe())
            .args(["--data", data.to_str().unwrap(), "--device", "cpu", "--threads", "1", "--model", model])
            .args(["--epochs", "1", "--batch-size", "2"])
            .output()
            .unwrap();
        let msg = text(&o);
        assert_eq!(o.status.code(), Some(1), "{model}: {msg}");
        assert!(msg.contains(takes) && msg.contains("2x2") && !msg.contains("panicked"), "{model}: {msg}");
    }
}
