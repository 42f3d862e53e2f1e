//! `TensorFile::populate` enters every page of the file into the process before it is read,
//! so that a shuffled first epoch does not page-fault. (A file of its own: the test watches the
//! process's file-backed resident memory, which other tests' files would disturb.)
mod common;

use cifar_fast::TensorFile;
use cifar_fast::prep::StoreDtype;
use common::*;

#[test]
fn populate_maps_the_whole_file_without_reading_it() {
    // 5 × 400 samples of f32: 24.6 MB, far more than anything else this process maps meanwhile.
    let path = tensor_file(&scratch("populate"), 400, StoreDtype::F32);
    let size_kb = (std::fs::metadata(&path).unwrap().len() / 1024) as i64;
    let start = proc_status_kb("RssFile");
    let file = TensorFile::open(&path).unwrap();
    let before = proc_status_kb("RssFile");
    assert!(before - start < size_kb / 2, "open alone mapped {} kB of {size_kb} kB", before - start);
    // Linux ≥ 5.14 (MADV_POPULATE_READ) with the file far under half the available memory.
    assert!(file.populate(), "populate declined a {size_kb} kB file");
    let grown = proc_status_kb("RssFile") - before;
    assert!(grown >= size_kb * 9 / 10, "{grown} kB of the {size_kb} kB file mapped");
    assert_eq!(file.len(), 2000);
}
