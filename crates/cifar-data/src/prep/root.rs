//! A data directory used as torchvision's `root` with `download=True`: the prepared pair of
//! tensor files found there, or made there once — from a CIFAR tarball already in it, else from
//! the official download (md5-checked), else, where the download fails (no network), from the
//! real CIFAR-10 images beside the checkout. `cifar-train`'s first run and the Python package's
//! datasets both come through [`find_or_prepare`].
use std::path::{Path, PathBuf};

use super::{PrepOptions, download, prepare};
use crate::error::{Error, Result};

/// What to look for, and where.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Root {
    /// The data directory (torchvision's `root`).
    pub dir: PathBuf,
    /// Which prepared pair, `NAME-{train,test}.safetensors`. By default, `cifar10`, else
    /// `cifar100`, else the only pair there.
    pub dataset: Option<String>,
    /// Prepare the data when it is not there. By default, true (`download=True`); false finds
    /// prepared files only, saying what to put where when there are none.
    pub download: bool,
    /// Where to download from, with the md5 the file must have. By default, the official
    /// tarball's URL and md5.
    pub download_from: Option<(String, String)>,
    /// The real CIFAR-10 images (`cifar-10-jpeg.tar.gz`) to prepare where the download fails.
    /// By default, [`offline_images`].
    pub offline: Option<PathBuf>,
    /// How an error tells the user to prepare a tarball, for the front they use. By default,
    /// [`Front::Cli`].
    pub front: Front,
}

/// The user's way in, for the advice an error gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Front {
    /// The binaries: `cifar-prep TARBALL --out DIR`.
    #[default]
    Cli,
    /// The Python package: `cifar_fast.prepare("TARBALL", out="DIR")`.
    Python,
}

impl Front {
    /// The command that prepares a tarball into `dir`, in this front's words.
    pub fn prepare_command(self, dir: &Path) -> String {
        match self {
            Front::Cli => format!("`cifar-prep TARBALL --out {}`", dir.display()),
            Front::Python => {
                format!("`cifar_fast.prepare(\"TARBALL\", out={:?})`", dir.display().to_string())
            }
        }
    }
}

impl Root {
    /// `dir`, with the defaults above.
    pub fn new(dir: impl Into<PathBuf>) -> Root {
        Root {
            dir: dir.into(),
            dataset: None,
            download: true,
            download_from: None,
            offline: offline_images(),
            front: Front::Cli,
        }
    }
}

/// The prepared pair a [`Root`] gives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    /// `NAME-train.safetensors`.
    pub train: PathBuf,
    /// `NAME-test.safetensors`, or `NAME-val.safetensors` where there is no test split (an
    /// ImageNet-like folder's `val/`).
    pub test: PathBuf,
}

/// The official tarball downloaded for `dataset`: CIFAR-100's for `cifar100`, else CIFAR-10's.
pub fn official(dataset: Option<&str>) -> &'static download::Official {
    &download::OFFICIAL[if dataset == Some("cifar100") { 2 } else { 0 }]
}

/// The CIFAR inputs prepared by themselves when found in the data directory: the official
/// tarballs and the folders they extract to (torchvision's own `root` holds these).
pub const TARBALLS: [&str; 6] = [
    "cifar-10-binary.tar.gz",
    "cifar-10-python.tar.gz",
    "cifar-10-batches-bin",
    "cifar-10-batches-py",
    "cifar-100-python.tar.gz",
    "cifar-100-python",
];

/// The real CIFAR-10 images beside the checkout (`../shared/data/cifar-10-jpeg.tar.gz`), for
/// machines without a network: `CIFAR_FAST_OFFLINE_IMAGES` where set (empty: none), else beside
/// the checkout the running program was built in (`<checkout>/target/<profile>/<program>`).
/// Never from the working directory: a file that happens to sit there is not taken for them.
pub fn offline_images() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok();
    offline(exe.and_then(|exe| Some(exe.parent()?.parent()?.parent()?.to_path_buf())))
}

/// As [`offline_images`], for a program whose checkout is not where it runs from (the Python
/// extension, loaded by an interpreter, knows the checkout it was built in).
pub fn offline_images_beside(checkout: &Path) -> Option<PathBuf> {
    offline(Some(checkout.to_path_buf()))
}

fn offline(checkout: Option<PathBuf>) -> Option<PathBuf> {
    let found = match std::env::var_os("CIFAR_FAST_OFFLINE_IMAGES") {
        Some(set) => Some(PathBuf::from(set)).filter(|p| !p.as_os_str().is_empty()),
        None => checkout.map(|c| c.join("../shared/data/cifar-10-jpeg.tar.gz")),
    };
    let found = found.filter(|p| p.is_file())?;
    Some(found.canonicalize().unwrap_or(found))
}

/// The held-out split of NAME in `dir`: `NAME-test`, else `NAME-val` (ImageNet names it so).
fn held_out(dir: &Path, name: &str) -> Option<PathBuf> {
    ["test", "val"].iter().map(|s| dir.join(format!("{name}-{s}.safetensors"))).find(|p| p.exists())
}

/// The names NAME with a `NAME-train` tensor file and a held-out one (`NAME-test`, or
/// `NAME-val`) in `dir`, sorted.
pub fn prepared_pairs(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().to_str()?.strip_suffix("-train.safetensors").map(String::from))
        .filter(|n| !n.starts_with('.') && held_out(dir, n).is_some())
        .collect();
    names.sort();
    names
}

/// The pair `root` names: found, or prepared once as the module's doc says. `say` receives a
/// line for each thing done (downloading, preparing, falling back); `bar` is the progress bar
/// the download and the conversion draw on (hidden where nobody watches).
pub fn find_or_prepare(
    root: &Root,
    say: &mut dyn FnMut(&str),
    bar: &indicatif::ProgressBar,
) -> Result<Prepared> {
    let dir = &root.dir;
    if dir.exists() && !dir.is_dir() {
        // Else every message below would ask for a tarball to be put inside a file.
        return Err(Error::Config(format!(
            "{} is a file, not a directory: name the directory that holds the data{}",
            dir.display(),
            dir.parent()
                .filter(|p| !p.as_os_str().is_empty())
                .map(|p| format!(" ({})", p.display()))
                .unwrap_or_default()
        )));
    }
    let pairs = prepared_pairs(dir);
    let files = |name: &str| Prepared {
        train: dir.join(format!("{name}-train.safetensors")),
        test: held_out(dir, name).unwrap_or_else(|| dir.join(format!("{name}-test.safetensors"))),
    };
    let pick = match &root.dataset {
        Some(name) => pairs.iter().find(|n| *n == name),
        None => ["cifar10", "cifar100"]
            .iter()
            .find_map(|want| pairs.iter().find(|n| n == want))
            .or(if pairs.len() == 1 { pairs.first() } else { None }),
    };
    if let Some(name) = pick {
        return Ok(files(name));
    }
    match root.dataset.as_deref() {
        None if pairs.len() > 1 => {
            return Err(Error::Config(format!(
                "{} holds several prepared datasets ({}): choose one with --dataset NAME",
                dir.display(),
                pairs.join(", ")
            )));
        }
        None | Some("cifar10") | Some("cifar100") => {}
        Some(other) => {
            return Err(Error::NotFound {
                path: dir.clone(),
                msg: format!(
                    "no prepared dataset {other:?} in {} (no {other}-train.safetensors and \
                     {other}-test.safetensors){}",
                    dir.display(),
                    if pairs.is_empty() {
                        String::new()
                    } else {
                        format!("; there are: {}", pairs.join(", "))
                    }
                ),
            });
        }
    }
    let want100 = root.dataset.as_deref() == Some("cifar100");
    let official = official(root.dataset.as_deref());
    let prepare_from = |input: &Path, name: Option<&str>, say: &mut dyn FnMut(&str)| -> Result<Prepared> {
        say(&format!("preparing {} (once) ...", input.display()));
        let opts = PrepOptions { name: name.map(String::from), ..PrepOptions::default() };
        let s = prepare(input, dir, &opts, bar)?;
        let find = |split: &str| s.splits.iter().find(|x| x.split == split).map(|x| x.path.clone());
        match (find("train"), find("test")) {
            (Some(train), Some(test)) => Ok(Prepared { train, test }),
            _ => Err(Error::format(input, "has no train and test splits")),
        }
    };
    // What torchvision's `root` holds, used as torchvision uses it with or without `download`.
    if let Some(input) = TARBALLS
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.exists() && p.to_string_lossy().contains("100") == want100)
    {
        return prepare_from(&input, None, say);
    }
    if !root.download {
        return Err(Error::NotFound {
            path: dir.clone(),
            msg: format!(
                "no {} data in {dir}: put {} (or any CIFAR tarball, or torchvision's extracted {}) in \
                 {dir}, or prepare one with {}, or allow the download",
                if want100 { "CIFAR-100" } else { "CIFAR-10" },
                official.file,
                if want100 { "cifar-100-python" } else { "cifar-10-batches-py" },
                root.front.prepare_command(dir),
                dir = dir.display()
            ),
        });
    }
    let (url, md5) = match &root.download_from {
        Some((url, md5)) => (url.as_str(), md5.as_str()),
        None => (official.url, official.md5),
    };
    say(&format!("no CIFAR data in {}: downloading {url}", dir.display()));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let got = download::download(url, md5, &dir.join(official.file), download::STALL, bar);
    match (got, &root.offline) {
        (Ok(tarball), _) => {
            say(&format!("downloaded {} (md5 {md5} verified)", tarball.display()));
            prepare_from(&tarball, None, say)
        }
        (Err(e), Some(jpeg)) if !want100 => {
            say(&format!("{e}; using the real CIFAR-10 images in {} instead", jpeg.display()));
            prepare_from(jpeg, Some("cifar10"), say)
        }
        (Err(e), _) => Err(Error::NotFound {
            path: dir.clone(),
            msg: format!(
                "no CIFAR data in {dir}, and {e}. Put {file} in {dir} (or any CIFAR tarball), or prepare \
                 one with {command}",
                dir = dir.display(),
                file = official.file,
                command = root.front.prepare_command(dir)
            ),
        }),
    }
}
