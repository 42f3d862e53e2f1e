//! Pillow's antialiased bilinear resize of 8-bit RGB (`Image.resize(size, BILINEAR)`, which
//! torchvision's `Resize` and `RandomResizedCrop` call on PIL images), reproduced to the value:
//! the filter's support widened by the reduction, coefficients normalized in `f64` then fixed
//! to 22 bits, a horizontal pass rounded to 8 bits, then a vertical pass.
//!
//! Written by hand: the crates that resize fast (fast_image_resize, pic-scale) keep their own
//! coefficient precision and so differ from Pillow by a level here and there; torchvision's
//! values are Pillow's. Only the output rows and columns a window asks for are computed (each
//! output pixel's coefficients are its own), so a centre crop after a resize costs the crop.
//! Both passes work from a region of a larger buffer, so a crop is never copied out first.

/// Pillow's `PRECISION_BITS` for 8-bit images.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Bytes a pixel: red, green, blue and one unused, as Pillow holds an RGB image (and libjpeg
/// writes `JCS_EXT_RGBX`), so that a pixel's three sums are one four-lane vector operation.
pub const PIXEL: usize = 4;

/// An RGBX image (or a region of one) in a buffer: `height` rows of `width` pixels, rows
/// `stride` bytes apart, starting at `offset`.
#[derive(Debug, Clone, Copy)]
pub struct View<'a> {
    /// The buffer.
    pub data: &'a [u8],
    /// Byte offset of the first pixel.
    pub offset: usize,
    /// Bytes from one row to the next.
    pub stride: usize,
    /// Pixels a row.
    pub width: usize,
    /// Rows.
    pub height: usize,
}

impl View<'_> {
    #[inline]
    fn row(&self, y: usize) -> &[u8] {
        let start = self.offset + y * self.stride;
        &self.data[start..start + PIXEL * self.width]
    }
}

/// One axis's coefficients for the output positions `first..first + len`: for each, the first
/// input position and the fixed-point weights from there (`ksize` a position).
struct Axis {
    bounds: Vec<(usize, usize)>,
    weights: Vec<i32>,
    ksize: usize,
}

/// Pillow's `precompute_coeffs` then `normalize_coeffs_8bpc`, for an input of `in_size`
/// positions read from `in0..in1` (a fractional box is allowed) resized to `out_size`, at the
/// output positions `first..first + len`.
fn axis(in_size: usize, in0: f64, in1: f64, out_size: usize, first: usize, len: usize) -> Axis {
    let scale = (in1 - in0) / out_size as f64;
    let filterscale = scale.max(1.0);
    // The bilinear filter's support is 1.
    let support = filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(len);
    let mut weights = vec![0i32; len * ksize];
    let mut k = vec![0f64; ksize];
    for (o, xx) in (first..first + len).enumerate() {
        let center = in0 + (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // Pillow truncates toward zero (a C cast) before clamping.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64).max(xmin as i64) as usize - xmin;
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(xmax) {
            let t = ((x + xmin) as f64 - center + 0.5) * ss;
            let w = (1.0 - t.abs()).max(0.0);
            *kx = w;
            ww += w;
        }
        let fixed = &mut weights[o * ksize..(o + 1) * ksize];
        for x in 0..xmax {
            let w = if ww != 0.0 { k[x] / ww } else { k[x] };
            let scaled = w * (1u32 << PRECISION_BITS) as f64;
            fixed[x] = if w < 0.0 { (-0.5 + scaled) as i32 } else { (0.5 + scaled) as i32 };
        }
        bounds.push((xmin, xmax));
    }
    Axis { bounds, weights, ksize }
}

#[inline]
fn clip8(v: i32) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// An image of `size` `(height, width)` resized as Pillow resizes it to `(out_h, out_w)` from
/// the box `(x0, y0, x1, y1)` (in the image's pixels, fractional where it was decoded at a
/// reduced scale; `(0, 0, width, height)` for all of it), keeping only the output rows `rows`
/// and columns `cols`: writes `rows.len() × cols.len()` RGBX pixels into `out`, row after row.
///
/// The image's pixels are those of `src`, whose first row and column are the image's `at`
/// `(row, column)`: only the part the kept output reads need be there. Filters are clamped at
/// the image's edges (`size`), as Pillow clamps them at a crop's, never at `src`'s.
#[allow(clippy::too_many_arguments)] // one per thing a resize is told
pub fn resize(
    src: &View<'_>,
    at: (usize, usize),
    size: (usize, usize),
    bbox: (f64, f64, f64, f64),
    (out_h, out_w): (usize, usize),
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
    out: &mut [u8],
) {
    let (x0, y0, x1, y1) = bbox;
    let (nh, nw) = (rows.len(), cols.len());
    debug_assert!(out.len() >= PIXEL * nh * nw);
    let need_horizontal = out_w != size.1 || x0 != 0.0 || x1 != out_w as f64;
    let need_vertical = out_h != size.0 || y0 != 0.0 || y1 != out_h as f64;
    let vert = need_vertical.then(|| axis(size.0, y0, y1, out_h, rows.start, nh));
    // The image rows the vertical pass reads (all of `rows` where there is none).
    let (ybox_first, ybox_last) = match &vert {
        Some(v) => {
            let first = v.bounds.iter().map(|b| b.0).min().unwrap_or(0);
            let last = v.bounds.iter().map(|b| b.0 + b.1).max().unwrap_or(0);
            (first, last)
        }
        None => (rows.start, rows.end),
    };
    TEMP.with_borrow_mut(|(temp, acc)| {
        let after_horizontal: View<'_> = if need_horizontal {
            let h = axis(size.1, x0, x1, out_w, cols.start, nw);
            let n_rows = ybox_last - ybox_first;
            temp.resize(PIXEL * nw * n_rows, 0);
            for (t, y) in (ybox_first..ybox_last).enumerate() {
                let row = src.row(y - at.0);
                let dst = &mut temp[PIXEL * nw * t..PIXEL * nw * (t + 1)];
                horizontal(row, at.1, &h, dst);
            }
            View { data: temp, offset: 0, stride: PIXEL * nw, width: nw, height: n_rows }
        } else {
            // No horizontal pass: the columns are the image's own, from `cols.start`.
            View {
                data: src.data,
                offset: src.offset + PIXEL * (cols.start - at.1) + (ybox_first - at.0) * src.stride,
                stride: src.stride,
                width: nw,
                height: ybox_last - ybox_first,
            }
        };
        match &vert {
            Some(v) => {
                for (o, dst) in out.chunks_exact_mut(PIXEL * nw).take(nh).enumerate() {
                    let (ymin, ylen) = v.bounds[o];
                    let k = &v.weights[o * v.ksize..o * v.ksize + ylen];
                    vertical(&after_horizontal, ymin - ybox_first, k, acc, dst);
                }
            }
            None => {
                for (o, dst) in out.chunks_exact_mut(PIXEL * nw).take(nh).enumerate() {
                    dst.copy_from_slice(after_horizontal.row(o));
                }
            }
        }
    });
}

thread_local! {
    /// A worker's buffers for the horizontal pass's rows and the vertical pass's sums, reused
    /// from sample to sample.
    static TEMP: std::cell::RefCell<(Vec<u8>, Vec<i32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// One row's horizontal pass: each output pixel from its taps of `row`, whose first pixel is
/// the image's column `at`. The common filter sizes run with their size known to the compiler
/// (a third of the pass's time): every pixel then reads all `ksize` taps, the ones past its own
/// weighted by zero, and only a pixel whose taps would run past `row` takes the general loop.
fn horizontal(row: &[u8], at: usize, h: &Axis, dst: &mut [u8]) {
    match h.ksize {
        3 => horizontal_fixed::<3>(row, at, h, dst),
        5 => horizontal_fixed::<5>(row, at, h, dst),
        7 => horizontal_fixed::<7>(row, at, h, dst),
        9 => horizontal_fixed::<9>(row, at, h, dst),
        _ => horizontal_any(row, at, h, dst),
    }
}

#[multiversion::multiversion(targets("x86_64+avx2", "x86_64+sse4.1"))]
fn horizontal_fixed<const K: usize>(row: &[u8], at: usize, h: &Axis, dst: &mut [u8]) {
    for ((px, &(xmin, xlen)), k) in dst.chunks_exact_mut(PIXEL).zip(&h.bounds).zip(h.weights.chunks_exact(K))
    {
        let start = PIXEL * (xmin - at);
        let k: &[i32; K] = k.try_into().expect("K weights a position");
        // Inlined, the K taps are a loop of known length.
        let acc = match row.get(start..start + PIXEL * K) {
            Some(taps) => taps_sum(taps, k),
            None => taps_sum(&row[start..start + PIXEL * xlen], &k[..xlen]),
        };
        for c in 0..PIXEL {
            px[c] = clip8(acc[c]);
        }
    }
}

#[multiversion::multiversion(targets("x86_64+avx2", "x86_64+sse4.1"))]
fn horizontal_any(row: &[u8], at: usize, h: &Axis, dst: &mut [u8]) {
    for (o, px) in dst.chunks_exact_mut(PIXEL).enumerate() {
        let (xmin, xlen) = h.bounds[o];
        let k = &h.weights[o * h.ksize..o * h.ksize + xlen];
        let acc = taps_sum(&row[PIXEL * (xmin - at)..PIXEL * (xmin - at + xlen)], k);
        for c in 0..PIXEL {
            px[c] = clip8(acc[c]);
        }
    }
}

/// One output pixel's four sums, from its taps' pixels and weights: four lanes (the fourth
/// unused) so that each tap is one vector multiply-add.
#[inline(always)]
fn taps_sum(taps: &[u8], k: &[i32]) -> [i32; PIXEL] {
    let mut acc = [1i32 << (PRECISION_BITS - 1); PIXEL];
    for (p, &w) in taps.chunks_exact(PIXEL).zip(k) {
        for c in 0..PIXEL {
            acc[c] += p[c] as i32 * w;
        }
    }
    acc
}

/// One output row's vertical pass: each value from its column's taps in rows `ymin..`, summed
/// in `acc`.
#[multiversion::multiversion(targets("x86_64+avx2", "x86_64+sse4.1"))]
fn vertical(src: &View<'_>, ymin: usize, k: &[i32], acc: &mut Vec<i32>, dst: &mut [u8]) {
    let half = 1i32 << (PRECISION_BITS - 1);
    acc.clear();
    acc.resize(dst.len(), half);
    for (dy, &w) in k.iter().enumerate() {
        let row = src.row(ymin + dy);
        for (a, &p) in acc.iter_mut().zip(row) {
            *a += p as i32 * w;
        }
    }
    for (d, &a) in dst.iter_mut().zip(acc.iter()) {
        *d = clip8(a);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(w: usize, h: usize) -> Vec<u8> {
        (0..w * h * PIXEL).map(|i| ((i * 37 + i / 7) % 251) as u8).collect()
    }

    fn whole(data: &[u8], w: usize, h: usize) -> View<'_> {
        View { data, offset: 0, stride: PIXEL * w, width: w, height: h }
    }

    #[test]
    fn the_same_size_is_a_copy() {
        let data = image(5, 4);
        let mut out = vec![0; data.len()];
        resize(&whole(&data, 5, 4), (0, 0), (4, 5), (0.0, 0.0, 5.0, 4.0), (4, 5), 0..4, 0..5, &mut out);
        assert_eq!(out, data);
    }

    #[test]
    fn a_window_is_the_same_pixels_as_the_whole_output() {
        let (w, h) = (40, 30);
        let data = image(w, h);
        let mut all = vec![0; PIXEL * 17 * 13];
        resize(
            &whole(&data, w, h),
            (0, 0),
            (h, w),
            (0.0, 0.0, w as f64, h as f64),
            (13, 17),
            0..13,
            0..17,
            &mut all,
        );
        let mut part = vec![0; PIXEL * 5 * 6];
        resize(
            &whole(&data, w, h),
            (0, 0),
            (h, w),
            (0.0, 0.0, w as f64, h as f64),
            (13, 17),
            4..9,
            7..13,
            &mut part,
        );
        for y in 0..5 {
            assert_eq!(
                &part[PIXEL * 6 * y..PIXEL * 6 * (y + 1)],
                &all[PIXEL * (17 * (y + 4) + 7)..PIXEL * (17 * (y + 4) + 13)]
            );
        }
    }

    #[test]
    fn a_region_of_a_buffer_is_the_same_as_the_region_copied_out() {
        let (w, h) = (30, 20);
        let data = image(w, h);
        let (top, left, rw, rh) = (3, 5, 21, 14);
        let copied: Vec<u8> = (top..top + rh)
            .flat_map(|y| data[PIXEL * (y * w + left)..PIXEL * (y * w + left + rw)].to_vec())
            .collect();
        let view =
            View { data: &data, offset: PIXEL * (top * w + left), stride: PIXEL * w, width: rw, height: rh };
        let (mut a, mut b) = (vec![0; PIXEL * 9 * 8], vec![0; PIXEL * 9 * 8]);
        let bbox = (0.0, 0.0, rw as f64, rh as f64);
        resize(&view, (0, 0), (rh, rw), bbox, (8, 9), 0..8, 0..9, &mut a);
        resize(&whole(&copied, rw, rh), (0, 0), (rh, rw), bbox, (8, 9), 0..8, 0..9, &mut b);
        assert_eq!(a, b);
        // Only the part of the region the kept output reads: the same values.
        let (rows, cols) = (5..8, 6..9);
        let inner = View {
            data: &copied,
            offset: PIXEL * (4 * rw + 9),
            stride: PIXEL * rw,
            width: rw - 9,
            height: rh - 4,
        };
        let mut c = vec![0; PIXEL * 3 * 3];
        resize(&inner, (4, 9), (rh, rw), bbox, (8, 9), rows.clone(), cols.clone(), &mut c);
        for (k, y) in rows.enumerate() {
            assert_eq!(
                &c[3 * PIXEL * k..3 * PIXEL * (k + 1)],
                &b[PIXEL * (9 * y + cols.start)..PIXEL * (9 * y + cols.end)]
            );
        }
    }

    #[test]
    fn a_flat_image_stays_flat_at_any_size() {
        let data = vec![77u8; PIXEL * 50 * 33];
        for (oh, ow) in [(10, 10), (33, 50), (66, 100), (7, 45)] {
            let mut out = vec![0; PIXEL * oh * ow];
            resize(
                &whole(&data, 50, 33),
                (0, 0),
                (33, 50),
                (0.0, 0.0, 50.0, 33.0),
                (oh, ow),
                0..oh,
                0..ow,
                &mut out,
            );
            assert!(out.iter().all(|&v| v == 77), "{oh}x{ow}");
        }
    }
}
