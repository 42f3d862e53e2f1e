//! Small CIFAR tarballs and tensor files made here, in both official layouts, and the paths of
//! the things tests run.
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const IMG: usize = 3 * 32 * 32;

/// A fresh, empty directory under target/ for one test.
pub fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A deterministic synthetic batch: `n` records whose pixels encode (batch, record) and whose
/// labels cycle through the classes.
pub fn records(batch: usize, n: usize, classes: usize) -> (Vec<u8>, Vec<u8>) {
    let labels: Vec<u8> = (0..n).map(|i| ((i + batch) % classes) as u8).collect();
    let mut pixels = Vec::with_capacity(n * IMG);
    for i in 0..n {
        for p in 0..IMG {
            pixels.push(((p * 7 + i * 13 + batch * 101) % 256) as u8);
        }
    }
    (labels, pixels)
}

/// The official binary record layout: label byte, then 3072 pixel bytes.
pub fn binary_batch(labels: &[u8], pixels: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, l) in labels.iter().enumerate() {
        out.push(*l);
        out.extend_from_slice(&pixels[i * IMG..(i + 1) * IMG]);
    }
    out
}

fn binstring(out: &mut Vec<u8>, s: &[u8]) {
    if s.len() < 256 {
        out.push(b'U');
        out.push(s.len() as u8);
    } else {
        out.push(b'T');
        out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    }
    out.extend_from_slice(s);
}

/// Options for a hand-made pickle, to make it wrong in one way.
#[derive(Default, Clone)]
pub struct PickleFlaws {
    pub dtype: Option<&'static str>,
    pub shape: Option<(usize, usize)>,
    pub global: Option<(&'static str, &'static str)>,
    pub trailing_opcode: Option<u8>,
}

/// A protocol-2 pickle as Python 2 wrote CIFAR's: `{'labels': [...], 'data': ndarray}`.
pub fn pickled_batch(labels: &[u8], pixels: &[u8], flaws: &PickleFlaws) -> Vec<u8> {
    pickled_with(&[("labels", labels)], pixels, flaws)
}

/// The same with any label lists (CIFAR-100's `fine_labels` and `coarse_labels`).
pub fn pickled_with(label_lists: &[(&str, &[u8])], pixels: &[u8], flaws: &PickleFlaws) -> Vec<u8> {
    let mut p = vec![0x80, 2, b'}', b'('];
    binstring(&mut p, b"batch_label");
    binstring(&mut p, b"training batch");
    for (key, labels) in label_lists {
        binstring(&mut p, key.as_bytes());
        p.extend_from_slice(b"](");
        for l in labels.iter() {
            p.extend_from_slice(&[b'K', *l]);
        }
        p.push(b'e');
    }
    let labels = label_lists[0].1;
    binstring(&mut p, b"data");
    let (module, name) = flaws.global.unwrap_or(("numpy.core.multiarray", "_reconstruct"));
    p.extend_from_slice(format!("c{module}\n{name}\n").as_bytes());
    p.extend_from_slice(b"cnumpy\nndarray\nK\x00\x85");
    binstring(&mut p, b"b");
    p.extend_from_slice(b"\x87R(K\x01");
    let (rows, cols) = flaws.shape.unwrap_or((labels.len(), IMG));
    p.push(b'J');
    p.extend_from_slice(&(rows as i32).to_le_bytes());
    p.push(b'M');
    p.extend_from_slice(&(cols as u16).to_le_bytes());
    p.push(0x86);
    p.extend_from_slice(b"cnumpy\ndtype\n");
    binstring(&mut p, flaws.dtype.unwrap_or("u1").as_bytes());
    p.extend_from_slice(b"K\x00K\x01\x87R(K\x03");
    binstring(&mut p, b"|");
    p.extend_from_slice(b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89");
    binstring(&mut p, pixels);
    p.extend_from_slice(b"tb");
    if let Some(op) = flaws.trailing_opcode {
        p.push(op);
    }
    p.extend_from_slice(b"u.");
    p
}

/// Writes a gzipped tar of `(member name, bytes)`.
pub fn tar_gz(path: &Path, members: &[(String, Vec<u8>)]) {
    let file = std::fs::File::create(path).unwrap();
    let gz = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    for (name, data) in members {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append_data(&mut h, name, &data[..]).unwrap();
    }
    tar.into_inner().unwrap().finish().unwrap().flush().unwrap();
}

/// The members of a small CIFAR-10 tarball: `per_batch` images in each of the 5 train batches
/// and `test` in the test batch, binary or pickled.
pub fn cifar10_members(per_batch: usize, test: usize, pickled: bool) -> Vec<(String, Vec<u8>)> {
    let dir = if pickled { "cifar-10-batches-py" } else { "cifar-10-batches-bin" };
    let mut out = Vec::new();
    for b in 0..6 {
        let (n, name) =
            if b < 5 { (per_batch, format!("data_batch_{}", b + 1)) } else { (test, "test_batch".into()) };
        let (labels, pixels) = records(b, n, 10);
        let (name, data) = if pickled {
            (name, pickled_batch(&labels, &pixels, &PickleFlaws::default()))
        } else {
            (format!("{name}.bin"), binary_batch(&labels, &pixels))
        };
        out.push((format!("{dir}/{name}"), data));
    }
    out
}

pub fn prep_exe() -> &'static str {
    env!("CARGO_BIN_EXE_cifar-prep")
}

pub fn run(exe: &str, args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    Command::new(exe).args(args.iter().map(|a| a.as_ref())).output().unwrap()
}

pub fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// The workspace's root.
pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The project's Python (the venv `tools/setup` made, with torch, numpy and safetensors).
pub fn python() -> PathBuf {
    let torch = workspace().join(".libtorch").canonicalize().expect("run tools/setup");
    torch.join("../../../../bin/python")
}

/// `../shared`, where the real data lives.
pub fn shared() -> PathBuf {
    workspace().join("../shared")
}

/// A prepared CIFAR-10 train file of `5 * per_batch` synthetic images in `dir`.
pub fn tensor_file(dir: &Path, per_batch: usize, dtype: cifar_fast::prep::StoreDtype) -> PathBuf {
    let tgz = dir.join("synthetic.tar.gz");
    tar_gz(&tgz, &cifar10_members(per_batch, per_batch, false));
    let opts = cifar_fast::prep::PrepOptions { dtype, ..Default::default() };
    cifar_fast::prep::prepare(&tgz, dir, &opts, &indicatif::ProgressBar::hidden()).unwrap();
    dir.join("cifar10-train.safetensors")
}

/// A small CIFAR-10-shaped set a net can learn: each class has its own colour (plus texture).
/// Writes `cifar10-{train,test}.safetensors` into `dir` and returns `dir`.
pub fn learnable_data(dir: &Path, per_batch: usize) -> PathBuf {
    let mut members = Vec::new();
    for b in 0..6 {
        let mut data = Vec::new();
        for i in 0..per_batch {
            let c = (i * 7 + b) % 10;
            data.push(c as u8);
            for ch in 0..3 {
                for p in 0..1024 {
                    let base = [25 * c, 255 - 25 * c, 128][ch];
                    data.push(((base + (p * 7 + i * 13) % 40) % 256) as u8);
                }
            }
        }
        let name = if b < 5 { format!("data_batch_{}.bin", b + 1) } else { "test_batch.bin".into() };
        members.push((format!("cifar-10-batches-bin/{name}"), data));
    }
    let tgz = dir.join("learnable.tar.gz");
    tar_gz(&tgz, &members);
    cifar_fast::prep::prepare(&tgz, dir, &Default::default(), &indicatif::ProgressBar::hidden()).unwrap();
    std::fs::remove_file(tgz).unwrap();
    dir.to_path_buf()
}

/// Runs `exe` with its stdout a pipe nobody reads (as in `exe | head` once head has exited).
pub fn run_with_stdout_closed(exe: &str, args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    Command::new(exe).args(args.iter().map(|a| a.as_ref())).stdout(writer).output().unwrap()
}

/// Serves one HTTP connection on 127.0.0.1: reads the request's headers, then hands the stream
/// to `respond`. Returns the URL.
pub fn serve(respond: impl FnOnce(std::net::TcpStream) + Send + 'static) -> String {
    use std::io::{BufRead, BufReader};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/cifar.tar.gz", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut line = String::new();
        while reader.read_line(&mut line).unwrap_or(0) > 2 {
            line.clear();
        }
        respond(stream);
    });
    url
}

/// Serves `body` once over HTTP on 127.0.0.1; returns its URL.
pub fn serve_once(body: Vec<u8>) -> String {
    serve(move |mut s| {
        write!(s, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len()).unwrap();
        s.write_all(&body).unwrap();
    })
}

/// A URL on 127.0.0.1 where nothing listens: a download from it fails at once, as with no
/// network.
pub fn dead_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/cifar-10-python.tar.gz", listener.local_addr().unwrap());
    drop(listener);
    url
}

/// Writes an image file (its format from the extension) of `w`×`h` whose pixels encode `seed`.
pub fn write_image(path: &Path, w: u32, h: u32, seed: u32) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(x * 7 + seed * 31) as u8, (y * 11 + seed * 17) as u8, ((x + y) * 5 + seed * 3) as u8])
    });
    img.save(path).unwrap();
}

/// Packs directory `dir` as a `.tar.gz` at `out`, its members named `prefix/<path below dir>`.
pub fn tar_gz_dir(dir: &Path, prefix: &str, out: &Path) {
    let file = std::fs::File::create(out).unwrap();
    let gz = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    tar.append_dir_all(prefix, dir).unwrap();
    tar.into_inner().unwrap().finish().unwrap();
}
