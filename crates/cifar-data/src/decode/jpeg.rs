//! JPEG through libjpeg-turbo (as mozjpeg builds it), decoding only what an output needs: at a
//! DCT scaling of 1/2, 1/4 or 1/8 where the output is that much smaller, only the iMCU columns
//! of the region (`jpeg_crop_scanline`), nothing above it (`jpeg_skip_scanlines`, which runs
//! the entropy decoder but not the inverse DCT) and nothing below it (the decode stops there).
//!
//! The pixels are Pillow's: libjpeg's accurate integer IDCT and fancy upsampling (Pillow's
//! defaults), grey and RGB files converted to RGB by libjpeg as Pillow's `convert("RGB")` does,
//! CMYK ones read with Adobe's inverted polarity and converted with Pillow's formula. The
//! decoded block reaches a margin of 16 pixels past the region on every side where the image
//! has them, so that the upsampling at the region's edges sees the neighbours it sees in a
//! whole decode. A file cut short, one of more scans than [`MAX_SCANS`] (a progressive bomb),
//! or one of more pixels than the caller's limit is an error, not a guess.
use std::panic::{AssertUnwindSafe, catch_unwind};

use mozjpeg_sys::{
    J_COLOR_SPACE, JDIMENSION, jpeg_abort_decompress, jpeg_common_struct, jpeg_create_decompress,
    jpeg_crop_scanline, jpeg_decompress_struct, jpeg_destroy_decompress, jpeg_error_mgr, jpeg_mem_src,
    jpeg_progress_mgr, jpeg_read_header, jpeg_read_scanlines, jpeg_skip_scanlines, jpeg_start_decompress,
    jpeg_std_error,
};

use super::Plan;

/// The most scans a progressive JPEG may have: real files have a few (at most tens); a
/// hostile one can repeat scans to make each pass over the coefficients cost the whole image.
pub const MAX_SCANS: i32 = 1000;

/// Pixels decoded beyond the region on each side (the largest iMCU is 16×16): the upsampling
/// of the region's edge pixels then reads the same neighbours as in a whole decode.
const MARGIN: u32 = 16;

/// Whether `bytes` starts like a JPEG.
pub fn is_jpeg(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0xFF, 0xD8, 0xFF])
}

/// Whether a JPEG's last scan is followed by its end-of-image marker: a file cut short in its
/// scan data has none (Pillow raises "image file is truncated" for it). Searched from the end,
/// past any bytes appended after the marker.
pub fn ends_whole(bytes: &[u8]) -> bool {
    let mut i = bytes.len();
    while i >= 2 {
        i -= 1;
        if bytes[i - 1] == 0xFF {
            match bytes[i] {
                0xD9 => return true,
                0xDA => return false,
                _ => {}
            }
        }
    }
    false
}

/// A region of a JPEG, decoded as RGBX (4 bytes a pixel) at a reduced scale: `height` rows of `width` pixels, the
/// first at `(top, left)` of the whole image at that scale, which is `scaled` `(height,
/// width)`.
#[derive(Debug)]
pub struct Block<'a> {
    /// Rows of pixels, 4 bytes a pixel (RGB and one unused), no padding.
    pub pixels: std::borrow::Cow<'a, [u8]>,
    /// Pixels a row.
    pub width: usize,
    /// Rows.
    pub height: usize,
    /// The block's first row in the scaled image.
    pub top: usize,
    /// The block's first column in the scaled image.
    pub left: usize,
    /// The whole image at this scale, `(height, width)`.
    pub scaled: (usize, usize),
    /// The scale's denominator: 1, 2, 4 or 8.
    pub scale: u32,
}

/// What a JPEG's header says: `(height, width)` and whether it is CMYK.
pub fn header(bytes: &[u8]) -> Result<(u32, u32), String> {
    run(bytes, |cinfo| Ok((cinfo.image_height, cinfo.image_width)))
}

/// Decodes the part of the JPEG `bytes` that `plan` asks for once the header's `(height,
/// width)` is known (the plan may refuse the image, or choose the region and scale from its
/// size).
pub fn decode(
    bytes: &[u8],
    plan: impl FnOnce((u32, u32)) -> Result<Plan, String>,
) -> Result<Block<'static>, String> {
    run(bytes, |cinfo| {
        let plan = plan((cinfo.image_height, cinfo.image_width))?;
        // SAFETY: `cinfo` holds a header just read from `bytes`, which outlive this call.
        unsafe { read_region(cinfo, &plan) }
    })
}

/// Runs `body` on a decompressor that has read `bytes`' header, turning libjpeg's errors (which
/// unwind out of its error manager) into `Err` and always freeing the decompressor.
fn run<T>(
    bytes: &[u8],
    body: impl FnOnce(&mut jpeg_decompress_struct) -> Result<T, String>,
) -> Result<T, String> {
    if !is_jpeg(bytes) {
        return Err("not a JPEG".into());
    }
    let result = catch_unwind(AssertUnwindSafe(|| {
        let mut err = strict_errors();
        let mut progress = jpeg_progress_mgr {
            progress_monitor: Some(limit_scans),
            pass_counter: 0,
            pass_limit: 0,
            completed_passes: 0,
            total_passes: 0,
        };
        // SAFETY: an all-zero `jpeg_decompress_struct` is what libjpeg's own examples start from
        // (`jpeg_create_decompress` fills it in); `err` and `progress` outlive `cinfo`'s use:
        // `Decompressor` destroys it before they are dropped.
        let mut cinfo: Box<jpeg_decompress_struct> = Box::new(unsafe { std::mem::zeroed() });
        cinfo.common.err = &mut err;
        // SAFETY: `cinfo` is zeroed with its error manager set, as `jpeg_create_decompress` needs.
        unsafe { jpeg_create_decompress(&mut *cinfo) };
        let mut d = Decompressor(cinfo);
        d.0.common.progress = &mut progress;
        // SAFETY: `bytes` outlives the decompressor, which reads them through the source
        // manager until it is destroyed at the end of this closure.
        unsafe {
            jpeg_mem_src(&mut d.0, bytes.as_ptr(), bytes.len() as _);
            jpeg_read_header(&mut d.0, 1);
        }
        body(&mut d.0)
    }));
    match result {
        Ok(r) => r,
        Err(panic) => Err(panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "corrupt JPEG data".into())),
    }
}

/// A live decompressor, destroyed (its memory freed) when dropped, on an error too.
struct Decompressor(Box<jpeg_decompress_struct>);

impl Drop for Decompressor {
    fn drop(&mut self) {
        // SAFETY: created by `jpeg_create_decompress` and not destroyed before; destroying one
        // mid-decompression (after an error, or an early stop) is what libjpeg documents.
        unsafe { jpeg_destroy_decompress(&mut self.0) };
    }
}

/// The block `plan` asks for, from a decompressor whose header is read.
///
/// # Safety
/// `cinfo` must have read a header with [`run`] (its source still alive).
unsafe fn read_region(cinfo: &mut jpeg_decompress_struct, plan: &Plan) -> Result<Block<'static>, String> {
    let cmyk = matches!(cinfo.jpeg_color_space, J_COLOR_SPACE::JCS_CMYK | J_COLOR_SPACE::JCS_YCCK);
    // RGBX: four bytes a pixel, as the resize reads them.
    cinfo.out_color_space = if cmyk { J_COLOR_SPACE::JCS_CMYK } else { J_COLOR_SPACE::JCS_EXT_RGBX };
    cinfo.scale_num = 1;
    cinfo.scale_denom = plan.scale;
    // SAFETY: the header is read and the output parameters set, as libjpeg requires.
    unsafe { jpeg_start_decompress(cinfo) };
    let scaled = (cinfo.output_height as usize, cinfo.output_width as usize);
    let s = plan.scale as f64;
    let region = plan.region;
    let lo = |start: i64| ((start as f64 / s).floor() as i64 - MARGIN as i64).max(0) as u32;
    let hi = |end: i64, n: usize| ((end as f64 / s).ceil() as i64 + MARGIN as i64).clamp(0, n as i64) as u32;
    let (y0, y1) = (lo(region.top), hi(region.top + region.height as i64, scaled.0));
    let (x0, x1) = (lo(region.left), hi(region.left + region.width as i64, scaled.1));
    if y1 <= y0 || x1 <= x0 {
        return Err(format!("region {region:?} lies outside the {}x{} image", scaled.1, scaled.0));
    }
    let (mut left, mut width): (JDIMENSION, JDIMENSION) = (x0, x1 - x0);
    if (width as usize) < scaled.1 {
        // SAFETY: called after `jpeg_start_decompress` and before any scanline is read; libjpeg
        // moves `left` down to an iMCU boundary and widens `width` to match, within the image.
        unsafe { jpeg_crop_scanline(cinfo, &mut left, &mut width) };
    }
    if y0 > 0 {
        // SAFETY: the source is a memory source (not suspending), as skipping requires.
        let skipped = unsafe { jpeg_skip_scanlines(cinfo, y0) };
        if skipped != y0 {
            return Err(format!("skipped {skipped} of {y0} rows"));
        }
    }
    let row = width as usize * 4;
    let rows = (y1 - y0) as usize;
    let mut pixels = take_buffer(row * rows);
    // Made once: libjpeg returns a row or two a call.
    let mut pointers: Vec<*mut u8> =
        pixels.chunks_exact_mut(row).take(rows).map(|r| r.as_mut_ptr()).collect();
    let mut done = 0;
    while done < rows {
        // SAFETY: each pointer is the start of a row of `row` bytes of `pixels`, the width libjpeg
        // writes a scanline of (the cropped width times the output components); the pointers
        // from `done` on are the `rows - done` rows not yet written.
        let n =
            unsafe { jpeg_read_scanlines(cinfo, pointers[done..].as_mut_ptr(), (rows - done) as JDIMENSION) };
        if n == 0 {
            return Err("libjpeg returned no rows".into());
        }
        done += n as usize;
    }
    // The rest of the image is not needed.
    // SAFETY: aborting is allowed at any point after the header; the decompressor is destroyed next.
    unsafe { jpeg_abort_decompress(cinfo) };
    if cmyk {
        cmyk_to_rgbx(&mut pixels);
    }
    Ok(Block {
        pixels: pixels.into(),
        width: width as usize,
        height: rows,
        top: y0 as usize,
        left: left as usize,
        scaled,
        scale: plan.scale,
    })
}

/// Pillow's CMYK → RGB for libjpeg's CMYK output, in place (RGBX): read with Adobe's polarity
/// (inverted, as Pillow's "CMYK;I" raw mode), then `cmyk2rgb`: `nk - nk·c/255` per channel,
/// `nk = 255 - k`, with its integer `MULDIV255`.
fn cmyk_to_rgbx(pixels: &mut [u8]) {
    let muldiv255 = |a: i32, b: i32| {
        let t = a * b + 128;
        ((t >> 8) + t) >> 8
    };
    for px in pixels.chunks_exact_mut(4) {
        let [c, m, y, k] = [px[0], px[1], px[2], px[3]].map(|v| 255 - v as i32);
        let nk = 255 - k;
        for (out, v) in px.iter_mut().zip([c, m, y]) {
            *out = (nk - muldiv255(v, nk)).clamp(0, 255) as u8;
        }
        px[3] = 255;
    }
}

thread_local! {
    /// A worker's decoded block, kept from image to image so that its memory is not asked of the
    /// allocator (and zeroed) each time; see [`Block::recycle`].
    static SPARE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A buffer of `len` bytes, this thread's spare where there is one.
fn take_buffer(len: usize) -> Vec<u8> {
    let mut buf = SPARE.with_borrow_mut(std::mem::take);
    buf.resize(len, 0);
    buf
}

impl Block<'_> {
    /// Gives an owned block's memory back to this thread, for the next decode.
    pub fn recycle(self) {
        if let std::borrow::Cow::Owned(buf) = self.pixels {
            SPARE.with_borrow_mut(|spare| {
                if buf.capacity() > spare.capacity() {
                    *spare = buf;
                }
            });
        }
    }
}

/// libjpeg's standard error manager, except that fatal errors unwind with libjpeg's message
/// (as mozjpeg's own manager does) and so does the warning that the data ended before the image
/// did: libjpeg then fills the rest with grey, where Pillow raises "image file is truncated".
/// Other warnings (extraneous bytes, a corrupt Huffman code) stay silent, as in Pillow.
pub(crate) fn strict_errors() -> jpeg_error_mgr {
    // SAFETY: an all-zero `jpeg_error_mgr` (null function pointers, zero counts) is a valid value
    // of this plain C struct, and `jpeg_std_error` only fills in its fields.
    let mut err: jpeg_error_mgr = unsafe { std::mem::zeroed() };
    // SAFETY: `err` is a live, exclusively borrowed error manager.
    unsafe { jpeg_std_error(&mut err) };
    err.error_exit = Some(unwind_on_error);
    err.emit_message = Some(unwind_on_truncation);
    err
}

/// libjpeg's message for the error or warning in `cinfo`.
fn message(cinfo: &mut jpeg_common_struct) -> String {
    // SAFETY: libjpeg calls the error manager's hooks only with `err` pointing at the live
    // manager it was created with.
    let format = unsafe { (*cinfo.err).format_message };
    let Some(format) = format else { return "corrupt JPEG data".into() };
    // The binding declares the buffer shared though libjpeg writes into it (mozjpeg casts it
    // so too): called through the signature libjpeg really has.
    type Format = unsafe extern "C-unwind" fn(&mut jpeg_common_struct, &mut [u8; 80]);
    // SAFETY: the two signatures differ only in the buffer's mutability, not in its ABI.
    let format: Format = unsafe { std::mem::transmute(format) };
    let mut buffer = [0u8; 80];
    // SAFETY: `format_message` writes a NUL-terminated message of at most 80 bytes
    // (JMSG_LENGTH_MAX) into the buffer it is given, reading only `cinfo`.
    unsafe { format(cinfo, &mut buffer) };
    let text = buffer.split(|&c| c == 0).next().unwrap_or_default();
    String::from_utf8_lossy(text).into_owned()
}

extern "C-unwind" fn unwind_on_error(cinfo: &mut jpeg_common_struct) {
    std::panic::resume_unwind(Box::new(message(cinfo)));
}

extern "C-unwind" fn unwind_on_truncation(cinfo: &mut jpeg_common_struct, level: std::ffi::c_int) {
    // SAFETY: as in `message`.
    let code = unsafe { (*cinfo.err).msg_code };
    if level < 0 && code == mozjpeg_sys::JWRN_JPEG_EOF as std::ffi::c_int {
        std::panic::resume_unwind(Box::new(format!("image file is truncated ({})", message(cinfo))));
    }
}

/// The progress monitor: refuses a file whose scans outnumber [`MAX_SCANS`].
extern "C-unwind" fn limit_scans(cinfo: &mut jpeg_common_struct) {
    if cinfo.is_decompressor == 0 {
        return;
    }
    // SAFETY: a decompressor's common part is the first field of its `jpeg_decompress_struct`
    // (`#[repr(C)]`), which is what libjpeg passes its progress monitor.
    let scans =
        unsafe { (*(cinfo as *mut jpeg_common_struct as *const jpeg_decompress_struct)).input_scan_number };
    if scans > MAX_SCANS {
        std::panic::resume_unwind(Box::new(format!(
            "has more than {MAX_SCANS} scans (a progressive JPEG built to cost more than it weighs)"
        )));
    }
}

/// Whether libjpeg-turbo was built with its SIMD code (x86-64 needs `nasm` at build time; the
/// C paths give the same pixels, at about half the speed).
pub fn simd() -> bool {
    unsafe extern "C" {
        // libjpeg-turbo's own query (jsimd.c, or jsimd_none.c without SIMD, which returns 0).
        fn jsimd_can_idct_islow() -> std::ffi::c_int;
    }
    // SAFETY: a query without arguments that reads libjpeg-turbo's CPU-feature flags, set up on
    // its first call.
    unsafe { jsimd_can_idct_islow() != 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_end_marker_is_found_past_appended_bytes_and_not_before_the_last_scan() {
        assert!(ends_whole(&[0xFF, 0xD8, 0xFF, 0xDA, 1, 2, 0xFF, 0xD9]));
        assert!(ends_whole(&[0xFF, 0xD8, 0xFF, 0xDA, 1, 2, 0xFF, 0xD9, 0, 0, 0]));
        assert!(!ends_whole(&[0xFF, 0xD8, 0xFF, 0xDA, 1, 2, 0xFF, 0x00, 3]));
        // A thumbnail's end marker before the main scan does not count.
        assert!(!ends_whole(&[0xFF, 0xD8, 0xFF, 0xD9, 0xFF, 0xDA, 5, 6]));
    }

    #[test]
    fn cmyk_white_and_black() {
        // libjpeg's CMYK of an Adobe file is inverted: 255 everywhere is no ink (white); ink
        // everywhere (0) is black.
        let mut px = [255, 255, 255, 255, 0, 0, 0, 0];
        cmyk_to_rgbx(&mut px);
        assert_eq!(px, [255, 255, 255, 255, 0, 0, 0, 255]);
    }
}
