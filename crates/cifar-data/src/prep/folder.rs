//! Image-classification folders into tensor files: `ROOT/<split>/<class>/<image>` (PNG, JPEG,
//! BMP, ...), as a directory or a `.tar`/`.tar.gz` of one — the layout of torchvision's
//! `ImageFolder`, of the PNG/JPEG mirrors of CIFAR-10, of CINIC-10 and of `cifar2png`'s output.
//!
//! Order is `ImageFolder`'s: classes are the sorted folder names, samples the sorted file names
//! within each class, so index *i* of `<name>-<split>.safetensors` is
//! `ImageFolder("ROOT/<split>")[i]` (an archive read as its extraction would be: see
//! [`super::listing`]). The listing fixes every image's place before a pixel is decoded, and
//! records have one size, so decoding streams: every core decodes as the files (or the
//! archive's members) are read, and writes each image at its place in its split's file.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use sha2::{Digest, Sha256};

use super::image::MemoryBudget;
use super::layout::CHANNELS;
use super::listing::{Bytes, Image, Listing, list_archive, list_dir, read_members};
use super::tarball::{InputKind, hex, input_kind, open_archive};
use super::writer::{Normalize, StoreDtype, TensorFileWriter};
use super::{Metadata, Norm, PrepOptions, PrepSummary, SplitSummary};
use crate::error::{Error, IoContext, Result};
use crate::store::TensorFile;

/// The file name endings torchvision's `ImageFolder` takes as images (`IMG_EXTENSIONS`),
/// compared case-insensitively; other files are skipped, as it skips them.
pub const IMG_EXTENSIONS: [&str; 9] =
    [".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"];

/// Whether `name` ends like an image file, as `ImageFolder` decides it.
pub fn is_image_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    IMG_EXTENSIONS.iter().any(|e| lower.ends_with(e))
}

/// Where one image sits: `(split, class, file name)` below the root.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Place {
    split: String,
    class: String,
    file: String,
}

/// Whether `input` is an image folder (rather than CIFAR batches): a directory with no CIFAR
/// batch files, or an archive whose first recognisable member is an image.
pub fn is_image_folder(input: &Path) -> Result<bool> {
    match input_kind(input)? {
        InputKind::Dir => Ok(super::tarball::dir_members(input)?.is_empty()),
        kind => {
            let file = std::fs::File::open(input).at(input)?;
            let mut archive = open_archive(file, kind == InputKind::Gzip);
            let corrupt =
                |e: std::io::Error| Error::format(input, format!("corrupt or truncated archive: {e}"));
            for entry in archive.entries().map_err(corrupt)? {
                let entry = entry.map_err(corrupt)?;
                if !entry.header().entry_type().is_file() {
                    continue;
                }
                let name = entry.path().map_err(corrupt)?.to_string_lossy().into_owned();
                if super::layout::role_of(&name).is_some() {
                    return Ok(false);
                }
                if is_image_name(&name) {
                    return Ok(true);
                }
            }
            Ok(false)
        }
    }
}

/// The output name of `input` when `--name` is not given: the archive's file name without
/// `.tar.gz`/`.tgz`/`.tar`, or the directory's name (its parent's, for a directory that is
/// itself one split), with characters other than `[A-Za-z0-9._-]` as `-`.
fn default_name(input: &Path, one_split: bool) -> String {
    let base = if one_split {
        input.canonicalize().ok().and_then(|p| p.parent().map(Path::to_path_buf))
    } else {
        None
    };
    let file = base.as_deref().unwrap_or(input).file_name().map(|n| n.to_string_lossy().into_owned());
    let mut name = file.unwrap_or_else(|| "images".into());
    for ext in [".tar.gz", ".tgz", ".tar"] {
        if let Some(stem) = name.strip_suffix(ext) {
            name = stem.to_string();
            break;
        }
    }
    name.chars().map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '-' }).collect()
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

/// The tensor file of split `split` of dataset `name` in `dir`.
pub fn output_path(dir: &Path, name: &str, split: &str) -> PathBuf {
    dir.join(format!("{name}-{split}.safetensors"))
}

/// The `(split, class, file)` of each member, from the layout `[prefix/]<split>/<class>/<file>`
/// (or `<class>/<file>` in a directory that is one split, named `own_split`).
fn places(input: &Path, members: &[Image], own_split: Option<&str>) -> Result<Vec<Place>> {
    let Some(first) = members.first() else {
        return Err(Error::format(
            input,
            "holds neither CIFAR batches nor images (expected ROOT/<split>/<class>/<image>)",
        ));
    };
    let depth = first.parts.len();
    if let Some(odd) = members.iter().find(|m| m.parts.len() != depth) {
        return Err(Error::format(
            input,
            format!(
                "images lie at different depths ({} and {}): expected every image at \
                 ROOT/<split>/<class>/<image>",
                first.shown.display(),
                odd.shown.display()
            ),
        ));
    }
    let place = |m: &Image| -> Result<Place> {
        let p = &m.parts;
        match (depth, own_split) {
            (2, Some(split)) => Ok(Place { split: split.into(), class: p[0].clone(), file: p[1].clone() }),
            (d, _) if d >= 3 => {
                if p[..d - 3] != first.parts[..d - 3] {
                    return Err(Error::format(
                        input,
                        format!(
                            "holds images under two roots ({} and {}): expected one ROOT/<split>/<class>/<image>",
                            first.shown.display(),
                            m.shown.display()
                        ),
                    ));
                }
                Ok(Place { split: p[d - 3].clone(), class: p[d - 2].clone(), file: p[d - 1].clone() })
            }
            _ => Err(Error::format(
                &m.shown,
                "is not in a class folder: expected ROOT/<split>/<class>/<image>",
            )),
        }
    };
    let out = members.iter().map(place).collect::<Result<Vec<_>>>()?;
    for p in &out {
        if !valid_name(&p.split) {
            return Err(Error::format(
                input,
                format!(
                    "split folder {:?} is not usable in a file name (letters, digits, '.', '_', '-')",
                    p.split
                ),
            ));
        }
    }
    Ok(out)
}

/// The folders, and the path and content of every image, hashed: a re-run on unchanged input
/// is skipped, and a changed image (or a new folder) is converted again whatever its size and
/// modification time.
fn fingerprint_files(listing: &Listing) -> Result<String> {
    let mut h = Sha256::new();
    for d in &listing.dirs {
        h.update(d.as_bytes());
        h.update([0]);
    }
    for image in &listing.images {
        h.update(image.parts.join("/").as_bytes());
        h.update([0]);
        if let Bytes::File(path) = &image.bytes {
            super::hash_file(&mut h, path)?;
        }
    }
    Ok(format!("images:{}", hex(&h.finalize())))
}

fn options_tag(opts: &PrepOptions, name: &str) -> String {
    format!(
        "{}:{:?}:size={:?}:name={name}:store={:?}:max_side={:?}:quality={}",
        opts.dtype.name(),
        opts.norm,
        opts.size,
        opts.store,
        opts.max_side,
        opts.quality
    )
}

/// A prepared split of either kind (dense or encoded), as [`up_to_date`] compares it.
struct Prepared {
    metadata: HashMap<String, String>,
    labels: Vec<i64>,
    classes: Vec<String>,
}

impl Prepared {
    fn open(path: &Path) -> Option<Prepared> {
        if crate::store::is_encoded(path).ok()? {
            let f = crate::store::encoded::EncodedFile::open(path).ok()?;
            Some(Prepared {
                metadata: f.metadata().clone(),
                labels: f.labels().to_vec(),
                classes: f.classes().to_vec(),
            })
        } else {
            let f = TensorFile::open(path).ok()?;
            Some(Prepared {
                metadata: f.metadata().clone(),
                labels: f.labels().to_vec(),
                classes: f.classes().to_vec(),
            })
        }
    }

    fn made_from(&self, print: &str, tag: &str) -> bool {
        let m = &self.metadata;
        m.get("source_fingerprint").map(String::as_str) == Some(print)
            && m.get("prep_options").map(String::as_str) == Some(tag)
    }
}

/// Output in `out_dir` made from this input (fingerprint `print`) with these options.
fn up_to_date(input: &Path, name: &str, print: &str, tag: &str, out_dir: &Path) -> Option<PrepSummary> {
    let first = std::fs::read_dir(out_dir).ok()?.filter_map(|e| e.ok()).find_map(|e| {
        let file_name = e.file_name().to_string_lossy().into_owned();
        let split = file_name.strip_prefix(&format!("{name}-"))?.strip_suffix(".safetensors")?.to_string();
        let f = Prepared::open(&e.path())?;
        (f.made_from(print, tag) && f.metadata.get("split") == Some(&split)).then_some(f)
    })?;
    let splits: Vec<String> = serde_json::from_str(first.metadata.get("splits")?).ok()?;
    let classes = first.classes.clone();
    let mut out = Vec::new();
    for split in splits {
        let path = output_path(out_dir, name, &split);
        let f = Prepared::open(&path)?;
        if !f.made_from(print, tag) || f.metadata.get("conversion") != first.metadata.get("conversion") {
            return None;
        }
        let per_class = super::per_class(&f.labels, classes.len())?;
        let bytes = std::fs::metadata(&path).ok()?.len();
        out.push(SplitSummary { split, path, images: f.labels.len(), per_class, bytes });
    }
    out.sort_by_key(|s| (s.split != "train", s.split.clone()));
    let source = super::tarball::SourceInfo::named(input);
    Some(PrepSummary {
        dataset: name.into(),
        source,
        classes,
        splits: out,
        seconds: 0.0,
        skipped: true,
        image_folder: true,
    })
}

/// Where one image's pixels go: `(split number, index in the split)`. An archive's member
/// that several names share (hard links) goes to each of their places.
pub(crate) type Target = (usize, usize);

/// One image to decode: its path for messages, its bytes (read by the decoder for a directory),
/// and its places.
pub(crate) type Job = (PathBuf, Option<Vec<u8>>, Vec<Target>);

/// Converts an image folder (directory or archive) into `out_dir/<name>-<split>.safetensors`,
/// streaming, so memory stays bounded (by [`MemoryBudget`]) whatever the folder's size: as
/// dense tensors where every image has one size (or `--size` gives one), every image decoded
/// and written at its place in its split's file; as encoded files (`prep::encoded`) where
/// images differ in size, or `--store encoded` or `--max-side` asks. On error nothing is left
/// in `out_dir` and earlier output there is untouched.
pub fn prepare(
    input: &Path,
    out_dir: &Path,
    opts: &PrepOptions,
    progress: &indicatif::ProgressBar,
) -> Result<PrepSummary> {
    let start = Instant::now();
    let kind = input_kind(input)?;
    let gzipped = kind == InputKind::Gzip;
    let listing = match kind {
        InputKind::Dir => list_dir(input)?,
        _ => list_archive(std::fs::File::open(input).at(input)?, gzipped, input)?,
    };
    let own_split = (kind == InputKind::Dir && listing.images.first().is_some_and(|f| f.parts.len() == 2))
        .then(|| default_name(input, false));
    let name = match &opts.name {
        Some(n) if valid_name(n) => n.clone(),
        Some(n) => return Err(Error::Config(format!("--name {n:?}: use letters, digits, '.', '_' and '-'"))),
        None => default_name(input, own_split.is_some()),
    };
    let print = match kind {
        InputKind::Dir => fingerprint_files(&listing)?,
        _ => super::fingerprint(input)?,
    };
    let tag = options_tag(opts, &name);
    if !opts.force
        && let Some(done) = up_to_date(input, &name, &print, &tag, out_dir)
    {
        return Ok(done);
    }
    let conv = Conversion::plan(input, gzipped, &listing, own_split.as_deref(), out_dir, name, print, tag)?;
    std::fs::create_dir_all(out_dir).at(out_dir)?;
    let sealed = match opts.store {
        Store::Dense => dense(&conv, opts, progress)?,
        Store::Encoded => super::encoded::write(&conv, opts, progress)?,
        Store::Auto if opts.size.is_some() => dense(&conv, opts, progress)?,
        Store::Auto if opts.max_side.is_some() => super::encoded::write(&conv, opts, progress)?,
        Store::Auto => match dense(&conv, opts, progress) {
            // Images of several sizes: kept encoded instead (the dense attempt stopped at the
            // first image of another size; what it wrote is gone).
            Err(e) if conv.sizes_differ.load(std::sync::atomic::Ordering::SeqCst) => {
                drop(e);
                progress.set_position(0);
                super::encoded::write(&conv, opts, progress)?
            }
            other => other?,
        },
    };
    let mut splits = super::persist_all(out_dir, sealed)?;
    splits.sort_by_key(|s| (s.split != "train", s.split.clone()));
    let source = super::tarball::SourceInfo::named(input);
    Ok(PrepSummary {
        dataset: conv.name,
        source,
        classes: conv.classes,
        splits,
        seconds: start.elapsed().as_secs_f64(),
        skipped: false,
        image_folder: true,
    })
}

/// How the images of a folder's splits are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Store {
    /// Dense where every image has one size (or `--size` resizes them to one), encoded
    /// otherwise.
    #[default]
    Auto,
    /// Decoded, `[N, 3, H, W]`.
    Dense,
    /// Kept encoded (see `prep::encoded`).
    Encoded,
}

/// What a conversion knows from the listing alone: every image's place, the classes, the
/// splits and their labels.
pub(crate) struct Conversion<'a> {
    pub input: &'a Path,
    pub gzipped: bool,
    pub listing: &'a Listing,
    pub out_dir: &'a Path,
    pub name: String,
    pub print: String,
    pub tag: String,
    pub classes: Vec<String>,
    pub split_names: Vec<String>,
    /// Each split's labels, in index order.
    pub labels: Vec<Vec<i64>>,
    /// Each listed image's place.
    pub target_of: Vec<Target>,
    /// The listed image first in index order (whose size a dense conversion takes).
    pub first: usize,
    /// Set by a dense conversion that met an image of another size than the first.
    pub sizes_differ: std::sync::atomic::AtomicBool,
}

impl<'a> Conversion<'a> {
    #[allow(clippy::too_many_arguments)] // what `prepare` found, handed over once
    fn plan(
        input: &'a Path,
        gzipped: bool,
        listing: &'a Listing,
        own_split: Option<&str>,
        out_dir: &'a Path,
        name: String,
        print: String,
        tag: String,
    ) -> Result<Self> {
        let images = &listing.images;
        let places = places(input, images, own_split)?;
        let mut classes_of: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for p in &places {
            classes_of.entry(&p.split).or_default().insert(&p.class);
        }
        // A class folder without images is refused, as ImageFolder refuses it.
        let root: Vec<String> = match own_split {
            Some(_) => Vec::new(),
            None => images[0].parts[..images[0].parts.len() - 3].to_vec(),
        };
        for (split, classes) in &classes_of {
            let mut split_dir = root.clone();
            if own_split.is_none() {
                split_dir.push(split.to_string());
            }
            let prefix =
                if split_dir.is_empty() { String::new() } else { format!("{}/", split_dir.join("/")) };
            for d in &listing.dirs {
                if let Some(class) = d.strip_prefix(&prefix)
                    && !class.contains('/')
                    && !classes.contains(class)
                {
                    return Err(Error::format(input.join(d), "is a class folder with no images"));
                }
            }
        }
        let (first_split, first_classes) = classes_of.iter().next().expect("at least one image");
        for (split, classes) in &classes_of {
            if classes != first_classes {
                let only: Vec<&&str> = classes.symmetric_difference(first_classes).collect();
                return Err(Error::format(
                    input,
                    format!(
                        "splits {first_split} and {split} have different classes (not in both: {}): \
                         labels would not mean the same",
                        only.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(", ")
                    ),
                ));
            }
        }
        let classes: Vec<String> = first_classes.iter().map(|s| s.to_string()).collect();
        let split_names: Vec<String> = classes_of.keys().map(|s| s.to_string()).collect();
        let outputs: Vec<PathBuf> =
            split_names.iter().map(|split| output_path(out_dir, &name, split)).collect();
        super::input_is_not_an_output(input, outputs.iter().map(PathBuf::as_path))?;
        super::check_class_count(classes.len(), input)?;
        let label: HashMap<&str, i64> =
            classes.iter().enumerate().map(|(i, c)| (c.as_str(), i as i64)).collect();
        // ImageFolder's order: split, then class, then file name.
        let mut order: Vec<usize> = (0..images.len()).collect();
        order.sort_by(|&a, &b| places[a].cmp(&places[b]));
        let mut target_of = vec![(0, 0); images.len()];
        let mut labels: Vec<Vec<i64>> = vec![Vec::new(); split_names.len()];
        for &i in &order {
            let s = split_names.binary_search(&places[i].split).expect("a split of the listing");
            target_of[i] = (s, labels[s].len());
            labels[s].push(label[places[i].class.as_str()]);
        }
        Ok(Conversion {
            input,
            gzipped,
            listing,
            out_dir,
            name,
            print,
            tag,
            classes,
            split_names,
            labels,
            target_of,
            first: order[0],
            sizes_differ: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The metadata of split `s`'s file, made by the conversion `conversion`.
    pub fn metadata(
        &self,
        s: usize,
        dtype: StoreDtype,
        (mean, std): ([f32; 3], [f32; 3]),
        conversion: &str,
    ) -> HashMap<String, String> {
        let mut meta = Metadata {
            dataset: &self.name,
            split: &self.split_names[s],
            classes: &self.classes,
            dtype,
            mean,
            std,
            source: &self.input.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            official: false,
            fingerprint: &self.print,
            options: &self.tag,
            conversion,
        }
        .into_map();
        meta.insert("splits".into(), serde_json::to_string(&self.split_names).unwrap());
        meta.insert("source_kind".into(), "image-folder".into());
        meta
    }

    /// Reads every image in the listing's order (a directory's files are read by whoever
    /// takes the job; an archive's members here, in archive order), handing each to `send`
    /// with its places until `send` says stop. Returns the jobs sent, and how reading ended.
    pub fn read(&self, send: &mut dyn FnMut(Job) -> bool) -> (usize, Result<()>) {
        let mut sent = 0;
        let mut send = |job: Job| -> bool {
            sent += 1;
            send(job)
        };
        let read = match &self.listing.images[0].bytes {
            Bytes::File(_) => {
                for (image, &target) in self.listing.images.iter().zip(&self.target_of) {
                    if !send((image.shown.clone(), None, vec![target])) {
                        break;
                    }
                }
                Ok(())
            }
            Bytes::Member { .. } => {
                let mut wanted: BTreeMap<usize, u64> = BTreeMap::new();
                let mut places: HashMap<usize, (PathBuf, Vec<Target>)> = HashMap::new();
                for (image, &target) in self.listing.images.iter().zip(&self.target_of) {
                    let Bytes::Member { number, size } = image.bytes else {
                        unreachable!("one kind of input")
                    };
                    wanted.insert(number, size);
                    places.entry(number).or_insert_with(|| (image.shown.clone(), Vec::new())).1.push(target);
                }
                let (input, gzipped) = (self.input, self.gzipped);
                std::fs::File::open(input).at(input).and_then(|file| {
                    read_members(file, gzipped, input, &wanted, |number, bytes| {
                        let (shown, targets) = places.remove(&number).expect("a wanted member");
                        Ok(send((shown, Some(bytes), targets)))
                    })
                })
            }
        };
        (sent, read)
    }
}

/// The dense conversion: every image decoded, checked against the first's size (or resized to
/// `--size`), and written at its place; sealed splits, ready to persist.
fn dense(
    conv: &Conversion<'_>,
    opts: &PrepOptions,
    progress: &indicatif::ProgressBar,
) -> Result<Vec<(SplitSummary, super::writer::Sealed)>> {
    let (input, out_dir, name) = (conv.input, conv.out_dir, &conv.name);
    // The images' size: --size, or the first image's (in index order, read from its header).
    let first = &conv.listing.images[conv.first];
    let side = match opts.size {
        Some(s) => s,
        None => {
            let bytes = read_one(input, conv.gzipped, first)?;
            let (w, h) = super::image::dimensions(&bytes, &first.shown)?;
            super::image::check_pixels((w, h), opts.max_image_pixels, &first.shown)?;
            (h, w)
        }
    };
    let side_px = (side.0 as usize, side.1 as usize);
    // Normalizing with the data's own statistics needs them before the first f32 is written:
    // the bytes go to a scratch file first, and are normalized from there.
    let staged = opts.dtype == StoreDtype::F32 && opts.norm == Norm::Dataset;
    let first_dtype = if staged { StoreDtype::U8 } else { opts.dtype };
    let room = super::writer::header_room(conv.classes.iter().chain(&conv.split_names).map(String::as_str));
    let mut outputs = Vec::new();
    for (s, split) in conv.split_names.iter().enumerate() {
        let stage = if staged { "-u8" } else { "" };
        outputs.push(TensorFileWriter::placed(
            out_dir,
            &format!("cifar-prep-{name}-{split}{stage}"),
            first_dtype,
            side_px,
            conv.labels[s].clone(),
            room,
        )?);
    }
    let (mean, std) = opts.norm.mean_std(|| ([0.0; 3], [1.0; 3]));
    let norm = Normalize::new(mean, std);
    let stats_split = conv.split_names.iter().position(|s| s == "train").unwrap_or(0);
    let hist = decode_all(conv, side, opts, &outputs, &norm, stats_split, &first.shown, progress)?;

    let (mean, std) = opts.norm.mean_std(|| super::stats_of_histogram(&hist));
    let norm = Normalize::new(mean, std);
    if staged {
        let scratch = std::mem::take(&mut outputs);
        for (s, split) in conv.split_names.iter().enumerate() {
            let out = TensorFileWriter::placed(
                out_dir,
                &format!("cifar-prep-{name}-{split}"),
                opts.dtype,
                side_px,
                conv.labels[s].clone(),
                room,
            )?;
            let per_image = CHANNELS * side_px.0 * side_px.1;
            let mut buf = vec![0u8; per_image];
            for i in 0..out.images() {
                scratch[s].read_back(i, &mut buf)?;
                out.put(i, &buf, &norm)?;
            }
            outputs.push(out);
        }
    }

    let conversion = super::conversion_id();
    let mut sealed = Vec::new();
    for (s, writer) in outputs.into_iter().enumerate() {
        let per_class =
            super::per_class(&conv.labels[s], conv.classes.len()).expect("labels index the classes");
        let meta = conv.metadata(s, opts.dtype, (mean, std), &conversion);
        let images = writer.images();
        let file = writer.finish(meta)?;
        let path = output_path(out_dir, name, &conv.split_names[s]);
        sealed.push((
            SplitSummary { split: conv.split_names[s].clone(), path, images, per_class, bytes: file.size },
            file,
        ));
    }
    Ok(sealed)
}

/// The bytes of one image of the listing.
fn read_one(input: &Path, gzipped: bool, image: &Image) -> Result<Vec<u8>> {
    match &image.bytes {
        Bytes::File(path) => std::fs::read(path).at(path),
        Bytes::Member { number, size } => {
            let mut out = None;
            let wanted = BTreeMap::from([(*number, *size)]);
            read_members(std::fs::File::open(input).at(input)?, gzipped, input, &wanted, |_, b| {
                out = Some(b);
                Ok(false)
            })?;
            Ok(out.expect("the listed member was read"))
        }
    }
}

/// Decodes every image of the conversion and writes it at its places in `outputs`, every core
/// decoding while this thread reads. Returns the per-channel byte histogram of split
/// `stats_split`.
#[allow(clippy::too_many_arguments)]
fn decode_all(
    conv: &Conversion<'_>,
    side: (u32, u32),
    opts: &PrepOptions,
    outputs: &[TensorFileWriter],
    norm: &Normalize,
    stats_split: usize,
    first_shown: &Path,
    progress: &indicatif::ProgressBar,
) -> Result<[[u64; 256]; CHANNELS]> {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let budget = MemoryBudget::for_this_machine();
    // The error reported is that of the first bad image in reading order, whichever decoder
    // finds one first: jobs leave the channel in that order, so when job `n` fails every job
    // before it is done or in hand, and is finished; only jobs after the first failure so far
    // are dropped.
    use std::sync::atomic::Ordering::SeqCst;
    let first_bad = std::sync::atomic::AtomicUsize::new(usize::MAX);
    let first_error: std::sync::Mutex<Option<(usize, Error)>> = std::sync::Mutex::new(None);
    let fail = |n: usize, e: Error| {
        let mut first = first_error.lock().unwrap_or_else(|p| p.into_inner());
        if first.as_ref().is_none_or(|(m, _)| n < *m) {
            *first = Some((n, e));
        }
        first_bad.fetch_min(n, SeqCst);
    };
    let (jobs_tx, jobs_rx) = crossbeam_channel::bounded::<(usize, Job)>(2 * threads);
    progress.set_length(conv.listing.images.len() as u64);
    let hists = std::thread::scope(|s| {
        let decoders: Vec<_> = (0..threads)
            .map(|_| {
                let jobs = jobs_rx.clone();
                let (budget, first_bad, fail) = (&budget, &first_bad, &fail);
                s.spawn(move || {
                    let mut hist = [[0u64; 256]; CHANNELS];
                    for (n, (shown, bytes, targets)) in jobs {
                        if n > first_bad.load(SeqCst) {
                            break;
                        }
                        let bytes = match bytes {
                            Some(b) => Ok(b),
                            None => crate::files::read_regular(&shown, super::layout::MAX_MEMBER_BYTES),
                        };
                        let done = bytes.and_then(|b| {
                            decode_one(
                                &b,
                                &shown,
                                first_shown,
                                side,
                                opts,
                                budget,
                                &conv.sizes_differ,
                                |pixels| {
                                    for &(split, index) in &targets {
                                        outputs[split].put(index, pixels, norm)?;
                                        if split == stats_split {
                                            count(&mut hist, pixels);
                                        }
                                    }
                                    Ok(())
                                },
                            )
                        });
                        match done {
                            Ok(()) => progress.inc(targets.len() as u64),
                            Err(e) => fail(n, e),
                        }
                    }
                    hist
                })
            })
            .collect();
        drop(jobs_rx);
        let mut n = 0;
        let (sent, read) = conv.read(&mut |job| {
            n += 1;
            first_bad.load(SeqCst) == usize::MAX && jobs_tx.send((n - 1, job)).is_ok()
        });
        drop(jobs_tx);
        if let Err(e) = read {
            // After every image read before it; a decoder's error, where there is one, is the
            // cause (reading only saw it stop).
            fail(sent, e);
        }
        decoders.into_iter().map(|d| d.join().expect("decoder thread panicked")).collect::<Vec<_>>()
    });
    if let Some((_, e)) = first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    let mut hist = [[0u64; 256]; CHANNELS];
    for h in hists {
        for c in 0..CHANNELS {
            for v in 0..256 {
                hist[c][v] += h[c][v];
            }
        }
    }
    Ok(hist)
}

/// Decodes one image within `budget`, checks its size against the conversion's `side`
/// (`(height, width)`, that of `first`; a mismatch sets `sizes_differ`), and hands its pixels
/// to `write`.
#[allow(clippy::too_many_arguments)]
fn decode_one(
    bytes: &[u8],
    shown: &Path,
    first: &Path,
    side: (u32, u32),
    opts: &PrepOptions,
    budget: &MemoryBudget,
    sizes_differ: &std::sync::atomic::AtomicBool,
    write: impl FnOnce(&[u8]) -> Result<()>,
) -> Result<()> {
    let (w, h) = super::image::dimensions(bytes, shown)?;
    super::image::check_pixels((w, h), opts.max_image_pixels, shown)?;
    if opts.size.is_none() && (h, w) != side {
        sizes_differ.store(true, std::sync::atomic::Ordering::SeqCst);
        return Err(Error::format(
            shown,
            format!(
                "is {w}x{h}, but {} is {}x{}: pass --size H,W to resize every image to one size (or \
                 --store encoded to keep images of every size)",
                first.display(),
                side.1,
                side.0
            ),
        ));
    }
    let cost = super::image::decode_cost((w, h), opts.size);
    let _share = budget.take_for_image((w, h), cost, shown)?;
    let (_, _, pixels) = super::image::decode_checked(bytes, (w, h), opts.size, shown)?;
    write(&pixels)
}

/// Adds one planar image's bytes to a per-channel histogram.
fn count(hist: &mut [[u64; 256]; CHANNELS], pixels: &[u8]) {
    let plane = pixels.len() / CHANNELS;
    for (c, h) in hist.iter_mut().enumerate() {
        for &p in &pixels[c * plane..(c + 1) * plane] {
            h[p as usize] += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_names_follow_torchvision() {
        assert!(is_image_name("a/B.JPG") && is_image_name("x.webp") && is_image_name("x.pgm"));
        assert!(!is_image_name("x.gif") && !is_image_name("x.txt") && !is_image_name("jpg"));
    }

    #[test]
    fn default_names_drop_archive_endings() {
        assert_eq!(default_name(Path::new("/d/cifar-10-jpeg.tar.gz"), false), "cifar-10-jpeg");
        assert_eq!(default_name(Path::new("x/my data.tgz"), false), "my-data");
    }
}
