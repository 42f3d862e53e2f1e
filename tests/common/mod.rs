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

/// Asserts that `o` is one refusal: exit status 1, no panic, and every one of `says` in its output.
pub fn assert_refused(o: &std::process::Output, says: &[&str]) {
    let msg = text(o);
    assert_eq!(o.status.code(), Some(1), "{msg}");
    for s in says {
        assert!(msg.contains(s), "{s:?} not in: {msg}");
    }
    assert!(!msg.contains("panicked"), "{msg}");
}

/// Copies the safetensors file `from` to `to` with its header's JSON changed by `edit` and its
/// data by `data` (given the header, for the tensors' offsets): files that lie, made from one
/// that does not.
pub fn rewrite_safetensors(
    from: &Path,
    to: &Path,
    edit: impl FnOnce(&mut serde_json::Value),
    data: impl FnOnce(&serde_json::Value, &mut Vec<u8>),
) {
    let bytes = std::fs::read(from).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let mut body = bytes[8 + n..].to_vec();
    edit(&mut header);
    data(&header, &mut body);
    let mut json = serde_json::to_vec(&header).unwrap();
    json.resize(json.len().div_ceil(8) * 8, b' ');
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend(json);
    out.extend(body);
    std::fs::write(to, out).unwrap();
}
