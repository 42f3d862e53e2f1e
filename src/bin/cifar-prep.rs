//! `cifar-prep`: CIFAR tarballs into memory-mappable safetensors files. See `--help`.
//!
//! It uses the `cifar-data` crate alone, so it links no libtorch and starts in milliseconds.
mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use cifar_data::prep::{self, Norm, PrepOptions, StoreDtype, download};
use clap::{Parser, ValueEnum};
use common::say;

/// Unpack CIFAR-10/100, or any image-classification folder, into one normalized,
/// memory-mappable tensor file per split.
#[derive(Parser, Debug)]
#[command(name = "cifar-prep", version, about, long_about = None)]
struct Args {
    /// A CIFAR tarball (binary or python) or an extracted `cifar-10-batches-*` directory; or an
    /// image folder `ROOT/<split>/<class>/<image>`, as a directory or a `.tar`/`.tar.gz`.
    /// By default, the first CIFAR tarball found in the output directory.
    input: Option<PathBuf>,
    /// The data directory, where the tensor files are written (torchvision's `root`).
    #[arg(long, default_value = "data")]
    out: PathBuf,
    /// Stored dtype: normalized `f32`, or raw `u8` (4x smaller, normalized when loaded).
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    dtype: DtypeArg,
    /// `half`: Normalize((0.5,)*3, (0.5,)*3) as in the tutorial; `dataset`: the train split's
    /// per-channel mean and std.
    #[arg(long, value_enum, default_value_t = NormArg::Half)]
    norm: NormArg,
    /// Per-channel mean R,G,B, e.g. 0.4914,0.4822,0.4465 (with --std; overrides --norm).
    #[arg(long, value_name = "R,G,B", value_parser = parse_mean, requires = "std", allow_hyphen_values = true)]
    mean: Option<[f32; 3]>,
    /// Per-channel std R,G,B, e.g. 0.2470,0.2435,0.2616.
    #[arg(long, value_name = "R,G,B", value_parser = parse_std, requires = "mean")]
    std: Option<[f32; 3]>,
    /// Image folders: resize every image to H,W (by default every image must have the size of
    /// the first).
    #[arg(long, value_name = "H,W", value_parser = parse_size)]
    size: Option<(u32, u32)>,
    /// Image folders: name the files NAME-SPLIT.safetensors (default: the folder's name).
    #[arg(long)]
    name: Option<String>,
    /// Image folders: `dense` decodes every image into one tensor (one size for all: the first
    /// image's, or --size); `encoded` keeps every image's bytes (JPEGs as they are, others as
    /// lossless PNG), to decode and crop at load time. By default dense where every image has
    /// one size, encoded otherwise.
    #[arg(long, value_enum)]
    store: Option<StoreArg>,
    /// Encoded files: shrink images whose longer side is over N pixels to N (re-encoded as JPEG
    /// at --quality; said so). By default every image is kept as it is.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=65535))]
    max_side: Option<u32>,
    /// The JPEG quality of the images --max-side re-encodes.
    #[arg(long, value_name = "Q", default_value_t = 90, value_parser = clap::value_parser!(u8).range(1..=100),
          requires = "max_side")]
    quality: u8,
    /// Image folders: refuse an image that declares more pixels than this (a decompression
    /// bomb). The default is Pillow's MAX_IMAGE_PIXELS.
    #[arg(long, value_name = "N", default_value_t = prep::image::MAX_IMAGE_PIXELS,
          value_parser = clap::value_parser!(u64).range(1..))]
    max_image_pixels: u64,
    /// Convert even when the output is up to date.
    #[arg(long)]
    force: bool,
    /// Download the official tarball into the data directory first (like `download=True`).
    #[arg(long)]
    download: bool,
    /// Which tarball --download fetches.
    #[arg(long, value_enum, default_value_t = Which::Cifar10Python)]
    dataset: Which,
    /// Download from this URL instead of the official one.
    #[arg(long, requires = "download")]
    url: Option<String>,
    /// The md5 the download must have (by default, the official one).
    #[arg(long, requires = "download", value_parser = common::parse_md5)]
    md5: Option<String>,
    /// Give the download up when the server is silent this long (to connect, answer or send).
    #[arg(long, value_name = "SECONDS", default_value_t = 30, requires = "download",
          value_parser = clap::value_parser!(u64).range(1..))]
    timeout: u64,
    /// Also draw a PNG grid of the train split: a row per class, its first 10 images, x3.
    #[arg(long, value_name = "PNG")]
    preview: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum DtypeArg {
    F32,
    U8,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum StoreArg {
    Dense,
    Encoded,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum NormArg {
    Half,
    Dataset,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Which {
    Cifar10Python,
    Cifar10Binary,
    Cifar100Python,
}

/// The inputs looked for in the data directory, in order of preference (binary reads fastest).
const CANDIDATES: [&str; 8] = [
    "cifar-10-binary.tar.gz",
    "cifar-10-python.tar.gz",
    "cifar-10-batches-bin",
    "cifar-10-batches-py",
    "cifar-100-binary.tar.gz",
    "cifar-100-python.tar.gz",
    "cifar-100-binary",
    "cifar-100-python",
];

/// Three comma-separated finite numbers, `R,G,B`.
fn parse_triple(s: &str) -> Result<[f32; 3], String> {
    let parts: Vec<&str> = s.split(',').map(str::trim).collect();
    let [r, g, b] = parts[..] else {
        return Err(format!("expected three comma-separated values R,G,B, got {s:?}"));
    };
    let mut out = [0f32; 3];
    for (o, p) in out.iter_mut().zip([r, g, b]) {
        *o = p.parse().map_err(|_| format!("{p:?} is not a number"))?;
        if !o.is_finite() {
            return Err(format!("{p:?} is not a finite number"));
        }
    }
    Ok(out)
}

fn parse_mean(s: &str) -> Result<[f32; 3], String> {
    parse_triple(s)
}

fn parse_std(s: &str) -> Result<[f32; 3], String> {
    let v = parse_triple(s)?;
    if v.iter().any(|&x| x <= 0.0) {
        return Err(format!("every std must be positive, got {s}"));
    }
    Ok(v)
}

/// `H,W`, both at least 1.
fn parse_size(s: &str) -> Result<(u32, u32), String> {
    let bad = || format!("expected H,W (two positive integers), got {s:?}");
    let (h, w) = s.split_once(',').ok_or_else(bad)?;
    let (h, w): (u32, u32) = (h.trim().parse().map_err(|_| bad())?, w.trim().parse().map_err(|_| bad())?);
    if h == 0 || w == 0 || h > 4096 || w > 4096 {
        return Err(format!("--size {s}: each side must be 1 to 4096"));
    }
    Ok((h, w))
}

/// Prepared splits already in `dir`: `<name>-<split>.safetensors` files, sorted.
fn prepared_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            name.ends_with(".safetensors") && !name.starts_with('.')
        })
        .collect();
    files.sort();
    files
}

/// The official tarball `--download` fetches for `--dataset`.
fn official(which: Which) -> &'static download::Official {
    match which {
        Which::Cifar10Python => &download::OFFICIAL[0],
        Which::Cifar10Binary => &download::OFFICIAL[1],
        Which::Cifar100Python => &download::OFFICIAL[2],
    }
}

fn find_input(dir: &Path) -> anyhow::Result<PathBuf> {
    for name in CANDIDATES {
        let p = dir.join(name);
        if p.exists() {
            return Ok(p);
        }
    }
    bail!(
        "no CIFAR tarball or extracted directory in {} (looked for {}); \
         run `cifar-prep --download` to fetch cifar-10-python.tar.gz, or name an input",
        dir.display(),
        CANDIDATES.join(", ")
    )
}

fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

fn main() {
    if let Err(e) = run(common::parse_args::<Args>()) {
        eprintln!("cifar-prep: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    // Ctrl-C or SIGTERM: no temporary file is left behind (the finished files are renamed into
    // place whole, so earlier output stays as it was).
    let out = args.out.clone();
    let part = args.download.then(|| download::part_path(&args.out.join(official(args.dataset).file)));
    ctrlc::set_handler(move || {
        prep::remove_own_temporaries(&out);
        if let Some(p) = &part {
            let _ = std::fs::remove_file(p);
        }
        eprintln!("cifar-prep: interrupted; temporary files removed");
        std::process::exit(130);
    })
    .context("installing the Ctrl-C handler")?;
    if let Some(png) = &args.preview
        && let Some(parent) = png.parent().filter(|d| !d.as_os_str().is_empty())
        && !parent.is_dir()
    {
        bail!("--preview {}: the directory {} does not exist", png.display(), parent.display());
    }
    // Nothing to convert: with prepared files here, --preview draws from them.
    if !args.download
        && args.input.is_none()
        && find_input(&args.out).is_err()
        && let Some(png) = &args.preview
        && let Some(train) = prepared_files(&args.out)
            .into_iter()
            .find(|p| p.to_string_lossy().ends_with("-train.safetensors"))
    {
        say!("{}: no input to convert; previewing the prepared {}", args.out.display(), train.display());
        return preview(&train, png);
    }
    let input = if args.download {
        let official = official(args.dataset);
        let url = args.url.as_deref().unwrap_or(official.url);
        let md5 = args.md5.as_deref().unwrap_or(official.md5);
        std::fs::create_dir_all(&args.out).with_context(|| format!("{}", args.out.display()))?;
        let dest = args.out.join(official.file);
        let pb = common::progress_bar(0, "download");
        let got = download::download(url, md5, &dest, Duration::from_secs(args.timeout), &pb)?;
        pb.finish_and_clear();
        say!("downloaded {} (md5 {md5} verified)", got.display());
        got
    } else {
        match args.input {
            Some(p) => p,
            None => find_input(&args.out)?,
        }
    };
    let norm = match (args.mean, args.std, args.norm) {
        (Some(mean), Some(std), _) => Norm::Custom { mean, std },
        (_, _, NormArg::Half) => Norm::Half,
        (_, _, NormArg::Dataset) => Norm::Dataset,
    };
    let opts = PrepOptions {
        dtype: match args.dtype {
            DtypeArg::F32 => StoreDtype::F32,
            DtypeArg::U8 => StoreDtype::U8,
        },
        norm,
        force: args.force,
        size: args.size,
        name: args.name.clone(),
        max_image_pixels: args.max_image_pixels,
        store: match args.store {
            None => prep::Store::Auto,
            Some(StoreArg::Dense) => prep::Store::Dense,
            Some(StoreArg::Encoded) => prep::Store::Encoded,
        },
        max_side: args.max_side,
        quality: args.quality,
    };
    if args.max_side.is_some() && matches!(args.store, Some(StoreArg::Dense)) {
        bail!(
            "--max-side shrinks the images an encoded file keeps: it does not go with --store dense (use --size)"
        );
    }
    let pb = common::progress_bar(0, "convert");
    let summary = prep::prepare(&input, &args.out, &opts, &pb)?;
    pb.finish_and_clear();
    if summary.skipped {
        say!(
            "{}: up to date (made from this input with these options; --force converts again)",
            input.display()
        );
    } else {
        match (summary.source.md5.as_deref(), input.is_dir()) {
            (Some(md5), _) => match download::official_by_md5(md5) {
                Some(o) => say!("{}: md5 {md5} is the official {}'s: verified", input.display(), o.file),
                None => say!(
                    "{}: md5 {md5} is not an official CIFAR tarball's; converted anyway",
                    input.display()
                ),
            },
            (None, _) if summary.image_folder => say!(
                "{}: an image folder of {} classes, in ImageFolder's order",
                input.display(),
                summary.classes.len()
            ),
            (None, false) => say!(
                "{}: not an official CIFAR tarball (its size is none of theirs); converted anyway",
                input.display()
            ),
            (None, true) => {
                say!("{}: a directory, not checked against the official md5 sums", input.display())
            }
        }
    }
    for s in &summary.splits {
        say!("{:>5}: {} images -> {} ({})", s.split, s.images, s.path.display(), mb(s.bytes));
        let counts: Vec<String> =
            summary.classes.iter().zip(&s.per_class).map(|(c, n)| format!("{c} {n}")).collect();
        say!("       per class: {}", counts.join(", "));
    }
    if !summary.skipped {
        let total: u64 = summary.splits.iter().map(|s| s.bytes).sum();
        say!("wrote {} in {:.2} s", mb(total), summary.seconds);
    }
    if let Some(png) = &args.preview {
        let train = summary.splits.iter().find(|s| s.split == "train").unwrap_or(&summary.splits[0]);
        preview(&train.path, png)?;
    }
    Ok(())
}

/// `--preview`: a row per class of the split in `path`, its first 10 images, ×3.
fn preview(path: &Path, png: &Path) -> anyhow::Result<()> {
    if cifar_data::store::is_encoded(path)? {
        bail!("--preview draws dense files; {} keeps its images encoded", path.display());
    }
    let file = cifar_data::TensorFile::open(path)?;
    cifar_data::preview::save_png(&cifar_data::preview::class_grid(&file, 10, 3), png)?;
    say!("preview: {}", png.display());
    Ok(())
}
