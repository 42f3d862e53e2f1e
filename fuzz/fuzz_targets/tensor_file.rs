//! Any bytes as a tensor file: `TensorFile::open` is the gate for the memory map and for the
//! zero-copy tensors made from it, so whatever it accepts must be safe to read everywhere it
//! says: an error, or a file whose every accessor stays inside the mapping. Never a panic, a
//! hang or a read out of bounds.
#![no_main]
use cifar_data::TensorFile;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // One file a fuzzing process, rewritten for each input (memory-backed where /dev/shm is).
    let dir = if std::path::Path::new("/dev/shm").is_dir() { "/dev/shm".into() } else { std::env::temp_dir() };
    let path = dir.join(format!("cifar-fuzz-tensor-{}.safetensors", std::process::id()));
    std::fs::write(&path, data).unwrap();
    if let Ok(f) = TensorFile::open(&path) {
        let mut sum = 0u64;
        for &l in f.labels() {
            sum = sum.wrapping_add(l as u64);
        }
        if let Some(c) = f.coarse_labels() {
            sum = sum.wrapping_add(c.len() as u64);
        }
        for i in [0, f.len() / 2, f.len().saturating_sub(1)] {
            if i < f.len() {
                sum = sum.wrapping_add(f.image_bytes(i).iter().map(|&b| b as u64).sum::<u64>());
            }
        }
        sum = sum.wrapping_add(f.all_image_bytes().len() as u64);
        let _ = (f.classes().len(), f.mean(), f.std(), f.image_shape(), sum);
    }
});
