//! One image file's bytes to planar RGB, as Pillow's `convert("RGB")` gives them, and refused
//! where decoding it would cost more than it weighs or Pillow would refuse it: more pixels
//! than the limit (read from the header, before a pixel is decoded), a file cut short, no
//! pixels at all. [`MemoryBudget`] bounds what the decoders of one conversion hold together.
use std::path::Path;
use std::sync::{Condvar, Mutex};

use image::imageops::FilterType;

use super::layout::CHANNELS;
use crate::error::{Error, IoContext, Result};

/// The default pixel limit: Pillow's `Image.MAX_IMAGE_PIXELS`. Pillow only warns above it (and
/// refuses at twice it); this refuses above it, which is at least as safe.
pub const MAX_IMAGE_PIXELS: u64 = 89_478_485;

/// Bytes that decoding an image of `(width, height)` and resizing it to `out` (`(height, width)`)
/// may hold at once, at most: the decoder's native pixels (up to 16 bytes a pixel, RGBA f32),
/// their RGB copy, the resize's f32 intermediate and the planar result.
pub fn decode_cost((w, h): (u32, u32), out: Option<(u32, u32)>) -> u64 {
    let src = w as u64 * h as u64;
    let (oh, ow) = out.map_or((h as u64, w as u64), |(oh, ow)| (oh as u64, ow as u64));
    src * (16 + 3) + 16 * w as u64 * oh + 2 * 3 * oh * ow
}

/// The `(width, height)` an image file declares, read from its header alone.
pub fn dimensions(bytes: &[u8], path: &Path) -> Result<(u32, u32)> {
    if bytes.is_empty() {
        return Err(Error::format(path, "is empty (0 bytes), not an image"));
    }
    if crate::decode::jpeg::is_jpeg(bytes) {
        return crate::decode::jpeg::header(bytes)
            .map(|(h, w)| (w, h))
            .map_err(|e| Error::format(path, format!("cannot be decoded as a JPEG: {e}")));
    }
    image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .at(path)?
        .into_dimensions()
        .map_err(|e| Error::format(path, format!("cannot be decoded as an image: {e}")))
}

/// Decodes one image file's bytes to planar RGB (`convert("RGB")`, as `ImageFolder`'s loader
/// does), resized (bilinear, antialiased) to `size` `(height, width)` when given. Returns
/// `(height, width, pixels)`. JPEGs go through libjpeg-turbo's decoder, as in Pillow, so the
/// pixels are torchvision's; other formats through the `image` crate. An image of more than
/// `max_pixels` pixels, of none, or cut short (Pillow's "image file is truncated") is an error
/// naming `path`.
pub fn decode(
    bytes: &[u8],
    size: Option<(u32, u32)>,
    max_pixels: u64,
    path: &Path,
) -> Result<(u32, u32, Vec<u8>)> {
    let (w, h) = dimensions(bytes, path)?;
    check_pixels((w, h), max_pixels, path)?;
    decode_checked(bytes, (w, h), size, path)
}

/// [`decode`] of an image whose header declared `(w, h)`, already checked against the limit.
pub(crate) fn decode_checked(
    bytes: &[u8],
    (w, h): (u32, u32),
    size: Option<(u32, u32)>,
    path: &Path,
) -> Result<(u32, u32, Vec<u8>)> {
    let rgb = decode_rgb(bytes, (w, h), path)?;
    let mut rgb = image::RgbImage::from_raw(w, h, rgb).expect("decode_rgb gives w*h pixels");
    if let Some((h, w)) = size
        && rgb.dimensions() != (w, h)
    {
        rgb = image::imageops::resize(&rgb, w, h, FilterType::Triangle);
    }
    let (w, h) = rgb.dimensions();
    let plane = (w * h) as usize;
    let mut chw = vec![0u8; CHANNELS * plane];
    for (i, px) in rgb.pixels().enumerate() {
        for c in 0..CHANNELS {
            chw[c * plane + i] = px.0[c];
        }
    }
    Ok((h, w, chw))
}

/// The RGB pixels (rows of `w` pixels, 3 bytes each) of an image whose header declared `(w,
/// h)`, already checked against the limit: `convert("RGB")`'s, with JPEGs (CMYK ones too)
/// through libjpeg-turbo as Pillow decodes them and other formats through the `image` crate.
pub fn decode_rgb(bytes: &[u8], (w, h): (u32, u32), path: &Path) -> Result<Vec<u8>> {
    if crate::decode::jpeg::is_jpeg(bytes) {
        let whole = crate::geometry::Rect::whole((h, w));
        let block = crate::decode::jpeg::decode(bytes, |found| {
            if found != (h, w) {
                return Err(format!("declares {w}x{h} in one header and {}x{} in another", found.1, found.0));
            }
            Ok(crate::decode::Plan { region: whole, scale: 1 })
        })
        .map_err(|msg| Error::format(path, format!("cannot be decoded as a JPEG: {msg}")))?;
        // The whole image decodes with no margin to trim.
        debug_assert_eq!((block.width, block.height), (w as usize, h as usize));
        let rgb = block
            .pixels
            .chunks_exact(crate::decode::resample::PIXEL)
            .flat_map(|p| [p[0], p[1], p[2]])
            .collect();
        block.recycle();
        return Ok(rgb);
    }
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format().at(path)?;
    // The pixel count is checked above; the allocation bound backs it for decoders that
    // allocate more than the header says.
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(decode_cost((w, h), None).max(512 << 20));
    reader.limits(limits);
    let rgb = reader
        .decode()
        .map_err(|e| Error::format(path, format!("cannot be decoded as an image: {e}")))?
        .into_rgb8();
    if rgb.dimensions() != (w, h) {
        return Err(Error::format(
            path,
            format!("declares {w}x{h} in its header but decodes to {}x{}", rgb.width(), rgb.height()),
        ));
    }
    Ok(rgb.into_raw())
}

/// Refuses an image of no pixels, or of more than `max_pixels`.
pub fn check_pixels((w, h): (u32, u32), max_pixels: u64, path: &Path) -> Result<()> {
    let pixels = w as u64 * h as u64;
    if pixels == 0 {
        return Err(Error::format(path, format!("is {w}x{h}: an image with no pixels")));
    }
    if pixels > max_pixels {
        return Err(Error::format(
            path,
            format!(
                "is {w}x{h} ({pixels} pixels), above the limit of {max_pixels} pixels (a \
                 decompression bomb, or an image too large to convert): pass --max-image-pixels N \
                 (max_image_pixels= in Python) to raise it"
            ),
        ));
    }
    Ok(())
}

/// Bytes of memory shared by the decoders of one conversion: each takes what its image may
/// cost ([`decode_cost`]) before decoding and gives it back once the pixels are written, so
/// that together they never hold more than the budget (an image larger than all of it waits
/// to run alone).
pub struct MemoryBudget {
    total: u64,
    used: Mutex<u64>,
    freed: Condvar,
}

/// A share of a [`MemoryBudget`], given back when dropped.
pub struct Share<'a> {
    budget: &'a MemoryBudget,
    bytes: u64,
}

impl MemoryBudget {
    /// A budget of `total` bytes.
    pub fn new(total: u64) -> Self {
        MemoryBudget { total, used: Mutex::new(0), freed: Condvar::new() }
    }

    /// The budget a conversion takes on this machine: a quarter of the memory available now
    /// (1 GiB where that cannot be read).
    pub fn for_this_machine() -> Self {
        #[cfg(target_os = "linux")]
        let total = crate::store::available_memory().map_or(1 << 30, |m| m / 4);
        #[cfg(not(target_os = "linux"))]
        let total = 1u64 << 30;
        Self::new(total.max(64 << 20))
    }

    /// Bytes in all.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Waits until `bytes` fit beside what the others hold (or nothing else is held), then takes them.
    pub fn take(&self, bytes: u64) -> Share<'_> {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        while *used > 0 && *used + bytes > self.total {
            used = self.freed.wait(used).unwrap_or_else(|e| e.into_inner());
        }
        *used += bytes;
        Share { budget: self, bytes }
    }

    /// [`MemoryBudget::take`] for decoding the `(w, h)` image `path` at `cost` bytes
    /// ([`decode_cost`]); an image that would need more than twice the whole budget (more than
    /// half the memory available) is refused instead, naming it.
    pub fn take_for_image(&self, (w, h): (u32, u32), cost: u64, path: &Path) -> Result<Share<'_>> {
        if cost > 2 * self.total {
            return Err(Error::format(
                path,
                format!(
                    "is {w}x{h}: decoding it needs about {:.1} GB, more than half the memory available",
                    cost as f64 / 1e9
                ),
            ));
        }
        Ok(self.take(cost))
    }
}

impl Drop for Share<'_> {
    fn drop(&mut self) {
        let mut used = self.budget.used.lock().unwrap_or_else(|e| e.into_inner());
        *used -= self.bytes;
        self.budget.freed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_wait_for_room_and_a_large_one_runs_alone() {
        let budget = MemoryBudget::new(100);
        let a = budget.take(60);
        let taken = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                let _b = budget.take(150); // larger than the whole budget: waits for `a`
                taken.store(true, std::sync::atomic::Ordering::SeqCst);
            });
            std::thread::sleep(std::time::Duration::from_millis(50));
            assert!(!taken.load(std::sync::atomic::Ordering::SeqCst), "took room it did not have");
            drop(a);
        });
        assert!(taken.load(std::sync::atomic::Ordering::SeqCst));
        assert_eq!(*budget.used.lock().unwrap(), 0);
    }
}
