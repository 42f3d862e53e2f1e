//! `cifar-prep` on image folders (`ROOT/<split>/<class>/<image>`), as directories and as
//! tarballs: torchvision's `ImageFolder` order and values, `--size`, and bad images refused.
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use cifar_fast::{ImageFolder, Source, TensorFile};
use common::*;

/// A small folder in several formats, class folders made out of sorted order, names that sort
/// differently as text and as numbers, files `ImageFolder` skips, and a grey and an RGBA image.
fn make_folder(root: &Path) {
    for (split, n) in [("train", 5u32), ("test", 2)] {
        for (c, class) in ["cat", "ant", "dog"].iter().enumerate() {
            let dir = root.join(split).join(class);
            for i in 0..n {
                let ext = ["png", "JPG", "bmp", "jpeg", "png"][i as usize % 5];
                write_image(
                    &dir.join(format!("b{}.{ext}", [10, 2, 1, 33, 4][i as usize])),
                    32,
                    32,
                    i + 10 * c as u32,
                );
            }
            std::fs::write(dir.join("notes.txt"), "not an image").unwrap();
            write_image(&dir.join("skipped.gif"), 8, 8, 0);
        }
    }
    let grey = image::GrayImage::from_fn(32, 32, |x, y| image::Luma([(x * 8 + y) as u8]));
    grey.save(root.join("train/ant/grey.png")).unwrap();
    let rgba =
        image::RgbaImage::from_fn(32, 32, |x, y| image::Rgba([x as u8 * 8, y as u8 * 8, 9, (x * y) as u8]));
    rgba.save(root.join("train/dog/rgba.png")).unwrap();
}

fn prep(args: &[&dyn AsRef<std::ffi::OsStr>]) -> std::process::Output {
    run(prep_exe(), args)
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    v.sort();
    v
}

#[test]
fn a_folder_is_imagefolders_order_and_values_as_a_directory_and_as_a_tarball() {
    let dir = scratch("folder_matches");
    let root = dir.join("myset");
    make_folder(&root);
    let out = dir.join("out");
    let o = prep(&[&root, &"--out", &out]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("train: 17 images"), "{}", text(&o));
    let check = Command::new(python())
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/check_folder.py"))
        .args([root.to_str().unwrap(), out.to_str().unwrap(), "myset", "train", "test"])
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", text(&check));
    assert!(text(&check).contains("train: 17 images match"), "{}", text(&check));

    // The same folder packed (under a top folder, as the JPEG mirror of CIFAR-10 is) gives the
    // same tensors.
    let tgz = dir.join("packed.tar.gz");
    tar_gz_dir(&root, "top", &tgz);
    let out2 = dir.join("out2");
    let o = prep(&[&tgz, &"--out", &out2]);
    assert!(o.status.success(), "{}", text(&o));
    for split in ["train", "test"] {
        let a = TensorFile::open(out.join(format!("myset-{split}.safetensors"))).unwrap();
        let b = TensorFile::open(out2.join(format!("packed-{split}.safetensors"))).unwrap();
        assert_eq!(a.labels(), b.labels());
        assert_eq!(a.all_image_bytes(), b.all_image_bytes(), "{split}");
        assert_eq!(a.classes(), ["ant", "cat", "dog"]);
    }
    // --preview needs only the prepared files.
    let png = dir.join("grid.png");
    let o = prep(&[&"--out", &out, &"--preview", &png]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(image::open(&png).unwrap().height(), 2 + 3 * (96 + 2), "a row per class");
    // A second run on the same input converts nothing.
    let o = prep(&[&tgz, &"--out", &out2]);
    assert!(text(&o).contains("up to date"), "{}", text(&o));

    // The library's ImageFolder source reads the same values, through the same decoder.
    let source = ImageFolder::new(root.join("train")).unwrap();
    let file = TensorFile::open(out.join("myset-train.safetensors")).unwrap();
    assert_eq!(source.len(), file.len());
    let mut row = vec![0f32; 3 * 32 * 32];
    for i in 0..source.len() {
        let label = source.read_into(i, &mut row).unwrap();
        assert_eq!(label, file.labels()[i]);
        assert_eq!(bytemuck::cast_slice::<f32, u8>(&row), file.image_bytes(i), "sample {i}");
    }
}

#[test]
fn size_resizes_and_other_sizes_are_refused_naming_the_first() {
    let dir = scratch("folder_sizes");
    let root = dir.join("sizes");
    for (split, class, file, w, h) in [
        ("train", "a", "1.png", 40, 30),
        ("train", "a", "2.png", 40, 30),
        ("train", "b", "1.png", 40, 30),
        ("train", "b", "2.png", 24, 24),
        ("train", "b", "3.png", 12, 12),
        ("test", "a", "1.png", 40, 30),
        ("test", "b", "1.png", 40, 30),
    ] {
        write_image(&root.join(split).join(class).join(file), w, h, 1);
    }
    // The first odd image is the slowest to read (bytes after its end, which decoders skip),
    // so that a decoder of a later odd one finishes first: the first is still the one named.
    let slow = root.join("train/b/2.png");
    let mut bytes = std::fs::read(&slow).unwrap();
    bytes.resize(bytes.len() + (32 << 20), 0);
    std::fs::write(&slow, bytes).unwrap();
    let out = dir.join("out");
    let o = prep(&[&root, &"--out", &out, &"--store", &"dense"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let msg = text(&o);
    assert!(msg.contains("b/2.png") && msg.contains("24x24") && msg.contains("--size"), "{msg}");
    assert!(!msg.contains("3.png"), "names the first odd image only: {msg}");
    assert!(!out.exists() || files_in(&out).is_empty(), "{:?}", files_in(&out));

    // An archive whose members come in another order than ImageFolder's (train before test):
    // the size is the first image's in ImageFolder's order, and the message names that one.
    let archive = dir.join("sizes.tar.gz");
    let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(
        std::fs::File::create(&archive).unwrap(),
        flate2::Compression::fast(),
    ));
    for member in ["train/a/1.png", "train/a/2.png", "train/b/1.png", "train/b/2.png", "train/b/3.png"]
        .into_iter()
        .chain(["test/a/1.png", "test/b/1.png"])
    {
        tar.append_path_with_name(root.join(member), format!("sizes/{member}")).unwrap();
    }
    tar.into_inner().unwrap().finish().unwrap();
    let o = prep(&[&archive, &"--out", &out, &"--store", &"dense"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let msg = text(&o);
    assert!(msg.contains("train/b/2.png: is 24x24, but") && msg.contains("test/a/1.png is 40x30"), "{msg}");
    assert!(!msg.contains("3.png"), "names the first odd image only: {msg}");

    // By default, images of several sizes are kept encoded, each with its own size.
    for input in [&root, &archive] {
        let o = prep(&[input, &"--out", &out]);
        assert!(o.status.success(), "{}", text(&o));
        let f = cifar_fast::EncodedFile::open(out.join("sizes-train.safetensors")).unwrap();
        let sizes: Vec<(u32, u32)> = (0..f.len()).map(|i| f.size(i)).collect();
        assert_eq!(sizes, [(30, 40), (30, 40), (30, 40), (24, 24), (12, 12)]);
        assert_eq!(f.labels(), [0, 0, 1, 1, 1]);
        // The PNGs, stored as the lossless PNG of their RGB: the same pixels.
        for (i, member) in ["a/1.png", "a/2.png", "b/1.png", "b/2.png", "b/3.png"].iter().enumerate() {
            let (h, w) = f.size(i);
            let decode = |bytes: &[u8]| {
                cifar_fast::prep::image::decode_rgb(bytes, (w, h), std::path::Path::new(member))
            };
            let original = std::fs::read(root.join("train").join(member)).unwrap();
            assert_eq!(decode(f.image(i)).unwrap(), decode(&original).unwrap(), "{member}");
        }
    }

    let o = prep(&[&root, &"--out", &out, &"--size", &"20,36"]);
    assert!(o.status.success(), "{}", text(&o));
    let f = TensorFile::open(out.join("sizes-train.safetensors")).unwrap();
    assert_eq!(f.image_shape(), [3, 20, 36]);
    assert_eq!(f.len(), 5);
    let o = prep(&[&root, &"--out", &out, &"--size", &"0,3"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
}

#[test]
fn bad_images_and_layouts_are_one_clear_error_and_leave_earlier_output() {
    let dir = scratch("folder_bad");
    let good = dir.join("good");
    make_folder(&good);
    let out = dir.join("out");
    let o = prep(&[&good, &"--out", &out, &"--name", &"same"]);
    assert!(o.status.success(), "{}", text(&o));
    let before: Vec<Vec<u8>> = files_in(&out).iter().map(|p| std::fs::read(p).unwrap()).collect();

    let jpeg = std::fs::read(good.join("train/ant/b2.JPG")).unwrap();
    type Spoil = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, Spoil, &str)> = vec![
        ("empty", Box::new(|r: &Path| std::fs::write(r.join("train/cat/b2.JPG"), b"").unwrap()), "0 bytes"),
        (
            "garbage",
            Box::new(|r: &Path| {
                std::fs::write(r.join("train/cat/b10.png"), b"\x89PNG but not really").unwrap()
            }),
            "cannot be decoded",
        ),
        (
            "truncated",
            Box::new(move |r: &Path| {
                std::fs::write(r.join("train/dog/b2.JPG"), &jpeg[..jpeg.len() / 2]).unwrap()
            }),
            "cannot be decoded as a JPEG",
        ),
        (
            "empty class",
            Box::new(|r: &Path| std::fs::create_dir_all(r.join("test/eel")).unwrap()),
            "no images",
        ),
        (
            "classes differ",
            Box::new(|r: &Path| std::fs::remove_dir_all(r.join("test/dog")).unwrap()),
            "different classes",
        ),
        (
            "depths differ",
            Box::new(|r: &Path| write_image(&r.join("train/cat/deeper/x.png"), 32, 32, 1)),
            "different depths",
        ),
    ];
    for (what, spoil, expect) in cases {
        let root = dir.join(what.replace(' ', "_"));
        let _ = std::fs::remove_dir_all(&root);
        make_folder(&root);
        spoil(&root);
        let o = prep(&[&root, &"--out", &out, &"--name", &"same"]);
        let msg = text(&o);
        assert_eq!(o.status.code(), Some(1), "{what}: {msg}");
        assert!(msg.contains(expect), "{what}: {msg}");
        assert!(msg.starts_with("cifar-prep: error: ") && msg.lines().count() == 1, "{what}: {msg}");
        let after: Vec<Vec<u8>> = files_in(&out).iter().map(|p| std::fs::read(p).unwrap()).collect();
        assert!(
            after == before,
            "{what}: earlier output changed or temporary files left: {:?}",
            files_in(&out)
        );
    }
    // The file is named for the errors about one image.
    let root = dir.join("empty");
    let o = prep(&[&root, &"--out", &out, &"--name", &"same"]);
    assert!(text(&o).contains("train/cat/b2.JPG"), "{}", text(&o));
}
