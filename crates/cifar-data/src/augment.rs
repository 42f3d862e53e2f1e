//! Augmentations the workers apply on the host: random crop after padding, and horizontal
//! flip, on one normalized `[C, H, W]` f32 sample. Each sample's randomness comes from
//! `(seed, epoch, index)` alone, so batches are the same whatever thread makes them.
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::sampler::mix;

/// What fills the border of a padded crop (torchvision's `padding_mode` and `fill`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Padding {
    /// Zeros of the normalized tensor (the dataset's mean colour), as `F.pad` after `Normalize`.
    Zero,
    /// A per-channel value of the normalized tensor (`padding_mode="constant"` with a `fill`;
    /// a fill given in pixels before `Normalize` is that pixel's normalized value).
    Constant([f32; 3]),
    /// The image mirrored at its edge, without repeating the edge pixel (`reflect`).
    Reflect,
    /// The image mirrored at its edge, repeating the edge pixel (`symmetric`).
    Symmetric,
    /// The edge pixel repeated (`edge`).
    Edge,
}

/// The augmentations to apply. `Augment::default()` applies none.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Augment {
    /// Pad by this many pixels on each side, then crop back to the original size at a random
    /// offset (`RandomCrop(32, padding=4)`); 0 for no crop.
    pub crop_padding: usize,
    /// How the padding is filled.
    pub padding: Option<Padding>,
    /// Flip left-right with probability 1/2 (`RandomHorizontalFlip()`).
    pub flip: bool,
}

impl Augment {
    /// The usual CIFAR recipe: pad 4 (reflect), random crop, random flip.
    pub fn standard() -> Self {
        Augment { crop_padding: 4, padding: Some(Padding::Reflect), flip: true }
    }

    /// Whether this changes anything.
    pub fn is_identity(&self) -> bool {
        self.crop_padding == 0 && !self.flip
    }

    /// The random choices for one sample: `(dy, dx, flip)`, offsets in `0..=2*padding`.
    pub fn draw(&self, seed: u64, epoch: u64, index: usize) -> (usize, usize, bool) {
        let mut rng = ChaCha8Rng::seed_from_u64(mix(&[seed, epoch, index as u64, 0xA06]));
        let p = self.crop_padding;
        let dy = if p > 0 { rng.gen_range(0..=2 * p) } else { p };
        let dx = if p > 0 { rng.gen_range(0..=2 * p) } else { p };
        let flip = self.flip && rng.r#gen::<bool>();
        (dy, dx, flip)
    }

    /// Writes the augmented `src` (shape `[c, h, w]`) into `dst` for sample `index`.
    pub fn apply(
        &self,
        seed: u64,
        epoch: u64,
        index: usize,
        shape: [usize; 3],
        src: &[f32],
        dst: &mut [f32],
    ) {
        self.apply_drawn(self.draw(seed, epoch, index), shape, src, dst);
    }

    /// Writes `src` (shape `[c, h, w]`) into `dst` cropped at `(dy, dx)` of its padded form and
    /// mirrored where `flip` says: the choices made elsewhere (as the Python package's `ds[i]`
    /// draws them from torch's generator). Offsets past `2 * crop_padding` are clamped to it.
    pub fn apply_drawn(
        &self,
        (dy, dx, flip): (usize, usize, bool),
        shape: [usize; 3],
        src: &[f32],
        dst: &mut [f32],
    ) {
        let (dy, dx) = (dy.min(2 * self.crop_padding), dx.min(2 * self.crop_padding));
        let [c, h, w] = shape;
        let p = self.crop_padding as isize;
        let padding = self.padding.unwrap_or(Padding::Zero);
        // Source coordinate of padded coordinate `i` (in -p..n+p), or None for a constant.
        let at = |i: isize, n: usize| -> Option<usize> {
            let n = n as isize;
            if (0..n).contains(&i) {
                return Some(i as usize);
            }
            match padding {
                Padding::Zero | Padding::Constant(_) => None,
                Padding::Edge => Some(i.clamp(0, n - 1) as usize),
                Padding::Reflect if n == 1 => Some(0),
                Padding::Reflect => {
                    let period = 2 * (n - 1);
                    let m = i.rem_euclid(period);
                    Some((if m < n { m } else { period - m }) as usize)
                }
                Padding::Symmetric => {
                    let m = i.rem_euclid(2 * n);
                    Some((if m < n { m } else { 2 * n - 1 - m }) as usize)
                }
            }
        };
        let fill = match padding {
            Padding::Constant(f) => f,
            _ => [0.0; 3],
        };
        for ch in 0..c {
            let plane = &src[ch * h * w..(ch + 1) * h * w];
            let out = &mut dst[ch * h * w..(ch + 1) * h * w];
            for y in 0..h {
                let sy = at(y as isize + dy as isize - p, h);
                for x in 0..w {
                    let xo = if flip { w - 1 - x } else { x };
                    let sx = at(xo as isize + dx as isize - p, w);
                    out[y * w + x] = match (sy, sx) {
                        (Some(sy), Some(sx)) => plane[sy * w + sx],
                        _ => fill[ch.min(2)],
                    };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reflect_mirrors_without_repeating_the_edge() {
        // A 1x1x4 row [0 1 2 3], padded 2 by reflection, is [2 1 0 1 2 3 2 1].
        let a = Augment { crop_padding: 2, padding: Some(Padding::Reflect), flip: false };
        let src = [0.0, 1.0, 2.0, 3.0];
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..200 {
            let (_, dx, _) = a.draw(1, 0, i);
            let mut dst = [0.0; 4];
            a.apply(1, 0, i, [1, 1, 4], &src, &mut dst);
            let padded = [2.0, 1.0, 0.0, 1.0, 2.0, 3.0, 2.0, 1.0];
            assert_eq!(dst, padded[dx..dx + 4]);
            seen.insert(dx);
        }
        assert_eq!(seen.len(), 5, "every offset 0..=4 occurs");
    }

    #[test]
    fn every_padding_mode_fills_as_numpy_pad_does() {
        // A 1x1x3 row [1 2 3], padded 2 (np.pad's modes: symmetric [2 1 1 2 3 3 2], edge
        // [1 1 1 2 3 3 3], constant 7 [7 7 1 2 3 7 7]), cropped back to 3 at each offset.
        let cases = [
            (Padding::Symmetric, [2.0, 1.0, 1.0, 2.0, 3.0, 3.0, 2.0]),
            (Padding::Edge, [1.0, 1.0, 1.0, 2.0, 3.0, 3.0, 3.0]),
            (Padding::Constant([7.0; 3]), [7.0, 7.0, 1.0, 2.0, 3.0, 7.0, 7.0]),
        ];
        for (padding, padded) in cases {
            let a = Augment { crop_padding: 2, padding: Some(padding), flip: false };
            for i in 0..100 {
                let (dy, dx, _) = a.draw(9, 0, i);
                let mut dst = [0.0; 3];
                a.apply(9, 0, i, [1, 1, 3], &[1.0, 2.0, 3.0], &mut dst);
                // A crop row off the image (dy != 2) is padding from the mode's rows.
                if dy == 2 || padding != Padding::Constant([7.0; 3]) {
                    assert_eq!(dst, padded[dx..dx + 3], "{padding:?} dx {dx}");
                } else {
                    assert_eq!(dst, [7.0; 3]);
                }
            }
        }
    }

    #[test]
    fn draws_are_uniform() {
        let a = Augment::standard();
        let n = 20_000;
        let mut flips = 0;
        let mut offsets = [0usize; 9];
        for i in 0..n {
            let (dy, dx, f) = a.draw(3, 1, i);
            flips += f as usize;
            offsets[dy] += 1;
            offsets[dx] += 1;
        }
        assert!((flips as f64 / n as f64 - 0.5).abs() < 0.02, "{flips}");
        for k in offsets {
            assert!((k as f64 / (2 * n) as f64 - 1.0 / 9.0).abs() < 0.01, "{offsets:?}");
        }
    }

    #[test]
    fn zero_padding_and_flip() {
        let a = Augment { crop_padding: 1, padding: Some(Padding::Zero), flip: true };
        let src = [1.0, 2.0, 3.0];
        for i in 0..50 {
            let (dy, dx, flip) = a.draw(5, 2, i);
            let mut dst = [9.0; 3];
            a.apply(5, 2, i, [1, 1, 3], &src, &mut dst);
            // The one row, padded with zeros to [0 1 2 3 0]; a crop off the row is all zeros.
            let padded = [0.0, 1.0, 2.0, 3.0, 0.0];
            let mut want: Vec<f32> = padded[dx..dx + 3].to_vec();
            if flip {
                // Crop, then flip: the window is read right to left.
                want.reverse();
            }
            if dy != 1 {
                want = vec![0.0; 3];
            }
            assert_eq!(dst.to_vec(), want, "sample {i}");
        }
    }
}
