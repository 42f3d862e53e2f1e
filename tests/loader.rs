//! The loader's contracts: determinism whatever the threads, exactly-once epochs, shards,
//! resumption, errors that arrive instead of hangs, custom sources.
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use cifar_fast::prep::StoreDtype;
use cifar_fast::{Augment, Dataset, Error, ImageFolder, Loader, SizePolicy, Source};
use common::*;

fn dataset(name: &str) -> Arc<Dataset> {
    let dir = scratch(name);
    Arc::new(Dataset::open(tensor_file(&dir, 20, StoreDtype::F32)).unwrap())
}

#[test]
fn batches_are_the_same_for_any_number_of_workers_and_prefetch_depth() {
    let data = dataset("loader_determinism");
    let run = |workers: usize, prefetch: usize| {
        let mut l = Loader::builder(data.clone())
            .batch_size(7)
            .seed(11)
            .num_workers(workers)
            .prefetch(prefetch)
            .augment(Augment::standard())
            .build()
            .unwrap();
        (collect(l.epoch(0)), collect(l.epoch(1)))
    };
    let reference = run(0, 1);
    assert_eq!(reference.0.len(), 15); // 100 samples in batches of 7
    for workers in [1, 2, 4, 8] {
        for prefetch in 1..=8 {
            assert!(run(workers, prefetch) == reference, "{workers} workers, prefetch {prefetch}");
        }
    }
    assert_ne!(reference.0[0].0, reference.1[0].0, "epochs differ");
}

#[test]
fn every_sample_once_per_epoch_and_drop_last_drops_only_the_tail() {
    let data = dataset("loader_once");
    for drop_last in [false, true] {
        let mut l = Loader::builder(data.clone()).batch_size(8).drop_last(drop_last).build().unwrap();
        let batches = collect(l.iter());
        let mut seen: Vec<usize> = batches.iter().flat_map(|b| b.0.clone()).collect();
        let sizes: Vec<usize> = batches.iter().map(|b| b.0.len()).collect();
        assert!(sizes[..sizes.len() - 1].iter().all(|&s| s == 8));
        if drop_last {
            assert_eq!(seen.len(), 96);
            assert_eq!(*sizes.last().unwrap(), 8);
        } else {
            assert_eq!(*sizes.last().unwrap(), 4);
            seen.sort();
            assert_eq!(seen, (0..100).collect::<Vec<_>>());
        }
        // The labels are the file's labels of those indices, and images their rows.
        let file = data.file();
        for (idx, images, labels) in &batches {
            for (k, &i) in idx.iter().enumerate() {
                assert_eq!(labels[k], file.labels()[i]);
                let row: &[f32] = bytemuck::cast_slice(file.image_bytes(i));
                assert_eq!(&images[k * IMG..(k + 1) * IMG], row);
            }
        }
    }
}

#[test]
fn shards_are_disjoint_and_cover_the_epoch() {
    let data = dataset("loader_shards");
    let mut all = Vec::new();
    for rank in 0..3 {
        let mut l = Loader::builder(data.clone()).batch_size(5).seed(4).shard(rank, 3).build().unwrap();
        let got: Vec<usize> = collect(l.epoch(2)).into_iter().flat_map(|b| b.0).collect();
        assert!(got.len() == 33 || got.len() == 34);
        all.extend(got);
    }
    all.sort();
    assert_eq!(all, (0..100).collect::<Vec<_>>());
}

#[test]
fn start_at_reproduces_the_rest_of_the_epoch() {
    let data = dataset("loader_resume");
    let build = || Loader::builder(data.clone()).batch_size(9).seed(5).augment(Augment::standard());
    let full = collect(build().build().unwrap().epoch(3));
    let mut resumed = build().start_at(3, 4).build().unwrap();
    let rest = collect(resumed.iter());
    assert_eq!(rest, full[4..]);
    // The epoch after continues as usual.
    assert_eq!(collect(resumed.iter()), collect(build().build().unwrap().epoch(4)));
}

#[test]
fn start_at_skips_only_in_its_own_epoch_asked_for_first() {
    let data = dataset("loader_resume_other");
    let build = || Loader::builder(data.clone()).batch_size(9).seed(5);
    let whole = |e: u64| collect(build().build().unwrap().epoch(e));
    // Another epoch asked for first: it is whole, and so is every epoch after it, the
    // start_at epoch's successor included (the skip is not left armed for a later epoch).
    let mut l = build().start_at(3, 4).build().unwrap();
    assert_eq!(collect(l.epoch(1)), whole(1));
    assert_eq!(collect(l.epoch(2)), whole(2));
    assert_eq!(collect(l.iter()), whole(3));
}

/// A source that fails (or panics) on one sample.
struct Faulty {
    bad: usize,
    panic: bool,
}

impl Source for Faulty {
    fn len(&self) -> usize {
        64
    }
    fn sample_shape(&self) -> [usize; 3] {
        [3, 32, 32]
    }
    fn read_into(&self, index: usize, out: &mut [f32]) -> cifar_fast::Result<i64> {
        if index == self.bad {
            if self.panic {
                panic!("sample {index} is cursed");
            }
            return Err(Error::format("faulty.bin", "bad bytes"));
        }
        out.fill(index as f32);
        Ok(0)
    }
}

#[test]
fn a_failing_or_panicking_sample_fails_its_batch_naming_it_and_the_epoch_goes_on() {
    for panic in [false, true] {
        for workers in [0, 1, 3] {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let start = Instant::now();
                let mut l = Loader::builder(Faulty { bad: 37, panic })
                    .batch_size(4)
                    .num_workers(workers)
                    .shuffle(false)
                    .build()
                    .unwrap();
                let results: Vec<_> =
                    l.iter().map(|r| r.map(|b| b.indices).map_err(|e| e.to_string())).collect();
                let _ = tx.send((results, start.elapsed()));
            });
            let (results, took) = rx.recv_timeout(Duration::from_secs(5)).expect("the loader hung");
            assert_eq!(results.len(), 16, "every batch, the failed one included, as PyTorch's DataLoader");
            for (k, r) in results.iter().enumerate() {
                match r {
                    Ok(indices) => assert_eq!(*indices, (4 * k..4 * k + 4).collect::<Vec<_>>()),
                    Err(err) => {
                        assert_eq!(k, 9, "the batch of sample 37 fails: {err}");
                        assert!(err.contains("sample 37"), "{err}");
                        assert!(
                            err.contains(if panic { "cursed" } else { "faulty.bin: bad bytes" }),
                            "{err}"
                        );
                    }
                }
            }
            assert!(results[9].is_err());
            assert!(took < Duration::from_secs(1), "{took:?}");
        }
    }
}

#[test]
fn bad_settings_are_errors() {
    let data = dataset("loader_settings");
    assert!(Loader::builder(data.clone()).batch_size(0).build().is_err());
    assert!(Loader::builder(data.clone()).shard(3, 3).build().is_err());
    assert!(Loader::builder(data.clone()).prefetch(0).build().is_err());
    assert!(Loader::builder(data).start_at(0, 99).build().is_err());
}

#[test]
fn small_batches_get_a_deeper_prefetch_by_default() {
    let data = dataset("loader_prefetch");
    let depth = |b: usize| Loader::builder(data.clone()).batch_size(b).build().unwrap().prefetch();
    // CPU: at least 64 samples and 4 batches, at most 2 MiB of f32 batches (12 KiB a sample).
    let depths = [1, 4, 16, 32, 64, 128, 256].map(depth);
    assert_eq!(depths, [64, 16, 4, 4, 2, 1, 1]);
    // For a CUDA device the cap does not apply (the rule itself: no device needed).
    assert_eq!(cifar_fast::default_prefetch(256, 256 * 12288, tch::Device::Cuda(0)), 4);
    assert_eq!(Loader::builder(data).batch_size(4).prefetch(2).build().unwrap().prefetch(), 2);
}

#[test]
fn u8_files_are_normalized_on_the_fly_to_the_same_values_as_f32_files() {
    let f32 = Dataset::open(tensor_file(&scratch("loader_u8_a"), 4, StoreDtype::F32)).unwrap();
    let u8 = Dataset::open(tensor_file(&scratch("loader_u8_b"), 4, StoreDtype::U8)).unwrap();
    let a = collect(Loader::builder(f32).seed(1).build().unwrap().iter());
    let b = collect(Loader::builder(u8).seed(1).build().unwrap().iter());
    assert_eq!(a, b);
}

#[test]
fn the_augmentation_of_a_seed_is_a_fixture() {
    let aug = Augment::standard();
    let draws: Vec<(usize, usize, bool)> = (0..4).map(|i| aug.draw(7, 0, i)).collect();
    assert_eq!(draws, FIXTURE_DRAWS);
    // The first row of sample 0's first channel, from a 32x32 ramp.
    let src: Vec<f32> = (0..3 * 32 * 32).map(|i| (i % 1024) as f32).collect();
    let mut dst = vec![0.0; src.len()];
    aug.apply(7, 0, 0, [3, 32, 32], &src, &mut dst);
    assert_eq!(dst[..8], FIXTURE_ROW);
}

/// Recorded from the first run: (dy, dx, flip) of samples 0..4 under seed 7, epoch 0.
const FIXTURE_DRAWS: [(usize, usize, bool); 4] = [(4, 1, true), (1, 2, true), (6, 1, true), (2, 0, true)];
/// Derived by hand from the draw (4, 1, flip): row y=0 reads source row 0 + 4 - 4 = 0, and
/// column x reads 31 - x + 1 - 4 = 28 - x.
const FIXTURE_ROW: [f32; 8] = [28.0, 27.0, 26.0, 25.0, 24.0, 23.0, 22.0, 21.0];

#[test]
fn an_image_folder_is_a_source_with_an_explicit_size_policy() {
    let root = scratch("loader_folder");
    for (c, class) in ["cat", "dog"].iter().enumerate() {
        std::fs::create_dir_all(root.join(class)).unwrap();
        for k in 0..3 {
            let img = image::RgbImage::from_fn(32, 32, |x, y| {
                image::Rgb([x as u8 * 8, y as u8 * 8, (c * 100 + k) as u8])
            });
            img.save(root.join(class).join(format!("{k}.png"))).unwrap();
        }
    }
    image::RgbImage::new(40, 30).save(root.join("dog/odd.png")).unwrap();
    let folder = ImageFolder::new(&root).unwrap();
    assert_eq!(folder.classes(), ["cat", "dog"]);
    assert_eq!(folder.len(), 7);
    let mut out = vec![0f32; IMG];
    assert_eq!(folder.read_into(4, &mut out).unwrap(), 1);
    // Pixel (x=2, y=1) of dog/1.png: R = 16, G = 8, B = 101; planar and normalized.
    assert_eq!(out[32 + 2], (16.0 / 255.0 - 0.5) / 0.5);
    assert_eq!(out[1024 + 32 + 2], (8.0 / 255.0 - 0.5) / 0.5);
    assert_eq!(out[2048], (101.0 / 255.0 - 0.5) / 0.5);

    let mut l =
        Loader::builder(ImageFolder::new(&root).unwrap()).batch_size(7).shuffle(false).build().unwrap();
    let err = l.iter().next().unwrap().unwrap_err().to_string();
    assert!(err.contains("odd.png") && err.contains("is 40x30, expected 32x32"), "{err}");
    let resize = ImageFolder::new(&root).unwrap().policy(SizePolicy::Resize);
    let batches = collect(Loader::builder(resize).batch_size(7).build().unwrap().iter());
    assert_eq!(batches[0].0.len(), 7);
}

#[test]
fn pinned_batches_reach_cuda_intact() {
    if !tch::Cuda::is_available() {
        eprintln!("skipped: CUDA is not available");
        return;
    }
    let data = dataset("loader_cuda");
    let cpu = collect(Loader::builder(data.clone()).seed(2).batch_size(16).build().unwrap().iter());
    let mut l = Loader::builder(data)
        .seed(2)
        .batch_size(16)
        .prefetch(2)
        .device(tch::Device::Cuda(0))
        .build()
        .unwrap();
    for epoch in 0..3 {
        // Every device batch of the epoch is kept, unread, until the epoch ends: a pinned buffer
        // refilled before its copy had completed would show in an earlier batch, and nothing
        // waits for the device between batches (no blocking copy back) to hide it. Three
        // epochs of 7 batches reuse the pool of 2 + 1 + 2 buffers many times.
        let gpu: Vec<_> = l
            .epoch(0)
            .map(|b| {
                let b = b.unwrap();
                assert!(b.images.device().is_cuda());
                (b.indices.clone(), b.images.shallow_clone(), b.labels.shallow_clone())
            })
            .collect();
        assert_eq!(gpu.len(), cpu.len(), "epoch {epoch}: a batch is missing");
        for (k, ((indices, images, labels), c)) in gpu.iter().zip(&cpu).enumerate() {
            let images = Vec::<f32>::try_from(images.flatten(0, -1).to_device(tch::Device::Cpu)).unwrap();
            let labels = Vec::<i64>::try_from(labels.to_device(tch::Device::Cpu)).unwrap();
            assert_eq!((indices, &images, &labels), (&c.0, &c.1, &c.2), "epoch {epoch}, batch {k}");
        }
    }
}

#[test]
fn a_batch_is_the_users_views_and_saved_tensors_keep_their_values() {
    let data = dataset("loader_views");
    for workers in [0, 2] {
        let mut l =
            Loader::builder(data.clone()).batch_size(8).num_workers(workers).prefetch(2).build().unwrap();
        let mut epoch = l.epoch(0);
        let first = epoch.next().unwrap().unwrap();
        let expected = first.images.copy();
        // A shallow clone, a narrowed view, and a tensor autograd saves for the backward pass.
        let clone = first.images.shallow_clone();
        let view = first.images.narrow(0, 2, 3);
        let w =
            tch::Tensor::ones([1, 3, 32, 32], (tch::Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        let product = (&first.images * &w).sum(tch::Kind::Float);
        drop(first);
        // The workers go on filling every later batch of the epoch (and the next epoch's).
        let later: Vec<_> = epoch.by_ref().map(|b| b.unwrap().images.copy()).collect();
        drop(epoch);
        let _ = collect(l.epoch(1));
        assert_eq!(later.len(), 12);
        assert!(clone.equal(&expected), "{workers} workers: a shallow clone changed");
        assert!(view.equal(&expected.narrow(0, 2, 3)), "{workers} workers: a view changed");
        product.backward();
        let grad = w.grad();
        assert!(grad.allclose(&expected.sum_dim_intlist(0, true, tch::Kind::Float), 1e-5, 1e-5, false));
    }
}

#[test]
fn devices_other_than_cpu_and_cuda_are_refused_at_build() {
    let data = dataset("loader_devices");
    for device in [tch::Device::Mps, tch::Device::Vulkan] {
        match Loader::builder(data.clone()).device(device).build() {
            Err(Error::Config(msg)) => assert!(msg.contains("CPU and CUDA only"), "{msg}"),
            other => panic!("{device:?} was not refused: {:?}", other.map(|_| ())),
        }
    }
}

/// Samples that take 40 ms each to read, as a large image's decode does.
struct Slow;

impl Source for Slow {
    fn len(&self) -> usize {
        64
    }
    fn sample_shape(&self) -> [usize; 3] {
        [1, 2, 2]
    }
    fn read_into(&self, index: usize, out: &mut [f32]) -> cifar_fast::Result<i64> {
        std::thread::sleep(Duration::from_millis(40));
        out.fill(index as f32);
        Ok(0)
    }
}

#[test]
fn dropping_an_epoch_waits_for_the_sample_in_each_workers_hands_not_its_batch() {
    // Batches of 16 slow samples (640 ms each); the workers are mid-batch when the epoch goes.
    let mut loader = Loader::builder(Slow).batch_size(16).num_workers(2).shuffle(false).build().unwrap();
    let mut epoch = loader.iter();
    epoch.next().unwrap().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let start = Instant::now();
    drop(epoch);
    let took = start.elapsed();
    assert!(took < Duration::from_millis(300), "dropping the epoch took {took:?}");
    // The next epoch is whole and in order: nothing of the abandoned one leaks into it.
    let mut epoch = loader.iter();
    let first = epoch.next().unwrap().unwrap();
    let values: Vec<f32> = Vec::try_from(first.images.flatten(0, -1)).unwrap();
    assert_eq!(values.len(), 16 * 4);
    for (k, v) in values.chunks(4).enumerate() {
        assert!(v.iter().all(|&x| x == k as f32), "sample {k}: {v:?}");
    }
}
