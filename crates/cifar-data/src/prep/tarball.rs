//! Reading the input: a gzipped tarball, a plain tar, or an extracted directory, streamed member
//! by member (gzip → tar → bytes) with nothing written to disk, hashing the input as it passes.
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use md5::Md5;
use sha2::{Digest, Sha256};

use super::layout::{MAX_MEMBER_BYTES, Role, role_of};
use crate::error::{Error, IoContext, Result};

/// Digests of the input, taken while it is read.
#[derive(Debug, Clone, Default)]
pub struct SourceInfo {
    /// The input's file or directory name.
    pub name: String,
    /// Bytes read.
    pub bytes: u64,
    /// md5 of a tarball of an official tarball's size (to compare with the official sums);
    /// `None` for other files, which cannot be official, and for directories.
    pub md5: Option<String>,
    /// sha256 of the tarball, or of the batch files' contents in name order for a directory.
    pub sha256: String,
}

impl SourceInfo {
    /// The input's name alone, for output found up to date (nothing was read or hashed).
    pub fn named(input: &Path) -> Self {
        SourceInfo { name: file_name(input), ..Default::default() }
    }
}

/// The first bytes tell a gzip stream (`1f 8b`) and a tar (`ustar` at 257) apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputKind {
    /// A `.tar.gz`.
    Gzip,
    /// A plain `.tar`.
    Tar,
    /// An extracted directory.
    Dir,
}

/// Recognises an input by its content.
pub fn input_kind(path: &Path) -> Result<InputKind> {
    let meta = std::fs::metadata(path).at(path)?;
    if meta.is_dir() {
        return Ok(InputKind::Dir);
    }
    crate::files::regular_file(path)?;
    let mut head = [0u8; 512];
    let mut f = File::open(path).at(path)?;
    let n = read_up_to(&mut f, &mut head).at(path)?;
    if n >= 2 && head[..2] == [0x1f, 0x8b] {
        Ok(InputKind::Gzip)
    } else if n >= 262 && &head[257..262] == b"ustar" {
        Ok(InputKind::Tar)
    } else {
        Err(Error::format(path, "not a gzip file, a tar archive or a directory"))
    }
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Passes what it reads on to the hashing thread, and counts it for the progress bar.
struct Tee<R> {
    inner: R,
    hash: crossbeam_channel::Sender<Vec<u8>>,
    bytes: u64,
    progress: indicatif::ProgressBar,
}

impl<R: Read> Read for Tee<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        // The hasher only stops early if it panicked; the join below reports that.
        let _ = self.hash.send(buf[..n].to_vec());
        self.bytes += n as u64;
        self.progress.set_position(self.bytes);
        Ok(n)
    }
}

/// md5 and sha256 of everything sent, on a thread of their own: hashing 170 MB costs about as
/// much as decompressing it, and the reading thread is the conversion's critical path.
fn hash_blocks(blocks: crossbeam_channel::Receiver<Vec<u8>>, want_md5: bool) -> (Option<String>, String) {
    let (mut md5, mut sha) = (want_md5.then(Md5::new), Sha256::new());
    for b in blocks {
        if let Some(m) = &mut md5 {
            m.update(&b);
        }
        sha.update(&b);
    }
    (md5.map(|m| hex(&m.finalize())), hex(&sha.finalize()))
}

/// Calls `visit(role, member_name, path_for_errors, bytes)` for each CIFAR member of `input`,
/// in archive order (name order for a directory), and returns the input's digests.
pub fn for_each_member(
    input: &Path,
    progress: &indicatif::ProgressBar,
    mut visit: impl FnMut(Role, &str, &Path, Vec<u8>) -> Result<()>,
) -> Result<SourceInfo> {
    let name = input.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    match input_kind(input)? {
        InputKind::Dir => read_dir(input, name, &mut visit),
        kind => {
            let file = File::open(input).at(input)?;
            let size = file.metadata().at(input)?.len();
            progress.set_length(size);
            let want_md5 = super::download::OFFICIAL.iter().any(|o| o.size == size);
            let (tx, rx) = crossbeam_channel::bounded(16);
            std::thread::scope(|s| {
                let hasher = s.spawn(move || hash_blocks(rx, want_md5));
                let mut tee = Tee { inner: file, hash: tx, bytes: 0, progress: progress.clone() };
                let read = (|| {
                    for_each_archived_member(&mut tee, kind == InputKind::Gzip, input, visit)?;
                    io::copy(&mut tee, &mut io::sink()).at(input)?;
                    Ok(tee.bytes)
                })();
                drop(tee);
                let (md5, sha256) = hasher.join().expect("hashing thread panicked");
                read.map(|bytes| SourceInfo { name, bytes, md5, sha256 })
            })
        }
    }
}

/// A (gzipped) tar stream over `reader`, read in large blocks: few messages to the hasher, few
/// calls into the decompressor.
pub(crate) fn open_archive<'a>(reader: impl Read + 'a, gzipped: bool) -> tar::Archive<Box<dyn Read + 'a>> {
    let reader = io::BufReader::with_capacity(1 << 20, reader);
    let stream: Box<dyn Read + 'a> =
        if gzipped { Box::new(flate2::bufread::GzDecoder::new(reader)) } else { Box::new(reader) };
    tar::Archive::new(stream)
}

/// The bytes of the archive member `entry` (named `at` in messages) of the archive `input`:
/// refused when it declares more than [`MAX_MEMBER_BYTES`], or holds fewer than it declares.
pub(crate) fn read_member<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    at: &Path,
    input: &Path,
) -> Result<Vec<u8>> {
    let size = entry.size();
    if size > MAX_MEMBER_BYTES {
        return Err(Error::format(at, format!("member of {size} bytes is too large")));
    }
    let corrupt = |e: io::Error| Error::format(input, format!("corrupt or truncated archive: {e}"));
    // The declared size is only a claim: grow to it as bytes really arrive.
    let mut bytes = Vec::with_capacity(size.min(1 << 26) as usize);
    entry.read_to_end(&mut bytes).map_err(corrupt)?;
    if bytes.len() as u64 != size {
        return Err(corrupt(io::ErrorKind::UnexpectedEof.into()));
    }
    Ok(bytes)
}

/// The archive half of [`for_each_member`]: a (gzipped) tar stream, with `input` naming it in
/// errors. Public for the fuzz target.
pub fn for_each_archived_member(
    reader: impl Read,
    gzipped: bool,
    input: &Path,
    mut visit: impl FnMut(Role, &str, &Path, Vec<u8>) -> Result<()>,
) -> Result<()> {
    let corrupt = |e: io::Error| Error::format(input, format!("corrupt or truncated archive: {e}"));
    let mut archive = open_archive(reader, gzipped);
    for entry in archive.entries().map_err(corrupt)? {
        let mut entry = entry.map_err(corrupt)?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let member = entry.path().map_err(corrupt)?.to_string_lossy().into_owned();
        let Some(role) = role_of(&member) else { continue };
        let at = input.join(&member);
        let bytes = read_member(&mut entry, &at, input)?;
        visit(role, &member, &at, bytes)?;
    }
    // Read the gzip trailer too: its CRC check catches a corrupt tail, and the digests cover
    // the whole file.
    let mut rest = archive.into_inner();
    io::copy(&mut rest, &mut io::sink()).map_err(corrupt)?;
    Ok(())
}

/// The CIFAR files of an extracted directory, as `(member name, path)` in name order. The
/// batches sit in the directory itself or one level down (`data/cifar-10-batches-bin/`).
pub fn dir_members(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut files: Vec<(String, PathBuf)> = Vec::new();
    for entry in std::fs::read_dir(dir).at(dir)? {
        let path = entry.at(dir)?.path();
        if path.is_dir() {
            for sub in std::fs::read_dir(&path).at(&path)? {
                let p = sub.at(&path)?.path();
                files.push((format!("{}/{}", file_name(&path), file_name(&p)), p));
            }
        } else {
            files.push((file_name(&path), path));
        }
    }
    files.retain(|(member, p)| p.is_file() && role_of(member).is_some());
    files.sort();
    Ok(files)
}

fn read_dir(
    dir: &Path,
    name: String,
    visit: &mut impl FnMut(Role, &str, &Path, Vec<u8>) -> Result<()>,
) -> Result<SourceInfo> {
    let files = dir_members(dir)?;
    let mut sha = Sha256::new();
    let mut bytes_read = 0;
    for (member, path) in files {
        let bytes = std::fs::read(&path).at(&path)?;
        sha.update(member.as_bytes());
        sha.update(&bytes);
        bytes_read += bytes.len() as u64;
        visit(role_of(&member).unwrap(), &member, &path, bytes)?;
    }
    Ok(SourceInfo { name, bytes: bytes_read, md5: None, sha256: hex(&sha.finalize()) })
}

fn file_name(p: &Path) -> String {
    p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Lower-case hex of a digest.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
