//! Launches that ask too much or meet the wrong peer: more ranks than cores or memory, a
//! launcher killed under its ranks, a rendezvous port served by something that is not a
//! store, an address that does not resolve, a malformed md5. Each ends in one error, in
//! bounded time, with no rank left behind.
mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn train_cmd(data: &std::path::Path) -> Command {
    let mut c = Command::new(train_exe());
    c.args(["--data", data.to_str().unwrap(), "--device", "cpu", "--threads", "1"]);
    c
}

/// The pids of `pid`'s children.
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
        let list = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        out.extend(list.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
    }
    out
}

/// `child`'s exit status if it ends within `limit`; else it is killed and `None`.
fn exit_within(child: &mut std::process::Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

fn alive(pid: u32) -> bool {
    // A zombie (exited, not yet reaped by its new parent) has ended.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit(')').next().is_some_and(|rest| !rest.trim_start().starts_with('Z')))
}

#[test]
fn more_ranks_than_cores_or_memory_are_refused_before_any_starts() {
    let dir = scratch("launch_too_many");
    tensor_file(&dir, 10, cifar_fast::prep::StoreDtype::U8);
    let cores = std::thread::available_parallelism().unwrap().get();
    let o = train_cmd(&dir).args(["--nproc-per-node", &(cores + 1).to_string()]).output().unwrap();
    assert_refused(&o, &[&format!("{cores} cores"), "--oversubscribe"]);
    let start = Instant::now();
    let o = train_cmd(&dir).args(["--nproc-per-node", "60000", "--oversubscribe"]).output().unwrap();
    assert_refused(&o, &["60000 ranks take about", "available"]);
    assert!(start.elapsed() < Duration::from_secs(20), "took {:?}", start.elapsed());
}

#[test]
fn ranks_end_when_their_launcher_is_killed() {
    let dir = scratch("launch_parent_death");
    tensor_file(&dir, 20, cifar_fast::prep::StoreDtype::U8);
    let mut launcher = train_cmd(&dir)
        .args(["--nproc-per-node", "2", "--oversubscribe", "--epochs", "100000", "--batch-size", "4"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let mut ranks = Vec::new();
    while ranks.len() < 2 && start.elapsed() < Duration::from_secs(60) {
        ranks = children(launcher.id());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(ranks.len(), 2, "the ranks did not start");
    launcher.kill().unwrap();
    launcher.wait().unwrap();
    let killed = Instant::now();
    while ranks.iter().any(|&r| alive(r)) && killed.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let left: Vec<u32> = ranks.iter().copied().filter(|&r| alive(r)).collect();
    for &r in &left {
        // SAFETY: kill with a pid and a signal; no memory is touched.
        unsafe { libc::kill(r as i32, libc::SIGKILL) };
    }
    assert!(left.is_empty(), "ranks {left:?} outlived their launcher by 10 s");
}

/// Serves `answer` to every connection on a port of 127.0.0.1, for `secs` seconds.
fn squatter(answer: &'static [u8], secs: u64) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        listener.set_nonblocking(true).unwrap();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(secs) {
            if let Ok((mut s, _)) = listener.accept() {
                use std::io::Write;
                let _ = s.write_all(answer);
                held.push(s);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    port
}

#[test]
fn a_rendezvous_with_something_that_is_not_a_store_ends_within_the_timeout() {
    let dir = scratch("launch_not_a_store");
    tensor_file(&dir, 10, cifar_fast::prep::StoreDtype::U8);
    let port = squatter(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", 60);
    let start = Instant::now();
    let o = train_cmd(&dir)
        .args(["--dist-timeout", "3"])
        .envs([("RANK", "1"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1")])
        .env("MASTER_PORT", port.to_string())
        .output()
        .unwrap();
    let took = start.elapsed();
    assert_refused(&o, &[&format!("127.0.0.1:{port}")]);
    assert!(took < Duration::from_secs(20), "took {took:?} for a 3 s timeout");

    // SIGTERM while it waits there ends it at once, as Ctrl-C does.
    let port = squatter(b"", 60);
    let mut child = train_cmd(&dir)
        .args(["--dist-timeout", "60"])
        .envs([("RANK", "1"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1")])
        .env("MASTER_PORT", port.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    // SAFETY: kill with our own child's pid and a signal; no memory is touched.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status =
        exit_within(&mut child, Duration::from_secs(10)).expect("SIGTERM ignored during the rendezvous");
    assert_eq!(status.code(), Some(130));
}

#[test]
fn an_unresolvable_master_addr_is_one_line_naming_it() {
    let dir = scratch("launch_bad_addr");
    tensor_file(&dir, 10, cifar_fast::prep::StoreDtype::U8);
    let o = train_cmd(&dir)
        .args(["--dist-timeout", "5"])
        .envs([
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "no-such-host.invalid"),
            ("MASTER_PORT", "29500"),
        ])
        .output()
        .unwrap();
    assert_refused(&o, &["no-such-host.invalid", "cannot be resolved"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}

#[test]
fn an_md5_of_the_wrong_form_is_refused_before_connecting() {
    let dir = scratch("launch_bad_md5");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!("http://{}/cifar-10-python.tar.gz", listener.local_addr().unwrap());
    for md5 in ["abc", "c58f30108f718f92721af3b95e74349", "c58f30108f718f92721af3b95e74349az"] {
        let o = train_cmd(&dir.join("none"))
            .args(["--download-url", &url, "--download-md5", md5])
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        assert!(text(&o).contains("not an md5 digest"), "{}", text(&o));
        let o = run(prep_exe(), &[&"--download", &"--url", &url, &"--md5", &md5, &"--out", &dir.join("out")]);
        assert!(text(&o).contains("not an md5 digest"), "{}", text(&o));
    }
    assert!(listener.accept().is_err(), "a download was attempted");
}

#[test]
fn sigterm_while_ranks_start_ends_the_launch_and_its_ranks() {
    let dir = scratch("launch_sigterm_start");
    tensor_file(&dir, 20, cifar_fast::prep::StoreDtype::U8);
    for delay_ms in [0u64, 300, 1500] {
        let mut launcher = train_cmd(&dir)
            .args(["--nproc-per-node", "2", "--oversubscribe", "--epochs", "100000", "--dist-timeout", "60"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let ranks = children(launcher.id());
        // SAFETY: kill with our own child's pid and a signal; no memory is touched.
        unsafe { libc::kill(launcher.id() as i32, libc::SIGTERM) };
        let status = exit_within(&mut launcher, Duration::from_secs(30))
            .unwrap_or_else(|| panic!("SIGTERM {delay_ms} ms into the start was not acted on within 30 s"));
        assert!(!status.success(), "after {delay_ms} ms: {status}");
        std::thread::sleep(Duration::from_millis(200));
        assert!(ranks.iter().all(|&r| !alive(r)), "after {delay_ms} ms: ranks {ranks:?} left");
    }
}
