//! Errors of the `io` room; every variant names the file, and the extent where one is involved.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum IoError {
    #[error("{}: cannot open for reading: {source}", .path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "{}: read of {len} bytes at offset {offset} into {dst:#x} is not {align}-aligned \
         (O_DIRECT needs aligned offset, length and destination; use io::align_extent)",
        .path.display()
    )]
    Misaligned { path: PathBuf, offset: u64, len: usize, dst: usize, align: usize },

    #[error(
        "{}: read of {len} bytes at offset {offset} runs past the end of the file \
         ({file_len} bytes, aligned up to {align})",
        .path.display()
    )]
    OutOfRange { path: PathBuf, offset: u64, len: usize, file_len: u64, align: usize },

    #[error("{}: read of {len} bytes at offset {offset} failed: {source}", .path.display())]
    Read {
        path: PathBuf,
        offset: u64,
        len: usize,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "{}: short read: {got} of {len} bytes at offset {offset} (file truncated or shrunk?)",
        .path.display()
    )]
    ShortRead { path: PathBuf, offset: u64, len: usize, got: usize },

    #[error("{}: io_uring: {source}", .path.display())]
    Uring {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{}: cannot start I/O thread: {source}", .path.display())]
    Thread {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("cannot allocate an aligned buffer of {len} bytes")]
    Alloc { len: usize },

    #[error("{}: the I/O service's threads have stopped", .path.display())]
    ServiceGone { path: PathBuf },

    #[error("{}: the step run after a batch of reads panicked", .path.display())]
    Completion { path: PathBuf },

    #[error("{}: the read was cancelled before it started", .path.display())]
    Cancelled { path: PathBuf },

    #[error("{}: ticket {ticket} is unknown or was already waited", .path.display())]
    UnknownTicket { path: PathBuf, ticket: u64 },
}
