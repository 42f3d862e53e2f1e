//! Writing a split as a safetensors file, streamed: pixels go to disk as batches arrive, and the
//! header (whose sizes and digests are known only at the end) goes last into space reserved in
//! front, padded with spaces as the format allows. Written to a temporary name, synced, renamed.
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use safetensors::Dtype;
use safetensors::tensor::{Metadata, TensorInfo};

use super::layout::{CHANNELS, Records, SIDE};
use crate::error::{Error, IoContext, Result};

/// Where the tensor data starts by default: the 8-byte header length plus a header of at most
/// 16 KiB - 8 (CIFAR's metadata is 3 KiB), which also keeps every image row 4-byte (indeed
/// page-) aligned in the memory map. [`TensorFileWriter::placed`] reserves more where the
/// class names need it.
pub const DATA_START: u64 = 16 * 1024;

/// The room to reserve in front for a header whose metadata holds `names` (class names, split
/// names: what grows with the dataset) besides the fixed fields: whole pages, so the data stays
/// page-aligned.
pub fn header_room<'a>(names: impl IntoIterator<Item = &'a str>) -> u64 {
    // Each name JSON-escaped at worst six bytes a byte (`\u00XX`), plus quotes and a comma.
    let named: u64 = names.into_iter().map(|n| 6 * n.len() as u64 + 3).sum();
    (DATA_START + named).div_ceil(4096) * 4096
}

/// How pixels are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreDtype {
    /// Normalized `f32`, ready to be a tensor.
    F32,
    /// Raw bytes, 4× smaller; normalized by the loader with the mean/std in the metadata.
    U8,
}

impl StoreDtype {
    /// `f32` or `u8`, as in the metadata.
    pub fn name(self) -> &'static str {
        match self {
            StoreDtype::F32 => "f32",
            StoreDtype::U8 => "u8",
        }
    }

    /// Bytes per stored pixel value.
    pub fn size(self) -> usize {
        match self {
            StoreDtype::F32 => 4,
            StoreDtype::U8 => 1,
        }
    }
}

/// `ToTensor()` then `Normalize(mean, std)` for each possible byte, per channel: the same f32
/// operations in the same order as torchvision, so the values agree exactly.
#[derive(Clone)]
pub struct Normalize {
    lut: [[f32; 256]; CHANNELS],
    /// Per channel, the value of pixel 0 and pixels per unit of value: the inverse map's guess.
    inverse: [(f32, f32); CHANNELS],
}

impl std::fmt::Debug for Normalize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The values of pixel 0 and 255 say which normalization it is; the table is 3 KiB.
        let ends: Vec<(f32, f32)> = self.lut.iter().map(|c| (c[0], c[255])).collect();
        f.debug_struct("Normalize").field("pixels 0 and 255", &ends).finish()
    }
}

impl Normalize {
    /// The table for per-channel `mean` and `std`.
    pub fn new(mean: [f32; 3], std: [f32; 3]) -> Self {
        let mut lut = [[0f32; 256]; CHANNELS];
        for (c, table) in lut.iter_mut().enumerate() {
            for (x, v) in table.iter_mut().enumerate() {
                *v = (x as f32 / 255.0 - mean[c]) / std[c];
            }
        }
        let inverse = std::array::from_fn(|c| (lut[c][0], 255.0 / (lut[c][255] - lut[c][0])));
        Normalize { lut, inverse }
    }

    /// Pixel `x`'s normalized value in channel `c`.
    #[inline]
    pub fn value(&self, c: usize, x: u8) -> f32 {
        self.lut[c][x as usize]
    }

    /// The pixel whose normalized value in channel `c` is exactly `v`, if one is.
    #[inline]
    pub fn pixel(&self, c: usize, v: f32) -> Option<u8> {
        // Normalizing is increasing for a positive std: invert it, round, then check, so only
        // exact values pass (a std of 0 or below, or NaN, leaves no pixel to find).
        let table = &self.lut[c];
        let (lo, per) = self.inverse[c];
        // Rounded by adding a half and truncating: `f32::round` is a libm call, and this runs for
        // every value of an image.
        let guess = (v - lo) * per + 0.5;
        if !(0.0..256.0).contains(&guess) {
            return None;
        }
        let x = guess as usize;
        if table[x] == v {
            return Some(x as u8);
        }
        // Rounding in the guess can land one off.
        [x.saturating_sub(1), (x + 1).min(255)].into_iter().find(|&x| table[x] == v).map(|x| x as u8)
    }

    /// Normalizes one planar `[3, H, W]` image into `out` (as long as `pixels`).
    #[inline]
    pub fn image(&self, pixels: &[u8], out: &mut [f32]) {
        debug_assert_eq!(pixels.len(), out.len());
        let side = pixels.len() / CHANNELS;
        for c in 0..CHANNELS {
            let plane = c * side..(c + 1) * side;
            for (o, &p) in out[plane.clone()].iter_mut().zip(&pixels[plane]) {
                *o = self.lut[c][p as usize];
            }
        }
    }
}

/// The temporary files `cifar-prep` writes in `dir` (`.cifar-prep-*.<pid>.tmp`), with the pid of
/// the process that writes each.
fn temporaries(dir: &Path) -> Vec<(PathBuf, u32)> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    entries
        .filter_map(|e| {
            let path = e.ok()?.path();
            let name = path.file_name()?.to_str()?.to_string();
            let rest = name.strip_prefix(".cifar-prep-")?.strip_suffix(".tmp")?;
            let pid = rest.rsplit_once('.')?.1.parse().ok()?;
            Some((path, pid))
        })
        .collect()
}

/// Removes this process's temporary files in `dir`: what an interrupted conversion leaves.
pub fn remove_own_temporaries(dir: &Path) {
    for (path, pid) in temporaries(dir) {
        if pid == std::process::id() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Removes temporary files in `dir` left by conversions whose process no longer runs (killed
/// before it could clean up). Those of running conversions are left alone.
pub fn remove_stale_temporaries(dir: &Path) {
    // Whether a process runs is read from /proc: elsewhere nothing is removed.
    if !cfg!(target_os = "linux") {
        return;
    }
    for (path, pid) in temporaries(dir) {
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// One split's tensor file being written.
pub struct TensorFileWriter {
    tmp: PathBuf,
    /// Where the images start: the header's room in front.
    data_start: u64,
    file: Option<File>,
    dtype: StoreDtype,
    /// `(height, width)` of every image.
    side: (usize, usize),
    images: usize,
    labels: Vec<i64>,
    coarse: Vec<i64>,
}

impl TensorFileWriter {
    /// Opens a temporary file beside `final_dir/<tag>` (so the rename is atomic), for CIFAR's
    /// 32×32 images.
    pub fn create(dir: &Path, tag: &str, dtype: StoreDtype) -> Result<Self> {
        Self::with_side(dir, tag, dtype, (SIDE, SIDE))
    }

    /// As [`TensorFileWriter::create`], for images of `(height, width)`.
    pub fn with_side(dir: &Path, tag: &str, dtype: StoreDtype, side: (usize, usize)) -> Result<Self> {
        Self::with_room(dir, tag, dtype, side, DATA_START)
    }

    fn with_room(
        dir: &Path,
        tag: &str,
        dtype: StoreDtype,
        side: (usize, usize),
        data_start: u64,
    ) -> Result<Self> {
        let tmp = dir.join(format!(".{tag}.{}.tmp", std::process::id()));
        let mut file = OpenOptions::new().write(true).create(true).truncate(true).open(&tmp).at(&tmp)?;
        file.seek(SeekFrom::Start(data_start)).at(&tmp)?;
        Ok(TensorFileWriter {
            tmp,
            data_start,
            file: Some(file),
            dtype,
            side,
            images: 0,
            labels: Vec::new(),
            coarse: Vec::new(),
        })
    }

    /// As [`TensorFileWriter::with_side`], for exactly `labels.len()` images that
    /// [`TensorFileWriter::put`] writes at their places, in any order and from any thread;
    /// `labels` are theirs, in order. `header_room` bytes (see [`header_room`]) are reserved in
    /// front for the header.
    pub fn placed(
        dir: &Path,
        tag: &str,
        dtype: StoreDtype,
        side: (usize, usize),
        labels: Vec<i64>,
        header_room: u64,
    ) -> Result<Self> {
        let mut w = Self::with_room(dir, tag, dtype, side, header_room)?;
        w.images = labels.len();
        w.labels = labels;
        Ok(w)
    }

    /// Bytes one image takes in the file.
    fn image_bytes(&self) -> usize {
        CHANNELS * self.side.0 * self.side.1 * self.dtype.size()
    }

    /// Writes image `index` (planar `[3, H, W]` bytes of this writer's size) at its place,
    /// normalized with `norm` when storing f32.
    pub fn put(&self, index: usize, pixels: &[u8], norm: &Normalize) -> Result<()> {
        debug_assert!(index < self.images);
        debug_assert_eq!(pixels.len() * self.dtype.size(), self.image_bytes());
        let file = self.file.as_ref().expect("put after finish");
        let at = self.data_start + (index * self.image_bytes()) as u64;
        match self.dtype {
            StoreDtype::U8 => file.write_all_at(pixels, at).at(&self.tmp),
            StoreDtype::F32 => {
                let mut floats = vec![0f32; pixels.len()];
                norm.image(pixels, &mut floats);
                file.write_all_at(bytemuck::cast_slice(&floats), at).at(&self.tmp)
            }
        }
    }

    /// Reads back the stored bytes of images `first..first + n` (a u8 file's pixels) into `out`.
    pub fn read_back(&self, first: usize, out: &mut [u8]) -> Result<()> {
        let file = self.file.as_ref().expect("read after finish");
        file.read_exact_at(out, self.data_start + (first * self.image_bytes()) as u64).at(&self.tmp)
    }

    /// Images written so far (for a placed writer, the images it holds).
    pub fn images(&self) -> usize {
        self.images
    }

    /// Appends a batch of records (images of this writer's size), normalized with `norm` when
    /// storing f32.
    pub fn push(&mut self, records: &Records, norm: &Normalize) -> Result<()> {
        let per_image = CHANNELS * self.side.0 * self.side.1;
        debug_assert_eq!(records.pixels.len(), records.len() * per_image);
        let file = self.file.as_mut().expect("push after finish");
        match self.dtype {
            StoreDtype::U8 => file.write_all(&records.pixels).at(&self.tmp)?,
            StoreDtype::F32 => {
                // About 4 MiB at a time (at least one image): large writes, little memory,
                // whatever the images' size.
                let chunk_images = ((1 << 20) / per_image).max(1);
                let mut floats = vec![0f32; chunk_images.min(records.len().max(1)) * per_image];
                for chunk in records.pixels.chunks(chunk_images * per_image) {
                    let n = chunk.len() / per_image;
                    for (img, out) in chunk.chunks_exact(per_image).zip(floats.chunks_exact_mut(per_image)) {
                        norm.image(img, out);
                    }
                    // Little-endian on every target this builds for (x86-64, aarch64).
                    file.write_all(bytemuck::cast_slice(&floats[..n * per_image])).at(&self.tmp)?;
                }
            }
        }
        // Flush each batch to disk now, while the reader decompresses the next, rather than
        // all 614 MB in the final sync.
        file.sync_data().at(&self.tmp)?;
        self.images += records.len();
        self.labels.extend_from_slice(&records.labels);
        if let Some(c) = &records.coarse {
            self.coarse.extend_from_slice(c);
        }
        Ok(())
    }

    /// Writes labels and header and syncs; `Sealed::persist` then gives the file its name, so
    /// that several splits appear only once all of them are complete.
    pub fn finish(mut self, metadata: HashMap<String, String>) -> Result<Sealed> {
        let file = self.file.as_mut().expect("finish twice");
        let n = self.images;
        let (h, w) = self.side;
        let image_bytes = n * CHANNELS * h * w * self.dtype.size();
        // Placed writers wrote out of order: the labels go after the last image's place.
        file.seek(SeekFrom::Start(self.data_start + image_bytes as u64)).at(&self.tmp)?;
        let dtype = match self.dtype {
            StoreDtype::F32 => Dtype::F32,
            StoreDtype::U8 => Dtype::U8,
        };
        let mut tensors = vec![
            (
                "images".to_string(),
                TensorInfo { dtype, shape: vec![n, CHANNELS, h, w], data_offsets: (0, image_bytes) },
            ),
            (
                "labels".to_string(),
                TensorInfo {
                    dtype: Dtype::I64,
                    shape: vec![n],
                    data_offsets: (image_bytes, image_bytes + 8 * n),
                },
            ),
        ];
        let mut tail: Vec<u8> = self.labels.iter().flat_map(|l| l.to_le_bytes()).collect();
        if !self.coarse.is_empty() {
            let start = image_bytes + 8 * n;
            tensors.push((
                "coarse_labels".to_string(),
                TensorInfo { dtype: Dtype::I64, shape: vec![n], data_offsets: (start, start + 8 * n) },
            ));
            tail.extend(self.coarse.iter().flat_map(|l| l.to_le_bytes()));
        }
        file.write_all(&tail).at(&self.tmp)?;
        let size = write_header(file, &self.tmp, self.data_start, metadata, tensors)?;
        self.file = None;
        Ok(Sealed { tmp: std::mem::take(&mut self.tmp), size })
    }
}

/// Writes the safetensors header of `tensors` and `metadata` into the room reserved at the
/// start of `file` (its data from `data_start` on already written), syncs it, and returns the
/// file's size. Both writers' last step: the header goes in last, so a file cut short anywhere
/// has no valid header.
pub(super) fn write_header(
    file: &mut File,
    tmp: &Path,
    data_start: u64,
    metadata: HashMap<String, String>,
    tensors: Vec<(String, TensorInfo)>,
) -> Result<u64> {
    let header =
        Metadata::new(Some(metadata), tensors).map_err(|e| Error::format(tmp, format!("header: {e}")))?;
    let mut header = serde_json::to_vec(&header).expect("header serializes");
    let room = (data_start - 8) as usize;
    if header.len() > room {
        // The room was sized for the names given up front: a bug, not the input's fault.
        return Err(Error::format(
            tmp,
            format!("header of {} bytes exceeds the {room} reserved for it", header.len()),
        ));
    }
    header.resize(room, b' ');
    file.seek(SeekFrom::Start(0)).at(tmp)?;
    file.write_all(&(room as u64).to_le_bytes()).at(tmp)?;
    file.write_all(&header).at(tmp)?;
    file.sync_all().at(tmp)?;
    Ok(file.metadata().at(tmp)?.len())
}

/// A complete, synced tensor file still under its temporary name (removed if dropped).
pub struct Sealed {
    tmp: PathBuf,
    /// Its size in bytes.
    pub size: u64,
}

impl Sealed {
    /// A complete, synced file at `tmp` of `size` bytes.
    pub(crate) fn new(tmp: PathBuf, size: u64) -> Self {
        Sealed { tmp, size }
    }

    /// Renames it to `path`, atomically replacing any earlier file there.
    pub fn persist(self, path: &Path) -> Result<()> {
        std::fs::rename(&self.tmp, path).at(path)
    }
}

impl Drop for Sealed {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.tmp);
    }
}

impl Drop for TensorFileWriter {
    /// An unfinished file is removed: a failed run leaves no partial output behind.
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.tmp);
    }
}

#[cfg(test)]
mod tests {
    use super::Normalize;

    #[test]
    fn every_normalized_pixel_maps_back_to_its_pixel_and_nothing_else_does() {
        let cases = [
            ([0.5; 3], [0.5; 3]),
            ([0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]),
            ([0.0; 3], [1.0; 3]),
        ];
        for (mean, std) in cases {
            let n = Normalize::new(mean, std);
            for c in 0..3 {
                for x in 0..=255u8 {
                    let v = n.value(c, x);
                    assert_eq!(n.pixel(c, v), Some(x), "{mean:?} {std:?} channel {c} pixel {x}");
                    // Between two pixels' values lies no pixel.
                    let between = f32::from_bits(v.to_bits() + 1);
                    if x < 255 && between < n.value(c, x + 1) {
                        assert_eq!(n.pixel(c, between), None);
                    }
                }
                assert_eq!(n.pixel(c, f32::NAN), None);
                assert_eq!(n.pixel(c, n.value(c, 255) + 1.0), None);
            }
        }
    }
}
