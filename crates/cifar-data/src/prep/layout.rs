//! The CIFAR file layouts: member names, record sizes, and turning one batch file into records.
//!
//! Batches are recognised by their member name (the official layouts' names) and read by their
//! content: a pickle starts with protocol byte `0x80`, which no binary record can (labels are
//! < 100), so a renamed or mixed directory still reads right.
use std::path::Path;

use super::pickle::{self, Value};
use crate::error::{Error, Result};

/// Pixels per channel row and column.
pub const SIDE: usize = 32;
/// Colour channels, stored planar (all R, then G, then B), as both layouts do.
pub const CHANNELS: usize = 3;
/// One image, `[3, 32, 32]` bytes.
pub const BYTES_PER_IMAGE: usize = CHANNELS * SIDE * SIDE;
/// The largest batch member read into memory (CIFAR-100's `train` pickle is ~160 MB).
pub const MAX_MEMBER_BYTES: u64 = 1 << 30;

/// The CIFAR-10 class names, in label order.
pub const CIFAR10_CLASSES: [&str; 10] =
    ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"];

/// Which of the two datasets a file belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// 10 classes; 5 train batches of 10,000 and one test batch.
    Cifar10,
    /// 100 fine classes in 20 coarse ones; one train and one test file.
    Cifar100,
}

impl Kind {
    /// The prefix of the tensor files: `cifar10` or `cifar100`.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Cifar10 => "cifar10",
            Kind::Cifar100 => "cifar100",
        }
    }

    /// Number of (fine) classes.
    pub fn classes(self) -> usize {
        match self {
            Kind::Cifar10 => 10,
            Kind::Cifar100 => 100,
        }
    }

    /// Label bytes in front of each binary record.
    pub fn label_bytes(self) -> usize {
        match self {
            Kind::Cifar10 => 1,
            Kind::Cifar100 => 2,
        }
    }

    /// Batch files in the train split.
    pub fn train_batches(self) -> usize {
        match self {
            Kind::Cifar10 => 5,
            Kind::Cifar100 => 1,
        }
    }
}

/// CIFAR-100's coarse classes.
pub const COARSE_CLASSES: usize = 20;

/// Train or test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Split {
    /// The training images (torchvision's `train=True`).
    Train,
    /// The test images.
    Test,
}

impl Split {
    /// `train` or `test`, as in the file names.
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "test",
        }
    }
}

/// What a member of an archive or directory is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A batch of images.
    Batch {
        /// The dataset.
        kind: Kind,
        /// Train or test.
        split: Split,
        /// 0-based position in torchvision's order (`data_batch_1` is 0).
        index: usize,
    },
    /// The class names.
    Meta {
        /// The dataset.
        kind: Kind,
    },
}

/// The role of a member from its file name, as the official layouts name them.
pub fn role_of(member: &str) -> Option<Role> {
    let base = member.rsplit('/').next()?;
    let stem = base.strip_suffix(".bin").unwrap_or(base);
    let batch = |kind, split, index| Some(Role::Batch { kind, split, index });
    match stem {
        "test_batch" => batch(Kind::Cifar10, Split::Test, 0),
        "train" => batch(Kind::Cifar100, Split::Train, 0),
        "test" => batch(Kind::Cifar100, Split::Test, 0),
        "batches.meta" | "batches.meta.txt" => Some(Role::Meta { kind: Kind::Cifar10 }),
        "meta" | "fine_label_names.txt" | "coarse_label_names.txt" => {
            Some(Role::Meta { kind: Kind::Cifar100 })
        }
        _ => {
            let n: usize = stem.strip_prefix("data_batch_")?.parse().ok()?;
            (1..=5).contains(&n).then_some(Role::Batch {
                kind: Kind::Cifar10,
                split: Split::Train,
                index: n - 1,
            })
        }
    }
}

/// The images and labels of one batch file.
#[derive(Debug, Default)]
pub struct Records {
    /// Labels (fine labels for CIFAR-100).
    pub labels: Vec<i64>,
    /// CIFAR-100's coarse labels.
    pub coarse: Option<Vec<i64>>,
    /// `labels.len()` images of [`BYTES_PER_IMAGE`] bytes, planar RGB.
    pub pixels: Vec<u8>,
}

impl Records {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// Parses one batch file, binary or pickled, checking every label against `kind`.
pub fn parse_batch(kind: Kind, bytes: &[u8], path: &Path) -> Result<Records> {
    let records = if bytes.first() == Some(&0x80) {
        parse_pickled_batch(kind, bytes, path)?
    } else {
        parse_binary_batch(kind, bytes, path)?
    };
    check_labels(&records.labels, kind.classes(), "label", path)?;
    if let Some(coarse) = &records.coarse {
        check_labels(coarse, COARSE_CLASSES, "coarse label", path)?;
    }
    Ok(records)
}

fn check_labels(labels: &[i64], classes: usize, what: &str, path: &Path) -> Result<()> {
    match labels.iter().position(|&l| l < 0 || l >= classes as i64) {
        Some(i) => Err(Error::format(
            path,
            format!("{what} {} of record {i} is out of range 0..{classes}", labels[i]),
        )),
        None => Ok(()),
    }
}

fn parse_binary_batch(kind: Kind, bytes: &[u8], path: &Path) -> Result<Records> {
    let record = kind.label_bytes() + BYTES_PER_IMAGE;
    if bytes.is_empty() || !bytes.len().is_multiple_of(record) {
        return Err(Error::format(
            path,
            format!("{} bytes is not a whole number of {}-byte {} records", bytes.len(), record, kind.name()),
        ));
    }
    let n = bytes.len() / record;
    let mut out = Records {
        labels: Vec::with_capacity(n),
        coarse: (kind == Kind::Cifar100).then(|| Vec::with_capacity(n)),
        pixels: Vec::with_capacity(n * BYTES_PER_IMAGE),
    };
    for rec in bytes.chunks_exact(record) {
        match &mut out.coarse {
            // CIFAR-100 binary records start with the coarse label, then the fine one.
            Some(coarse) => {
                coarse.push(rec[0] as i64);
                out.labels.push(rec[1] as i64);
            }
            None => out.labels.push(rec[0] as i64),
        }
        out.pixels.extend_from_slice(&rec[kind.label_bytes()..]);
    }
    Ok(out)
}

fn int_list(v: &Value, key: &str, path: &Path) -> Result<Vec<i64>> {
    match v {
        Value::List(items, _) => items
            .iter()
            .map(|x| match x {
                Value::Int(i) => Ok(*i),
                other => {
                    Err(Error::format(path, format!("'{key}' holds a {}, expected ints", other.type_name())))
                }
            })
            .collect(),
        other => Err(Error::format(path, format!("'{key}' is a {}, expected a list", other.type_name()))),
    }
}

fn parse_pickled_batch(kind: Kind, bytes: &[u8], path: &Path) -> Result<Records> {
    let value = pickle::parse(bytes).map_err(|e| Error::format(path, format!("pickle: {e}")))?;
    if !matches!(value, Value::Dict(..)) {
        return Err(Error::format(path, format!("pickle holds a {}, expected a dict", value.type_name())));
    }
    let field =
        |key: &str| value.get(key).ok_or_else(|| Error::format(path, format!("pickle has no '{key}' entry")));
    let (labels, coarse) = match kind {
        Kind::Cifar10 => (int_list(field("labels")?, "labels", path)?, None),
        Kind::Cifar100 => (
            int_list(field("fine_labels")?, "fine_labels", path)?,
            Some(int_list(field("coarse_labels")?, "coarse_labels", path)?),
        ),
    };
    let Value::Array(data) = field("data")? else {
        return Err(Error::format(path, "'data' is not a numpy array"));
    };
    if data.dtype.trim_start_matches(['|', '<', '=']) != "u1" {
        return Err(Error::format(path, format!("'data' has dtype {}, expected uint8", data.dtype)));
    }
    if data.shape.len() != 2 || data.shape[1] != BYTES_PER_IMAGE || data.shape[0] != labels.len() {
        return Err(Error::format(
            path,
            format!(
                "'data' has shape {:?}, expected [{}, {BYTES_PER_IMAGE}] for {} labels",
                data.shape,
                labels.len(),
                labels.len()
            ),
        ));
    }
    if coarse.as_ref().is_some_and(|c| c.len() != labels.len()) {
        return Err(Error::format(path, "'coarse_labels' and 'fine_labels' differ in length"));
    }
    Ok(Records { labels, coarse, pixels: data.data.to_vec() })
}

/// Class names a meta member lists: fine (CIFAR-10's only) and coarse, either possibly absent.
pub type ClassNames = (Option<Vec<String>>, Option<Vec<String>>);

/// Class names from a meta member.
pub fn parse_meta(member: &str, bytes: &[u8], path: &Path) -> Result<ClassNames> {
    let lines = || -> Vec<String> {
        String::from_utf8_lossy(bytes)
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect()
    };
    if member.ends_with("coarse_label_names.txt") {
        return Ok((None, Some(lines())));
    }
    if member.ends_with(".txt") {
        return Ok((Some(lines()), None));
    }
    let value = pickle::parse(bytes).map_err(|e| Error::format(path, format!("pickle: {e}")))?;
    let names = |key: &str| -> Result<Option<Vec<String>>> {
        match value.get(key) {
            None => Ok(None),
            Some(Value::List(items, _)) => items
                .iter()
                .map(|v| {
                    v.as_bytes()
                        .map(|b| String::from_utf8_lossy(b).into_owned())
                        .ok_or_else(|| Error::format(path, format!("'{key}' holds a non-string")))
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(v) => Err(Error::format(path, format!("'{key}' is a {}", v.type_name()))),
        }
    };
    let fine = match names("label_names")? {
        Some(n) => Some(n),
        None => names("fine_label_names")?,
    };
    Ok((fine, names("coarse_label_names")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_follow_the_official_names() {
        assert_eq!(
            role_of("cifar-10-batches-bin/data_batch_3.bin"),
            Some(Role::Batch { kind: Kind::Cifar10, split: Split::Train, index: 2 })
        );
        assert_eq!(
            role_of("cifar-100-python/test"),
            Some(Role::Batch { kind: Kind::Cifar100, split: Split::Test, index: 0 })
        );
        assert_eq!(role_of("cifar-10-batches-py/data_batch_6"), None);
        assert_eq!(role_of("cifar-10-batches-py/readme.html"), None);
    }

    #[test]
    fn binary_cifar100_puts_coarse_first() {
        let mut rec = vec![7u8, 42];
        rec.extend((0..BYTES_PER_IMAGE).map(|i| i as u8));
        let r = parse_batch(Kind::Cifar100, &rec, Path::new("train.bin")).unwrap();
        assert_eq!((r.labels[0], r.coarse.as_ref().unwrap()[0]), (42, 7));
        assert_eq!(r.pixels[..3], [0, 1, 2]);
    }

    #[test]
    fn ragged_binary_and_bad_labels_are_refused() {
        let e = parse_batch(Kind::Cifar10, &[0u8; 3074], Path::new("b.bin")).unwrap_err();
        assert!(e.to_string().contains("not a whole number of 3073-byte"), "{e}");
        let mut rec = vec![10u8];
        rec.extend([0u8; BYTES_PER_IMAGE]);
        let e = parse_batch(Kind::Cifar10, &rec, Path::new("b.bin")).unwrap_err();
        assert!(e.to_string().contains("label 10 of record 0 is out of range 0..10"), "{e}");
    }
}
