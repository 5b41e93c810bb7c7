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
