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

/// Opens `path` for reading if it is a regular file. The type is checked on the open file
/// (opened without blocking, so that a FIFO cannot hold the open), not on the name, so a file
/// swapped for another kind meanwhile is refused too.
pub fn open_regular(path: &Path) -> Result<File> {
    use std::fs::OpenOptions;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    options.custom_flags(libc::O_NONBLOCK);
    let file = options.open(path).at(path)?;
    let meta = file.metadata().at(path)?;
    if !meta.is_file() {
        return Err(Error::format(path, format!("is {}, not a regular file", kind_of(&meta))));
    }
    Ok(file)
}

/// The whole of `path`, a regular file of at most `max_bytes` bytes (a larger one, or a FIFO,
/// socket or device, is refused before a byte is read).
pub fn read_regular(path: &Path, max_bytes: u64) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut file = open_regular(path)?;
    let len = file.metadata().at(path)?.len();
    if len > max_bytes {
        return Err(Error::format(
            path,
            format!("is {len} bytes, more than the {max_bytes} an image may be"),
        ));
    }
    let mut bytes = Vec::new();
    bytes
        .try_reserve_exact(len as usize)
        .map_err(|_| Error::OutOfMemory { bytes: len as usize, what: format!("{}", path.display()) })?;
    // One byte past the length read at open tells a file that grew meanwhile.
    file.by_ref().take(max_bytes + 1).read_to_end(&mut bytes).at(path)?;
    if bytes.len() as u64 > max_bytes {
        return Err(Error::format(
            path,
            format!("grew past the {max_bytes} bytes an image may be while read"),
        ));
    }
    Ok(bytes)
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
