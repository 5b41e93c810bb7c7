//! `io::IoService` end to end on real files: every test body runs on both backends (io_uring and
//! pread) through `for_each_backend`, with O_DIRECT unless the test is about buffered reads.

use std::io::Write;
use std::path::{Path, PathBuf};

use moerun::io::{
    align_extent, AlignedBuf, IoBackend, IoConfig, IoError, IoService, IoTuning, ReadOp, Ticket, Urgency, ALIGN,
};
use moerun::rng::SplitMix64;

const MIB: usize = 1 << 20;

/// The file's byte at `i`: byte `i % 8` of a hash of the word index, so any extent can be
/// checked without keeping the file in memory.
fn byte_at(i: u64) -> u8 {
    let mut z = (i / 8).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> ((i % 8) * 8)) as u8
}

fn expected(offset: u64, len: usize) -> Vec<u8> {
    (offset..offset + len as u64).map(byte_at).collect()
}

fn write_file(dir: &Path, name: &str, len: usize) -> PathBuf {
    let path = dir.join(name);
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).expect("create"));
    for start in (0..len).step_by(MIB) {
        f.write_all(&expected(start as u64, MIB.min(len - start))).expect("write");
    }
    f.into_inner().expect("flush").sync_all().expect("sync");
    path
}

/// A reader set-up under test: a backend, and how finely it splits ops into kernel reads.
#[derive(Clone, Copy, Debug)]
struct Setup {
    backend: IoBackend,
    split_bytes: usize,
}

fn open(path: &Path, setup: Setup, direct: bool) -> IoService {
    let cfg = IoConfig { backend: setup.backend, direct, ..IoConfig::default() };
    let tuning = IoTuning { split_bytes: setup.split_bytes };
    let svc = IoService::open_tuned(path, cfg, tuning).expect("open");
    assert_eq!(svc.backend(), setup.backend);
    svc
}

/// Runs `body` once per concrete backend, and once more with io_uring splitting ops into
/// 64 KiB reads (many chunks per op in flight).
fn for_each_backend(body: impl Fn(Setup)) {
    for (backend, split_bytes) in [(IoBackend::Uring, 0), (IoBackend::Uring, 64 * 1024), (IoBackend::Pread, 0)] {
        body(Setup { backend, split_bytes });
    }
}

/// A wanted byte range and the aligned buffer that will hold its superset.
struct Extent {
    offset: u64,
    len: usize,
    pad: usize,
    buf: AlignedBuf,
    aligned_offset: u64,
}

impl Extent {
    fn new(offset: u64, len: usize) -> Extent {
        let (aligned_offset, alen, pad) = align_extent(offset, len as u64);
        Extent { offset, len, pad, buf: AlignedBuf::new(alen).expect("alloc"), aligned_offset }
    }

    fn op(&mut self) -> ReadOp {
        ReadOp { file_offset: self.aligned_offset, len: self.buf.len(), dst: self.buf.as_mut_ptr() }
    }

    fn check(&self, what: &str) {
        let got = &self.buf.as_slice()[self.pad..self.pad + self.len];
        assert!(
            got == expected(self.offset, self.len).as_slice(),
            "{what}: bytes differ for extent at {} (+{})",
            self.offset,
            self.len
        );
    }
}

fn random_extents(rng: &mut SplitMix64, n: usize, file_len: usize, max_len: usize) -> Vec<Extent> {
    (0..n)
        .map(|_| {
            let len = 1 + (rng.next_u64() as usize) % max_len;
            let offset = rng.next_u64() % (file_len - len) as u64;
            Extent::new(offset, len)
        })
        .collect()
}

#[test]
fn random_unaligned_extents_match_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file_len = 64 * MIB;
    let path = write_file(dir.path(), "data.bin", file_len);
    for_each_backend(|backend| {
        let svc = open(&path, backend, true);
        let mut rng = SplitMix64::new(7);
        let mut extents = random_extents(&mut rng, 96, file_len, 3 * MIB);
        // Include both file ends.
        extents.push(Extent::new(0, 5));
        extents.push(Extent::new(file_len as u64 - 3, 3));
        for batch in extents.chunks_mut(16) {
            let ops = batch.iter_mut().map(Extent::op).collect();
            // SAFETY: each buffer is owned by `batch`, untouched until wait returns.
            let t = unsafe { svc.submit(ops) };
            svc.wait(t).expect("wait");
        }
        for e in &extents {
            e.check(&format!("{backend:?}"));
        }
        let s = svc.stats();
        let bytes: usize = extents.iter().map(|e| e.buf.len()).sum();
        assert_eq!((s.ops, s.bytes, s.errors), (extents.len() as u64, bytes as u64, 0));
        assert_eq!(s.batches, extents.len().div_ceil(16) as u64);
        assert!(s.busy_s > 0.0);
    });
}

#[test]
fn many_batches_in_flight_waited_out_of_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file_len = 32 * MIB;
    let path = write_file(dir.path(), "data.bin", file_len);
    for_each_backend(|backend| {
        let svc = open(&path, backend, true);
        let mut rng = SplitMix64::new(11);
        let mut batches: Vec<Vec<Extent>> = (0..24).map(|_| random_extents(&mut rng, 6, file_len, MIB)).collect();
        let tickets: Vec<Ticket> = batches
            .iter_mut()
            // SAFETY: every buffer lives in `batches` until all tickets are waited below.
            .map(|b| unsafe { svc.submit(b.iter_mut().map(Extent::op).collect()) })
            .collect();
        // Odd tickets from the back, then even ones from the front.
        let order: Vec<usize> = (0..24).rev().filter(|i| i % 2 == 1).chain((0..24).filter(|i| i % 2 == 0)).collect();
        for i in order {
            svc.wait(tickets[i]).expect("wait");
            for e in &batches[i] {
                e.check(&format!("{backend:?} batch {i}"));
            }
        }
        // A ticket is consumed by its wait.
        assert!(matches!(svc.wait(tickets[0]), Err(IoError::UnknownTicket { .. })));
    });
}

#[test]
fn submit_from_many_threads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file_len = 16 * MIB;
    let path = write_file(dir.path(), "data.bin", file_len);
    for_each_backend(|backend| {
        let svc = open(&path, backend, true);
        std::thread::scope(|s| {
            for seed in 0..4 {
                let svc = &svc;
                s.spawn(move || {
                    let mut rng = SplitMix64::new(100 + seed);
                    for _ in 0..8 {
                        let mut ex = random_extents(&mut rng, 4, file_len, 512 * 1024);
                        // SAFETY: `ex` outlives the wait below.
                        let t = unsafe { svc.submit(ex.iter_mut().map(Extent::op).collect()) };
                        svc.wait(t).expect("wait");
                        ex.iter().for_each(|e| e.check("threads"));
                    }
                });
            }
        });
        assert_eq!(svc.stats().ops, 4 * 8 * 4);
    });
}

#[test]
fn truncated_file_is_an_error_naming_file_and_offset_and_service_recovers() {
    let dir = tempfile::tempdir().expect("tempdir");
    for_each_backend(|backend| {
        // Fresh full-length file per backend; the service learns its length at open.
        let path = write_file(dir.path(), "shrinks.bin", 8 * MIB);
        let svc = open(&path, backend, true);
        std::fs::OpenOptions::new().write(true).open(&path).and_then(|f| f.set_len(4 * MIB as u64)).expect("truncate");

        let mut gone = Extent::new(6 * MIB as u64, MIB);
        let mut partly = Extent::new(4 * MIB as u64 - 8192, 64 * 1024);
        let mut fine = Extent::new(12_345, 100_000);
        // SAFETY: the extents outlive the wait.
        let t = unsafe { svc.submit(vec![gone.op(), fine.op()]) };
        let err = svc.wait(t).expect_err("read past the truncated end must fail");
        let msg = err.to_string();
        assert!(matches!(err, IoError::ShortRead { offset, got: 0, .. } if offset == 6 * MIB as u64));
        assert!(msg.contains("shrinks.bin") && msg.contains(&(6 * MIB).to_string()), "{msg}");

        // SAFETY: as above.
        let t = unsafe { svc.submit(vec![partly.op()]) };
        match svc.wait(t) {
            Err(IoError::ShortRead { got, len, .. }) => assert_eq!((got, len), (8192, 64 * 1024)),
            other => panic!("{backend:?}: expected a short read, got {other:?}"),
        }

        // The service still serves valid batches.
        // SAFETY: as above.
        let t = unsafe { svc.submit(vec![fine.op()]) };
        svc.wait(t).expect("valid read after a failed one");
        fine.check("after truncation");
        assert_eq!(svc.stats().errors, 2);
    });
}

#[test]
fn misaligned_ops_under_o_direct_are_errors_not_ub() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_file(dir.path(), "data.bin", 2 * MIB);
    for_each_backend(|backend| {
        let svc = open(&path, backend, true);
        if !svc.direct() {
            eprintln!("filesystem refuses O_DIRECT; alignment is not enforced");
            return;
        }
        let mut buf = AlignedBuf::new(3 * ALIGN).expect("alloc");
        let p = buf.as_mut_ptr();
        let bad = [
            ReadOp { file_offset: 1, len: ALIGN, dst: p },
            ReadOp { file_offset: 0, len: 100, dst: p },
            ReadOp { file_offset: 0, len: ALIGN, dst: p.wrapping_add(8) },
        ];
        for op in bad {
            // SAFETY: buf outlives the wait; the op is rejected before any I/O anyway.
            let t = unsafe { svc.submit(vec![ReadOp { file_offset: 0, len: ALIGN, dst: p }, op]) };
            let err = svc.wait(t).expect_err("misaligned");
            assert!(matches!(err, IoError::Misaligned { .. }), "{err:?}");
            assert!(err.to_string().contains("data.bin"), "{err}");
        }
        // The whole batch was rejected: nothing was written.
        assert!(buf.as_slice().iter().all(|&b| b == 0));
        // Past the aligned end of the file.
        let op = ReadOp { file_offset: 2 * MIB as u64, len: ALIGN, dst: p };
        // SAFETY: as above.
        let err = svc.wait(unsafe { svc.submit(vec![op]) }).expect_err("out of range");
        assert!(matches!(err, IoError::OutOfRange { .. }), "{err:?}");
        let (b, pad) = svc.read_range(5, 10).expect("still usable");
        assert_eq!(&b.as_slice()[pad..pad + 10], expected(5, 10).as_slice());
    });
}

#[test]
fn the_aligned_tail_past_eof_reads_as_zero() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file_len = 3 * ALIGN + 1000;
    let path = write_file(dir.path(), "odd.bin", file_len);
    for_each_backend(|backend| {
        let svc = open(&path, backend, true);
        assert_eq!(svc.file_len(), file_len as u64);
        let mut e = Extent::new(2 * ALIGN as u64 + 17, ALIGN + 983); // ends exactly at EOF
        e.buf.as_mut_slice().fill(0xAA);
        // SAFETY: e outlives the wait.
        svc.wait(unsafe { svc.submit(vec![e.op()]) }).expect("tail read");
        e.check("tail");
        assert!(e.buf.as_slice()[e.pad + e.len..].iter().all(|&b| b == 0));
        // One block beyond the aligned end is out of range.
        let op = ReadOp { file_offset: 4 * ALIGN as u64, len: ALIGN, dst: e.buf.as_mut_ptr() };
        // SAFETY: as above.
        let err = svc.wait(unsafe { svc.submit(vec![op]) }).expect_err("past the end");
        assert!(matches!(err, IoError::OutOfRange { .. }), "{err:?}");
    });
}

#[test]
fn buffered_mode_accepts_unaligned_ops() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_file(dir.path(), "data.bin", 4 * MIB);
    for_each_backend(|backend| {
        let svc = open(&path, backend, false);
        assert!(!svc.direct());
        let mut v = vec![0u8; 777_777];
        let op = ReadOp { file_offset: 123_457, len: v.len(), dst: v.as_mut_ptr() };
        // SAFETY: v outlives the wait and is not touched until it returns.
        svc.wait(unsafe { svc.submit(vec![op]) }).expect("buffered read");
        assert!(v == expected(123_457, v.len()));
    });
}

#[test]
fn drop_waits_for_batches_never_waited() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file_len = 16 * MIB;
    let path = write_file(dir.path(), "data.bin", file_len);
    for_each_backend(|backend| {
        let mut rng = SplitMix64::new(3);
        let mut ex = random_extents(&mut rng, 40, file_len, 2 * MIB);
        let svc = open(&path, backend, true);
        // SAFETY: `ex` outlives `svc`, whose drop waits for every queued read.
        let _t = unsafe { svc.submit(ex.iter_mut().map(Extent::op).collect()) };
        drop(svc);
        ex.iter().for_each(|e| e.check("after drop"));
    });
}

#[test]
fn auto_picks_a_concrete_backend_and_empty_batches_complete() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_file(dir.path(), "data.bin", MIB);
    let svc = IoService::open(&path, IoConfig::default()).expect("open");
    assert_ne!(svc.backend(), IoBackend::Auto);
    // SAFETY: no ops.
    svc.wait(unsafe { svc.submit(Vec::new()) }).expect("empty batch");
    let missing = IoService::open(&dir.path().join("nope.bin"), IoConfig::default());
    assert!(matches!(missing, Err(IoError::Open { ref path, .. }) if path.ends_with("nope.bin")));
}

#[test]
fn io_service_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<IoService>();
    check::<AlignedBuf>();
}

/// Cancelling a background batch drops the reads that have not started (it then ends with
/// `Cancelled`, naming the file) while batches queued around it land intact; promoting a
/// background batch lets it finish with its bytes right.
#[test]
fn cancelled_batches_drop_queued_reads_and_promoted_ones_land() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file_len = 32 * MIB;
    let path = write_file(dir.path(), "data.bin", file_len);
    for_each_backend(|setup| {
        // One read in flight at a time, so most of a queued batch has not started.
        let cfg = IoConfig { backend: setup.backend, queue_depth: 1, pread_threads: 1, ..IoConfig::default() };
        let svc = IoService::open_tuned(&path, cfg, IoTuning { split_bytes: setup.split_bytes }).expect("open");
        let mut rng = SplitMix64::new(5);
        let mut first = random_extents(&mut rng, 8, file_len, MIB);
        let mut doomed = random_extents(&mut rng, 32, file_len, MIB);
        let mut promoted = random_extents(&mut rng, 8, file_len, MIB);
        let mut last = random_extents(&mut rng, 8, file_len, MIB);
        let bg = Urgency::Background;
        // SAFETY: every buffer lives until its ticket is waited below.
        let (t1, t2, t3, t4) = unsafe {
            (
                svc.submit_with(first.iter_mut().map(Extent::op).collect(), bg),
                svc.submit_with(doomed.iter_mut().map(Extent::op).collect(), bg),
                svc.submit_with(promoted.iter_mut().map(Extent::op).collect(), bg),
                svc.submit_with(last.iter_mut().map(Extent::op).collect(), bg),
            )
        };
        svc.cancel(t2);
        svc.promote(t3);
        match svc.wait(t2) {
            Err(IoError::Cancelled { path: p }) => assert_eq!(p, path),
            other => panic!("{setup:?}: a cancelled batch of 32 queued reads ended {other:?}"),
        }
        for (t, batch, name) in [(t1, &first, "first"), (t3, &promoted, "promoted"), (t4, &last, "last")] {
            svc.wait(t).unwrap_or_else(|e| panic!("{setup:?} {name}: {e}"));
            batch.iter().for_each(|e| e.check(&format!("{setup:?} {name}")));
        }
    });
}
