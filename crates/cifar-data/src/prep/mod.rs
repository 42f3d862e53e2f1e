//! `cifar-prep`'s work: CIFAR tarballs (or their extracted directories), or image folders
//! ([`folder`]), into one safetensors file per split, `images [N,3,H,W]` + `labels [N]`, in
//! torchvision's order.
//!
//! For CIFAR, two threads overlap the work: this one decompresses and untars (the input's
//! bound), the writer parses, normalizes and writes (the disk's bound), with a bounded channel
//! between.
pub mod download;
mod encoded;
pub mod folder;
pub mod image;
pub mod layout;
pub mod listing;
mod persist;
// The pickle reader is this crate's own business; the fuzz targets reach it with the
// `fuzzing` feature.
#[cfg(feature = "fuzzing")]
pub mod pickle;
#[cfg(not(feature = "fuzzing"))]
mod pickle;
pub mod root;
pub mod tarball;
pub mod writer;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

pub use self::folder::Store;
use self::layout::{CIFAR10_CLASSES, COARSE_CLASSES, Kind, Records, Role, Split};
use self::tarball::SourceInfo;
use self::writer::TensorFileWriter;
pub use self::writer::{Normalize, StoreDtype, remove_own_temporaries, remove_stale_temporaries};
use sha2::{Digest, Sha256};

use crate::error::{Error, IoContext, Result};
use crate::store::TensorFile;

/// The tensor file format's version, in the metadata.
pub const FORMAT_VERSION: &str = "1";

/// How to normalize.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Norm {
    /// The tutorial's `Normalize((0.5,)*3, (0.5,)*3)`: values in [-1, 1].
    Half,
    /// Per-channel mean and std of the train split.
    Dataset,
    /// Given mean and std.
    Custom {
        /// Per-channel mean (of pixel / 255).
        mean: [f32; 3],
        /// Per-channel standard deviation.
        std: [f32; 3],
    },
}

impl Norm {
    /// The mean and std this normalization uses, `stats` (the train split's, computed only
    /// where needed) for [`Norm::Dataset`].
    pub fn mean_std(self, stats: impl FnOnce() -> ([f32; 3], [f32; 3])) -> ([f32; 3], [f32; 3]) {
        match self {
            Norm::Half => ([0.5; 3], [0.5; 3]),
            Norm::Custom { mean, std } => (mean, std),
            Norm::Dataset => stats(),
        }
    }
}

/// What `prepare` does.
#[derive(Debug, Clone)]
pub struct PrepOptions {
    /// Stored dtype. By default, `f32`.
    pub dtype: StoreDtype,
    /// Normalization. By default, `Half`.
    pub norm: Norm,
    /// Convert even when up-to-date output exists.
    pub force: bool,
    /// Image folders only: resize every image to `(height, width)`. By default, every image
    /// must have the size of the first.
    pub size: Option<(u32, u32)>,
    /// Image folders only: the files' name, `<name>-<split>.safetensors`. By default, the
    /// archive's or directory's name.
    pub name: Option<String>,
    /// Image folders only: the most pixels an image may declare before it is refused (a
    /// decompression bomb). By default, [`image::MAX_IMAGE_PIXELS`].
    pub max_image_pixels: u64,
    /// Image folders only: dense tensors or encoded images. By default, [`Store::Auto`]:
    /// dense where every image has one size, encoded otherwise.
    pub store: Store,
    /// Encoded files only: shrink images whose longer side is more than this to it,
    /// re-encoding them as JPEG at `quality`. By default, none: every JPEG kept byte for byte.
    pub max_side: Option<u32>,
    /// The JPEG quality `max_side`'s re-encoding uses. By default, 90.
    pub quality: u8,
}

impl Default for PrepOptions {
    fn default() -> Self {
        PrepOptions {
            dtype: StoreDtype::F32,
            norm: Norm::Half,
            force: false,
            size: None,
            name: None,
            max_image_pixels: image::MAX_IMAGE_PIXELS,
            store: Store::Auto,
            max_side: None,
            quality: 90,
        }
    }
}

/// One split's output.
#[derive(Debug, Clone)]
pub struct SplitSummary {
    /// `train`, `test`, or an image folder's split folder name.
    pub split: String,
    /// The file written.
    pub path: PathBuf,
    /// Images in it.
    pub images: usize,
    /// Images per class, in label order.
    pub per_class: Vec<usize>,
    /// File size in bytes.
    pub bytes: u64,
}

impl SplitSummary {
    /// The summary of split `split`'s file at `path`, already written and opened as `file`:
    /// its images counted per class of `classes`. `None` if a label is beyond them.
    pub fn of_file(split: &str, path: PathBuf, file: &TensorFile, classes: usize) -> Option<SplitSummary> {
        let per_class = per_class(file.labels(), classes)?;
        let bytes = std::fs::metadata(&path).ok()?.len();
        Some(SplitSummary { split: split.into(), path, images: file.len(), per_class, bytes })
    }
}

/// How many of `labels` each class of `classes` has; `None` if a label is beyond them.
pub fn per_class(labels: &[i64], classes: usize) -> Option<Vec<usize>> {
    let mut counts = vec![0; classes];
    for &l in labels {
        *counts.get_mut(usize::try_from(l).ok()?)? += 1;
    }
    Some(counts)
}

/// Whether `file` was converted from the input of fingerprint `print` with the options `tag`:
/// what makes earlier output up to date.
fn made_from(file: &TensorFile, print: &str, tag: &str) -> bool {
    let m = file.metadata();
    m.get("source_fingerprint").map(String::as_str) == Some(print)
        && m.get("prep_options").map(String::as_str) == Some(tag)
}

/// The most classes a dataset may have: more than any real label set (ImageNet-21k has
/// 21,841), few enough that what scales with them (the header, the model's last layer, the
/// per-class counts) stays small.
pub const MAX_CLASSES: usize = 100_000;

/// Refuses `classes` classes when they are more than [`MAX_CLASSES`], naming `input` (a
/// conversion's input, or a tensor file).
pub fn check_class_count(classes: usize, input: &Path) -> Result<()> {
    if classes > MAX_CLASSES {
        return Err(Error::format(
            input,
            format!("names {classes} classes, more than the {MAX_CLASSES} this tool takes"),
        ));
    }
    Ok(())
}

/// Renames every sealed split into place in `dir`, all or none ([`persist`]), and returns
/// their summaries.
fn persist_all(dir: &Path, sealed: Vec<(SplitSummary, writer::Sealed)>) -> Result<Vec<SplitSummary>> {
    let (splits, files): (Vec<SplitSummary>, Vec<(PathBuf, writer::Sealed)>) =
        sealed.into_iter().map(|(s, f)| (s.clone(), (s.path, f))).unzip();
    persist::persist_all(dir, files)?;
    Ok(splits)
}

/// What `prepare` did.
#[derive(Debug, Clone)]
pub struct PrepSummary {
    /// The files' name: `cifar10`, `cifar100`, or an image folder's name.
    pub dataset: String,
    /// The input's name and digests (digests empty when skipped).
    pub source: SourceInfo,
    /// Class names, in label order.
    pub classes: Vec<String>,
    /// Train, then test.
    pub splits: Vec<SplitSummary>,
    /// Wall time.
    pub seconds: f64,
    /// True when up-to-date output was found and nothing was converted.
    pub skipped: bool,
    /// True for an image folder's output (rather than CIFAR batches').
    pub image_folder: bool,
}

/// The tensor file of `kind`'s `split` in `dir`: `cifar10-train.safetensors`, ...
pub fn output_path(dir: &Path, kind: Kind, split: Split) -> PathBuf {
    dir.join(format!("{}-{}.safetensors", kind.name(), split.name()))
}

/// The input's content, hashed (sha256; of the batch files' names and bytes, for a directory):
/// a re-run on the same input skips the conversion, and a changed input is converted again
/// even where its size and modification time were kept.
pub(crate) fn fingerprint(input: &Path) -> Result<String> {
    let mut h = Sha256::new();
    if input.is_dir() {
        for (member, path) in tarball::dir_members(input)? {
            h.update(member.as_bytes());
            h.update([0]);
            hash_file(&mut h, &path)?;
        }
    } else {
        hash_file(&mut h, input)?;
    }
    Ok(format!("sha256:{}", tarball::hex(&h.finalize())))
}

/// Feeds the bytes of the regular file `path` to `h`.
pub(crate) fn hash_file(h: &mut Sha256, path: &Path) -> Result<()> {
    use std::io::Read;
    let mut f = crate::files::open_regular(path)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match f.read(&mut buf).at(path)? {
            0 => return Ok(()),
            n => h.update(&buf[..n]),
        }
    }
}

/// A name for one conversion, written into every split it makes, so that splits of two
/// conversions (two runs racing into one directory, or one stopped between its renames) are
/// never taken for a pair.
pub(crate) fn conversion_id() -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let mut h = Sha256::new();
    h.update(format!("{}:{}:{:?}", std::process::id(), now.as_nanos(), std::thread::current().id()));
    tarball::hex(&h.finalize()[..16])
}

/// Whether every file has the same `conversion` metadata (files without one, made before it
/// existed, are not compared).
pub fn same_conversion<'a>(files: impl IntoIterator<Item = &'a TensorFile>) -> bool {
    let ids: std::collections::HashSet<&String> =
        files.into_iter().filter_map(|f| f.metadata().get("conversion")).collect();
    ids.len() <= 1
}

fn norm_tag(opts: &PrepOptions) -> String {
    format!("{}:{:?}", opts.dtype.name(), opts.norm)
}

/// Finds output in `out_dir` made from the input of fingerprint `print` with these options.
fn up_to_date(input: &Path, print: &str, out_dir: &Path, opts: &PrepOptions) -> Result<Option<PrepSummary>> {
    for kind in [Kind::Cifar10, Kind::Cifar100] {
        let mut splits = Vec::new();
        let mut classes = Vec::new();
        for split in [Split::Train, Split::Test] {
            let path = output_path(out_dir, kind, split);
            let Ok(file) = TensorFile::open(&path) else { break };
            if !made_from(&file, print, &norm_tag(opts)) {
                break;
            }
            classes = file.classes().to_vec();
            let Some(summary) = SplitSummary::of_file(split.name(), path, &file, classes.len()) else {
                break;
            };
            splits.push(summary);
        }
        let files: Vec<TensorFile> =
            splits.iter().filter_map(|s: &SplitSummary| TensorFile::open(&s.path).ok()).collect();
        if splits.len() == 2 && same_conversion(&files) {
            let source = SourceInfo::named(input);
            let dataset = kind.name().into();
            return Ok(Some(PrepSummary {
                dataset,
                source,
                classes,
                splits,
                seconds: 0.0,
                skipped: true,
                image_folder: false,
            }));
        }
    }
    Ok(None)
}

/// Converts `input` into `out_dir`: a CIFAR-10/100 tarball (binary or python) or its extracted
/// directory, or an image folder (`ROOT/<split>/<class>/<image>`, a directory or a tar of one;
/// see [`folder`]), told apart by content. On error nothing is left in `out_dir` and earlier
/// output there is untouched.
pub fn prepare(
    input: &Path,
    out_dir: &Path,
    opts: &PrepOptions,
    progress: &indicatif::ProgressBar,
) -> Result<PrepSummary> {
    remove_stale_temporaries(out_dir);
    let result = if folder::is_image_folder(input)? {
        folder::prepare(input, out_dir, opts, progress)
    } else if opts.size.is_some()
        || opts.name.is_some()
        || opts.store != Store::Auto
        || opts.max_side.is_some()
    {
        Err(Error::format(
            input,
            "is a CIFAR tarball or directory: --size, --name, --store and --max-side apply to image folders only",
        ))
    } else {
        prepare_cifar(input, out_dir, opts, progress)
    };
    result.map_err(|e| name_the_input(e, input))
}

/// Refuses to write `outputs` when one of them is `input` itself (the same file, by any name):
/// renaming a split into place would destroy the input it is made from.
pub(crate) fn input_is_not_an_output<'a>(
    input: &Path,
    outputs: impl IntoIterator<Item = &'a Path>,
) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let Ok(inp) = std::fs::metadata(input) else { return Ok(()) };
    for out in outputs {
        if let Ok(o) = std::fs::metadata(out)
            && (o.dev(), o.ino()) == (inp.dev(), inp.ino())
        {
            return Err(Error::format(
                input,
                format!(
                    "is also where this conversion writes {}: it would be replaced by its own output \
                     (move it, or choose another --out or --name)",
                    out.display()
                ),
            ));
        }
    }
    Ok(())
}

/// An error about one of the temporary files being written, said of the input it was made
/// from: a temporary name alone tells the user nothing.
fn name_the_input(e: Error, input: &Path) -> Error {
    let about_temporary = match &e {
        Error::Io { path, .. } | Error::Format { path, .. } => {
            path.file_name().is_some_and(|n| n.to_string_lossy().starts_with(".cifar-prep-"))
        }
        _ => false,
    };
    if about_temporary { Error::format(input, format!("writing its tensor files: {e}")) } else { e }
}

fn prepare_cifar(
    input: &Path,
    out_dir: &Path,
    opts: &PrepOptions,
    progress: &indicatif::ProgressBar,
) -> Result<PrepSummary> {
    let start = Instant::now();
    let outputs: Vec<PathBuf> = [Kind::Cifar10, Kind::Cifar100]
        .into_iter()
        .flat_map(|k| [Split::Train, Split::Test].map(|s| output_path(out_dir, k, s)))
        .collect();
    input_is_not_an_output(input, outputs.iter().map(PathBuf::as_path))?;
    let print = fingerprint(input)?;
    if !opts.force
        && let Some(done) = up_to_date(input, &print, out_dir, opts)?
    {
        return Ok(done);
    }
    std::fs::create_dir_all(out_dir).at(out_dir)?;
    let mut writers = BTreeMap::new();
    for split in [Split::Train, Split::Test] {
        writers.insert(
            split,
            TensorFileWriter::create(out_dir, &format!("cifar-prep-{}", split.name()), opts.dtype)?,
        );
    }

    let (tx, rx) = crossbeam_channel::bounded::<(Role, PathBuf, Vec<u8>)>(2);
    let mut kind: Option<Kind> = None;
    let mut fine: Option<Vec<String>> = None;
    let mut coarse: Option<Vec<String>> = None;
    let mut seen: HashMap<(Split, usize), PathBuf> = HashMap::new();

    let (read, written) = std::thread::scope(|s| {
        let writer = s.spawn(|| write_splits(rx, &mut writers, opts));
        let read = tarball::for_each_member(input, progress, |role, member, path, bytes| {
            let member_kind = match role {
                Role::Batch { kind, .. } | Role::Meta { kind } => kind,
            };
            if *kind.get_or_insert(member_kind) != member_kind {
                return Err(Error::format(input, "mixes CIFAR-10 and CIFAR-100 members"));
            }
            match role {
                Role::Meta { .. } => {
                    let (f, c) = layout::parse_meta(member, &bytes, path)?;
                    fine = f.or(fine.take());
                    coarse = c.or(coarse.take());
                    Ok(())
                }
                Role::Batch { split, index, .. } => {
                    if let Some(first) = seen.insert((split, index), path.to_path_buf()) {
                        return Err(Error::format(
                            input,
                            format!(
                                "holds two copies of one batch: {} and {}",
                                first.display(),
                                path.display()
                            ),
                        ));
                    }
                    // A closed channel means the writer failed; its error is reported below.
                    tx.send((role, path.to_path_buf(), bytes)).or(Ok(()))
                }
            }
        });
        drop(tx);
        (read, writer.join().expect("writer thread panicked"))
    });
    // The writer's error is the cause when both failed (the reader only saw a closed channel).
    let written = written?;
    let source = read?;
    let Some(kind) = kind.filter(|_| !seen.is_empty()) else {
        return Err(Error::format(
            input,
            "holds no CIFAR batches (data_batch_1..5 and test_batch, or train and test)",
        ));
    };
    for split in [Split::Train, Split::Test] {
        let expected = if split == Split::Train { kind.train_batches() } else { 1 };
        for i in 0..expected {
            if !seen.contains_key(&(split, i)) {
                let name = match (kind, split) {
                    (Kind::Cifar10, Split::Train) => format!("data_batch_{}", i + 1),
                    (Kind::Cifar10, Split::Test) => "test_batch".into(),
                    (Kind::Cifar100, s) => s.name().into(),
                };
                return Err(Error::format(input, format!("batch {name} is missing")));
            }
        }
    }
    for (split, w) in &writers {
        if w.images() == 0 {
            return Err(Error::format(
                input,
                format!("its {} batches hold no images: an empty split cannot train or test", split.name()),
            ));
        }
    }
    let classes = match (kind, fine) {
        (_, Some(names)) if names.len() == kind.classes() => names,
        (_, Some(names)) => {
            return Err(Error::format(
                input,
                format!("lists {} class names, expected {}", names.len(), kind.classes()),
            ));
        }
        (Kind::Cifar10, None) => CIFAR10_CLASSES.iter().map(|s| s.to_string()).collect(),
        (Kind::Cifar100, None) => (0..100).map(|i| format!("class_{i}")).collect(),
    };
    let coarse = match (kind, coarse) {
        (Kind::Cifar100, Some(c)) if c.len() == COARSE_CLASSES => Some(c),
        (Kind::Cifar100, _) => Some((0..COARSE_CLASSES).map(|i| format!("superclass_{i}")).collect()),
        _ => None,
    };

    let official = source.md5.as_deref().and_then(download::official_by_md5);
    let conversion = conversion_id();
    let mut sealed = Vec::new();
    for (split, w) in writers {
        let per_class = written.per_class(split, classes.len());
        let mut meta = Metadata {
            dataset: kind.name(),
            split: split.name(),
            classes: &classes,
            dtype: opts.dtype,
            mean: written.mean,
            std: written.std,
            source: &source.name,
            official: official.is_some(),
            fingerprint: &print,
            options: &norm_tag(opts),
            conversion: &conversion,
        }
        .into_map();
        meta.insert("source_sha256".into(), source.sha256.clone());
        if let Some(c) = &coarse {
            meta.insert("coarse_classes".into(), serde_json::to_string(c).unwrap());
        }
        let path = output_path(out_dir, kind, split);
        let images = w.images();
        let file = w.finish(meta)?;
        sealed.push((
            SplitSummary { split: split.name().into(), path, images, per_class, bytes: file.size },
            file,
        ));
    }
    let splits = persist_all(out_dir, sealed)?;
    let dataset = kind.name().into();
    Ok(PrepSummary {
        dataset,
        source,
        classes,
        splits,
        seconds: start.elapsed().as_secs_f64(),
        skipped: false,
        image_folder: false,
    })
}

/// The metadata every tensor file carries, whatever its input.
pub(crate) struct Metadata<'a> {
    pub dataset: &'a str,
    pub split: &'a str,
    pub classes: &'a [String],
    pub dtype: StoreDtype,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// The input's file name.
    pub source: &'a str,
    pub official: bool,
    /// What "up to date" compares: the input's fingerprint and the options.
    pub fingerprint: &'a str,
    pub options: &'a str,
    /// The conversion's [`conversion_id`], the same in all its splits.
    pub conversion: &'a str,
}

impl Metadata<'_> {
    pub fn into_map(self) -> HashMap<String, String> {
        HashMap::from([
            ("format".to_string(), "cifar-fast".to_string()),
            ("format_version".into(), FORMAT_VERSION.into()),
            ("dataset".into(), self.dataset.into()),
            ("split".into(), self.split.into()),
            ("classes".into(), serde_json::to_string(self.classes).unwrap()),
            ("dtype".into(), self.dtype.name().into()),
            ("normalized".into(), (self.dtype == StoreDtype::F32).to_string()),
            ("mean".into(), serde_json::to_string(&self.mean).unwrap()),
            ("std".into(), serde_json::to_string(&self.std).unwrap()),
            ("source".into(), self.source.into()),
            ("source_official".into(), self.official.to_string()),
            ("source_fingerprint".into(), self.fingerprint.into()),
            ("prep_options".into(), self.options.into()),
            ("conversion".into(), self.conversion.into()),
        ])
    }
}

/// What the writer thread reports back.
struct Written {
    mean: [f32; 3],
    std: [f32; 3],
    labels: BTreeMap<Split, Vec<i64>>,
}

impl Written {
    fn per_class(&self, split: Split, classes: usize) -> Vec<usize> {
        let labels = self.labels.get(&split).map_or(&[][..], Vec::as_slice);
        per_class(labels, classes).expect("labels were checked against the classes when parsed")
    }
}

/// Parses batches as they arrive and writes them in torchvision's order (batch 1 before 2, ...),
/// holding back any that come early. With `Norm::Dataset` everything waits for the train split's
/// statistics.
fn write_splits(
    rx: crossbeam_channel::Receiver<(Role, PathBuf, Vec<u8>)>,
    writers: &mut BTreeMap<Split, TensorFileWriter>,
    opts: &PrepOptions,
) -> Result<Written> {
    // For the train split's own statistics nothing is written until all of it is read.
    let (mean, std) = opts.norm.mean_std(|| ([0.0; 3], [1.0; 3]));
    let defer_all = opts.norm == Norm::Dataset;
    let mut norm = Normalize::new(mean, std);
    let mut pending: BTreeMap<(Split, usize), Records> = BTreeMap::new();
    let mut next: BTreeMap<Split, usize> = BTreeMap::new();
    let mut labels: BTreeMap<Split, Vec<i64>> = BTreeMap::new();
    let mut flush = |pending: &mut BTreeMap<(Split, usize), Records>, norm: &Normalize| -> Result<()> {
        for split in [Split::Train, Split::Test] {
            let n = next.entry(split).or_insert(0);
            while let Some(records) = pending.remove(&(split, *n)) {
                writers.get_mut(&split).unwrap().push(&records, norm)?;
                labels.entry(split).or_default().extend_from_slice(&records.labels);
                *n += 1;
            }
        }
        Ok(())
    };
    for (role, path, bytes) in rx {
        let Role::Batch { kind, split, index } = role else { continue };
        let records = layout::parse_batch(kind, &bytes, &path)?;
        drop(bytes);
        pending.insert((split, index), records);
        if !defer_all {
            flush(&mut pending, &norm)?;
        }
    }
    let (mean, std) = if defer_all {
        let stats = channel_stats(pending.range((Split::Train, 0)..(Split::Test, 0)).map(|(_, r)| r));
        norm = Normalize::new(stats.0, stats.1);
        stats
    } else {
        (mean, std)
    };
    flush(&mut pending, &norm)?;
    Ok(Written { mean, std, labels })
}

/// Per-channel mean and (population) std of pixel / 255, as `data.mean((0, 2, 3)) / 255`.
pub(crate) fn channel_stats<'a>(batches: impl Iterator<Item = &'a Records>) -> ([f32; 3], [f32; 3]) {
    let mut hist = [[0u64; 256]; 3];
    for r in batches.filter(|r: &&Records| !r.is_empty()) {
        let per_image = r.pixels.len() / r.len();
        let plane = per_image / layout::CHANNELS;
        for img in r.pixels.chunks_exact(per_image) {
            for c in 0..3 {
                for &p in &img[c * plane..(c + 1) * plane] {
                    hist[c][p as usize] += 1;
                }
            }
        }
    }
    stats_of_histogram(&hist)
}

/// Per-channel mean and (population) std of pixel / 255 from each channel's histogram of bytes.
pub(crate) fn stats_of_histogram(hist: &[[u64; 256]; 3]) -> ([f32; 3], [f32; 3]) {
    let mut mean = [0f32; 3];
    let mut std = [1f32; 3];
    for c in 0..3 {
        let n: u64 = hist[c].iter().sum();
        if n == 0 {
            continue;
        }
        let m = hist[c].iter().enumerate().map(|(v, &k)| v as f64 * k as f64).sum::<f64>() / n as f64;
        let var = hist[c].iter().enumerate().map(|(v, &k)| (v as f64 - m).powi(2) * k as f64).sum::<f64>()
            / n as f64;
        mean[c] = (m / 255.0) as f32;
        std[c] = (var.sqrt() / 255.0).max(1e-6) as f32;
    }
    (mean, std)
}
