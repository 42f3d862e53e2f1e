//! With no `--threads`, `cifar-train` leaves the cores other programs keep busy to them. (A
//! file of its own: nothing else of ours runs beside it.)
mod common;

use std::process::Command;

use common::*;

fn threads_chosen(dir: &std::path::Path) -> usize {
    let o = Command::new(train_exe())
        .args(["--data", dir.to_str().unwrap(), "--device", "cpu", "--max-steps", "20", "--no-eval"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let out = text(&o);
    let line = out.lines().find(|l| l.starts_with("libtorch threads: ")).unwrap_or_else(|| panic!("{out}"));
    line["libtorch threads: ".len()..].split(' ').next().unwrap().parse().unwrap()
}

#[test]
fn a_busy_core_is_left_to_the_program_that_keeps_it_busy() {
    let cores = std::thread::available_parallelism().unwrap().get();
    if cores < 2 {
        eprintln!("skipped: one core");
        return;
    }
    let dir = learnable_data(&scratch("threads_busy"), 8);
    assert_eq!(threads_chosen(&dir), cores, "a quiet machine: every core");
    let mut hog = Command::new("sh").args(["-c", "while :; do :; done"]).spawn().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let busy = threads_chosen(&dir);
    hog.kill().unwrap();
    hog.wait().unwrap();
    assert_eq!(busy, cores - 1, "one core taken by another program");
}
