//! Putting a conversion's splits in place as one step: after any failure — an error, a crash
//! between two renames, a conversion racing another into the same directory — the directory
//! holds the earlier complete set of splits or the new one, never a mix.
//!
//! Conversions into one directory take turns (`.cifar-prep.lock`, an exclusive `flock`, for the
//! renames only). Before renaming, each split already there is hard-linked to a backup and a
//! journal lists what is replaced; a failed rename puts the backups back; a journal left by a
//! process that died is rolled back by the next conversion into that directory.
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use super::writer::Sealed;
use crate::error::{Error, IoContext, Result};

const LOCK: &str = ".cifar-prep.lock";
const JOURNAL: &str = ".cifar-prep-journal.";
const BACKUP: &str = ".cifar-prep-backup.";

/// Renames each sealed file to its path, all or none.
pub(crate) fn persist_all(dir: &Path, files: Vec<(PathBuf, Sealed)>) -> Result<()> {
    let lock_path = dir.join(LOCK);
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .at(&lock_path)?;
    // SAFETY: flock on a descriptor this function owns; it touches no memory. Blocking: the
    // other conversion holds it only for its renames.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(Error::io(&lock_path, std::io::Error::last_os_error()));
    }
    recover(dir);
    let pid = std::process::id();
    let journal_path = dir.join(format!("{JOURNAL}{pid}"));
    let mut journal = String::new();
    let mut backups = Vec::new();
    for (target, _) in &files {
        let backup = dir.join(format!("{BACKUP}{pid}.{}", target.file_name().unwrap().to_string_lossy()));
        let _ = std::fs::remove_file(&backup);
        let kept = std::fs::symlink_metadata(target).is_ok_and(|m| m.is_file())
            && std::fs::hard_link(target, &backup).is_ok();
        journal.push_str(&format!(
            "{}\t{}\n",
            target.display(),
            if kept { backup.display().to_string() } else { String::new() }
        ));
        backups.push(kept.then_some(backup));
    }
    crate::files::write_atomically(&journal_path, |tmp| std::fs::write(tmp, &journal).at(tmp))?;
    let mut done = 0;
    let mut failed = None;
    for (target, sealed) in files {
        match sealed.persist(&target) {
            Ok(()) => done += 1,
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    if let Some(e) = failed {
        roll_back(&journal_path, done);
        return Err(e);
    }
    for b in backups.into_iter().flatten() {
        let _ = std::fs::remove_file(b);
    }
    let _ = std::fs::remove_file(&journal_path);
    Ok(())
}

/// Undoes the first `done` renames a journal lists (all of them for `usize::MAX`): each target
/// gets its backup back, or is removed where there was none; then the journal goes.
fn roll_back(journal_path: &Path, done: usize) {
    let journal = std::fs::read_to_string(journal_path).unwrap_or_default();
    for line in journal.lines().take(done) {
        let (target, backup) = line.split_once('\t').unwrap_or((line, ""));
        if backup.is_empty() {
            let _ = std::fs::remove_file(target);
        } else {
            let _ = std::fs::rename(backup, target);
        }
    }
    // Backups of renames never made are only extra names of files still in place.
    for line in journal.lines().skip(done) {
        if let Some((_, backup)) = line.split_once('\t').filter(|(_, b)| !b.is_empty()) {
            let _ = std::fs::remove_file(backup);
        }
    }
    let _ = std::fs::remove_file(journal_path);
}

/// Rolls back the journals in `dir` of processes that no longer run (killed between renames),
/// then removes their backups left without a journal (killed before writing it).
fn recover(dir: &Path) {
    let dead = |pid: &str| {
        pid.parse::<u32>()
            .is_ok_and(|p| p != std::process::id() && !Path::new(&format!("/proc/{p}")).exists())
    };
    for pass in [JOURNAL, BACKUP] {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix(pass) else { continue };
            let pid = rest.split('.').next().unwrap_or_default();
            if !dead(pid) {
                continue;
            }
            if pass == JOURNAL {
                roll_back(&e.path(), usize::MAX);
            } else {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_journal_left_by_a_killed_conversion_is_rolled_back() {
        let dir = std::env::temp_dir().join(format!("cifar-persist-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // pid 4194304 is above Linux's largest: a process that cannot be running.
        let dead = 4_194_304u32;
        let (train, test) = (dir.join("x-train.safetensors"), dir.join("x-test.safetensors"));
        let backup = dir.join(format!("{BACKUP}{dead}.x-train.safetensors"));
        // Killed after renaming a new train split over the old one (kept as the backup) and a
        // new test split where there was none.
        std::fs::write(&train, "new train").unwrap();
        std::fs::write(&backup, "old train").unwrap();
        std::fs::write(&test, "new test").unwrap();
        let stray = dir.join(format!("{BACKUP}{dead}.y-train.safetensors"));
        std::fs::write(&stray, "a backup without its journal").unwrap();
        std::fs::write(
            dir.join(format!("{JOURNAL}{dead}")),
            format!("{}\t{}\n{}\t\n", train.display(), backup.display(), test.display()),
        )
        .unwrap();
        recover(&dir);
        assert_eq!(std::fs::read_to_string(&train).unwrap(), "old train");
        assert!(!test.exists() && !backup.exists() && !stray.exists());
        assert!(!dir.join(format!("{JOURNAL}{dead}")).exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
