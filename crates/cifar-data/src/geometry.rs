//! Where each output pixel of an image comes from: torchvision's `RandomResizedCrop`, `Resize`,
//! `CenterCrop`, `RandomCrop` and `RandomHorizontalFlip` as one [`ImageTransform`], and each
//! sample's [`Geometry`] drawn from `(seed, epoch, index)` and its image's size before a byte of
//! the image is decoded, so that the decoder can decode only what the output needs.
//!
//! The sampling is torchvision's, step for step (`RandomResizedCrop.get_params`'s ten tries
//! and its centre-crop fallback, `Resize`'s rounding, `CenterCrop`'s); only the random numbers
//! come from this crate's generator, a pure function of `(seed, epoch, index)` as every other
//! draw of the pipeline, so the batches are the same whatever thread makes them.
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};
use crate::sampler::mix;

/// A rectangle of an image, in its pixels. `top` and `left` may be negative for a window that
/// reaches outside the image (a centre crop larger than it: zeros there, as torchvision pads).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rect {
    /// First row.
    pub top: i64,
    /// First column.
    pub left: i64,
    /// Rows.
    pub height: u32,
    /// Columns.
    pub width: u32,
}

impl Rect {
    /// The whole of an image of `(height, width)`.
    pub fn whole((height, width): (u32, u32)) -> Rect {
        Rect { top: 0, left: 0, height, width }
    }
}

/// One sample's geometry: `region` of the image (inside it) is resized to `resized`
/// (`(height, width)`; the region's own size where nothing is resized), and `window` of the
/// resized image is the output, mirrored left to right where `flip` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// The region of the image that is resized (torchvision crops it first).
    pub region: Rect,
    /// The size the region is resized to, `(height, width)`.
    pub resized: (u32, u32),
    /// The output: a window of the resized image.
    pub window: Rect,
    /// Mirror the output left to right.
    pub flip: bool,
}

impl Geometry {
    /// The output's `(height, width)`.
    pub fn output(&self) -> (u32, u32) {
        (self.window.height, self.window.width)
    }
}

/// How an image is resized.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Resample {
    /// Not at all: the image at its own size.
    None,
    /// `Resize(n)`: the shorter side to `n`, the longer in proportion (rounded down, as
    /// torchvision's `_compute_resized_output_size`).
    Shorter(u32),
    /// `Resize((h, w))`.
    Exact(u32, u32),
    /// `RandomResizedCrop(size, scale, ratio)`: a random region of `scale` of the area and of
    /// aspect ratio in `ratio` (log-uniform), resized to `size` `(h, w)`.
    RandomResizedCrop {
        /// The output's `(height, width)`.
        size: (u32, u32),
        /// The range of the region's share of the image's area.
        scale: (f64, f64),
        /// The range of the region's aspect ratio (width / height).
        ratio: (f64, f64),
    },
}

/// Which part of the resized image is the output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// All of it.
    Whole,
    /// `CenterCrop((h, w))`.
    Center(u32, u32),
    /// `RandomCrop((h, w))` (no padding).
    Random(u32, u32),
}

/// The geometric part of a transform: a resize (random or not), a crop of the result, and a
/// coin-flip mirror.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ImageTransform {
    /// How the image is resized.
    pub resample: Resample,
    /// What of it is the output.
    pub window: Window,
    /// `RandomHorizontalFlip()`: mirror with probability 1/2.
    pub flip: bool,
}

impl ImageTransform {
    /// The output's `(height, width)` where it is the same for every image; `None` where it
    /// follows the image (no crop after a `Resize(n)` or no resize at all), which a batch of
    /// images of different sizes cannot hold.
    pub fn output_size(&self) -> Option<(u32, u32)> {
        match (self.window, self.resample) {
            (Window::Center(h, w) | Window::Random(h, w), _) => Some((h, w)),
            (Window::Whole, Resample::Exact(h, w)) => Some((h, w)),
            (Window::Whole, Resample::RandomResizedCrop { size, .. }) => Some(size),
            (Window::Whole, Resample::None | Resample::Shorter(_)) => None,
        }
    }

    /// Sample `index`'s geometry in epoch `epoch` of a run seeded `seed`, for its image of
    /// `(height, width)`. An image too small for a random crop is an error, as torchvision's.
    pub fn draw(&self, seed: u64, epoch: u64, index: usize, size: (u32, u32)) -> Result<Geometry> {
        let mut rng = ChaCha8Rng::seed_from_u64(mix(&[seed, epoch, index as u64, 0x6E0]));
        self.geometry(size, &mut rng)
    }

    /// The geometry for an image of `size`, its random choices from `rng`.
    pub fn geometry(&self, size: (u32, u32), rng: &mut impl Rng) -> Result<Geometry> {
        let (region, resized) = match self.resample {
            Resample::None => (Rect::whole(size), size),
            Resample::Shorter(n) => (Rect::whole(size), shorter_side_to(size, n)),
            Resample::Exact(h, w) => (Rect::whole(size), (h, w)),
            Resample::RandomResizedCrop { size: out, scale, ratio } => {
                (random_resized_region(size, scale, ratio, rng), out)
            }
        };
        let window = match self.window {
            Window::Whole => Rect::whole(resized),
            Window::Center(h, w) => center_window(resized, (h, w)),
            Window::Random(h, w) => {
                let (rh, rw) = resized;
                if rh < h || rw < w {
                    return Err(Error::Shape(format!(
                        "RandomCrop({h}, {w}) is larger than the {rh}x{rw} image it crops"
                    )));
                }
                let top = if rh == h && rw == w { 0 } else { rng.gen_range(0..=(rh - h) as i64) };
                let left = if rh == h && rw == w { 0 } else { rng.gen_range(0..=(rw - w) as i64) };
                Rect { top, left, height: h, width: w }
            }
        };
        Ok(Geometry { region, resized, window, flip: self.flip && rng.r#gen::<bool>() })
    }
}

/// `Resize(n)`'s output size for an image of `(h, w)`: the shorter side `n`, the longer
/// `int(n * long / short)`.
pub fn shorter_side_to((h, w): (u32, u32), n: u32) -> (u32, u32) {
    let (short, long) = if w <= h { (w, h) } else { (h, w) };
    let new_long = (n as u64 * long as u64) as f64 / short.max(1) as f64;
    let new_long = new_long as u32;
    if w <= h { (new_long, n) } else { (n, new_long) }
}

/// `CenterCrop((ch, cw))`'s window of an image of `(h, w)`: offsets rounded half to even, as
/// Python's `round`; where the crop is larger than the image, the image is padded (with zeros)
/// by half the difference on the top and left, rounded down.
pub fn center_window((h, w): (u32, u32), (ch, cw): (u32, u32)) -> Rect {
    let offset = |n: u32, c: u32| -> i64 {
        if c > n { -(((c - n) / 2) as i64) } else { ((n - c) as f64 / 2.0).round_ties_even() as i64 }
    };
    Rect { top: offset(h, ch), left: offset(w, cw), height: ch, width: cw }
}

/// `RandomResizedCrop.get_params`: ten tries at a region of a random share of the area and a
/// log-uniform aspect ratio that fits, then the centre crop of the ratio nearest the image's.
pub fn random_resized_region(
    (h, w): (u32, u32),
    scale: (f64, f64),
    ratio: (f64, f64),
    rng: &mut impl Rng,
) -> Rect {
    let area = h as f64 * w as f64;
    let (log_lo, log_hi) = (ratio.0.ln(), ratio.1.ln());
    let uniform = |rng: &mut dyn rand::RngCore, lo: f64, hi: f64| {
        if hi > lo { lo + (hi - lo) * rng.r#gen::<f64>() } else { lo }
    };
    for _ in 0..10 {
        let target_area = area * uniform(rng, scale.0, scale.1);
        let aspect = uniform(rng, log_lo, log_hi).exp();
        let cw = (target_area * aspect).sqrt().round_ties_even();
        let ch = (target_area / aspect).sqrt().round_ties_even();
        if 0.0 < cw && cw <= w as f64 && 0.0 < ch && ch <= h as f64 {
            let (cw, ch) = (cw as u32, ch as u32);
            let top = rng.gen_range(0..=(h - ch) as i64);
            let left = rng.gen_range(0..=(w - cw) as i64);
            return Rect { top, left, height: ch, width: cw };
        }
    }
    let in_ratio = w as f64 / h as f64;
    let (lo, hi) = (ratio.0.min(ratio.1), ratio.0.max(ratio.1));
    let (cw, ch) = if in_ratio < lo {
        (w, ((w as f64 / lo).round_ties_even() as u32).clamp(1, h))
    } else if in_ratio > hi {
        (((h as f64 * hi).round_ties_even() as u32).clamp(1, w), h)
    } else {
        (w, h)
    };
    Rect { top: ((h - ch) / 2) as i64, left: ((w - cw) / 2) as i64, height: ch, width: cw }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_rounds_the_longer_side_down_as_torchvision() {
        // torchvision: Resize(256) of 375x500 (h, w) is 256x341 (341.33 down); of 500x375, 341x256.
        assert_eq!(shorter_side_to((375, 500), 256), (256, 341));
        assert_eq!(shorter_side_to((500, 375), 256), (341, 256));
        assert_eq!(shorter_side_to((300, 300), 256), (256, 256));
        // 256 * 7 / 3 = 597.33.
        assert_eq!(shorter_side_to((300, 700), 256), (256, 597));
    }

    #[test]
    fn centre_crops_round_half_to_even_and_pad_when_larger() {
        // (256 - 224) / 2 = 16; (341 - 224) / 2 = 58.5, which Python rounds to 58.
        assert_eq!(
            center_window((256, 341), (224, 224)),
            Rect { top: 16, left: 58, height: 224, width: 224 }
        );
        // (343 - 224) / 2 = 59.5 -> 60.
        assert_eq!(center_window((256, 343), (224, 224)).left, 60);
        // A crop larger than the image: padded by (224 - 200) // 2 = 12 on the left.
        assert_eq!(center_window((256, 200), (224, 224)).left, -12);
        assert_eq!(center_window((256, 201), (224, 224)).left, -11);
    }

    #[test]
    fn random_resized_regions_fit_and_follow_the_scale_and_ratio() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let (h, w) = (375u32, 500u32);
        let mut shares = Vec::new();
        for _ in 0..20_000 {
            let r = random_resized_region((h, w), (0.08, 1.0), (3.0 / 4.0, 4.0 / 3.0), &mut rng);
            assert!(r.top >= 0 && r.left >= 0 && r.height > 0 && r.width > 0);
            assert!(r.top as u32 + r.height <= h && r.left as u32 + r.width <= w, "{r:?}");
            shares.push(r.height as f64 * r.width as f64 / (h * w) as f64);
        }
        // torchvision's get_params gives a mean share of 0.435 here (20,000 draws): uniform in
        // [0.08, 1) less the large oblong regions that do not fit and are drawn again.
        let mean = shares.iter().sum::<f64>() / shares.len() as f64;
        assert!((0.425..0.445).contains(&mean), "{mean}");
        assert!(shares.iter().any(|&s| s < 0.1) && shares.iter().any(|&s| s > 0.95));
    }

    #[test]
    fn a_ratio_no_try_can_fit_falls_back_to_the_centre_crop_of_the_nearest_ratio() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        // A 10x1000 strip with ratios near 1 and the whole area: nothing fits in ten tries.
        let r = random_resized_region((10, 1000), (1.0, 1.0), (0.9, 1.1), &mut rng);
        assert_eq!(r, Rect { top: 0, left: (1000 - 11) / 2, height: 10, width: 11 });
    }

    #[test]
    fn draws_depend_on_seed_epoch_and_index_only() {
        let t = ImageTransform {
            resample: Resample::RandomResizedCrop {
                size: (224, 224),
                scale: (0.08, 1.0),
                ratio: (0.75, 4.0 / 3.0),
            },
            window: Window::Whole,
            flip: true,
        };
        let g = t.draw(7, 1, 42, (375, 500)).unwrap();
        assert_eq!(g, t.draw(7, 1, 42, (375, 500)).unwrap());
        assert_ne!(g, t.draw(7, 2, 42, (375, 500)).unwrap());
        assert_eq!(g.output(), (224, 224));
        assert_eq!(t.output_size(), Some((224, 224)));
    }
}
