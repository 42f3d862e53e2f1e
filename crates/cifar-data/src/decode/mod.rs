//! One image's bytes into one sample of a batch, as a [`Geometry`] says: only the region the
//! output needs decoded (JPEGs at a DCT scaling where the output is at least half as small,
//! and only the rows and columns of the region), resized as Pillow resizes (torchvision's
//! `Resize` and `RandomResizedCrop` on PIL images), cropped to the window, mirrored, and
//! written straight into the batch buffer as `uint8` or normalized `float32`.
//!
//! JPEGs go through libjpeg-turbo ([`jpeg`]); every other format through the `image` crate,
//! whole, as [`crate::prep::image`] decodes it (Pillow's `convert("RGB")`'s pixels).
pub mod jpeg;
pub mod resample;

use self::resample::PIXEL;
use std::path::Path;

use crate::error::{Error, Result};
use crate::geometry::{Geometry, Rect};
use crate::prep::Normalize;

/// What of an image to decode: `region` (in the image's pixels) at 1/`scale` (1, 2, 4 or 8;
/// only JPEGs decode at another scale than 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// The part of the image the output needs.
    pub region: Rect,
    /// The DCT scaling's denominator.
    pub scale: u32,
}

/// Where one sample goes: `C*H*W` bytes, or values normalized (`ToTensor` then `Normalize`).
pub enum Out<'a> {
    /// `uint8` (`ToImage`, `PILToTensor`).
    U8(&'a mut [u8]),
    /// `float32`, normalized.
    F32(&'a mut [f32], &'a Normalize),
}

impl Out<'_> {
    fn len(&self) -> usize {
        match self {
            Out::U8(o) => o.len(),
            Out::F32(o, _) => o.len(),
        }
    }
}

/// How to decode.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// The most pixels an image may declare (refused above, before decoding).
    pub max_pixels: u64,
    /// Decode JPEGs at a DCT scaling of 1/2, 1/4 or 1/8 where the region is that many times
    /// the resized size or more. Faster; the pixels then differ a little from a whole decode
    /// and resize (which Pillow's own `draft` does too).
    pub dct_scaling: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options { max_pixels: crate::prep::image::MAX_IMAGE_PIXELS, dct_scaling: true }
    }
}

/// An image's `(height, width)`, from its header alone.
pub fn size(bytes: &[u8], path: &Path) -> Result<(u32, u32)> {
    if jpeg::is_jpeg(bytes) {
        return jpeg::header(bytes)
            .map_err(|e| Error::format(path, format!("cannot be decoded as a JPEG: {e}")));
    }
    let (w, h) = crate::prep::image::dimensions(bytes, path)?;
    Ok((h, w))
}

/// Renders the image `bytes` (named `path` in errors) into `out` as `g` says. `out` holds
/// `3 × g.output()` values.
pub fn render(bytes: &[u8], g: &Geometry, out: Out<'_>, opts: &Options, path: &Path) -> Result<()> {
    let (oh, ow) = g.output();
    assert_eq!(out.len(), 3 * oh as usize * ow as usize, "the output holds the window");
    let block = if jpeg::is_jpeg(bytes) {
        if !jpeg::ends_whole(bytes) {
            return Err(Error::format(
                path,
                "image file is truncated (no end-of-image marker after its last scan)",
            ));
        }
        jpeg::decode(bytes, |size| plan(g, size, opts))
            .map_err(|e| Error::format(path, format!("cannot be decoded as a JPEG: {e}")))?
    } else {
        whole(bytes, opts, path)?
    };
    let r = g.region;
    let (h, w) = (block.scaled.0 * block.scale as usize, block.scaled.1 * block.scale as usize);
    if r.top < 0
        || r.left < 0
        || r.top as usize + r.height as usize > h
        || r.left as usize + r.width as usize > w
    {
        return Err(Error::format(path, format!("the region {r:?} lies outside the {w}x{h} image")));
    }
    resize_into(&block, g, out);
    block.recycle();
    Ok(())
}

/// RGB pixels (3 bytes each) as RGBX.
pub fn rgbx(rgb: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; rgb.len() / 3 * PIXEL];
    for (o, i) in out.chunks_exact_mut(PIXEL).zip(rgb.chunks_exact(3)) {
        o[..3].copy_from_slice(i);
    }
    out
}

/// Renders RGB `pixels` (rows of `size.1` pixels) into `out` as `g` says.
pub fn render_rgb(
    pixels: &[u8],
    (h, w): (u32, u32),
    g: &Geometry,
    out: Out<'_>,
) -> std::result::Result<(), String> {
    let r = g.region;
    if r.top < 0
        || r.left < 0
        || r.top as u64 + r.height as u64 > h as u64
        || r.left as u64 + r.width as u64 > w as u64
    {
        return Err(format!("the region {r:?} lies outside the {w}x{h} image"));
    }
    let block = jpeg::Block {
        pixels: rgbx(pixels).into(),
        width: w as usize,
        height: h as usize,
        top: 0,
        left: 0,
        scaled: (h as usize, w as usize),
        scale: 1,
    };
    resize_into(&block, g, out);
    Ok(())
}

/// A non-JPEG image decoded whole, as one block.
fn whole(bytes: &[u8], opts: &Options, path: &Path) -> Result<jpeg::Block<'static>> {
    let (w, h) = crate::prep::image::dimensions(bytes, path)?;
    crate::prep::image::check_pixels((w, h), opts.max_pixels, path)?;
    let rgb = crate::prep::image::decode_rgb(bytes, (w, h), path)?;
    Ok(jpeg::Block {
        pixels: rgbx(&rgb).into(),
        width: w as usize,
        height: h as usize,
        top: 0,
        left: 0,
        scaled: (h as usize, w as usize),
        scale: 1,
    })
}

/// What of a JPEG of `(h, w)` to decode for `g`: the region the window's pixels are made from
/// (with the filter's reach), at the DCT scale the resize allows.
fn plan(g: &Geometry, (h, w): (u32, u32), opts: &Options) -> std::result::Result<Plan, String> {
    let pixels = h as u64 * w as u64;
    if pixels == 0 {
        return Err(format!("is {w}x{h}: an image with no pixels"));
    }
    if pixels > opts.max_pixels {
        return Err(format!(
            "is {w}x{h} ({pixels} pixels), above the limit of {} pixels (a decompression bomb, or an image \
             too large to load)",
            opts.max_pixels
        ));
    }
    let r = g.region;
    if r.top < 0 || r.left < 0 || r.top + r.height as i64 > h as i64 || r.left + r.width as i64 > w as i64 {
        return Err(format!(
            "the region {r:?} lies outside the {w}x{h} image (is the file's stored size right?)"
        ));
    }
    let (rh, rw) = g.resized;
    let mut scale = 1;
    if opts.dct_scaling {
        for s in [8u32, 4, 2] {
            if r.width >= s * rw && r.height >= s * rh {
                scale = s;
                break;
            }
        }
    }
    // The region's rows and columns the window needs, with the filter's reach.
    let reach = |start: i64, len: u32, out: u32, wstart: i64, wlen: u32| -> (i64, u32) {
        let f = len as f64 / out as f64;
        let support = f.max(1.0) + 1.0;
        let lo = (wstart.max(0) as f64 * f - support).floor().max(0.0) as i64;
        let hi =
            (((wstart + wlen as i64).min(out as i64)) as f64 * f + support).ceil().min(len as f64) as i64;
        (start + lo, (hi - lo).max(1) as u32)
    };
    let (top, height) = reach(r.top, r.height, rh, g.window.top, g.window.height);
    let (left, width) = reach(r.left, r.width, rw, g.window.left, g.window.width);
    Ok(Plan { region: Rect { top, left, height, width }, scale })
}

thread_local! {
    /// A worker's buffer for the resized window, reused from sample to sample.
    static WINDOW: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Resizes `g.region` of the decoded `block` to `g.resized` as Pillow does (the region taken as
/// an image of its own, as torchvision crops before it resizes: no pixel outside it is read),
/// keeps the window (zeros where it reaches past the resized image), mirrors it where
/// `g.flip`, and writes it into `out`, planar.
fn resize_into(block: &jpeg::Block<'_>, g: &Geometry, out: Out<'_>) {
    let s = block.scale as f64;
    let r = g.region;
    // The region's pixels at the block's scale: whole ones (fractional edges at a reduced
    // scale, given to the resize as its box), clipped to the image.
    let (top, left) = (r.top as f64 / s, r.left as f64 / s);
    let (bottom, right) = ((r.top + r.height as i64) as f64 / s, (r.left + r.width as i64) as f64 / s);
    let (ry0, rx0) = (top.floor() as usize, left.floor() as usize);
    let ry1 = (bottom.ceil() as usize).min(block.scaled.0);
    let rx1 = (right.ceil() as usize).min(block.scaled.1);
    let size = (ry1 - ry0, rx1 - rx0);
    let bbox = (left - rx0 as f64, top - ry0 as f64, right - rx0 as f64, bottom - ry0 as f64);
    // The block, as seen from the region: from the region's first row and column where the block
    // starts before them (its margin), else from the block's own first.
    let (skip_y, skip_x) = (ry0.saturating_sub(block.top), rx0.saturating_sub(block.left));
    let view = resample::View {
        data: &block.pixels,
        offset: PIXEL * (skip_y * block.width + skip_x),
        stride: PIXEL * block.width,
        width: block.width - skip_x,
        height: block.height - skip_y,
    };
    let at = (block.top.saturating_sub(ry0), block.left.saturating_sub(rx0));
    let (rh, rw) = (g.resized.0 as i64, g.resized.1 as i64);
    let w = g.window;
    // The window's rows and columns inside the resized image.
    let rows = w.top.clamp(0, rh) as usize..(w.top + w.height as i64).clamp(0, rh) as usize;
    let cols = w.left.clamp(0, rw) as usize..(w.left + w.width as i64).clamp(0, rw) as usize;
    let (oh, ow) = (w.height as usize, w.width as usize);
    WINDOW.with_borrow_mut(|buf| {
        buf.clear();
        buf.resize(PIXEL * rows.len() * cols.len(), 0);
        if block.scale == 1 && (rh, rw) == (r.height as i64, r.width as i64) {
            // Nothing resized: the window's pixels, copied from the region.
            for (k, y) in rows.clone().enumerate() {
                let src = view.offset + (y - at.0) * view.stride + PIXEL * (cols.start - at.1);
                buf[PIXEL * k * cols.len()..PIXEL * (k + 1) * cols.len()]
                    .copy_from_slice(&view.data[src..src + PIXEL * cols.len()]);
            }
        } else {
            let out_size = (rh as usize, rw as usize);
            resample::resize(&view, at, size, bbox, out_size, rows.clone(), cols.clone(), buf);
        }
        let dy = (rows.start as i64 - w.top) as usize;
        let dx = (cols.start as i64 - w.left) as usize;
        write_planar(buf, (rows.len(), cols.len()), (dy, dx), (oh, ow), g.flip, out);
    });
}

/// Writes the RGBX `pixels` (`rows × cols`) at `(dy, dx)` of an `oh × ow` output (zeros
/// elsewhere), planar, mirrored where `flip`. Row by row and plane by plane, so that every
/// write is the next value of one output row.
fn write_planar(
    pixels: &[u8],
    (rows, cols): (usize, usize),
    (dy, dx): (usize, usize),
    (oh, ow): (usize, usize),
    flip: bool,
    out: Out<'_>,
) {
    let plane = oh * ow;
    let padded = rows != oh || cols != ow;
    // The output row's columns a source row lands in: mirrored, `dx` from the right.
    let first = if flip { ow - dx - cols } else { dx };
    let rows = if cols == 0 { 0 } else { rows };
    let row_bytes = (PIXEL * cols).max(1);
    match out {
        Out::U8(o) => {
            if padded {
                o.fill(0);
            }
            for (y, src) in pixels.chunks_exact(row_bytes).take(rows).enumerate() {
                for c in 0..3 {
                    let at = c * plane + (dy + y) * ow + first;
                    let dst = &mut o[at..at + cols];
                    let values = src.chunks_exact(PIXEL).map(|px| px[c]);
                    if flip {
                        dst.iter_mut().rev().zip(values).for_each(|(d, v)| *d = v);
                    } else {
                        dst.iter_mut().zip(values).for_each(|(d, v)| *d = v);
                    }
                }
            }
        }
        Out::F32(o, norm) => {
            if padded {
                // torchvision pads with black pixels before ToTensor: 0 normalized.
                for c in 0..3 {
                    o[c * plane..(c + 1) * plane].fill(norm.value(c, 0));
                }
            }
            for (y, src) in pixels.chunks_exact(row_bytes).take(rows).enumerate() {
                for c in 0..3 {
                    let at = c * plane + (dy + y) * ow + first;
                    let dst = &mut o[at..at + cols];
                    let values = src.chunks_exact(PIXEL).map(|px| norm.value(c, px[c]));
                    if flip {
                        dst.iter_mut().rev().zip(values).for_each(|(d, v)| *d = v);
                    } else {
                        dst.iter_mut().zip(values).for_each(|(d, v)| *d = v);
                    }
                }
            }
        }
    }
}
