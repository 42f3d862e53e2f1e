//! What one image costs the workers, part by part, on one thread: a whole decode (what Pillow
//! does for torchvision), the region a random resized crop needs (decode only), and the whole
//! sample (decode, resize, write) with and without the DCT scaling.
//!
//!     cargo bench --bench decode -- DIR [--images N] [--reps R]
//!
//! DIR is an image folder (`tools/bench-images` makes one); one line of JSON per measure.
use std::path::PathBuf;
use std::time::Instant;

use cifar_fast::decode::{self, Out};
use cifar_fast::geometry::{ImageTransform, Resample, Window};
use cifar_fast::prep::Normalize;
use cifar_fast::{ImageFolder, ImageSource, images};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir =
        PathBuf::from(args.get(1).filter(|a| !a.starts_with("--")).cloned().unwrap_or_else(|| ".".into()));
    let flag = |name: &str, default: usize| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let (n, reps) = (flag("--images", 2000), flag("--reps", 3));
    let folder = images::FolderImages::new(ImageFolder::new(&dir).expect("an image folder"));
    let n = n.min(folder.len());
    let blobs: Vec<(Vec<u8>, (u32, u32))> = (0..n)
        .map(|i| {
            let img = folder.image(i).unwrap();
            let images::ImageData::Encoded(bytes) = img.data else { unreachable!() };
            (bytes.into_owned(), img.size)
        })
        .collect();
    let rrc = ImageTransform {
        resample: Resample::RandomResizedCrop {
            size: (224, 224),
            scale: (0.08, 1.0),
            ratio: (0.75, 4.0 / 3.0),
        },
        window: Window::Whole,
        flip: true,
    };
    let center =
        ImageTransform { resample: Resample::Shorter(256), window: Window::Center(224, 224), flip: false };
    let norm = Normalize::new([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]);
    let mut out = vec![0f32; 3 * 224 * 224];
    let path = std::path::Path::new("bench");
    let time = |name: &str, f: &mut dyn FnMut(usize)| {
        for rep in 0..reps {
            let t = Instant::now();
            for i in 0..n {
                f(i);
            }
            let s = t.elapsed().as_secs_f64();
            println!(
                r#"{{"measure": "{name}", "rep": {rep}, "images_per_s": {:.1}, "us_per_image": {:.1}}}"#,
                n as f64 / s,
                1e6 * s / n as f64
            );
        }
    };
    time("whole decode", &mut |i| {
        let (bytes, (h, w)) = &blobs[i];
        std::hint::black_box(cifar_fast::prep::image::decode_rgb(bytes, (*w, *h), path).unwrap());
    });
    for (name, t, dct) in [("rrc", rrc, true), ("rrc exact", rrc, false), ("resize+center", center, true)] {
        let opts = decode::Options { dct_scaling: dct, ..Default::default() };
        time(name, &mut |i| {
            let (bytes, size) = &blobs[i];
            let g = t.draw(1, 0, i, *size).unwrap();
            decode::render(bytes, &g, Out::F32(&mut out, &norm), &opts, path).unwrap();
        });
    }
}
