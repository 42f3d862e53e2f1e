//! Images of every size: `cifar-prep` keeps them encoded (JPEGs byte for byte, others as the
//! PNG of their RGB, `--max-side` re-encoding), refuses hostile ones as the dense path does, and
//! the loader decodes each into the geometry drawn for it: the same batches whatever the
//! workers, on resume and from a folder or its encoded file; `cifar-train` trains on them.
mod common;

use std::path::Path;
use std::sync::Arc;

use cifar_fast::geometry::{Resample, Window};
use cifar_fast::pipeline::{ImageSettings, Output};
use cifar_fast::{
    EncodedFile, EncodedImages, FolderImages, ImageFolder, ImageSource, ImageTransform, Loader,
};
use common::*;

/// A JPEG of `w`×`h`, smooth enough to be photograph-like, different per `seed`.
fn jpeg(w: u32, h: u32, seed: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        let s = seed as f32;
        image::Rgb([
            ((x as f32 * 0.05 + s).sin() * 120.0 + 128.0) as u8,
            ((y as f32 * 0.07 + s * 2.0).cos() * 120.0 + 128.0) as u8,
            (((x + y) as f32 * 0.03 + s).sin() * 100.0 + 128.0) as u8,
        ])
    });
    let mut bytes = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 88).encode_image(&img).unwrap();
    bytes
}

/// `root/{train,val}/{a,b,c}/` of JPEGs of several sizes, a PNG and a grey JPEG among them, and a
/// PNG named `.JPEG` (as ImageNet holds).
fn photo_folder(root: &Path) {
    let sizes = [(120, 90), (64, 200), (333, 250), (90, 90), (250, 40), (180, 300)];
    for (split, n) in [("train", 6), ("val", 2)] {
        for (c, class) in ["a", "b", "c"].iter().enumerate() {
            let dir = root.join(split).join(class);
            std::fs::create_dir_all(&dir).unwrap();
            for i in 0..n {
                let (w, h) = sizes[(i + c) % sizes.len()];
                std::fs::write(dir.join(format!("{i}.JPEG")), jpeg(w, h, (i * 3 + c) as u32)).unwrap();
            }
        }
    }
    write_image(&root.join("train/a/png.png"), 77, 51, 4);
    let grey = image::GrayImage::from_fn(100, 60, |x, y| image::Luma([(x * 2 + y) as u8]));
    grey.save(root.join("train/b/grey.jpg")).unwrap();
    let mut png = Vec::new();
    image::RgbImage::from_fn(50, 70, |x, y| image::Rgb([x as u8 * 5, y as u8 * 3, 40]))
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    std::fs::write(root.join("train/c/named.JPEG"), png).unwrap();
}

fn prep(args: &[&dyn AsRef<std::ffi::OsStr>]) -> std::process::Output {
    run(prep_exe(), args)
}

fn rrc(size: u32) -> ImageTransform {
    ImageTransform {
        resample: Resample::RandomResizedCrop {
            size: (size, size),
            scale: (0.08, 1.0),
            ratio: (0.75, 4.0 / 3.0),
        },
        window: Window::Whole,
        flip: true,
    }
}

fn settings(transform: ImageTransform, output: Output) -> ImageSettings {
    ImageSettings { transform, output, decode: Default::default() }
}

/// Every batch of one epoch of `source` as (indices, pixel values as f64, labels).
fn epoch_of(
    source: Arc<dyn ImageSource>,
    images: ImageSettings,
    workers: usize,
    start_at: Option<usize>,
) -> Vec<(Vec<usize>, Vec<f64>, Vec<i64>)> {
    let mut b = Loader::builder_images(source, images).batch_size(4).num_workers(workers).seed(7);
    if let Some(step) = start_at {
        b = b.start_at(1, step);
    }
    let mut loader = b.build().unwrap();
    loader
        .epoch(1)
        .map(|b| {
            let b = b.unwrap();
            let px = b.images.to_kind(tch::Kind::Double).flatten(0, -1);
            let labels = Vec::<i64>::try_from(&b.labels).unwrap();
            (b.indices.clone(), Vec::<f64>::try_from(px).unwrap(), labels)
        })
        .collect()
}

#[test]
fn encoded_files_keep_jpegs_byte_for_byte_and_others_as_their_rgb() {
    let dir = scratch("images_encoded");
    let root = dir.join("photos");
    photo_folder(&root);
    let out = dir.join("out");
    let o = prep(&[&root, &"--out", &out]);
    assert!(o.status.success(), "{}", text(&o));
    let f = EncodedFile::open(out.join("photos-train.safetensors")).unwrap();
    let folder = ImageFolder::new(root.join("train")).unwrap();
    assert_eq!(f.len(), folder.samples().len());
    let mut input_bytes = 0;
    for (i, (path, label)) in folder.samples().iter().enumerate() {
        let original = std::fs::read(path).unwrap();
        input_bytes += original.len();
        assert_eq!(f.labels()[i], *label, "{}", path.display());
        let (w, h) = image::load_from_memory(&original).unwrap().to_rgb8().dimensions();
        assert_eq!(f.size(i), (h, w), "{}", path.display());
        if original.starts_with(&[0xFF, 0xD8]) {
            assert_eq!(f.image(i), original, "a JPEG is stored as it is: {}", path.display());
        } else {
            // Compressed as well as the image crate's default PNG: no bloat from the re-encode.
            assert!(
                f.image(i).len() <= original.len() * 11 / 10,
                "{}: {} bytes",
                path.display(),
                f.image(i).len()
            );
            let stored = image::load_from_memory(f.image(i)).unwrap().to_rgb8();
            let want = image::load_from_memory(&original).unwrap().to_rgb8();
            assert!(stored == want, "{} keeps its RGB pixels", path.display());
        }
    }
    // The file is the images' bytes plus its tables (40 bytes an image) and the header's room.
    let size = std::fs::metadata(out.join("photos-train.safetensors")).unwrap().len() as usize;
    assert!(size < input_bytes + input_bytes / 100 + (64 << 10), "{size} bytes for {input_bytes} of images");

    // --max-side re-encodes the larger images, says so, and keeps the others byte for byte.
    let small = dir.join("small");
    let o = prep(&[&root, &"--out", &small, &"--max-side", &"150", &"--quality", &"80"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("re-encoded") && text(&o).contains("quality 80"), "{}", text(&o));
    let g = EncodedFile::open(small.join("photos-train.safetensors")).unwrap();
    for i in 0..g.len() {
        let (h, w) = f.size(i);
        let (nh, nw) = g.size(i);
        assert!(nh.max(nw) <= 150, "image {i} is {nh}x{nw}");
        if h.max(w) <= 150 {
            assert_eq!((nh, nw), (h, w));
            if f.image(i).starts_with(&[0xFF, 0xD8]) {
                assert_eq!(g.image(i), f.image(i), "image {i} needed no shrinking");
            }
        } else {
            // The aspect ratio is kept, within the rounding of one side.
            let (r0, r1) = (w as f64 / h as f64, nw as f64 / nh as f64);
            assert!((r0 - r1).abs() / r0 < 0.02, "image {i}: {w}x{h} became {nw}x{nh}");
            assert!(g.image(i).starts_with(&[0xFF, 0xD8]), "image {i} is re-encoded as JPEG");
        }
    }
}

#[test]
fn hostile_images_are_refused_in_the_encoded_path_and_earlier_output_stays() {
    let dir = scratch("images_hostile");
    let root = dir.join("photos");
    photo_folder(&root);
    let out = dir.join("out");
    let o = prep(&[&root, &"--out", &out]);
    assert!(o.status.success(), "{}", text(&o));
    let before = std::fs::read(out.join("photos-train.safetensors")).unwrap();

    let good = jpeg(120, 90, 1);
    let mut bomb = jpeg(16, 16, 2);
    let sof = bomb.windows(2).position(|m| m == [0xFF, 0xC0]).unwrap();
    bomb[sof + 5..sof + 9].copy_from_slice(&[0x4E, 0x20, 0x4E, 0x20]); // 20000x20000
    let cases: Vec<(&str, Vec<u8>, &[&str])> = vec![
        ("cut.JPEG", good[..good.len() * 2 / 3].to_vec(), &["cut.JPEG", "truncated"]),
        ("bomb.JPEG", bomb, &["bomb.JPEG", "above the limit", "--max-image-pixels"]),
        ("empty.JPEG", Vec::new(), &["empty.JPEG", "0 bytes"]),
        ("garbage.JPEG", b"\xFF\xD8\xFF not a jpeg at all".to_vec(), &["garbage.JPEG"]),
    ];
    for (name, bytes, says) in cases {
        let bad = root.join("train/b").join(name);
        std::fs::write(&bad, bytes).unwrap();
        for store in ["encoded", "dense"] {
            let o = if store == "dense" {
                prep(&[&root, &"--out", &out, &"--store", &store, &"--size", &"32,32"])
            } else {
                prep(&[&root, &"--out", &out, &"--store", &store])
            };
            assert_refused(&o, says);
            assert_eq!(text(&o).matches("error").count(), 1, "one error: {}", text(&o));
            assert_eq!(std::fs::read(out.join("photos-train.safetensors")).unwrap(), before, "{name}");
            let names: Vec<_> = std::fs::read_dir(&out)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .filter(|n| n != ".cifar-prep.lock")
                .collect();
            assert_eq!(names.len(), 2, "no partial file beside the earlier output: {names:?}");
        }
        std::fs::remove_file(&bad).unwrap();
    }
}

#[test]
fn the_loader_gives_one_epoch_whatever_the_workers_source_or_resume() {
    let dir = scratch("images_loader");
    let root = dir.join("photos");
    photo_folder(&root);
    let out = dir.join("out");
    let o = prep(&[&root, &"--out", &out]);
    assert!(o.status.success(), "{}", text(&o));
    let encoded: Arc<dyn ImageSource> =
        Arc::new(EncodedImages::open(out.join("photos-train.safetensors"), false).unwrap());
    let folder: Arc<dyn ImageSource> =
        Arc::new(FolderImages::new(ImageFolder::new(root.join("train")).unwrap()));
    let norm = || Output::normalized([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]);

    let reference = epoch_of(encoded.clone(), settings(rrc(40), norm()), 0, None);
    assert_eq!(reference.iter().map(|b| b.0.len()).sum::<usize>(), 21);
    let mut all: Vec<usize> = reference.iter().flat_map(|b| b.0.clone()).collect();
    all.sort();
    assert_eq!(all, (0..21).collect::<Vec<_>>(), "each image once");
    for workers in [1, 3] {
        assert_eq!(
            epoch_of(encoded.clone(), settings(rrc(40), norm()), workers, None),
            reference,
            "{workers}"
        );
    }
    assert_eq!(epoch_of(folder.clone(), settings(rrc(40), norm()), 2, None), reference, "folder = file");
    assert_eq!(epoch_of(encoded.clone(), settings(rrc(40), norm()), 2, Some(2)), reference[2..], "resume");

    // The crop differs with the epoch's draw: another seed gives other pixels for the same image.
    let first = |v: &[(Vec<usize>, Vec<f64>, Vec<i64>)], i: usize| {
        let (b, p) =
            v.iter().find(|b| b.0.contains(&i)).map(|b| (b, b.0.iter().position(|&x| x == i))).unwrap();
        b.1[p.unwrap() * 3 * 40 * 40..][..3 * 40 * 40].to_vec()
    };
    let mut other = Loader::builder_images(encoded.clone(), settings(rrc(40), norm()))
        .batch_size(4)
        .seed(8)
        .build()
        .unwrap();
    let b = other.epoch(1).next().unwrap().unwrap();
    let i = b.indices[0];
    let px = Vec::<f64>::try_from(b.images.get(0).to_kind(tch::Kind::Double).flatten(0, -1)).unwrap();
    assert_ne!(px, first(&reference, i), "seed 8 draws another crop of image {i}");

    // uint8 batches are the pixels the float ones normalize.
    let u8s = epoch_of(encoded.clone(), settings(rrc(40), Output::U8), 2, None);
    let f32s = epoch_of(encoded.clone(), settings(rrc(40), Output::normalized([0.0; 3], [1.0; 3])), 2, None);
    for (u, f) in u8s.iter().zip(&f32s) {
        assert_eq!(u.0, f.0);
        assert!(u.1.iter().all(|v| v.fract() == 0.0 && (0.0..=255.0).contains(v)));
        let worst = u.1.iter().zip(&f.1).map(|(a, b)| (a / 255.0 - b).abs()).fold(0.0, f64::max);
        assert!(worst < 1e-6, "{worst}");
    }

    // Resize + CenterCrop has no randomness: the same pixels every epoch and seed.
    let center =
        ImageTransform { resample: Resample::Shorter(48), window: Window::Center(40, 40), flip: false };
    let a = epoch_of(encoded.clone(), settings(center, Output::U8), 1, None);
    let mut l =
        Loader::builder_images(encoded, settings(center, Output::U8)).batch_size(4).seed(99).build().unwrap();
    for b in l.epoch(5) {
        let b = b.unwrap();
        for (k, &i) in b.indices.iter().enumerate() {
            let px = Vec::<f64>::try_from(b.images.get(k as i64).to_kind(tch::Kind::Double).flatten(0, -1))
                .unwrap();
            assert_eq!(px, first(&a, i), "image {i}");
        }
    }
}

#[test]
fn a_bad_image_fails_its_batch_naming_the_file_and_the_epoch_goes_on() {
    let dir = scratch("images_bad_batch");
    let root = dir.join("photos");
    photo_folder(&root);
    // Whole enough for the listing, broken inside: the decoder meets it on a worker.
    let mut broken = jpeg(120, 90, 5);
    let mid = broken.len() / 2;
    broken[mid..mid + 64].fill(0xFF);
    std::fs::write(root.join("train/c/0.JPEG"), &broken).unwrap();
    std::fs::write(root.join("train/a/0.JPEG"), b"not an image").unwrap();
    let folder: Arc<dyn ImageSource> =
        Arc::new(FolderImages::new(ImageFolder::new(root.join("train")).unwrap()));
    let mut loader = Loader::builder_images(folder, settings(rrc(32), Output::U8))
        .batch_size(4)
        .num_workers(2)
        .build()
        .unwrap();
    let (mut good, mut errors) = (0, Vec::new());
    for b in loader.epoch(0) {
        match b {
            Ok(b) => good += b.len(),
            Err(e) => errors.push(e.to_string()),
        }
    }
    assert!(errors.iter().any(|e| e.contains("a/0.JPEG")), "{errors:?}");
    assert!(errors.len() <= 2 && good >= 21 - 8, "{good} good, {errors:?}");
}

#[test]
fn cifar_train_trains_resnet18_on_an_encoded_folder() {
    let dir = scratch("images_train");
    let root = dir.join("photos");
    photo_folder(&root);
    let data = dir.join("data");
    let o = prep(&[&root, &"--out", &data]);
    assert!(o.status.success(), "{}", text(&o));
    let runs = dir.join("runs");
    let o = run(
        train_exe(),
        &[
            &"--data",
            &data,
            &"--dataset",
            &"photos",
            &"--model",
            &"resnet18",
            &"--image-size",
            &"32",
            &"--batch-size",
            &"4",
            &"--epochs",
            &"1",
            &"--augment",
            &"--workers",
            &"1",
            &"--checkpoint",
            &runs,
        ],
    );
    let msg = text(&o);
    assert!(o.status.success(), "{msg}");
    assert!(msg.contains("epoch 1: 6 steps") && msg.contains("the 6 test images"), "21 and 6 images: {msg}");
    let weights = checkpoint_weights(&runs);
    assert!(weights.iter().any(|(n, _)| n.contains("layer4")), "a ResNet-18's weights");
    // The fast recipe needs dense CIFAR pixels: refused with the reason, not half-run.
    let o = run(train_exe(), &[&"--data", &data, &"--dataset", &"photos", &"--recipe", &"fast"]);
    assert_refused(&o, &["encoded"]);
}

/// An image source that notes which thread read each image.
struct Noting {
    inner: Arc<dyn ImageSource>,
    readers: std::sync::Mutex<Vec<(usize, std::thread::ThreadId)>>,
}

impl ImageSource for Noting {
    fn len(&self) -> usize {
        self.inner.len()
    }
    fn image(&self, index: usize) -> cifar_fast::Result<cifar_fast::images::Image<'_>> {
        self.readers.lock().unwrap().push((index, std::thread::current().id()));
        // Slow enough that every worker is on its way before the first batch is done.
        std::thread::sleep(std::time::Duration::from_millis(20));
        self.inner.image(index)
    }
    fn label(&self, index: usize) -> i64 {
        self.inner.label(index)
    }
    fn name(&self, index: usize) -> std::path::PathBuf {
        self.inner.name(index)
    }
}

#[test]
fn every_worker_fills_the_batch_waited_for_so_the_first_comes_sooner() {
    let dir = scratch("images_team");
    let root = dir.join("photos");
    photo_folder(&root);
    let noting = Arc::new(Noting {
        inner: Arc::new(FolderImages::new(ImageFolder::new(root.join("train")).unwrap())),
        readers: Default::default(),
    });
    let mut loader = Loader::builder_images(noting.clone(), settings(rrc(32), Output::U8))
        .batch_size(8)
        .num_workers(2)
        .seed(3)
        .build()
        .unwrap();
    let first = loader.epoch(0).next().unwrap().unwrap();
    let readers = noting.readers.lock().unwrap().clone();
    let threads: std::collections::HashSet<_> =
        readers.iter().filter(|(i, _)| first.indices.contains(i)).map(|(_, t)| *t).collect();
    assert_eq!(threads.len(), 2, "the first batch's images were read by {} thread(s)", threads.len());
}
