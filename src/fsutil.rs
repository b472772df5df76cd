//! Files written whole or not at all: the content goes to a temporary name in the same
//! directory, is fsynced, and is renamed over the final name, so a reader (or a process that
//! starts after a crash, a full disk or a signal) sees the old file or the new one, never a
//! part. Errors name the file in the house's words ("PATH: cannot write (why)").

use anyhow::{Context, Result};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Writes `bytes` to `path` atomically (temporary sibling, fsync, rename, fsync of the
/// directory). On any failure the temporary file is removed and `path` is untouched.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_sibling(path);
    let written = (|| -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(anyhow::anyhow!("{}: cannot write ({})", path.display(), io_words(&e)));
    }
    rename_into_place(&tmp, path)
}

/// Renames the finished file `tmp` over `path` and makes the rename durable.
pub fn rename_into_place(tmp: &Path, path: &Path) -> Result<()> {
    if let Err(e) = fs::rename(tmp, path) {
        let _ = fs::remove_file(tmp);
        return Err(anyhow::anyhow!("{}: cannot write ({})", path.display(), io_words(&e)));
    }
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("{}: fsync", dir.display()))
}

/// `.NAME.PID.tmp` beside `path`: distinct for concurrent writers, hidden, and recognisable.
pub fn temp_sibling(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}

/// An I/O error as words: "permission denied", not "Permission denied (os error 13)".
pub fn io_words(e: &std::io::Error) -> String {
    let text = e.to_string();
    let text = text.split(" (os error").next().unwrap_or_default();
    let mut chars = text.chars();
    chars.next().map(|c| c.to_lowercase().chain(chars).collect()).unwrap_or_else(|| e.kind().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_atomic_write_replaces_the_file_whole_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.json");
        write_atomic(&path, b"old").unwrap();
        write_atomic(&path, b"new").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new");
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["a.json"]);
    }

    #[test]
    fn a_failed_atomic_write_names_the_file_and_keeps_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing-dir").join("a.json");
        let err = write_atomic(&path, b"x").unwrap_err().to_string();
        assert!(err.starts_with(&format!("{}: cannot write", path.display())), "{err}");
    }
}
