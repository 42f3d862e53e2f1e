//! Dropping a loader mid-epoch stops and joins its threads. (A file of its own: the test counts
//! the process's threads, which other tests running beside it would disturb.)
mod common;

use std::time::{Duration, Instant};

use cifar_fast::prep::StoreDtype;
use cifar_fast::{Dataset, Loader};
use common::*;

/// The `/proc/self/task` entries of the loader's workers.
fn loader_tasks() -> Vec<std::path::PathBuf> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .map(|t| t.unwrap().path())
        .filter(|t| std::fs::read_to_string(t.join("comm")).unwrap_or_default().starts_with("cifar-loader"))
        .collect()
}

fn loader_threads() -> usize {
    loader_tasks().len()
}

/// A task's scheduling policy, from `/proc/<tid>/sched` (`policy : N`).
fn policy(task: &std::path::Path) -> Option<i32> {
    let sched = std::fs::read_to_string(task.join("sched")).ok()?;
    let line = sched.lines().find(|l| l.starts_with("policy"))?;
    line.rsplit(':').next()?.trim().parse().ok()
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
    // Workers run as batch work, so waking one never preempts the training thread (see
    // `worker::run_as_batch_work`); the test thread itself stays an ordinary one.
    const SCHED_BATCH: i32 = 3;
    if let Some(own) = policy(std::path::Path::new("/proc/thread-self")) {
        assert_eq!(own, 0);
        let start = Instant::now();
        while loader_tasks().iter().any(|t| policy(t) != Some(SCHED_BATCH))
            && start.elapsed() < Duration::from_secs(2)
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        for t in loader_tasks() {
            assert_eq!(policy(&t), Some(SCHED_BATCH), "{}", t.display());
        }
    }
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
