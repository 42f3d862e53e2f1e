//! Opening inputs: a path that is not a regular file (a FIFO, a socket, a character or block
//! device) is refused by its type, before a read could block on it or never end.
use std::fs::{File, Metadata};
use std::path::Path;

use crate::error::{Error, IoContext, Result};

/// The metadata of `path` (links followed), or an error if it is not a regular file.
pub fn regular_file(path: &Path) -> Result<Metadata> {
    let meta = std::fs::metadata(path).at(path)?;
    if !meta.is_file() {
        return Err(Error::format(path, format!("is {}, not a regular file", kind_of(&meta))));
    }
    Ok(meta)
}

/// Opens `path` for reading if it is a regular file.
pub fn open_regular(path: &Path) -> Result<File> {
    regular_file(path)?;
    File::open(path).at(path)
}

/// What kind of file `meta` describes, in words.
pub fn kind_of(meta: &Metadata) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        let t = meta.file_type();
        if t.is_fifo() {
            return "a FIFO";
        }
        if t.is_socket() {
            return "a socket";
        }
        if t.is_char_device() {
            return "a character device";
        }
        if t.is_block_device() {
            return "a block device";
        }
    }
    if meta.is_dir() { "a directory" } else { "not a regular file" }
}

/// Writes `path` whole or not at all: `write` fills a temporary file beside it (in the same
/// directory, so that the rename is atomic), which is synced to disk and then renamed over
/// `path`. On any failure the temporary is removed and `path` is as it was.
pub fn write_atomically(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let result = write(&tmp)
        .and_then(|()| File::open(&tmp).and_then(|f| f.sync_all()).at(&tmp))
        .and_then(|()| std::fs::rename(&tmp, path).at(path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
