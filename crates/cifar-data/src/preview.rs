//! Looking at the data: grids of images, enlarged by nearest-neighbour scaling, with class names
//! drawn in a bitmap font that ships in a crate (`font8x8`), so a fresh machine needs no fonts.
use std::path::Path;

use image::{Rgb, RgbImage};

use crate::error::{Error, Result};
use crate::prep::StoreDtype;
use crate::prep::layout::{BYTES_PER_IMAGE, SIDE};
use crate::store::TensorFile;

/// Gap between cells, in pixels.
pub const GAP: u32 = 2;
/// Glyphs are 8×8, drawn at this scale.
pub const TEXT_SCALE: u32 = 2;
const BACKGROUND: Rgb<u8> = Rgb([255, 255, 255]);
const INK: Rgb<u8> = Rgb([0, 0, 0]);

/// Width of the name column for these names: the longest name, plus a gap on each side.
pub fn label_width(names: &[String]) -> u32 {
    let longest = names.iter().map(|n| n.chars().count()).max().unwrap_or(0) as u32;
    longest * 8 * TEXT_SCALE + 2 * GAP
}

/// The `(x, y)` of cell (`row`, `col`) in a grid with a name column of `label_w` pixels.
pub fn cell_origin(label_w: u32, scale: u32, row: u32, col: u32) -> (u32, u32) {
    let cell = SIDE as u32 * scale + GAP;
    (label_w + GAP + col * cell, GAP + row * cell)
}

/// The size of a grid of `rows`×`cols` cells with a name column of `label_w` pixels.
pub fn grid_size(label_w: u32, scale: u32, rows: u32, cols: u32) -> (u32, u32) {
    let cell = SIDE as u32 * scale + GAP;
    (label_w + GAP + cols * cell, GAP + rows * cell)
}

/// Draws `text` with its top-left corner at (`x`, `y`); characters outside ASCII draw as `?`.
pub fn draw_text(img: &mut RgbImage, x: u32, y: u32, text: &str) {
    draw_text_scaled(img, x, y, text, TEXT_SCALE)
}

/// [`draw_text`] with glyphs of `8 * scale` pixels.
pub fn draw_text_scaled(img: &mut RgbImage, x: u32, y: u32, text: &str, scale: u32) {
    use font8x8::UnicodeFonts;
    for (i, ch) in text.chars().enumerate() {
        let glyph = font8x8::BASIC_FONTS.get(ch).or_else(|| font8x8::BASIC_FONTS.get('?')).unwrap_or([0; 8]);
        for (gy, bits) in glyph.iter().enumerate() {
            for gx in 0..8 {
                if bits & (1 << gx) == 0 {
                    continue;
                }
                for sy in 0..scale {
                    for sx in 0..scale {
                        let px = x + (i as u32 * 8 + gx) * scale + sx;
                        let py = y + gy as u32 * scale + sy;
                        if px < img.width() && py < img.height() {
                            img.put_pixel(px, py, INK);
                        }
                    }
                }
            }
        }
    }
}

/// Pastes a planar `[3, 32, 32]` image at (`x`, `y`), each pixel as a `scale`×`scale` block.
pub fn paste(img: &mut RgbImage, x: u32, y: u32, chw: &[u8], scale: u32) {
    let plane = SIDE * SIDE;
    for py in 0..SIDE as u32 * scale {
        for px in 0..SIDE as u32 * scale {
            let i = (py / scale) as usize * SIDE + (px / scale) as usize;
            img.put_pixel(x + px, y + py, Rgb([chw[i], chw[plane + i], chw[2 * plane + i]]));
        }
    }
}

/// A planar `[3, h, w]` image as a `[3, 32, 32]` grid cell: itself at 32×32, else resized.
pub fn to_cell(chw: &[u8], h: usize, w: usize) -> Vec<u8> {
    if (h, w) == (SIDE, SIDE) {
        return chw.to_vec();
    }
    let plane = h * w;
    let rgb = RgbImage::from_fn(w as u32, h as u32, |x, y| {
        let i = y as usize * w + x as usize;
        Rgb([chw[i], chw[plane + i], chw[2 * plane + i]])
    });
    let small =
        image::imageops::resize(&rgb, SIDE as u32, SIDE as u32, image::imageops::FilterType::Triangle);
    let mut out = vec![0u8; BYTES_PER_IMAGE];
    for (i, px) in small.pixels().enumerate() {
        for c in 0..3 {
            out[c * SIDE * SIDE + i] = px.0[c];
        }
    }
    out
}

/// Pixel bytes back from normalized planar `[3, H, W]` values: `round((v·std + mean)·255)`,
/// the inverse of `ToTensor()` + `Normalize` (exact for values that came from bytes).
pub fn denormalize(values: &[f32], mean: [f32; 3], std: [f32; 3]) -> Vec<u8> {
    let plane = values.len() / 3;
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let c = (i / plane) % 3;
            ((v * std[c] + mean[c]) * 255.0).round().clamp(0.0, 255.0) as u8
        })
        .collect()
}

/// Image `i` of a tensor file as planar bytes, `[3, 32, 32]` (resized for display if the
/// file's images have another size).
pub fn pixels(file: &TensorFile, i: usize) -> Vec<u8> {
    let chw = match file.dtype() {
        StoreDtype::U8 => file.image_bytes(i).to_vec(),
        StoreDtype::F32 => denormalize(bytemuck::cast_slice(file.image_bytes(i)), file.mean(), file.std()),
    };
    let [_, h, w] = file.image_shape();
    to_cell(&chw, h, w)
}

/// One row per class, the first `per_class` images of that class by index, each enlarged
/// `scale` times, the class name at the start of its row.
pub fn class_grid(file: &TensorFile, per_class: usize, scale: u32) -> RgbImage {
    let names: Vec<String> = if file.classes().is_empty() {
        let n = file.labels().iter().max().map_or(0, |&m| m as usize + 1);
        (0..n).map(|c| c.to_string()).collect()
    } else {
        file.classes().to_vec()
    };
    let label_w = label_width(&names);
    let (w, h) = grid_size(label_w, scale, names.len() as u32, per_class as u32);
    let mut img = RgbImage::from_pixel(w, h, BACKGROUND);
    let mut filled = vec![0usize; names.len()];
    for (i, &label) in file.labels().iter().enumerate() {
        let c = label as usize;
        if filled[c] == per_class {
            continue;
        }
        let (x, y) = cell_origin(label_w, scale, c as u32, filled[c] as u32);
        paste(&mut img, x, y, &pixels(file, i), scale);
        filled[c] += 1;
        if filled.iter().all(|&f| f == per_class) {
            break;
        }
    }
    for (c, name) in names.iter().enumerate() {
        let (_, y) = cell_origin(label_w, scale, c as u32, 0);
        let text_y = y + (SIDE as u32 * scale).saturating_sub(8 * TEXT_SCALE) / 2;
        draw_text(&mut img, GAP, text_y, name);
    }
    img
}

/// Planar byte images in rows of `cols`, enlarged `scale` times, with no name column.
pub fn image_grid(images: &[Vec<u8>], cols: usize, scale: u32) -> RgbImage {
    let rows = images.len().div_ceil(cols.max(1)) as u32;
    let (w, h) = grid_size(0, scale, rows, cols as u32);
    let mut img = RgbImage::from_pixel(w, h, BACKGROUND);
    for (k, chw) in images.iter().enumerate() {
        debug_assert_eq!(chw.len(), BYTES_PER_IMAGE);
        let (x, y) = cell_origin(0, scale, (k / cols) as u32, (k % cols) as u32);
        paste(&mut img, x, y, chw, scale);
    }
    img
}

/// Height of the caption under each image of [`labelled_grid`].
pub const CAPTION: u32 = 10;

/// The `(x, y)` of image (`row`, `col`) in a [`labelled_grid`]; its caption starts
/// `32 * scale + 1` pixels below.
pub fn labelled_cell_origin(scale: u32, row: u32, col: u32) -> (u32, u32) {
    let cell = SIDE as u32 * scale + GAP;
    (GAP + col * cell, GAP + row * (cell + CAPTION))
}

/// The size of a [`labelled_grid`] of `rows`×`cols` images.
pub fn labelled_grid_size(scale: u32, rows: u32, cols: u32) -> (u32, u32) {
    let cell = SIDE as u32 * scale + GAP;
    (GAP + cols * cell, GAP + rows * (cell + CAPTION))
}

/// Planar `[3, 32, 32]` byte images in rows of `cols`, enlarged `scale` times, each with its
/// caption (a class name) in 8-pixel letters under it, cut to the cell's width.
pub fn labelled_grid(images: &[Vec<u8>], captions: &[String], cols: usize, scale: u32) -> RgbImage {
    let rows = images.len().div_ceil(cols.max(1)) as u32;
    let (w, h) = labelled_grid_size(scale, rows, cols as u32);
    let mut img = RgbImage::from_pixel(w, h, BACKGROUND);
    for (k, chw) in images.iter().enumerate() {
        let (x, y) = labelled_cell_origin(scale, (k / cols) as u32, (k % cols) as u32);
        paste(&mut img, x, y, chw, scale);
        if let Some(text) = captions.get(k) {
            let fit: String = text.chars().take((SIDE as u32 * scale / 8) as usize).collect();
            draw_text_scaled(&mut img, x, y + SIDE as u32 * scale + 1, &fit, 1);
        }
    }
    img
}

/// Saves `img` as PNG at `path`.
pub fn save_png(img: &RgbImage, path: &Path) -> Result<()> {
    img.save_with_format(path, image::ImageFormat::Png)
        .map_err(|e| Error::format(path, format!("cannot write PNG: {e}")))
}
