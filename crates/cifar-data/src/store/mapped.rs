//! A tensor file's memory map with its SIGBUS watch: what both stores ([`super::TensorFile`] and
//! [`super::encoded::EncodedFile`]) hold of their file, and how each learns that the file was
//! truncated under it (see `TensorFile`'s contract).
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::sigbus;
use crate::error::{Error, IoContext, Result};

/// A file mapped read-only, its length when opened, and the watch on its map. The bytes are
/// the map's (`Deref`).
pub(crate) struct Mapped {
    path: PathBuf,
    /// Kept open: for positioned reads, and to see the file's length now.
    file: File,
    file_len: u64,
    map: Mmap,
    watch: Option<usize>,
    /// A truncation under the map reads zeros (and is seen by [`Mapped::check_whole`]) instead
    /// of raising SIGBUS.
    surviving: bool,
    /// For a surviving map, the file's last nonzero byte, `(offset, value, start of its
    /// page)`, where one lies within [`TAIL_SCAN`] bytes of its end: the probe of
    /// [`Mapped::check_cut`].
    tail: Option<(usize, u8, usize)>,
}

/// How far from its end a file is searched for a nonzero byte to probe: a file that ends in
/// more zeros than this (none of ours) has every batch check its length instead.
const TAIL_SCAN: usize = 1 << 20;

impl Mapped {
    /// Maps `file`, opened read-only from `path` and `file_len` bytes long, and watches the map.
    pub(crate) fn new(path: &Path, file: File, file_len: u64) -> Result<Mapped> {
        // SAFETY: the file is opened read-only. The mapping is undefined behaviour only if
        // another process truncates or rewrites the file while it is mapped; `cifar-prep` never
        // does that (it writes a new file and renames it over the old name, leaving mapped pages
        // intact), and a truncation by another program is what the SIGBUS watch reports. Every
        // slice of the map is bounds-checked, and the stores check every extent against the
        // file's length before they read.
        let map = unsafe { Mmap::map(&file) }.at(path)?;
        let watch = sigbus::watch(
            map.as_ptr(),
            map.len(),
            format!(
                "error: {}: the file was truncated while this program had it mapped (another \
                 program changed it during the run); prepare it anew and run again\n",
                path.display()
            ),
        );
        Ok(Mapped { path: path.to_path_buf(), file, file_len, map, watch, surviving: false, tail: None })
    }

    /// The file's path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The open file.
    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    /// The map itself.
    pub(crate) fn mmap(&self) -> &Mmap {
        &self.map
    }

    /// From now on a read of the map that finds the file truncated reads zeros instead of
    /// raising SIGBUS; [`Mapped::check_whole`] tells. Where the map could not be watched (all
    /// watch slots taken, or not Linux), nothing changes and [`Mapped::surviving`] stays false.
    pub(crate) fn survive_truncation(&mut self) {
        #[cfg(target_os = "linux")]
        if let Some(slot) = self.watch {
            sigbus::survive(slot);
            self.surviving = true;
            let scan = self.map.len().saturating_sub(TAIL_SCAN);
            let page = page_size();
            self.tail = self.map[scan..]
                .iter()
                .rposition(|&b| b != 0)
                .map(|i| (scan + i, self.map[scan + i], (scan + i) / page * page));
        }
    }

    /// Whether a truncation under the map is survived (see [`Mapped::survive_truncation`]).
    pub(crate) fn surviving(&self) -> bool {
        self.surviving
    }

    /// For a map that survives truncation: whether every read of it so far found the file
    /// whole (an error saying it was truncated, found while `doing`, if not).
    pub(crate) fn check_whole(&self, doing: &str) -> Result<()> {
        match self.watch {
            Some(slot) if self.surviving && sigbus::truncated(slot) => Err(self.truncated(doing)),
            _ => Ok(()),
        }
    }

    /// Where the page that holds the file's last nonzero byte starts (0 where none was found
    /// near the end): reads from there on are the ones [`Mapped::check_cut`] needs to be told of.
    pub(crate) fn tail_page(&self) -> usize {
        self.tail.map_or(0, |(_, _, page)| page)
    }

    /// After a batch's reads of a map that survives truncation: an error if the file was cut
    /// under them, found while `doing`; `read_tail_page`: whether they read anything from
    /// [`Mapped::tail_page`] on.
    ///
    /// A cut that leaves a page in two makes the rest of that page read as zeros, with no fault
    /// to tell. Without a system call for most batches: Linux (ext4, tmpfs) sets the new length
    /// and unmaps the pages past the cut before it zeroes the cut page's rest, so if the batch
    /// read zeros, a read of the file's last nonzero byte now faults (the watch sees it) or, in
    /// that very page, reads a zero; a cut past that byte only ever served the zeros the file
    /// holds, and a file cut and grown back is seen too. A batch that read from the tail page
    /// itself could race the zeroing of that page, so it checks the length as well, as does
    /// every batch of a map that is not watched or has no byte to probe. A filesystem that
    /// zeroes the cut page before it sets the length (XFS) leaves a moment in which neither
    /// check can see a cut made while the batch is read.
    pub(crate) fn check_cut(&self, doing: &str, read_tail_page: bool) -> Result<()> {
        match self.tail {
            Some((at, value, _)) if self.surviving => {
                // The probe must read the map after every read of the batch, not before.
                std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
                // SAFETY: `at` is within the map, which lives as long as `self`; a page cut off
                // under it reads as zeros through the watch instead of faulting.
                let now = unsafe { std::ptr::read_volatile(self.map.as_ptr().add(at)) };
                self.check_whole(doing)?;
                if now != value {
                    return Err(self.truncated(doing));
                }
                if read_tail_page { self.check_length(doing) } else { Ok(()) }
            }
            _ => {
                self.check_whole(doing)?;
                self.check_length(doing)
            }
        }
    }

    /// Whether the file still has the length it had when opened (an error saying it was
    /// truncated, found while `doing`, if not). A truncation that cuts a page in two is seen
    /// by no fault: the rest of that page reads as zeros.
    pub(crate) fn check_length(&self, doing: &str) -> Result<()> {
        match self.file.metadata() {
            Ok(m) if m.len() < self.file_len => Err(self.truncated(doing)),
            Ok(_) => Ok(()),
            Err(e) => Err(Error::io(&self.path, e)),
        }
    }

    /// The error of a file found truncated while `doing`.
    pub(crate) fn truncated(&self, doing: &str) -> Error {
        Error::format(&self.path, format!("was truncated while open (found {doing}); prepare it anew"))
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf reads a constant of the system.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 { n as usize } else { 4096 }
}

impl std::ops::Deref for Mapped {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.map
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        if let Some(i) = self.watch {
            sigbus::unwatch(i);
        }
    }
}
