//! The encoded tensor file, opened: images of every size kept as their encoded bytes (JPEGs as
//! they were, others as lossless PNG), in a safetensors file that any safetensors reader opens:
//!
//! | tensor | dtype, shape | what |
//! |---|---|---|
//! | `images` | u8 `[B]` | every image's bytes, one after the other |
//! | `offsets` | i64 `[N, 2]` | image `i` is `images[offsets[i, 0]:offsets[i, 1]]` |
//! | `sizes` | i64 `[N, 2]` | its `(height, width)` |
//! | `labels` | i64 `[N]` | its class |
//!
//! and in the metadata `layout: "encoded"`, the class names and the source's checksum. The
//! header and every offset and size are checked against the file before it is mapped, so a
//! corrupt file is an error at open, never a read past the map later.
use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;

use safetensors::Dtype;

use super::Header;
use super::mapped::Mapped;
use crate::error::{Error, Result};

/// The largest side an encoded image may declare: JPEG's own limit.
pub const MAX_SIDE: i64 = 65_535;

/// An encoded split, mapped and validated. Its map follows [`super::TensorFile`]'s contract.
pub struct EncodedFile {
    map: Mapped,
    len: usize,
    images: Range<usize>,
    offsets: Range<usize>,
    sizes: Range<usize>,
    labels: Range<usize>,
    metadata: HashMap<String, String>,
    classes: Vec<String>,
}

impl std::fmt::Debug for EncodedFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncodedFile").field("path", &self.map.path()).field("len", &self.len).finish()
    }
}

impl EncodedFile {
    /// Opens and validates `path`: every tensor's extent, dtype and shape, every image's byte
    /// range (inside `images`) and size (positive, at most [`MAX_SIDE`] a side), every label
    /// (within the classes named).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bad = |msg: String| Error::format(path, msg);
        let Header { file, file_len, header, data_start } = Header::read(path)?;
        let metadata = header.metadata().clone().unwrap_or_default();
        if metadata.get("layout").map(String::as_str) != Some("encoded") {
            return Err(bad("is not an encoded tensor file (no layout \"encoded\" in its metadata)".into()));
        }
        let tensor = |name: &str, dtype: Dtype, dims: usize| -> Result<(Range<usize>, Vec<usize>)> {
            let info = header.info(name).ok_or_else(|| bad(format!("no '{name}' tensor")))?;
            if info.dtype != dtype || info.shape.len() != dims {
                return Err(bad(format!(
                    "'{name}' is {:?} {:?}, expected {dtype:?} of {dims} dimensions",
                    info.dtype, info.shape
                )));
            }
            let r = data_start + info.data_offsets.0..data_start + info.data_offsets.1;
            if r.start % (dtype.bitsize() / 8) != 0 {
                return Err(bad(format!("'{name}' is not {}-byte aligned", dtype.bitsize() / 8)));
            }
            Ok((r, info.shape.clone()))
        };
        let (images, _) = tensor("images", Dtype::U8, 1)?;
        let (labels, shape) = tensor("labels", Dtype::I64, 1)?;
        let len = shape[0];
        for name in ["offsets", "sizes"] {
            let (_, shape) = tensor(name, Dtype::I64, 2)?;
            if shape != [len, 2] {
                return Err(bad(format!("'{name}' is {shape:?}, expected [{len}, 2] (one row an image)")));
            }
        }
        let (offsets, _) = tensor("offsets", Dtype::I64, 2)?;
        let (sizes, _) = tensor("sizes", Dtype::I64, 2)?;
        let classes: Vec<String> = match metadata.get("classes").map(|v| serde_json::from_str(v)) {
            Some(Ok(c)) => c,
            Some(Err(e)) => return Err(bad(format!("metadata 'classes': {e}"))),
            None => Vec::new(),
        };
        crate::prep::check_class_count(classes.len(), path)?;

        let map = Mapped::new(path, file, file_len)?;
        let out = EncodedFile { map, len, images, offsets, sizes, labels, metadata, classes };
        out.check_index()?;
        Ok(out)
    }

    /// Every image's range, size and label, checked.
    fn check_index(&self) -> Result<()> {
        let bad = |msg: String| Error::format(self.map.path(), msg);
        let blob = self.images.len() as i64;
        let offsets = self.offsets();
        let sizes = self.sizes_raw();
        for i in 0..self.len {
            let (start, end) = (offsets[2 * i], offsets[2 * i + 1]);
            if start < 0 || end < start || end > blob {
                return Err(bad(format!(
                    "image {i}'s bytes {start}..{end} lie outside the {blob} bytes of 'images'"
                )));
            }
            let (h, w) = (sizes[2 * i], sizes[2 * i + 1]);
            if !(1..=MAX_SIDE).contains(&h) || !(1..=MAX_SIDE).contains(&w) {
                return Err(bad(format!("image {i} is {w}x{h}: each side must be 1 to {MAX_SIDE}")));
            }
        }
        let named = !self.classes.is_empty();
        let classes = if named { self.classes.len() } else { crate::prep::MAX_CLASSES };
        if let Some(i) = self.labels().iter().position(|&l| l < 0 || l as usize >= classes) {
            return Err(bad(format!("label {} of image {i} is out of range", self.labels()[i])));
        }
        Ok(())
    }

    fn offsets(&self) -> &[i64] {
        bytemuck::cast_slice(&self.map[self.offsets.clone()])
    }

    fn sizes_raw(&self) -> &[i64] {
        bytemuck::cast_slice(&self.map[self.sizes.clone()])
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        self.map.path()
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Image `i`'s encoded bytes, straight from the map. Panics if `i >= len()`.
    pub fn image(&self, i: usize) -> &[u8] {
        let o = self.offsets();
        &self.map[self.images.start + o[2 * i] as usize..self.images.start + o[2 * i + 1] as usize]
    }

    /// Image `i`'s `(height, width)`. Panics if `i >= len()`.
    pub fn size(&self, i: usize) -> (u32, u32) {
        let s = self.sizes_raw();
        (s[2 * i] as u32, s[2 * i + 1] as u32)
    }

    /// All labels, straight from the map.
    pub fn labels(&self) -> &[i64] {
        bytemuck::cast_slice(&self.map[self.labels.clone()])
    }

    /// Class names, in label order.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    /// The header's `__metadata__` strings.
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    /// Bytes of encoded images in all.
    pub fn image_bytes(&self) -> usize {
        self.images.len()
    }

    /// As `TensorFile::survive_truncation`: a truncation under the map reads zeros
    /// and is reported by [`EncodedFile::check_intact`], which the reader calls after reading.
    pub fn survive_truncation(mut self) -> Self {
        self.map.survive_truncation();
        self
    }

    /// Whether every read of the map so far found the file whole, and it still has its length
    /// (a cut inside a page reads zeros that no fault shows).
    pub fn check_intact(&self, doing: &str) -> Result<()> {
        self.map.check_whole(doing)?;
        self.map.check_length(doing)
    }
}
