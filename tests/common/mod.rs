//! Test fixtures: small CIFAR tarballs and tensor files made here (`data`), and helpers for the
//! loader and trainer tests.
#![allow(dead_code)]
mod data;
pub use data::*;

use std::path::Path;

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
