//! The tensor file, opened: its header checked against the file's length, then memory-mapped
//! read-only, so samples are read straight from the page cache and never copied onto the heap.
pub mod encoded;
mod mapped;
mod sigbus;
use std::collections::HashMap;
use std::io::Read;
use std::ops::Range;
use std::path::Path;

use safetensors::Dtype;
use safetensors::tensor::Metadata;

use self::mapped::Mapped;
use crate::error::{Error, IoContext, Result};
use crate::prep::StoreDtype;
use crate::prep::layout::CHANNELS;

use crate::prep::MAX_CLASSES;

/// The largest header read (safetensors' own limit).
const MAX_HEADER: u64 = 100_000_000;

/// A safetensors file's header, read and checked against the file's length: what every kind of
/// tensor file this crate reads starts from.
pub(crate) struct Header {
    pub file: std::fs::File,
    pub file_len: u64,
    pub header: Metadata,
    /// Where the tensors' bytes start.
    pub data_start: usize,
}

impl Header {
    /// Opens `path` (a regular file) and reads its header.
    pub fn read(path: &Path) -> Result<Header> {
        let bad = |msg: String| Error::format(path, msg);
        let mut file = crate::files::open_regular(path)?;
        let file_len = file.metadata().at(path)?.len();
        let mut n = [0u8; 8];
        if file_len < 8 {
            return Err(bad(format!("{file_len} bytes is too short for a safetensors file")));
        }
        file.read_exact(&mut n).at(path)?;
        let n = u64::from_le_bytes(n);
        if n > MAX_HEADER {
            return Err(bad(format!(
                "declares a header of {n} bytes, more than the {MAX_HEADER} this reader takes \
                 (safetensors' own limit)"
            )));
        }
        if 8 + n > file_len {
            return Err(bad(format!(
                "header length {n} does not fit in the file's {file_len} bytes (truncated?)"
            )));
        }
        let mut header = vec![0u8; n as usize];
        file.read_exact(&mut header).at(path)?;
        let header: Metadata =
            serde_json::from_slice(&header).map_err(|e| bad(format!("corrupt safetensors header: {e}")))?;
        let data_start = 8 + n as usize;
        let data_len = header.data_len() as u64;
        if 8 + n + data_len != file_len {
            return Err(bad(format!(
                "the header describes {} bytes but the file holds {file_len} (truncated or corrupt)",
                8 + n + data_len
            )));
        }
        Ok(Header { file, file_len, header, data_start })
    }
}

/// Whether the tensor file at `path` holds images kept encoded (an [`encoded::EncodedFile`])
/// rather than dense pixels (a [`TensorFile`]): its header says.
pub fn is_encoded(path: &Path) -> Result<bool> {
    let h = Header::read(path)?;
    Ok(h.header.metadata().as_ref().and_then(|m| m.get("layout")).map(String::as_str) == Some("encoded"))
}

/// A prepared split (`cifar10-train.safetensors`, ...), mapped and validated.
///
/// # The memory map's contract
///
/// A memory map reads the file as it is *now*, not as it was when opened. `open` checks the
/// header and every tensor's extent against the file's length before mapping, so a file that
/// is truncated or corrupt at open is an error there. What no check at open can rule out is
/// another program changing the file while it is mapped:
///
/// - *Replaced* (a new file renamed over the name, as `cifar-prep` always writes): harmless.
///   The map keeps the old file's pages; the run goes on with the data it started with.
/// - *Rewritten in place*: the run reads whatever bytes are there, possibly a mix of old and
///   new. Nothing of this project writes a tensor file in place; don't let anything else.
/// - *Truncated*: reading past the new end raises SIGBUS. Opening a `TensorFile` installs a
///   handler for it (Linux) that names the file and exits with status 1, rather than the bare
///   "Bus error" the default gives. A program that must outlive a bad file (the Python
///   package: its interpreter) reads through [`crate::source::Pixels`] instead, whose file
///   survives the fault and reports it as an error of the read that found it.
///
/// This is the bargain ripgrep makes for its memory maps (and why it does not map files it
/// expects to change); here the files are ours, written once by `cifar-prep` and renamed.
pub struct TensorFile {
    /// The file, mapped and watched (see the contract above).
    map: Mapped,
    len: usize,
    dtype: StoreDtype,
    images: Range<usize>,
    /// `[C, H, W]` of one image.
    shape: [usize; 3],
    labels: Range<usize>,
    coarse: Option<Range<usize>>,
    metadata: HashMap<String, String>,
    classes: Vec<String>,
    mean: [f32; 3],
    std: [f32; 3],
}

impl std::fmt::Debug for TensorFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TensorFile").field("path", &self.map.path()).field("len", &self.len).finish()
    }
}

impl TensorFile {
    /// Opens and validates `path`. A truncated or corrupt file is an error here, never a
    /// SIGBUS later: every tensor's extent is checked against the file's length before mapping.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bad = |msg: String| Error::format(path, msg);
        let Header { file, file_len, header, data_start } = Header::read(path)?;
        if header.metadata().as_ref().and_then(|m| m.get("layout")).map(String::as_str) == Some("encoded") {
            return Err(bad(
                "holds images of every size, kept encoded: open it with EncodedFile (in Python, \
                            TensorFile with a transform that gives every image one size, such as \
                            RandomResizedCrop or Resize + CenterCrop)"
                    .into(),
            ));
        }
        let images = header.info("images").ok_or_else(|| bad("no 'images' tensor".into()))?;
        let dtype = match images.dtype {
            Dtype::F32 => StoreDtype::F32,
            Dtype::U8 => StoreDtype::U8,
            d => return Err(bad(format!("'images' has dtype {d:?}, expected F32 or U8"))),
        };
        let (len, shape) = match images.shape[..] {
            [n, c, h, w] if c == CHANNELS && h > 0 && w > 0 => (n, [c, h, w]),
            _ => return Err(bad(format!("'images' has shape {:?}, expected [N, 3, H, W]", images.shape))),
        };
        let extent = |name: &str| -> Result<Option<Range<usize>>> {
            let Some(info) = header.info(name) else { return Ok(None) };
            if info.dtype != Dtype::I64 || info.shape != [len] {
                return Err(bad(format!(
                    "'{name}' is {:?} {:?}, expected I64 [{len}]",
                    info.dtype, info.shape
                )));
            }
            let r = data_start + info.data_offsets.0..data_start + info.data_offsets.1;
            if r.start % 8 != 0 {
                return Err(bad(format!("'{name}' is not 8-byte aligned")));
            }
            Ok(Some(r))
        };
        let labels = extent("labels")?.ok_or_else(|| bad("no 'labels' tensor".into()))?;
        let coarse = extent("coarse_labels")?;
        let images = data_start + images.data_offsets.0..data_start + images.data_offsets.1;
        if images.start % 4 != 0 {
            return Err(bad("'images' is not 4-byte aligned".into()));
        }
        let metadata = header.metadata().clone().unwrap_or_default();
        let classes: Vec<String> = match metadata.get("classes").map(|v| serde_json::from_str(v)) {
            Some(Ok(c)) => c,
            Some(Err(e)) => return Err(bad(format!("metadata 'classes': {e}"))),
            None => Vec::new(),
        };
        // What scales with the class count (a model's last layer, per-class counts) must not
        // take the machine: refused here, before anything is built for them.
        crate::prep::check_class_count(classes.len(), path)?;
        let triple = |key: &str| -> Result<[f32; 3]> {
            match metadata.get(key).map(|v| serde_json::from_str(v)) {
                Some(Ok(v)) => Ok(v),
                Some(Err(e)) => Err(bad(format!("metadata '{key}': {e}"))),
                None => Ok([0.5; 3]),
            }
        };
        let (mean, std) = (triple("mean")?, triple("std")?);
        if std.iter().any(|&s| s.is_nan() || s <= 0.0) {
            return Err(bad(format!("metadata 'std' {std:?} is not positive")));
        }

        let map = Mapped::new(path, file, file_len)?;
        let out = TensorFile { map, len, dtype, images, shape, labels, coarse, metadata, classes, mean, std };
        let named = !out.classes.is_empty();
        let classes = if named { out.classes.len() } else { MAX_CLASSES };
        if let Some(i) = out.labels().iter().position(|&l| l < 0 || l as usize >= classes) {
            let l = out.labels()[i];
            return Err(bad(if named || l < 0 {
                format!("label {l} of sample {i} is out of range")
            } else {
                format!(
                    "label {l} of sample {i} would make {} classes, more than the {MAX_CLASSES} this \
                     tool takes",
                    l as u64 + 1
                )
            }));
        }
        Ok(out)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        self.map.path()
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no samples.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// How pixels are stored.
    pub fn dtype(&self) -> StoreDtype {
        self.dtype
    }

    /// Class names, in label order (empty if the file names none).
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    /// Per-channel mean used to normalize (of pixel / 255).
    pub fn mean(&self) -> [f32; 3] {
        self.mean
    }

    /// Per-channel std used to normalize.
    pub fn std(&self) -> [f32; 3] {
        self.std
    }

    /// The header's `__metadata__` strings.
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    /// All labels, straight from the map.
    pub fn labels(&self) -> &[i64] {
        bytemuck::cast_slice(&self.map[self.labels.clone()])
    }

    /// CIFAR-100's coarse labels.
    pub fn coarse_labels(&self) -> Option<&[i64]> {
        self.coarse.clone().map(|r| bytemuck::cast_slice(&self.map[r]))
    }

    /// The shape of one image, `[3, H, W]` (`[3, 32, 32]` for CIFAR).
    pub fn image_shape(&self) -> [usize; 3] {
        self.shape
    }

    /// Bytes of one stored image.
    fn image_size(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size()
    }

    /// The stored bytes of image `i` (`3*H*W` values of [`TensorFile::dtype`]).
    /// Panics if `i >= len()`, like slice indexing.
    #[inline]
    pub fn image_bytes(&self, i: usize) -> &[u8] {
        assert!(i < self.len, "sample {i} out of range for {} samples", self.len);
        let size = self.image_size();
        let start = self.images.start + i * size;
        &self.map[start..start + size]
    }

    /// Reads image `i`'s stored bytes into `out` (as long as [`TensorFile::image_bytes`]'s)
    /// so that a file truncated meanwhile is an error naming it, not a SIGBUS: from the map
    /// where the file was opened to survive truncation (`TensorFile::survive_truncation`),
    /// checking after the copy that no page of the map faulted; else with a positioned read.
    /// Panics if `i >= len()` or `out` has another length.
    pub fn read_image(&self, i: usize, out: &mut [u8]) -> Result<()> {
        use std::os::unix::fs::FileExt;
        assert!(i < self.len, "sample {i} out of range for {} samples", self.len);
        let size = self.image_size();
        assert_eq!(out.len(), size, "image {i} is {size} bytes");
        let start = self.images.start + i * size;
        if self.map.surviving() {
            // Half the time of a positioned read (which looks the pages up and copies them one
            // by one), and the batch's whole cost on the Python package's workers.
            out.copy_from_slice(&self.map[start..start + size]);
            return self.check_whole(&format!("reading sample {i}"));
        }
        self.map.file().read_exact_at(out, start as u64).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => self.map.truncated(&format!("reading sample {i}")),
            _ => Error::io(self.map.path(), e),
        })
    }

    /// For a file opened to survive truncation: whether every read of its map so far found
    /// the file whole (an error saying it was truncated, found while `doing`, if not).
    pub(crate) fn check_whole(&self, doing: &str) -> Result<()> {
        self.map.check_whole(doing)
    }

    /// For a file opened to survive truncation, after reading the images of `rows` (and
    /// nothing else of the map): an error if the file was cut under those reads, found while
    /// `doing` (a cut inside a page serves zeros that no fault shows; see `Mapped::check_cut`).
    pub(crate) fn check_images_read(&self, doing: &str, rows: &[usize]) -> Result<()> {
        let size = self.image_size();
        let tail = self.map.tail_page();
        let reached = rows.iter().any(|&i| self.images.start + (i + 1) * size > tail);
        self.map.check_cut(doing, reached)
    }

    /// From now on a read of this file's map that finds the file truncated reads zeros instead
    /// of raising SIGBUS, and [`TensorFile::read_image`] (which checks for that after each copy)
    /// returns the error. Only `read_image` checks: read this file with nothing else.
    /// Where the map could not be watched (all watch slots taken, or not Linux), `read_image`
    /// reads with positioned reads instead, which report a truncation by themselves.
    pub(crate) fn survive_truncation(mut self) -> Self {
        self.map.survive_truncation();
        self
    }

    /// The raw stored bytes of all images.
    pub fn all_image_bytes(&self) -> &[u8] {
        &self.map[self.images.clone()]
    }

    /// Enters every page of the file into this process's page tables now, reading from disk
    /// what the page cache lacks: the counterpart of torchvision's `CIFAR10`, which reads the
    /// whole split into memory before training. Returns whether it did; it does not when the
    /// file is over half the available memory (populating would only evict pages again) or
    /// the kernel is older than Linux 5.14. Either way reads stay correct: pages not entered
    /// here fault in as they are read.
    ///
    /// Why: a mapped file's pages are entered one small window (64 KB) at a time on first
    /// touch, so a shuffled first epoch takes a page fault every few samples, on the loader's
    /// workers, which share the cores with training. Measured on 2 cores at batch 256, a
    /// first epoch ran at about 90% of the in-memory step early on and a second one (all
    /// pages entered) at 100%. Populating the 614 MB training split takes 50–150 ms there
    /// when the page cache holds it.
    /// Not done by [`TensorFile::open`]: it would delay the loader's first batch by as much.
    pub fn populate(&self) -> bool {
        #[cfg(target_os = "linux")]
        {
            if self.map.len() as u64 > available_memory().unwrap_or(0) / 2 {
                return false;
            }
            self.map.mmap().advise(memmap2::Advice::PopulateRead).is_ok()
        }
        #[cfg(not(target_os = "linux"))]
        false
    }
}

/// `MemAvailable` from `/proc/meminfo`, in bytes (`None` where it cannot be read).
#[cfg(target_os = "linux")]
pub fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
