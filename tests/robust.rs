//! Hostile and broken input, refused early and cleanly: settings checked before any data is
//! touched, splits that do not belong together, interruptions that leave no temporary file
//! behind and checkpoint a run.
mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn train_in(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(train_exe())
        .current_dir(dir)
        .args(["--device", "cpu", "--threads", "1"])
        .args(args)
        .output()
        .unwrap()
}

fn refused(o: &std::process::Output, expect: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{expect}: {}", text(o));
    assert!(err.contains(expect), "expected {expect:?} in {err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn settings_are_refused_before_any_data_is_fetched() {
    let dir = scratch("robust_settings");
    for (args, expect) in [
        (vec!["--lr", "NaN"], "--lr NaN: must be a finite number"),
        (vec!["--lr", "-0.1"], "--lr -0.1: must be"),
        (vec!["--momentum", "inf"], "--momentum inf: must be"),
        (vec!["--weight-decay", "-1"], "--weight-decay -1: must be"),
        (vec!["--threads", "0"], "--threads"),
        (vec!["--prefetch", "0"], "--prefetch must be at least 1"),
        (vec!["--workers", "100000"], "--workers 100000: at most 256"),
        (vec!["--batch-size", "0"], "--batch-size must be at least 1"),
        (vec!["--device", "cuda:5"], "CUDA device 5 does not exist"),
        (vec!["--metrics", "no/such/dir/m.jsonl"], "the directory no/such/dir does not exist"),
    ] {
        if args[1] == "cuda:5" && tch::Cuda::device_count() > 5 {
            continue;
        }
        let o = train_in(&dir, &args);
        refused(&o, expect);
        assert!(!text(&o).contains("downloading"), "{args:?} fetched data first: {}", text(&o));
        assert!(!dir.join("data").exists(), "{args:?}");
    }
}

#[test]
fn extreme_but_meaningful_values_work() {
    let dir = learnable_data(&scratch("robust_values"), 4); // 20 training images, 4 test
    let data = dir.to_str().unwrap();
    // A batch larger than the data set is the whole set (and allocates no more than it).
    let o = train_in(&dir, &["--data", data, "--batch-size", "1000000000000", "--epochs", "2"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("2 steps"), "{}", text(&o));
    // More batches ahead than an epoch holds: the epoch's.
    let o = train_in(&dir, &["--data", data, "--prefetch", "1000", "--epochs", "1"]);
    assert!(o.status.success() && text(&o).contains("5 steps"), "{}", text(&o));
    // --max-steps 0 trains no step, and still evaluates the model.
    let o = train_in(&dir, &["--data", data, "--max-steps", "0"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("0 steps") && text(&o).contains("Accuracy of the network on the 4 test images"),
        "{}",
        text(&o)
    );
}

/// A tensor file of `n` 32×32 images with these labels and, if given, class names.
fn tensor_file(path: &Path, labels: &[i64], classes: Option<&[&str]>) {
    use safetensors::tensor::TensorView;
    let n = labels.len();
    let images = vec![0u8; n * 3 * 32 * 32 * 4];
    let labels: Vec<u8> = labels.iter().flat_map(|l| l.to_le_bytes()).collect();
    let mut meta = std::collections::HashMap::new();
    if let Some(c) = classes {
        meta.insert("classes".to_string(), serde_json::to_string(c).unwrap());
    }
    let tensors = [
        ("images", TensorView::new(safetensors::Dtype::F32, vec![n, 3, 32, 32], &images).unwrap()),
        ("labels", TensorView::new(safetensors::Dtype::I64, vec![n], &labels).unwrap()),
    ];
    safetensors::serialize_to_file(tensors, Some(meta), path).unwrap();
}

#[test]
fn splits_that_do_not_belong_together_are_refused_before_training() {
    let ten: Vec<&str> = cifar_fast::prep::layout::CIFAR10_CLASSES.to_vec();
    let dir = scratch("robust_splits");
    let (train, test) = (dir.join("x-train.safetensors"), dir.join("x-test.safetensors"));
    let metrics = dir.join("m.jsonl");
    let m = metrics.to_str().unwrap();
    /// Train labels and classes, test labels and classes, and the error expected.
    type Case<'a> = (Vec<i64>, Option<Vec<&'a str>>, Vec<i64>, Option<Vec<&'a str>>, &'a str);
    let cases: [Case; 4] = [
        (vec![], Some(ten.clone()), vec![1], Some(ten.clone()), "x-train.safetensors: holds no images"),
        (
            (0..10).collect(),
            Some(ten.clone()),
            vec![],
            Some(ten.clone()),
            "x-test.safetensors: holds no images",
        ),
        (
            (0..10).collect(),
            Some(ten.clone()),
            vec![1, 2],
            Some(ten[..5].to_vec()),
            "names 5 classes, the training split 10",
        ),
        (
            (0..10).collect(),
            None,
            vec![1, 12],
            None,
            "has labels up to 12, beyond the training split's 10 classes",
        ),
    ];
    for (train_labels, train_classes, test_labels, test_classes, expect) in cases {
        tensor_file(&train, &train_labels, train_classes.as_deref());
        tensor_file(&test, &test_labels, test_classes.as_deref());
        std::fs::write(&metrics, "earlier output\n").unwrap();
        let o = train_in(&dir, &["--data", dir.to_str().unwrap(), "--dataset", "x", "--metrics", m]);
        refused(&o, expect);
        assert_eq!(
            std::fs::read_to_string(&metrics).unwrap(),
            "earlier output\n",
            "{expect}: output replaced"
        );
    }
    // A label beyond the named classes is refused when the file is opened.
    tensor_file(&train, &[0, 10], Some(&ten));
    tensor_file(&test, &[0], Some(&ten));
    refused(
        &train_in(&dir, &["--data", dir.to_str().unwrap(), "--dataset", "x"]),
        "label 10 of sample 1 is out of range",
    );
}

/// Starts a long `cifar-train` run on `dir` and returns once it is training its second epoch
/// (its stdout read that far; the rest still to read).
fn train_into_epoch_2(
    dir: &Path,
    extra: &[&str],
) -> (std::process::Child, BufReader<std::process::ChildStdout>) {
    let mut child = Command::new(train_exe())
        .args(["--data", dir.to_str().unwrap(), "--device", "cpu", "--threads", "1", "--epochs", "100000"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while out.read_line(&mut line).unwrap() > 0 && !line.contains("epoch 2:") {}
    (child, out)
}

fn kill(child: &std::process::Child, signal: i32) {
    // SAFETY: `kill` only sends a signal to the child's pid, which we still own (not reaped).
    assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
}

#[test]
fn sigterm_checkpoints_a_training_run_as_ctrl_c_does() {
    let dir = learnable_data(&scratch("robust_sigterm"), 4);
    let ck = dir.join("ck");
    let (mut child, mut out) = train_into_epoch_2(&dir, &["--no-eval", "--checkpoint", ck.to_str().unwrap()]);
    kill(&child, libc::SIGTERM);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{rest}");
    assert!(rest.contains("stopped at epoch") && rest.contains("continue with --resume"), "{rest}");
    assert!(ck.join("checkpoint.safetensors").exists());
}

/// Serves a download that never ends: the headers promise 100 MB, then a little comes every
/// 50 ms until the client goes.
fn serve_trickle() -> String {
    serve(|mut s| {
        let _ = write!(s, "HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n");
        while s.write_all(&[0u8; 1024]).is_ok() {
            std::thread::sleep(Duration::from_millis(50));
        }
    })
}

#[test]
fn an_interrupted_prep_leaves_no_temporary_file_and_stale_ones_are_cleaned() {
    let dir = scratch("robust_interrupt");
    let out = dir.join("data");
    std::fs::create_dir_all(&out).unwrap();
    for signal in [libc::SIGINT, libc::SIGTERM] {
        let mut child = Command::new(prep_exe())
            .args(["--download", "--url", &serve_trickle(), "--md5", "0123456789abcdef0123456789abcdef"])
            .arg("--out")
            .arg(&out)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let part = out.join("cifar-10-python.tar.gz.part");
        let start = Instant::now();
        while !part.exists() && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(part.exists(), "the download never started");
        kill(&child, signal);
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(130));
        let left: Vec<_> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert!(left.is_empty(), "signal {signal}: left {left:?}");
    }
    // A temporary of a process that no longer runs is removed by the next conversion; one of a
    // running process (this test's) is left alone.
    let stale = out.join(".cifar-prep-train.4194303.tmp");
    let live = out.join(format!(".cifar-prep-train.{}.tmp", std::process::id()));
    std::fs::write(&stale, b"partial").unwrap();
    std::fs::write(&live, b"partial").unwrap();
    let tgz = dir.join("c.tar.gz");
    tar_gz(&tgz, &cifar10_members(1, 1, false));
    let o = run(prep_exe(), &[&tgz, &"--out", &out]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(!stale.exists() && live.exists());
}

/// Runs `cmd`, failing the test if it takes more than `limit` (a hang).
fn output_within(cmd: &mut Command, limit: Duration) -> std::process::Output {
    let child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let pid = child.id() as i32;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output().unwrap()));
    match rx.recv_timeout(limit) {
        Ok(out) => out,
        Err(_) => {
            // SAFETY: sends SIGKILL to our own child, which the waiting thread then reaps.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("{cmd:?} hung for {limit:?}");
        }
    }
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
}

#[test]
fn fifos_and_devices_are_refused_as_any_input_without_a_hang() {
    let dir = scratch("robust_fifo");
    let limit = Duration::from_secs(20);
    let fifo = dir.join("in.tar.gz");
    mkfifo(&fifo);
    let o = output_within(Command::new(prep_exe()).arg(&fifo).arg("--out").arg(dir.join("out")), limit);
    refused(&o, "in.tar.gz: is a FIFO, not a regular file");
    let o = output_within(Command::new(prep_exe()).arg("/dev/zero").arg("--out").arg(dir.join("out")), limit);
    refused(&o, "/dev/zero: is a character device, not a regular file");
    // A FIFO named like an image inside an image folder.
    write_image(&dir.join("folder/train/a/1.png"), 32, 32, 1);
    mkfifo(&dir.join("folder/train/a/2.png"));
    let o = output_within(
        Command::new(prep_exe()).arg(dir.join("folder")).arg("--out").arg(dir.join("out")),
        limit,
    );
    refused(&o, "2.png: is a FIFO, not an image file");
    // A tensor file, and a checkpoint.
    let data = learnable_data(&scratch("robust_fifo_data"), 4);
    let ck = data.join("ck");
    std::fs::create_dir_all(&ck).unwrap();
    mkfifo(&ck.join("checkpoint.safetensors"));
    let args = [
        "--data",
        data.to_str().unwrap(),
        "--device",
        "cpu",
        "--checkpoint",
        ck.to_str().unwrap(),
        "--resume",
    ];
    let o = output_within(Command::new(train_exe()).args(args), limit);
    refused(&o, "checkpoint.safetensors: is a FIFO, not a regular file");
    std::fs::remove_file(data.join("cifar10-test.safetensors")).unwrap();
    mkfifo(&data.join("cifar10-test.safetensors"));
    let o = output_within(
        Command::new(train_exe()).args(["--data", data.to_str().unwrap(), "--device", "cpu"]),
        limit,
    );
    refused(&o, "cifar10-test.safetensors: is a FIFO, not a regular file");
}

#[test]
fn downloads_that_stall_or_stop_end_in_an_error_and_leave_no_part_file() {
    let dir = scratch("robust_download");
    let out = dir.join("data");
    let md5 = "0123456789abcdef0123456789abcdef";
    let silent = serve(|s| {
        std::thread::sleep(Duration::from_secs(30));
        drop(s);
    });
    let cut = serve(|mut s| {
        let _ = write!(s, "HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n0123456789");
    });
    for (url, what) in [(silent, "silent"), (cut, "cut short")] {
        let t = Instant::now();
        let o = output_within(
            Command::new(prep_exe())
                .args(["--download", "--url", &url, "--md5", md5, "--timeout", "1"])
                .arg("--out")
                .arg(&out),
            Duration::from_secs(20),
        );
        refused(&o, "download of");
        assert!(t.elapsed() < Duration::from_secs(10), "{what}: took {:?}", t.elapsed());
        let left: Vec<_> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert!(left.is_empty(), "{what}: left {left:?}");
    }
}

#[test]
fn messages_say_the_reason_once_and_name_the_input_for_a_temporary() {
    let dir = scratch("robust_messages");
    let o = run(prep_exe(), &[&dir.join("missing.tar.gz")]);
    refused(&o, "missing.tar.gz: No such file or directory");
    assert_eq!(String::from_utf8_lossy(&o.stderr).matches("No such file").count(), 1, "{}", text(&o));
    // A write that fails (the file size limit) on the temporary tensor file is said of the input.
    let tgz = dir.join("c.tar.gz");
    tar_gz(&tgz, &cifar10_members(20, 20, false));
    let mut cmd = Command::new(prep_exe());
    cmd.arg(&tgz).arg("--out").arg(dir.join("out"));
    // SAFETY: between fork and exec only async-signal-safe calls: setrlimit and signal.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            let limit = libc::rlimit { rlim_cur: 64 * 1024, rlim_max: 64 * 1024 };
            libc::setrlimit(libc::RLIMIT_FSIZE, &limit);
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            Ok(())
        });
    }
    let o = output_within(&mut cmd, Duration::from_secs(20));
    refused(&o, "c.tar.gz: writing its tensor files: ");
    assert!(text(&o).contains(".cifar-prep-"), "{}", text(&o));
    let left: Vec<_> = std::fs::read_dir(dir.join("out")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "left {left:?}");
}

fn plain_tar(path: &Path, members: &[(String, Vec<u8>)]) {
    let mut tar = tar::Builder::new(std::fs::File::create(path).unwrap());
    for (name, data) in members {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(0);
        tar.append_data(&mut h, name, data.as_slice()).unwrap();
    }
    tar.finish().unwrap();
}

#[test]
fn splits_of_two_conversions_are_never_a_pair_and_up_to_date_follows_the_content() {
    let dir = scratch("robust_pair");
    let input = dir.join("c.tar");
    let members = cifar10_members(2, 2, false);
    plain_tar(&input, &members);
    let out = dir.join("data");
    let prep = |extra: &[&str]| {
        let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&input, &"--out", &out];
        for e in extra {
            args.push(e);
        }
        let o = run(prep_exe(), &args);
        assert!(o.status.success(), "{}", text(&o));
        text(&o)
    };
    prep(&[]);
    let test = out.join("cifar10-test.safetensors");
    let earlier = std::fs::read(&test).unwrap();
    prep(&["--force"]);
    // As if a second conversion had been stopped after renaming its train split only.
    std::fs::write(&test, &earlier).unwrap();
    let o = train_in(&dir, &["--data", out.to_str().unwrap(), "--max-steps", "1"]);
    refused(&o, "come from two conversions");
    // cifar-prep does not take that pair for up-to-date output: it converts again.
    assert!(!prep(&[]).contains("up to date"));
    let o = train_in(&dir, &["--data", out.to_str().unwrap(), "--max-steps", "1"]);
    assert!(o.status.success(), "{}", text(&o));

    // A new modification time with the same content: up to date. Other content of the same
    // size under the old modification time: converted again.
    let mtime = std::fs::metadata(&input).unwrap().modified().unwrap();
    let touch = |t: std::time::SystemTime| {
        std::fs::File::options().write(true).open(&input).unwrap().set_modified(t).unwrap()
    };
    touch(mtime + Duration::from_secs(60));
    assert!(prep(&[]).contains("up to date"));
    let mut changed = members.clone();
    changed[0].1[1] ^= 0xff; // one pixel of the first training image
    plain_tar(&input, &changed);
    touch(mtime);
    assert_eq!(std::fs::metadata(&input).unwrap().len(), {
        plain_tar(&dir.join("same.tar"), &members);
        std::fs::metadata(dir.join("same.tar")).unwrap().len()
    });
    assert!(!prep(&[]).contains("up to date"));
    let f = cifar_fast::TensorFile::open(out.join("cifar10-train.safetensors")).unwrap();
    let first = &bytemuck::cast_slice::<u8, f32>(f.image_bytes(0))[0];
    let want = ((members[0].1[1] ^ 0xff) as f32 / 255.0 - 0.5) / 0.5;
    assert!((first - want).abs() < 1e-6, "{first} vs {want}: the new content was not converted");
}

#[test]
fn a_training_file_truncated_under_a_run_is_a_clear_error_not_a_bus_error() {
    let dir = learnable_data(&scratch("robust_sigbus"), 40);
    let (mut child, _out) = train_into_epoch_2(&dir, &["--no-eval"]);
    // Cut the mapped file to its header and a few images, as another program might.
    let train = dir.join("cifar10-train.safetensors");
    std::fs::File::options().write(true).open(&train).unwrap().set_len(40_000).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "still running after the truncation");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(1), "{status:?}: {err}");
    assert!(
        err.contains("cifar10-train.safetensors: the file was truncated while this program had it mapped"),
        "{err}"
    );
}

#[test]
fn a_file_read_to_survive_truncation_reports_it_and_the_process_goes_on() {
    use cifar_fast::Source;
    let dir = scratch("robust_survive_truncation");
    let path = common::tensor_file(&dir, 40, cifar_fast::prep::StoreDtype::F32);
    // What the Python package reads through; its reads come from the map.
    let pixels = cifar_fast::source::Pixels::open(&path, None).unwrap();
    let mut out = vec![0f32; 3 * 32 * 32];
    let last = pixels.len() - 1;
    let label = pixels.read_into(last, &mut out).unwrap();
    let plain = cifar_fast::Dataset::open(&path).unwrap();
    let mut want = vec![0f32; out.len()];
    assert_eq!(plain.read_into(last, &mut want).unwrap(), label);
    assert_eq!(out, want);
    drop(plain);
    // Cut to its header and a few images, as another program might.
    std::fs::File::options().write(true).open(&path).unwrap().set_len(40_000).unwrap();
    let err = pixels.read_into(last, &mut out).unwrap_err().to_string();
    assert!(err.contains("cifar10-train.safetensors") && err.contains("was truncated while open"), "{err}");
    assert!(err.contains(&format!("sample {last}")), "{err}");
    // Once found truncated, the file's reads are errors, even of images that are still there.
    assert!(pixels.read_into(0, &mut out).is_err());
    // And this process goes on: another file reads as before.
    let other = common::tensor_file(
        &scratch("robust_survive_truncation_other"),
        40,
        cifar_fast::prep::StoreDtype::F32,
    );
    let fresh = cifar_fast::source::Pixels::open(&other, None).unwrap();
    assert_eq!(fresh.read_into(last, &mut out).unwrap(), label);
    assert_eq!(out, want);
}

#[test]
fn a_test_split_with_fewer_classes_than_the_model_is_evaluated() {
    let dir = scratch("robust_fewer_test_classes");
    let (train, test) = (dir.join("x-train.safetensors"), dir.join("x-test.safetensors"));
    // No class names: the training split's labels make 10 classes, the test split's 5.
    tensor_file(&train, &(0..20).map(|i| i % 10).collect::<Vec<_>>(), None);
    tensor_file(&test, &(0..10).map(|i| i % 5).collect::<Vec<_>>(), None);
    let metrics = dir.join("m.jsonl");
    let mut beyond = 0;
    for seed in 0..8 {
        let seed = seed.to_string();
        let args = ["--data", ".", "--dataset", "x", "--epochs", "1", "--seed", &seed];
        let o = train_in(&dir, &[&args[..], &["--metrics", metrics.to_str().unwrap()]].concat());
        assert!(o.status.success(), "seed {seed}: {}", text(&o));
        let text = std::fs::read_to_string(&metrics).unwrap();
        let epoch: serde_json::Value = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .find(|l: &serde_json::Value| l["type"] == "epoch")
            .unwrap();
        // The confusion matrix spans the model's 10 classes; its rows sum to the test split.
        let confusion: Vec<Vec<u64>> = serde_json::from_value(epoch["confusion"].clone()).unwrap();
        assert_eq!(confusion.len(), 10, "{epoch}");
        assert_eq!(confusion.iter().flatten().sum::<u64>(), 10, "{epoch}");
        // Predictions of a class the test split lacks count as wrong (and were once an index
        // out of bounds).
        beyond += confusion.iter().map(|row| row[5..].iter().sum::<u64>()).sum::<u64>();
    }
    assert!(beyond > 0, "every seed predicted only the test split's classes: the case was not exercised");
}
