//! Throughput of `io::IoService` on random 1–3 MiB extents of a large temp file, O_DIRECT (the
//! page cache plays no part): io_uring at several queue depths vs pread×4 vs one synchronous
//! pread thread. Prints GB/s; not a criterion bench because one sample is seconds of disk time.
//!
//! `cargo bench --bench io_read -- [file GiB = 2] [GiB read per config = 1] [min KiB = 1024]
//! [max KiB = 3072]`. CPU seconds are the whole process's (user + system) during the run.
//! The file goes to `$MOERUN_IO_BENCH_DIR` (default: the temp dir), which must be on a disk.

use std::io::Write;
use std::time::Instant;

use moerun::io::{align_extent, AlignedBuf, IoBackend, IoConfig, IoService, IoTuning, ReadOp};
use moerun::rng::SplitMix64;

const MIB: usize = 1 << 20;
/// Ops per submitted batch, and batches kept in flight (like a layer's fetches plus prefetch).
const BATCH: usize = 32;
const WINDOW: usize = 2;

fn main() {
    let args: Vec<f64> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let file_gib = args.first().copied().unwrap_or(2.0);
    let read_gib = args.get(1).copied().unwrap_or(1.0);
    let min_len = args.get(2).map_or(MIB, |k| (*k as usize) << 10);
    let max_len = args.get(3).map_or(3 * MIB, |k| (*k as usize) << 10).max(min_len + 1);
    let dir = std::env::var_os("MOERUN_IO_BENCH_DIR").map_or_else(std::env::temp_dir, Into::into);
    let tmp = tempfile::Builder::new().prefix("io_read").tempdir_in(dir).expect("tempdir");
    let path = tmp.path().join("big.bin");
    let file_len = (file_gib * (1u64 << 30) as f64) as usize;
    write_file(&path, file_len);

    let configs: &[(&str, IoBackend, usize, usize, usize)] = &[
        // (name, backend, queue depth, pread threads, split bytes)
        ("sync pread x1", IoBackend::Pread, 1, 1, 0),
        ("pread x4", IoBackend::Pread, 1, 4, 0),
        ("pread x8", IoBackend::Pread, 1, 8, 0),
        ("uring QD8", IoBackend::Uring, 8, 0, 0),
        ("uring QD16", IoBackend::Uring, 16, 0, 0),
        ("uring QD32", IoBackend::Uring, 32, 0, 0),
        ("uring QD64", IoBackend::Uring, 64, 0, 0),
        ("uring QD32 split 1MiB", IoBackend::Uring, 32, 0, MIB),
        ("uring QD32 split 256KiB", IoBackend::Uring, 32, 0, 256 * 1024),
    ];
    let target = (read_gib * (1u64 << 30) as f64) as u64;
    println!(
        "file {file_gib} GiB, {read_gib} GiB of random {}-{} KiB extents per config, O_DIRECT",
        min_len >> 10,
        max_len >> 10
    );
    for round in 0..2 {
        for &(name, backend, queue_depth, pread_threads, split_bytes) in configs {
            let cfg = IoConfig { backend, queue_depth, direct: true, pread_threads };
            let svc = IoService::open_tuned(&path, cfg, IoTuning { split_bytes }).expect("open");
            assert!(svc.direct(), "O_DIRECT refused: put MOERUN_IO_BENCH_DIR on a disk");
            let cpu0 = cpu_seconds();
            let gbs = run(&svc, file_len, target, 1000 + round, (min_len, max_len));
            let cpu = cpu_seconds() - cpu0;
            let s = svc.stats();
            println!(
                "round {round}  {name:<24} {gbs:6.2} GB/s  ({} ops, busy {:.2} s, cpu {:.2} s/GB)",
                s.ops,
                s.busy_s,
                cpu / (s.bytes as f64 / 1e9)
            );
        }
    }
}

/// Reads random extents until `target` bytes, BATCH ops per ticket, WINDOW tickets in flight.
fn run(svc: &IoService, file_len: usize, target: u64, seed: u64, lens: (usize, usize)) -> f64 {
    let mut rng = SplitMix64::new(seed);
    let mut bufs: Vec<Vec<AlignedBuf>> =
        (0..WINDOW).map(|_| (0..BATCH).map(|_| AlignedBuf::new(lens.1 + 8192).expect("alloc")).collect()).collect();
    let mut tickets = std::collections::VecDeque::new();
    let (mut bytes, mut slot) = (0u64, 0usize);
    let t0 = Instant::now();
    while bytes < target {
        if tickets.len() == WINDOW {
            svc.wait(tickets.pop_front().expect("window")).expect("read");
        }
        let ops: Vec<ReadOp> = bufs[slot]
            .iter_mut()
            .map(|b| {
                let len = lens.0 + (rng.next_u64() as usize) % (lens.1 - lens.0);
                let off = rng.next_u64() % (file_len - len) as u64;
                let (aoff, alen, _) = align_extent(off, len as u64);
                bytes += alen as u64;
                ReadOp { file_offset: aoff, len: alen, dst: b.as_mut_ptr() }
            })
            .collect();
        // SAFETY: bufs[slot] is reused only after its ticket is waited (WINDOW slots in turn).
        tickets.push_back(unsafe { svc.submit(ops) });
        slot = (slot + 1) % WINDOW;
    }
    while let Some(t) = tickets.pop_front() {
        svc.wait(t).expect("read");
    }
    bytes as f64 / t0.elapsed().as_secs_f64() / 1e9
}

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes the struct we pass; zeroed is a valid rusage.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a live rusage.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn write_file(path: &std::path::Path, len: usize) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).expect("create"));
    let mut rng = SplitMix64::new(1);
    let mut block = vec![0u8; MIB];
    for start in (0..len).step_by(MIB) {
        block.chunks_exact_mut(8).for_each(|c| c.copy_from_slice(&rng.next_u64().to_le_bytes()));
        f.write_all(&block[..MIB.min(len - start)]).expect("write");
    }
    f.into_inner().expect("flush").sync_all().expect("sync");
}
