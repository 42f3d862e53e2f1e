//! `--download`: fetch an official tarball over HTTP into the data directory, like torchvision's
//! `download=True`: into a `.part` file, md5-checked, then renamed, so a cut connection never
//! leaves a file that looks complete.
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use md5::{Digest, Md5};

use super::tarball::hex;
use crate::error::{Error, IoContext, Result};

/// An official CIFAR tarball: file name, URL and md5, as torchvision lists them.
#[derive(Debug, Clone, Copy)]
pub struct Official {
    /// The file name in the data directory.
    pub file: &'static str,
    /// Where the authors publish it.
    pub url: &'static str,
    /// Its md5.
    pub md5: &'static str,
    /// Its size in bytes: only a file of one of these sizes can be official, so only those
    /// are md5-summed (170 MB of md5 costs a third of a conversion).
    pub size: u64,
}

/// The tarballs `--download` knows.
pub const OFFICIAL: [Official; 3] = [
    Official {
        file: "cifar-10-python.tar.gz",
        url: "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5: "c58f30108f718f92721af3b95e74349a",
        size: 170_498_071,
    },
    Official {
        file: "cifar-10-binary.tar.gz",
        url: "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
        md5: "c32a1d4ab5d03f1284b67883e8d87530",
        size: 170_052_171,
    },
    Official {
        file: "cifar-100-python.tar.gz",
        url: "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5: "eb9058c3a382ffc7106e4002c42a8d85",
        size: 169_001_437,
    },
];

/// The official tarball with this md5, if any.
pub fn official_by_md5(md5: &str) -> Option<&'static Official> {
    OFFICIAL.iter().find(|o| o.md5 == md5)
}

/// The file a download into `dest` is written to until it is whole and checked.
pub fn part_path(dest: &Path) -> PathBuf {
    let mut name = dest.file_name().unwrap_or_default().to_os_string();
    name.push(".part");
    dest.with_file_name(name)
}

/// How long, by default, a connection may take to open, and the transfer may go without a byte,
/// before the download is given up.
pub const STALL: Duration = Duration::from_secs(30);

/// Downloads `url` to `dest`, checking `md5` (in either case), giving up when the server is
/// silent for `stall` (to connect, to answer, or between two reads). Returns `dest`. An
/// existing `dest` with the right md5 is kept as it is; on failure no `.part` file is left.
pub fn download(
    url: &str,
    md5: &str,
    dest: &Path,
    stall: Duration,
    progress: &indicatif::ProgressBar,
) -> Result<PathBuf> {
    let md5 = md5.to_ascii_lowercase();
    if dest.exists() && crate::files::regular_file(dest).is_ok() && file_md5(dest)? == md5 {
        return Ok(dest.to_path_buf());
    }
    let fail = |msg: String| Error::Download { url: url.to_string(), msg };
    let part = part_path(dest);
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_resolve(Some(stall))
        .timeout_connect(Some(stall))
        .timeout_recv_response(Some(stall))
        .timeout_per_read(Some(stall))
        .build()
        .into();
    let response = agent.get(url).call().map_err(|e| fail(e.to_string()))?;
    if let Some(len) = response.headers().get("content-length").and_then(|v| v.to_str().ok()?.parse().ok()) {
        progress.set_length(len);
    }
    let mut body = response.into_body().into_reader();
    let mut out = File::create(&part).at(&part)?;
    let mut hasher = Md5::new();
    let mut buf = vec![0u8; 1 << 16];
    let result = (|| {
        loop {
            let n = body.read(&mut buf).map_err(|e| fail(e.to_string()))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n]).at(&part)?;
            progress.inc(n as u64);
        }
        out.sync_all().at(&part)?;
        let got = hex(&hasher.finalize());
        if got != md5 {
            return Err(fail(format!("md5 {got} does not match the expected {md5}")));
        }
        std::fs::rename(&part, dest).at(dest)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&part);
    }
    result.map(|()| dest.to_path_buf())
}

fn file_md5(path: &Path) -> Result<String> {
    let mut f = File::open(path).at(path)?;
    let mut h = Md5::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match f.read(&mut buf).at(path)? {
            0 => return Ok(hex(&h.finalize())),
            n => h.update(&buf[..n]),
        }
    }
}
