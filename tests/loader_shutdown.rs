//! Dropping a loader mid-epoch stops and joins its threads. (A file of its own: the test counts
//! the process's threads, which other tests running beside it would disturb.)
mod common;

use std::time::{Duration, Instant};

use cifar_fast::prep::StoreDtype;
use cifar_fast::{Dataset, Loader};
use common::*;

fn loader_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter(|t| {
            let comm = std::fs::read_to_string(t.as_ref().unwrap().path().join("comm")).unwrap_or_default();
            comm.starts_with("cifar-loader")
        })
        .count()
}

#[test]
fn dropping_the_loader_mid_epoch_joins_every_worker() {
    let data = Dataset::open(tensor_file(&scratch("shutdown"), 40, StoreDtype::F32)).unwrap();
    let mut loader = Loader::builder(data).batch_size(4).num_workers(4).prefetch(8).build().unwrap();
    // A thread names itself once it runs, so give the four a moment to start.
    let start = Instant::now();
    while loader_threads() < 4 && start.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(loader_threads(), 4);
    let kept = {
        let mut epoch = loader.iter();
        let first = epoch.next().unwrap().unwrap();
        let _second = epoch.next().unwrap().unwrap();
        assert!(epoch.remaining() > 40);
        first
    };
    let start = Instant::now();
    drop(loader);
    assert!(start.elapsed() < Duration::from_secs(1));
    assert_eq!(loader_threads(), 0, "every worker was joined");
    // A batch that outlives its loader stays readable.
    assert_eq!(kept.images.size(), [4, 3, 32, 32]);
    let _ = kept.images.sum(tch::Kind::Float).double_value(&[]);
}
