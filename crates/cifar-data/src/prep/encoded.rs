//! Image folders of every size into encoded tensor files (the layout in
//! [`crate::store::encoded`]): a JPEG's bytes kept as they are (nothing lost, nothing
//! re-encoded), any other image (PNG, a PNG named `.JPEG`, BMP, WebP, grey, palette, 16-bit)
//! stored as the lossless PNG of the RGB that Pillow's `convert("RGB")` gives, and, where
//! `--max-side` asks, images with a longer side shrunk to it (Pillow's bilinear) and re-encoded
//! as JPEG at `--quality`.
//!
//! Streaming, bounded: the reading thread hands the files (or the archive's members) out in
//! order, every core checks (and where asked re-encodes) them, and one writer appends each
//! to its split's file in reading order, holding only those that finished ahead of an earlier
//! one. What the dense conversion refuses is refused here too, before a pixel is decoded where
//! it can be: more pixels than the limit (from the header), a JPEG cut inside its scans (no
//! end-of-image marker), one of more scans than the decoder takes, a file that is no image.
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

use safetensors::Dtype;
use safetensors::tensor::TensorInfo;

use super::folder::{Conversion, Job, Target, output_path};
use super::image::MemoryBudget;
use super::writer::Sealed;
use super::{PrepOptions, SplitSummary, StoreDtype};
use crate::decode::jpeg;
use crate::error::{Error, IoContext, Result};
use crate::geometry::{Geometry, Rect};

/// One image, ready to store: its bytes, its `(height, width)`, and whether it was re-encoded.
struct Stored {
    bytes: Vec<u8>,
    size: (u32, u32),
    reencoded: bool,
}

/// Converts `conv`'s images into one encoded file per split; sealed, ready to persist.
pub(super) fn write(
    conv: &Conversion<'_>,
    opts: &PrepOptions,
    progress: &indicatif::ProgressBar,
) -> Result<Vec<(SplitSummary, Sealed)>> {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let budget = MemoryBudget::for_this_machine();
    let room = super::writer::header_room(conv.classes.iter().chain(&conv.split_names).map(String::as_str));
    let mut writers: Vec<Writer> = conv
        .split_names
        .iter()
        .enumerate()
        .map(|(s, split)| {
            Writer::create(
                conv.out_dir,
                &format!("cifar-prep-{}-{split}", conv.name),
                room,
                conv.labels[s].clone(),
            )
        })
        .collect::<Result<_>>()?;
    // Jobs are numbered in reading order; the writer takes results in that order, so the first
    // error it meets is the first bad image in reading order whichever decoder found it first.
    let stop_after = AtomicUsize::new(usize::MAX);
    let (jobs_tx, jobs_rx) = crossbeam_channel::bounded::<(usize, Job)>(2 * threads);
    let (done_tx, done_rx) = crossbeam_channel::unbounded::<(usize, Result<Stored>, Vec<Target>)>();
    progress.set_length(conv.listing.images.len() as u64);
    let reencoded = std::thread::scope(|s| -> Result<usize> {
        for _ in 0..threads {
            let (jobs, done) = (jobs_rx.clone(), done_tx.clone());
            let (budget, stop_after) = (&budget, &stop_after);
            s.spawn(move || {
                for (n, (shown, bytes, targets)) in jobs {
                    if n > stop_after.load(SeqCst) {
                        continue;
                    }
                    let bytes = match bytes {
                        Some(b) => Ok(b),
                        None => crate::files::read_regular(&shown, super::layout::MAX_MEMBER_BYTES),
                    };
                    let stored = bytes.and_then(|b| store_one(b, &shown, opts, budget));
                    if done.send((n, stored, targets)).is_err() {
                        break;
                    }
                }
            });
        }
        drop((jobs_rx, done_tx));
        // The writer, on its own thread: it follows the decoders while this one reads.
        let writer = s.spawn(|| -> Result<usize> {
            let mut ahead: BTreeMap<usize, (Result<Stored>, Vec<Target>)> = BTreeMap::new();
            let (mut next, mut reencoded) = (0, 0);
            for (n, stored, targets) in done_rx {
                ahead.insert(n, (stored, targets));
                while let Some((stored, targets)) = ahead.remove(&next) {
                    let stored = match stored {
                        Ok(stored) => stored,
                        Err(e) => {
                            stop_after.store(next, SeqCst);
                            return Err(e);
                        }
                    };
                    for &(split, index) in &targets {
                        writers[split].put(index, &stored)?;
                    }
                    reencoded += usize::from(stored.reencoded);
                    progress.inc(targets.len() as u64);
                    next += 1;
                }
            }
            Ok(reencoded)
        });
        let mut n = 0;
        let (sent, read) = conv.read(&mut |job| {
            n += 1;
            stop_after.load(SeqCst) == usize::MAX && jobs_tx.send((n - 1, job)).is_ok()
        });
        drop(jobs_tx);
        let written = writer.join().expect("the writer thread panicked");
        match (written, read) {
            (Err(e), _) => Err(e),
            // Reading stopped early: whatever it says is the cause (a decoder's error would
            // have been the writer's).
            (Ok(_), Err(e)) => Err(e),
            (Ok(_), Ok(())) if sent < conv.listing.images.len() => {
                Err(Error::format(conv.input, "stopped before every image was read"))
            }
            (Ok(r), Ok(())) => Ok(r),
        }
    })?;
    if reencoded > 0 {
        eprintln!(
            "cifar-prep: re-encoded {reencoded} images with a side over {} as JPEG at quality {}",
            opts.max_side.unwrap_or(0),
            opts.quality
        );
    }
    let conversion = super::conversion_id();
    let mut sealed = Vec::new();
    for (s, writer) in writers.into_iter().enumerate() {
        let per_class =
            super::per_class(&conv.labels[s], conv.classes.len()).expect("labels index the classes");
        let mut meta = conv.metadata(s, StoreDtype::U8, ([0.0; 3], [1.0; 3]), &conversion);
        meta.insert("layout".into(), "encoded".into());
        meta.insert("normalized".into(), "false".into());
        meta.remove("dtype");
        let images = conv.labels[s].len();
        let file = writer.finish(meta)?;
        let path = output_path(conv.out_dir, &conv.name, &conv.split_names[s]);
        sealed.push((
            SplitSummary { split: conv.split_names[s].clone(), path, images, per_class, bytes: file.size },
            file,
        ));
    }
    Ok(sealed)
}

/// Checks one image and makes its stored form.
fn store_one(bytes: Vec<u8>, shown: &Path, opts: &PrepOptions, budget: &MemoryBudget) -> Result<Stored> {
    let (w, h) = super::image::dimensions(&bytes, shown)?;
    super::image::check_pixels((w, h), opts.max_image_pixels, shown)?;
    let is_jpeg = jpeg::is_jpeg(&bytes);
    if is_jpeg {
        if !jpeg::ends_whole(&bytes) {
            return Err(Error::format(
                shown,
                "image file is truncated (no end-of-image marker after its last scan)",
            ));
        }
        let scans = memchr::memmem::find_iter(&bytes, &[0xFF, 0xDA]).count();
        if scans > jpeg::MAX_SCANS as usize {
            return Err(Error::format(
                shown,
                format!("has {scans} scans, more than the {} a JPEG may have", jpeg::MAX_SCANS),
            ));
        }
    }
    let shrink = opts.max_side.filter(|&m| w.max(h) > m);
    if is_jpeg && shrink.is_none() {
        return Ok(Stored { bytes, size: (h, w), reencoded: false });
    }
    let cost = super::image::decode_cost((w, h), None);
    let _share = budget.take_for_image((w, h), cost, shown)?;
    match shrink {
        None => {
            let rgb = super::image::decode_rgb(&bytes, (w, h), shown)?;
            Ok(Stored { bytes: png(&rgb, (w, h), shown)?, size: (h, w), reencoded: false })
        }
        Some(side) => {
            let (nh, nw) = if w >= h {
                (((h as f64 * side as f64 / w as f64).round() as u32).max(1), side)
            } else {
                (side, ((w as f64 * side as f64 / h as f64).round() as u32).max(1))
            };
            let g = Geometry {
                region: Rect::whole((h, w)),
                resized: (nh, nw),
                window: Rect::whole((nh, nw)),
                flip: false,
            };
            let mut planar = vec![0u8; 3 * nh as usize * nw as usize];
            let decode = crate::decode::Options { max_pixels: opts.max_image_pixels, dct_scaling: true };
            crate::decode::render(&bytes, &g, crate::decode::Out::U8(&mut planar), &decode, shown)?;
            let plane = nh as usize * nw as usize;
            let rgb: Vec<u8> =
                (0..plane).flat_map(|i| [planar[i], planar[plane + i], planar[2 * plane + i]]).collect();
            Ok(Stored {
                bytes: jpeg_of(&rgb, (nw, nh), opts.quality, shown)?,
                size: (nh, nw),
                reencoded: true,
            })
        }
    }
}

/// `rgb` (`w × h`) as a PNG: lossless, so it decodes to these pixels. zlib's default level: such
/// images are few in a photo folder, and the file should not outgrow the folder.
fn png(rgb: &[u8], (w, h): (u32, u32), shown: &Path) -> Result<Vec<u8>> {
    use image::ImageEncoder;
    let mut out = Vec::new();
    image::codecs::png::PngEncoder::new_with_quality(
        &mut out,
        image::codecs::png::CompressionType::Default,
        image::codecs::png::FilterType::Adaptive,
    )
    .write_image(rgb, w, h, image::ExtendedColorType::Rgb8)
    .map_err(|e| Error::format(shown, format!("cannot be stored as PNG: {e}")))?;
    Ok(out)
}

/// `rgb` (`w × h`) as a baseline JPEG of `quality`, 4:2:0, as Pillow saves one by default.
fn jpeg_of(rgb: &[u8], (w, h): (u32, u32), quality: u8, shown: &Path) -> Result<Vec<u8>> {
    let encoded = std::panic::catch_unwind(|| -> std::io::Result<Vec<u8>> {
        let mut c = mozjpeg::Compress::new(mozjpeg::ColorSpace::JCS_RGB);
        c.set_fastest_defaults();
        c.set_size(w as usize, h as usize);
        c.set_quality(quality as f32);
        let mut c = c.start_compress(Vec::new())?;
        c.write_scanlines(rgb)?;
        c.finish()
    });
    match encoded {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(e)) => Err(Error::format(shown, format!("cannot be re-encoded as JPEG: {e}"))),
        Err(_) => Err(Error::format(shown, "cannot be re-encoded as JPEG")),
    }
}

/// One split's encoded file being written: images appended as they come, in order; their
/// ranges, sizes and the labels after them; the header last, into room reserved in front.
struct Writer {
    tmp: PathBuf,
    file: Option<File>,
    data_start: u64,
    /// Bytes of images written.
    written: u64,
    offsets: Vec<[i64; 2]>,
    sizes: Vec<[i64; 2]>,
    labels: Vec<i64>,
}

impl Writer {
    fn create(dir: &Path, tag: &str, room: u64, labels: Vec<i64>) -> Result<Self> {
        let tmp = dir.join(format!(".{tag}.{}.tmp", std::process::id()));
        let mut file =
            std::fs::OpenOptions::new().write(true).create(true).truncate(true).open(&tmp).at(&tmp)?;
        file.seek(SeekFrom::Start(room)).at(&tmp)?;
        let n = labels.len();
        Ok(Writer {
            tmp,
            file: Some(file),
            data_start: room,
            written: 0,
            offsets: vec![[0; 2]; n],
            sizes: vec![[0; 2]; n],
            labels,
        })
    }

    fn put(&mut self, index: usize, stored: &Stored) -> Result<()> {
        let file = self.file.as_mut().expect("put after finish");
        file.write_all(&stored.bytes).at(&self.tmp)?;
        let start = self.written as i64;
        self.written += stored.bytes.len() as u64;
        self.offsets[index] = [start, self.written as i64];
        self.sizes[index] = [stored.size.0 as i64, stored.size.1 as i64];
        Ok(())
    }

    fn finish(mut self, metadata: HashMap<String, String>) -> Result<Sealed> {
        let file = self.file.as_mut().expect("finish twice");
        // The images padded to 8 bytes, so that the i64 tensors after them are aligned.
        let blob = self.written.div_ceil(8) * 8;
        file.write_all(&vec![0u8; (blob - self.written) as usize]).at(&self.tmp)?;
        let n = self.labels.len();
        let blob = blob as usize;
        let pairs = 16 * n;
        let tensors = vec![
            (
                "images".to_string(),
                TensorInfo { dtype: Dtype::U8, shape: vec![blob], data_offsets: (0, blob) },
            ),
            (
                "offsets".to_string(),
                TensorInfo { dtype: Dtype::I64, shape: vec![n, 2], data_offsets: (blob, blob + pairs) },
            ),
            (
                "sizes".to_string(),
                TensorInfo {
                    dtype: Dtype::I64,
                    shape: vec![n, 2],
                    data_offsets: (blob + pairs, blob + 2 * pairs),
                },
            ),
            (
                "labels".to_string(),
                TensorInfo {
                    dtype: Dtype::I64,
                    shape: vec![n],
                    data_offsets: (blob + 2 * pairs, blob + 2 * pairs + 8 * n),
                },
            ),
        ];
        let mut tail: Vec<u8> = Vec::with_capacity(40 * n);
        tail.extend(self.offsets.iter().flatten().flat_map(|v| v.to_le_bytes()));
        tail.extend(self.sizes.iter().flatten().flat_map(|v| v.to_le_bytes()));
        tail.extend(self.labels.iter().flat_map(|v| v.to_le_bytes()));
        file.write_all(&tail).at(&self.tmp)?;
        let size = super::writer::write_header(file, &self.tmp, self.data_start, metadata, tensors)?;
        self.file = None;
        Ok(Sealed::new(std::mem::take(&mut self.tmp), size))
    }
}

impl Drop for Writer {
    /// An unfinished file is removed: a failed run leaves no partial output behind.
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}
