//! What an image folder holds, as `ImageFolder` sees it: a directory as it is, an archive as
//! `tar x` would leave it. For an archive that means a later member of the same name replaces
//! the earlier one, a hard link is a second name for an earlier member's bytes, and a symbolic
//! link to an image is that image; what extraction would not give (a name or link leaving the
//! archive, a link to a folder, a name that is not UTF-8) is refused, never dropped or merged.
use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};

use super::folder::is_image_name;
use super::tarball::open_archive;
use crate::error::{Error, IoContext, Result};

/// Where one image's bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bytes {
    /// A file of a directory input.
    File(PathBuf),
    /// One of the archive's regular-file members.
    Member {
        /// Its number among them, 0 for the first.
        number: usize,
        /// Its size in bytes.
        size: u64,
    },
}

/// One image: its path components below the root, its path for messages, its bytes.
#[derive(Debug, Clone)]
pub struct Image {
    /// Path components below the directory, or the archive's top.
    pub parts: Vec<String>,
    /// The path messages name it by.
    pub shown: PathBuf,
    /// Where to read it.
    pub bytes: Bytes,
}

/// An image folder's images (sorted by their components, `ImageFolder`'s order within a
/// folder) and every folder below its root (`a/b`, sorted), with or without images.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    /// Every image.
    pub images: Vec<Image>,
    /// Every folder.
    pub dirs: BTreeSet<String>,
}

/// Links followed before a chain is taken for a loop (Linux's own limit).
const MAX_LINK_HOPS: usize = 40;

/// Lists a directory: every image file below it (following links, as `os.walk(followlinks=True)`
/// does) and every folder.
pub fn list_dir(dir: &Path) -> Result<Listing> {
    let mut listing = Listing::default();
    let mut stack = vec![(dir.to_path_buf(), Vec::<String>::new())];
    while let Some((d, prefix)) = stack.pop() {
        for e in std::fs::read_dir(&d).at(&d)? {
            let e = e.at(&d)?;
            let path = e.path();
            let name = e.file_name().into_string().map_err(|raw| not_utf8(&path, raw.as_encoded_bytes()))?;
            let mut parts = prefix.clone();
            parts.push(name.clone());
            // `ImageFolder` follows links: metadata, not the entry's type.
            let meta = std::fs::metadata(&path).at(&path)?;
            if meta.is_dir() {
                listing.dirs.insert(parts.join("/"));
                stack.push((path, parts));
            } else if is_image_name(&name) {
                // Reading a FIFO named like an image would block for ever.
                if !meta.is_file() {
                    return Err(Error::format(
                        &path,
                        format!("is {}, not an image file", crate::files::kind_of(&meta)),
                    ));
                }
                listing.images.push(Image { parts, shown: path.clone(), bytes: Bytes::File(path) });
            }
        }
    }
    listing.images.sort_by(|a, b| a.parts.cmp(&b.parts));
    Ok(listing)
}

/// What one name of the archive is, once every member is read.
#[derive(Debug, Clone)]
enum Node {
    File { number: usize, size: u64 },
    Symlink { target: String },
}

/// Lists a (gzipped) tar stream named `input` in messages, as its extraction would be.
pub fn list_archive(reader: impl Read, gzipped: bool, input: &Path) -> Result<Listing> {
    let corrupt = |e: std::io::Error| Error::format(input, format!("corrupt or truncated archive: {e}"));
    let mut archive = open_archive(reader, gzipped);
    let mut nodes: BTreeMap<String, Node> = BTreeMap::new();
    let mut dirs = BTreeSet::new();
    let mut files = 0usize;
    for entry in archive.entries().map_err(corrupt)? {
        let entry = entry.map_err(corrupt)?;
        let raw = entry.path_bytes().into_owned();
        let Some(parts) = member_parts(&raw, input)? else { continue };
        let name = parts.join("/");
        let shown = input.join(&name);
        for depth in 1..parts.len() {
            dirs.insert(parts[..depth].join("/"));
        }
        let kind = entry.header().entry_type();
        if is_regular(kind) {
            nodes.insert(name, Node::File { number: files, size: entry.size() });
            files += 1;
        } else if kind.is_hard_link() {
            let target = link_target(&entry, &shown)?;
            let Some(target_parts) = member_parts(target.as_bytes(), input)? else {
                return Err(Error::format(&shown, "is a hard link to the archive's top folder"));
            };
            let target = target_parts.join("/");
            // A hard link names the bytes the target has now: a later member of the target's
            // name does not change it.
            let Some(node) = nodes.get(&target).cloned() else {
                return Err(Error::format(
                    &shown,
                    format!("is a hard link to {target}, which no earlier member of the archive is"),
                ));
            };
            nodes.insert(name, node);
        } else if kind.is_symlink() {
            let target = link_target(&entry, &shown)?;
            let target = resolve_symlink(&parts, &target).ok_or_else(|| {
                Error::format(&shown, format!("is a symbolic link to {target}, outside the archive"))
            })?;
            nodes.insert(name, Node::Symlink { target });
        } else if kind.is_dir() {
            nodes.remove(&name);
            dirs.insert(name);
        } else if is_image_name(&name) {
            return Err(Error::format(&shown, format!("is a {kind:?} member, not an image file")));
        }
    }
    // What the stream holds after the last member is not part of the tar: still, a corrupt
    // gzip tail is a corrupt archive.
    let mut rest = archive.into_inner();
    std::io::copy(&mut rest, &mut std::io::sink()).map_err(corrupt)?;

    let mut images = Vec::new();
    for (name, node) in &nodes {
        let shown = input.join(name);
        let mut node = node.clone();
        let mut hops = 0;
        while let Node::Symlink { target } = &node {
            hops += 1;
            if hops > MAX_LINK_HOPS {
                return Err(Error::format(&shown, "is a symbolic link in a loop of links"));
            }
            node = match nodes.get(target) {
                Some(n) => n.clone(),
                // ImageFolder follows links into folders (os.walk(followlinks=True)): refused
                // rather than followed, whatever the link is called.
                None if dirs.contains(target) || target.is_empty() => {
                    return Err(Error::format(
                        &shown,
                        format!(
                            "is a symbolic link to the folder {target}: links to folders are not \
                             followed in an archive (extract it and convert the folder)"
                        ),
                    ));
                }
                None if is_image_name(name) => {
                    return Err(Error::format(
                        &shown,
                        format!("is a symbolic link to {target}, which the archive does not hold"),
                    ));
                }
                None => break,
            };
        }
        if let (Node::File { number, size }, true) = (node, is_image_name(name)) {
            let parts = name.split('/').map(str::to_string).collect();
            images.push(Image { parts, shown, bytes: Bytes::Member { number, size } });
        }
    }
    images.sort_by(|a, b| a.parts.cmp(&b.parts));
    Ok(Listing { images, dirs })
}

/// Calls `visit(number, bytes)` for each regular-file member whose number `wanted` holds (sorted,
/// each once), in archive order, until it returns `false`. The archive must be the one listed:
/// a member of another size is an error.
pub fn read_members(
    reader: impl Read,
    gzipped: bool,
    input: &Path,
    wanted: &BTreeMap<usize, u64>,
    mut visit: impl FnMut(usize, Vec<u8>) -> Result<bool>,
) -> Result<()> {
    let corrupt = |e: std::io::Error| Error::format(input, format!("corrupt or truncated archive: {e}"));
    let mut archive = open_archive(reader, gzipped);
    let mut number = 0usize;
    let mut left = wanted.len();
    for entry in archive.entries().map_err(corrupt)? {
        if left == 0 {
            return Ok(());
        }
        let mut entry = entry.map_err(corrupt)?;
        if !is_regular(entry.header().entry_type()) {
            continue;
        }
        let this = number;
        number += 1;
        let Some(&size) = wanted.get(&this) else { continue };
        let shown = input.join(String::from_utf8_lossy(&entry.path_bytes()).trim_start_matches("./"));
        if entry.size() != size {
            return Err(Error::format(input, "changed while it was being converted"));
        }
        let bytes = super::tarball::read_member(&mut entry, &shown, input)?;
        left -= 1;
        if !visit(this, bytes)? {
            return Ok(());
        }
    }
    if left > 0 {
        return Err(Error::format(input, "changed while it was being converted"));
    }
    Ok(())
}

/// Members that hold bytes of their own.
fn is_regular(kind: tar::EntryType) -> bool {
    matches!(kind, tar::EntryType::Regular | tar::EntryType::Continuous)
}

/// A member name's components as extraction uses them: `.` and empty ones dropped, a leading
/// `/` removed (as GNU tar removes it); `None` for the archive's top itself. A name that is not
/// UTF-8, or that climbs out with `..`, is refused.
fn member_parts(raw: &[u8], input: &Path) -> Result<Option<Vec<String>>> {
    let name = std::str::from_utf8(raw).map_err(|_| not_utf8(input, raw))?;
    let mut parts = Vec::new();
    for p in name.split('/') {
        match p {
            "" | "." => {}
            ".." => {
                return Err(Error::format(
                    input,
                    format!("member {name:?} climbs out of the archive with '..': refused"),
                ));
            }
            p => parts.push(p.to_string()),
        }
    }
    Ok((!parts.is_empty()).then_some(parts))
}

fn not_utf8(path: &Path, raw: &[u8]) -> Error {
    Error::format(
        path,
        format!(
            "holds the name {:?}, which is not UTF-8: class and file names become strings \
             (rename it, e.g. with convmv)",
            raw.escape_ascii().to_string()
        ),
    )
}

fn link_target<R: Read>(entry: &tar::Entry<'_, R>, shown: &Path) -> Result<String> {
    let raw = entry.link_name_bytes().ok_or_else(|| Error::format(shown, "is a link with no target"))?;
    String::from_utf8(raw.into_owned()).map_err(|e| not_utf8(shown, e.as_bytes()))
}

/// Where the symbolic link at `link` (components) pointing at `target` leads, as a name in the
/// archive (`""` for its top); `None` if it leads outside.
fn resolve_symlink(link: &[String], target: &str) -> Option<String> {
    if target.starts_with('/') {
        return None;
    }
    let mut at: Vec<&str> = link[..link.len() - 1].iter().map(String::as_str).collect();
    for p in target.split('/') {
        match p {
            "" | "." => {}
            ".." => {
                at.pop()?;
            }
            p => at.push(p),
        }
    }
    Some(at.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symlinks_resolve_inside_the_archive_only() {
        let link: Vec<String> = ["train", "cat", "a.png"].iter().map(|s| s.to_string()).collect();
        assert_eq!(resolve_symlink(&link, "../dog/b.png").as_deref(), Some("train/dog/b.png"));
        assert_eq!(resolve_symlink(&link, "./c.png").as_deref(), Some("train/cat/c.png"));
        assert_eq!(resolve_symlink(&link, "../../../x.png"), None);
        assert_eq!(resolve_symlink(&link, "/etc/passwd"), None);
    }

    #[test]
    fn member_names_are_normalized_as_extraction_does() {
        let p = Path::new("a.tar");
        assert_eq!(member_parts(b"./train//cat/x.png", p).unwrap().unwrap(), ["train", "cat", "x.png"]);
        assert_eq!(member_parts(b"/train/cat/x.png", p).unwrap().unwrap(), ["train", "cat", "x.png"]);
        assert!(member_parts(b"./", p).unwrap().is_none());
        assert!(member_parts(b"train/../../x.png", p).is_err());
        assert!(member_parts(b"train/\xff/x.png", p).is_err());
    }
}
