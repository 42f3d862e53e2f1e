//! Opening a tensor file maps all its pages into the process in the background, so the
//! loader's first epoch reads without page faults. (A file of its own: the test watches the
//! process's file-backed resident memory, which other tests would disturb.)
mod common;

use std::time::{Duration, Instant};

use cifar_fast::TensorFile;
use cifar_fast::prep::StoreDtype;
use common::*;

fn rss_file_kb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("RssFile:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn opening_a_file_populates_its_mapping_without_being_read() {
    // 5 × 400 samples of f32: 24.6 MB, far more than anything else this process maps meanwhile.
    let path = tensor_file(&scratch("populate"), 400, StoreDtype::F32);
    let size_kb = std::fs::metadata(&path).unwrap().len() / 1024;
    let before = rss_file_kb();
    let file = TensorFile::open(&path).unwrap();
    let start = Instant::now();
    while rss_file_kb() < before + size_kb * 9 / 10 && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let grown = rss_file_kb() - before;
    assert!(
        grown >= size_kb * 9 / 10,
        "{grown} kB of the {size_kb} kB file mapped, after {:?}",
        start.elapsed()
    );
    assert_eq!(file.len(), 2000);
}
