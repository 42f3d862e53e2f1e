//! Image-classification folders into tensor files: `ROOT/<split>/<class>/<image>` (PNG, JPEG,
//! BMP, ...), as a directory or a `.tar`/`.tar.gz` of one — the layout of torchvision's
//! `ImageFolder`, of the PNG/JPEG mirrors of CIFAR-10, of CINIC-10 and of `cifar2png`'s output.
//!
//! Order is `ImageFolder`'s: classes are the sorted folder names, samples the sorted file names
//! within each class, so index *i* of `<name>-<split>.safetensors` is
//! `ImageFolder("ROOT/<split>")[i]`. Decoding runs on every core: one thread reads (the
//! directory, or the archive's gzip → tar stream), the others decode as members arrive. The
//! decoded pixels of all splits are held in memory until they are sorted and written
//! (3 × H × W bytes an image: 184 MB for CIFAR-10's 60,000).
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

use image::imageops::FilterType;
use sha2::{Digest, Sha256};

use super::layout::{CHANNELS, Records};
use super::tarball::{InputKind, hex, input_kind, open_archive};
use super::writer::{Normalize, TensorFileWriter};
use super::{Metadata, PrepOptions, PrepSummary, SplitSummary, channel_stats};
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

/// Decodes one image file's bytes to planar RGB (`convert("RGB")`, as `ImageFolder`'s loader
/// does), resized (bilinear, antialiased) to `size` `(height, width)` when given. Returns
/// `(height, width, pixels)`. JPEGs go through libjpeg-turbo's decoder, as in Pillow, so the
/// pixels are torchvision's; other formats through the `image` crate.
pub fn decode(bytes: &[u8], size: Option<(u32, u32)>, path: &Path) -> Result<(u32, u32, Vec<u8>)> {
    if bytes.is_empty() {
        return Err(Error::format(path, "is empty (0 bytes), not an image"));
    }
    let mut rgb = match decode_jpeg(bytes) {
        Some(Ok(rgb)) => rgb,
        Some(Err(msg)) => return Err(Error::format(path, format!("cannot be decoded as a JPEG: {msg}"))),
        None => image::ImageReader::new(std::io::Cursor::new(bytes))
            .with_guessed_format()
            .at(path)?
            .decode()
            .map_err(|e| Error::format(path, format!("cannot be decoded as an image: {e}")))?
            .into_rgb8(),
    };
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

/// A JPEG (by its magic bytes, in a colour space libjpeg turns into RGB) decoded to RGB;
/// `None` for anything else, left to the `image` crate.
fn decode_jpeg(bytes: &[u8]) -> Option<std::result::Result<image::RgbImage, String>> {
    if !bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        return None;
    }
    // mozjpeg reports libjpeg's fatal errors by unwinding (without the panic hook): caught here.
    let decoded = std::panic::catch_unwind(|| -> std::io::Result<Option<image::RgbImage>> {
        let d = mozjpeg::Decompress::new_mem(bytes)?;
        if matches!(d.color_space(), mozjpeg::ColorSpace::JCS_CMYK | mozjpeg::ColorSpace::JCS_YCCK) {
            return Ok(None);
        }
        let mut d = d.rgb()?;
        let (w, h) = (d.width() as u32, d.height() as u32);
        let px: Vec<u8> = d.read_scanlines()?;
        d.finish()?;
        Ok(image::RgbImage::from_raw(w, h, px))
    });
    match decoded {
        Ok(Ok(Some(img))) => Some(Ok(img)),
        Ok(Ok(None)) => None,
        Ok(Err(e)) => Some(Err(e.to_string())),
        Err(panic) => Some(Err(panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "corrupt JPEG data".into()))),
    }
}

/// Where one image sits: `(split, class, file name)` below the root, and its path for messages.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Place {
    split: String,
    class: String,
    file: String,
}

/// One image as read: its components below the root (or the archive's top), and its path.
struct Member {
    parts: Vec<String>,
    shown: PathBuf,
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

/// An image file of a directory input: its path components below the root, and its path.
type Listed = (Vec<String>, PathBuf);

/// Every image file below `dir`, as components relative to it, sorted; and every folder below
/// it (`ImageFolder` counts class folders without images too), as relative paths, sorted.
fn walk(dir: &Path) -> Result<(Vec<Listed>, Vec<String>)> {
    let mut out = Vec::new();
    let mut dirs = Vec::new();
    let mut stack = vec![(dir.to_path_buf(), Vec::<String>::new())];
    while let Some((d, prefix)) = stack.pop() {
        for e in std::fs::read_dir(&d).at(&d)? {
            let e = e.at(&d)?;
            let path = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            let mut parts = prefix.clone();
            parts.push(name.clone());
            // `ImageFolder` follows links (os.walk(followlinks=True)): metadata, not the entry's type.
            let meta = std::fs::metadata(&path).at(&path)?;
            if meta.is_dir() {
                dirs.push(parts.join("/"));
                stack.push((path, parts));
            } else if is_image_name(&name) {
                // Reading a FIFO named like an image would block for ever.
                if !meta.is_file() {
                    return Err(Error::format(
                        &path,
                        format!("is {}, not an image file", crate::files::kind_of(&meta)),
                    ));
                }
                out.push((parts, path));
            }
        }
    }
    out.sort();
    dirs.sort();
    Ok((out, dirs))
}

/// Class folders under each split folder of a directory input (`ImageFolder` lists them with
/// `os.scandir`, images or not), to refuse a class folder that holds none.
fn class_dirs(split_dir: &Path) -> Result<BTreeSet<String>> {
    let mut classes = BTreeSet::new();
    for e in std::fs::read_dir(split_dir).at(split_dir)? {
        let p = e.at(split_dir)?.path();
        if p.is_dir() {
            classes.insert(p.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    Ok(classes)
}

/// The `(split, class, file)` of each member, from the layout `[prefix/]<split>/<class>/<file>`
/// (or `<class>/<file>` in a directory that is one split, named `own_split`).
fn places(input: &Path, members: &[Member], own_split: Option<&str>) -> Result<Vec<Place>> {
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
    let place = |m: &Member| -> Result<Place> {
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
fn fingerprint_files(files: &[Listed], dirs: &[String]) -> Result<String> {
    let mut h = Sha256::new();
    for d in dirs {
        h.update(d.as_bytes());
        h.update([0]);
    }
    for (parts, path) in files {
        h.update(parts.join("/").as_bytes());
        h.update([0]);
        super::hash_file(&mut h, path)?;
    }
    Ok(format!("images:{}", hex(&h.finalize())))
}

fn options_tag(opts: &PrepOptions, name: &str) -> String {
    format!("{}:{:?}:size={:?}:name={name}", opts.dtype.name(), opts.norm, opts.size)
}

/// Output in `out_dir` made from this input (fingerprint `print`) with these options.
fn up_to_date(input: &Path, name: &str, print: &str, tag: &str, out_dir: &Path) -> Option<PrepSummary> {
    let matches = |f: &TensorFile| super::made_from(f, print, tag);
    let first = std::fs::read_dir(out_dir).ok()?.filter_map(|e| e.ok()).find_map(|e| {
        let file_name = e.file_name().to_string_lossy().into_owned();
        let split = file_name.strip_prefix(&format!("{name}-"))?.strip_suffix(".safetensors")?.to_string();
        let f = TensorFile::open(e.path()).ok()?;
        (matches(&f) && f.metadata().get("split") == Some(&split)).then_some(f)
    })?;
    let splits: Vec<String> = serde_json::from_str(first.metadata().get("splits")?).ok()?;
    let classes = first.classes().to_vec();
    let mut out = Vec::new();
    for split in splits {
        let path = output_path(out_dir, name, &split);
        let f = TensorFile::open(&path).ok()?;
        if !matches(&f) || !super::same_conversion([&first, &f]) {
            return None;
        }
        out.push(SplitSummary::of_file(&split, path, &f, classes.len())?);
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

/// One decoded image, or why it could not be.
type Decoded = (usize, Result<(u32, u32, Vec<u8>)>);

/// Converts an image folder (directory or archive) into `out_dir/<name>-<split>.safetensors`.
/// On error nothing is left in `out_dir` and earlier output there is untouched.
pub fn prepare(
    input: &Path,
    out_dir: &Path,
    opts: &PrepOptions,
    progress: &indicatif::ProgressBar,
) -> Result<PrepSummary> {
    let start = Instant::now();
    let kind = input_kind(input)?;
    // A directory is listed first (its listing is the fingerprint); an archive is streamed.
    let (listing, dirs) = match kind {
        InputKind::Dir => {
            let (files, dirs) = walk(input)?;
            (Some(files), dirs)
        }
        _ => (None, Vec::new()),
    };
    let own_split = listing.as_ref().and_then(|files| {
        (files.first().is_some_and(|f| f.0.len() == 2)).then(|| default_name(input, false))
    });
    let name = match &opts.name {
        Some(n) if valid_name(n) => n.clone(),
        Some(n) => return Err(Error::Config(format!("--name {n:?}: use letters, digits, '.', '_' and '-'"))),
        None => default_name(input, own_split.is_some()),
    };
    let print = match &listing {
        Some(files) => fingerprint_files(files, &dirs)?,
        None => super::fingerprint(input)?,
    };
    let tag = options_tag(opts, &name);
    if !opts.force
        && let Some(done) = up_to_date(input, &name, &print, &tag, out_dir)
    {
        return Ok(done);
    }

    // Read on this thread, decode on the others; results come back tagged with their order.
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let (jobs_tx, jobs_rx) = crossbeam_channel::bounded::<(usize, PathBuf, Option<Vec<u8>>)>(4 * threads);
    let (done_tx, done_rx) = crossbeam_channel::unbounded::<Decoded>();
    let mut members: Vec<Member> = Vec::new();
    let (read, decoded) = std::thread::scope(|s| {
        for _ in 0..threads {
            let (jobs, done) = (jobs_rx.clone(), done_tx.clone());
            s.spawn(move || {
                for (i, shown, bytes) in jobs {
                    let bytes = match bytes {
                        Some(b) => Ok(b),
                        None => std::fs::read(&shown).at(&shown),
                    };
                    let failed = bytes.and_then(|b| decode(&b, opts.size, &shown));
                    let stop = failed.is_err();
                    if done.send((i, failed)).is_err() || stop {
                        break;
                    }
                }
            });
        }
        // Only the decoders receive jobs: once they have all stopped (each on a bad image),
        // sending fails instead of blocking on a full queue forever.
        drop(jobs_rx);
        drop(done_tx);
        // The decoded pixels are held until they are sorted: refuse before they outgrow memory
        // (a huge --size, or a folder of millions of images), not after an out-of-memory kill.
        #[cfg(target_os = "linux")]
        let room = crate::store::available_memory().map_or(u64::MAX, |m| m / 2);
        #[cfg(not(target_os = "linux"))]
        let room = u64::MAX;
        let collector = s.spawn(move || {
            let mut out: Vec<Option<(u32, u32, Vec<u8>)>> = Vec::new();
            let mut held = 0u64;
            for (i, r) in done_rx {
                let img = r?;
                held += img.2.len() as u64;
                if held > room {
                    return Err(Error::format(
                        input,
                        format!(
                            "its decoded images need more than half the available memory ({:.1} GB so far): \
                             use a smaller --size, or split the folder",
                            held as f64 / 1e9
                        ),
                    ));
                }
                if out.len() <= i {
                    out.resize_with(i + 1, || None);
                }
                out[i] = Some(img);
            }
            Ok::<_, Error>(out)
        });
        let read = match &listing {
            Some(files) => {
                progress.set_length(files.len() as u64);
                for (i, (parts, path)) in files.iter().enumerate() {
                    members.push(Member { parts: parts.clone(), shown: path.clone() });
                    if jobs_tx.send((i, path.clone(), None)).is_err() {
                        break; // a decoder failed: its error is reported
                    }
                    progress.inc(1);
                }
                Ok(())
            }
            None => read_archive(input, kind == InputKind::Gzip, progress, |parts, shown, bytes| {
                let i = members.len();
                members.push(Member { parts, shown: shown.clone() });
                Ok(jobs_tx.send((i, shown, Some(bytes))).is_ok())
            }),
        };
        drop(jobs_tx);
        (read, collector.join().expect("collector thread panicked"))
    });
    let decoded = decoded?;
    read?;
    let places = places(input, &members, own_split.as_deref())?;

    // ImageFolder's order: split, then class, then file name.
    let mut order: Vec<usize> = (0..members.len()).collect();
    order.sort_by(|&a, &b| places[a].cmp(&places[b]));
    let mut classes_of: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for p in &places {
        classes_of.entry(&p.split).or_default().insert(&p.class);
    }
    if let Some(files) = &listing {
        // Directory input: a class folder without images is refused, as ImageFolder refuses it.
        for (split, classes) in &classes_of {
            let mut dir = input.to_path_buf();
            if own_split.is_none() {
                dir.extend(&files[0].0[..files[0].0.len() - 3]);
                dir.push(split);
            }
            if let Some(empty) = class_dirs(&dir)?.iter().find(|c| !classes.contains(c.as_str())) {
                return Err(Error::format(dir.join(empty), "is a class folder with no images"));
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
    let label: HashMap<&str, i64> = classes.iter().enumerate().map(|(i, c)| (c.as_str(), i as i64)).collect();

    // Every image must have the size of the first (in index order) unless --size resized them.
    let mut decoded: Vec<Option<(u32, u32, Vec<u8>)>> = decoded;
    decoded.resize_with(members.len(), || None);
    let size_of = |i: usize| decoded[i].as_ref().map(|d| (d.0, d.1)).expect("every member decoded");
    let (h, w) = size_of(order[0]);
    if let Some(&odd) = order.iter().find(|&&i| size_of(i) != (h, w)) {
        let (oh, ow) = size_of(odd);
        return Err(Error::format(
            &members[odd].shown,
            format!(
                "is {ow}x{oh}, but {} is {w}x{h}: pass --size H,W to resize every image to one size",
                members[order[0]].shown.display()
            ),
        ));
    }

    // Records per split, in index order, moving the pixels out of `decoded`.
    let mut records: BTreeMap<String, Records> = BTreeMap::new();
    for &i in &order {
        let r = records.entry(places[i].split.clone()).or_default();
        r.labels.push(label[places[i].class.as_str()]);
        r.pixels.extend_from_slice(&decoded[i].take().expect("decoded once").2);
    }
    drop(decoded);
    let (mean, std) = opts
        .norm
        .mean_std(|| channel_stats(records.get("train").or_else(|| records.values().next()).into_iter()));
    let norm = Normalize::new(mean, std);
    std::fs::create_dir_all(out_dir).at(out_dir)?;
    let split_names: Vec<String> = records.keys().cloned().collect();
    let conversion = super::conversion_id();
    let mut sealed = Vec::new();
    for (split, r) in &records {
        let side = (h as usize, w as usize);
        let mut writer =
            TensorFileWriter::with_side(out_dir, &format!("cifar-prep-{name}-{split}"), opts.dtype, side)?;
        writer.push(r, &norm)?;
        let per_class = super::per_class(&r.labels, classes.len()).expect("labels index the class folders");
        let mut meta = Metadata {
            dataset: &name,
            split,
            classes: &classes,
            dtype: opts.dtype,
            mean,
            std,
            source: &input.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            official: false,
            fingerprint: &print,
            options: &tag,
            conversion: &conversion,
        }
        .into_map();
        meta.insert("splits".into(), serde_json::to_string(&split_names).unwrap());
        meta.insert("source_kind".into(), "image-folder".into());
        let images = writer.images();
        let file = writer.finish(meta)?;
        let path = output_path(out_dir, &name, split);
        sealed.push((SplitSummary { split: split.clone(), path, images, per_class, bytes: file.size }, file));
    }
    let mut splits = super::persist_all(sealed)?;
    splits.sort_by_key(|s| (s.split != "train", s.split.clone()));
    let source = super::tarball::SourceInfo::named(input);
    Ok(PrepSummary {
        dataset: name,
        source,
        classes,
        splits,
        seconds: start.elapsed().as_secs_f64(),
        skipped: false,
        image_folder: true,
    })
}

/// Calls `visit(components, path for messages, bytes)` for each image member of a (gzipped) tar,
/// in archive order, until it returns `false`.
fn read_archive(
    input: &Path,
    gzipped: bool,
    progress: &indicatif::ProgressBar,
    mut visit: impl FnMut(Vec<String>, PathBuf, Vec<u8>) -> Result<bool>,
) -> Result<()> {
    let file = std::fs::File::open(input).at(input)?;
    progress.set_length(file.metadata().at(input)?.len());
    let mut archive = open_archive(progress.wrap_read(file), gzipped);
    let corrupt = |e: std::io::Error| Error::format(input, format!("corrupt or truncated archive: {e}"));
    for entry in archive.entries().map_err(corrupt)? {
        let mut entry = entry.map_err(corrupt)?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = entry.path().map_err(corrupt)?.to_string_lossy().into_owned();
        if !is_image_name(&name) {
            continue;
        }
        let shown = input.join(&name);
        let size = entry.size();
        if size > super::layout::MAX_MEMBER_BYTES {
            return Err(Error::format(&shown, format!("member of {size} bytes is too large")));
        }
        // The declared size is only a claim: grow to it as bytes really arrive.
        let mut bytes = Vec::with_capacity(size.min(1 << 24) as usize);
        entry.read_to_end(&mut bytes).map_err(corrupt)?;
        if bytes.len() as u64 != size {
            return Err(corrupt(std::io::ErrorKind::UnexpectedEof.into()));
        }
        let parts: Vec<String> =
            name.trim_start_matches("./").split('/').filter(|p| !p.is_empty()).map(str::to_string).collect();
        if !visit(parts, shown, bytes)? {
            return Ok(());
        }
    }
    let mut rest = archive.into_inner();
    std::io::copy(&mut rest, &mut std::io::sink()).map_err(corrupt)?;
    Ok(())
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
