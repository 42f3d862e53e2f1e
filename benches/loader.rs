//! The loader's throughput beside the alternatives, one configuration per run, one JSON line
//! out; `tools/bench-loader` runs it, alternating with the Python reference, and makes the table.
//!
//!     cargo bench --bench loader -- --data data --mode loader|tchrs|memcpy \
//!         [--batch-size 32] [--workers 1] [--images 200000]
use std::time::Instant;

use cifar_fast::{Dataset, Loader};
use tch::Tensor;

fn rss_anon_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("RssAnon:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0.0);
    kb / 1024.0
}

fn arg(args: &[String], name: &str, default: &str) -> String {
    args.iter().position(|a| a == name).map_or(default.to_string(), |i| args[i + 1].clone())
}

/// The same allocator as `cifar-train`, the loader's user here, so its figures are measured alike.
#[cfg(target_os = "linux")]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let data = std::path::PathBuf::from(arg(&args, "--data", "data"));
    let mode = arg(&args, "--mode", "loader");
    let batch: usize = arg(&args, "--batch-size", "32").parse().unwrap();
    let workers: usize = arg(&args, "--workers", "1").parse().unwrap();
    let want: usize = arg(&args, "--images", "200000").parse().unwrap();
    tch::set_num_threads(1);

    let rss0 = rss_anon_mb();
    let t0 = Instant::now();
    let mut first_batch = None;
    let mut seen = 0usize;
    let mut touch = 0f64;
    let mut peak_rss = rss0;
    match mode.as_str() {
        "loader" => {
            let ds = Dataset::open(data.join("cifar10-train.safetensors")).expect("run cifar-prep first");
            let mut loader = Loader::builder(ds)
                .batch_size(batch)
                .num_workers(workers)
                .prefetch(4)
                .seed(0)
                .build()
                .unwrap();
            'outer: loop {
                for b in loader.iter() {
                    let b = b.unwrap();
                    // Touch the batch, as a consumer would, without timing a model.
                    touch += b.images.double_value(&[0, 0, 0, 0]);
                    seen += b.len();
                    if first_batch.is_none() {
                        first_batch = Some(t0.elapsed().as_secs_f64());
                        peak_rss = peak_rss.max(rss_anon_mb());
                    }
                    if seen >= want {
                        break 'outer;
                    }
                }
                peak_rss = peak_rss.max(rss_anon_mb());
            }
        }
        "tchrs" => {
            let ds = tch::vision::cifar::load_dir(data.join("bin/cifar-10-batches-bin")).unwrap();
            first_batch = Some(t0.elapsed().as_secs_f64());
            peak_rss = rss_anon_mb();
            'outer2: loop {
                let mut it = tch::data::Iter2::new(&ds.train_images, &ds.train_labels, batch as i64);
                for (x, _y) in it.shuffle() {
                    touch += x.double_value(&[0, 0, 0, 0]);
                    seen += x.size()[0] as usize;
                    if seen >= want {
                        break 'outer2;
                    }
                }
            }
        }
        "memcpy" => {
            // The physical bound: one thread copying the same f32 rows the loader delivers (the
            // same shuffled epochs), out of the memory map into one buffer, and nothing else.
            let ds = Dataset::open(data.join("cifar10-train.safetensors")).unwrap();
            let file = ds.file();
            let row = 3 * 32 * 32 * 4;
            let mut buf = vec![0u8; batch * row];
            let sampler = cifar_fast::sampler::Sampler::shuffled(file.len(), batch, 0);
            let mut epoch = 0;
            'copy: loop {
                let order = sampler.indices(epoch);
                for rows in order.chunks(batch) {
                    for (k, &i) in rows.iter().enumerate() {
                        buf[k * row..(k + 1) * row].copy_from_slice(file.image_bytes(i));
                    }
                    touch += buf[0] as f64;
                    seen += rows.len();
                    if seen >= want {
                        break 'copy;
                    }
                }
                epoch += 1;
            }
            first_batch = Some(0.0);
        }
        m => panic!("unknown mode {m}"),
    }
    let secs = t0.elapsed().as_secs_f64();
    let _ = Tensor::from(touch);
    println!(
        "{{\"mode\": \"{mode}\", \"batch_size\": {batch}, \"workers\": {workers}, \"images\": {seen}, \
         \"seconds\": {secs:.3}, \"images_per_s\": {:.1}, \"first_batch_ms\": {:.2}, \"rss_anon_mb\": {:.1}}}",
        seen as f64 / secs,
        first_batch.unwrap_or(0.0) * 1000.0,
        peak_rss - rss0
    );
}
