//! Files written whole or not at all: a temporary file beside the target, synced, renamed over
//! it, the directory synced. A crash, a full disk or a kill midway leaves the old file (or
//! none), never half a new one.

use std::io::Write;
use std::path::Path;

/// Write `bytes` to `path` atomically (creating its directory).
pub fn write(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    // The rename is durable once the directory is synced (best effort: not every filesystem
    // lets a directory be opened for that).
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// A file being written in place of `path`: a temporary file beside it until `commit` syncs it
/// and renames it over `path`; dropped uncommitted, it is removed and `path` is untouched.
#[derive(Debug)]
pub struct Staged {
    tmp: tempfile::NamedTempFile,
}

impl Staged {
    /// Start writing the replacement of `path` (its directory is created).
    pub fn new(path: &Path) -> std::io::Result<Staged> {
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        Ok(Staged { tmp: tempfile::NamedTempFile::new_in(dir)? })
    }

    /// Sync and rename over `path`.
    pub fn commit(self, path: &Path) -> std::io::Result<()> {
        self.tmp.as_file().sync_all()?;
        self.tmp.persist(path).map_err(|e| e.error)?;
        if let Some(d) = path.parent().filter(|d| !d.as_os_str().is_empty()).and_then(|d| std::fs::File::open(d).ok()) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

impl Write for Staged {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.tmp.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.tmp.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staged_files_appear_whole_or_not_at_all() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/out.txt");
        write(&path, b"old").expect("write");
        let mut s = Staged::new(&path).expect("stage");
        s.write_all(b"half").expect("write");
        drop(s);
        assert_eq!(std::fs::read(&path).expect("read"), b"old", "an uncommitted stage leaves the old file");
        let mut s = Staged::new(&path).expect("stage");
        s.write_all(b"new").expect("write");
        s.commit(&path).expect("commit");
        assert_eq!(std::fs::read(&path).expect("read"), b"new");
        assert_eq!(std::fs::read_dir(path.parent().expect("dir")).expect("ls").count(), 1, "no temp file left");
    }
}
