//! `dist::launch::local` never leaves ranks running behind an error. Alone in its test binary:
//! it ignores SIGCHLD for the whole process, which would break other tests' waits.
use std::ffi::OsString;
use std::path::Path;
use std::time::{Duration, Instant};

use cifar_fast::dist::launch;

fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

#[test]
fn a_failed_wait_stops_the_ranks_still_running() {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("launch_local");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // With SIGCHLD ignored the kernel reaps children itself, so waiting for one that exited
    // fails (ECHILD): the launcher's wait errs while rank 1 still runs.
    // SAFETY: setting a signal's disposition to ignore runs no code of ours.
    unsafe { libc::signal(libc::SIGCHLD, libc::SIG_IGN) };
    // Rank 1 writes its pid and sleeps; rank 0 exits once it sees that pid.
    let script = format!(
        "d={}; if [ \"$RANK\" = 1 ]; then echo $$ > $d/pid.1.tmp; mv $d/pid.1.tmp $d/pid.1; exec sleep 60; fi; \
         while [ ! -e $d/pid.1 ]; do sleep 0.05; done",
        dir.display()
    );
    let args: Vec<OsString> = ["-c", &script].iter().map(OsString::from).collect();
    let t = Instant::now();
    let got =
        launch::local(2, Path::new("/bin/sh"), &args, Duration::from_secs(1), &cifar_fast::Interrupt::new());
    assert!(got.is_err(), "the wait was expected to fail: {got:?}");
    let pid: i32 = std::fs::read_to_string(dir.join("pid.1")).unwrap().trim().parse().unwrap();
    // Killed with the error (its end may take the kernel a moment).
    let gone = Instant::now();
    while alive(pid) && gone.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!alive(pid), "rank 1 (pid {pid}) outlived the launcher's error");
    assert!(t.elapsed() < Duration::from_secs(30));
}
