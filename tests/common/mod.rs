//! Test fixtures: small CIFAR tarballs and tensor files made here (`data`), and helpers for the
//! loader and trainer tests.
#![allow(dead_code)]
mod data;
pub use data::*;

use std::path::Path;

/// A `kB` line of this process's `/proc/self/status` (`RssAnon`, `RssFile`, ...).
pub fn proc_status_kb(field: &str) -> i64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.split(':').next() == Some(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Every batch of one epoch as (indices, image values, labels).
pub fn collect(epoch: cifar_fast::Epoch<'_>) -> Vec<(Vec<usize>, Vec<f32>, Vec<i64>)> {
    epoch
        .map(|b| {
            let b = b.unwrap();
            let images = Vec::<f32>::try_from(b.images.flatten(0, -1)).unwrap();
            let labels = Vec::<i64>::try_from(&b.labels).unwrap();
            (b.indices.clone(), images, labels)
        })
        .collect()
}

pub fn train_exe() -> &'static str {
    env!("CARGO_BIN_EXE_cifar-train")
}

/// The model tensors of a `cifar-train` checkpoint, by name.
pub fn checkpoint_weights(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let bytes = std::fs::read(dir.join("checkpoint.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<(String, Vec<u8>)> =
        st.tensors().into_iter().map(|(n, v)| (n, v.data().to_vec())).collect();
    out.sort();
    out
}
