//! Mat-vec kernels at real expert shapes: our persistent pool vs rayon vs one thread, over
//! ggml's per-type kernels. `cargo bench --bench matvec`.

use std::sync::atomic::{AtomicUsize, Ordering};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use moerun::backend::cpu::{matmul, repack, MatRef, QActs, SharedOut, ThreadPool};
use moerun::ggml::kernels;
use moerun::gguf::GgmlType;
use moerun::rng::SplitMix64;
use rayon::prelude::*;

const ROWS: usize = 14336;
const COLS: usize = 4096;

fn weights(ty: GgmlType) -> Vec<u8> {
    let k = kernels(ty).expect("kernels");
    let rb = ty.row_bytes(COLS as u64).expect("row bytes") as usize;
    let mut rng = SplitMix64::new(1);
    let mut bank = vec![0u8; rb * 16];
    let mut row = vec![0f32; COLS];
    for b in 0..16 {
        row.iter_mut().for_each(|x| *x = rng.next_normal(0.02));
        k.quantize_row_any(&row, &mut bank[b * rb..(b + 1) * rb]);
    }
    (0..ROWS).flat_map(|r| bank[(r % 16) * rb..(r % 16 + 1) * rb].to_vec()).collect()
}

fn bench(c: &mut Criterion) {
    let threads = 2;
    let pool = ThreadPool::new(threads);
    let one = ThreadPool::new(1);
    let rayon_pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("rayon");
    let mut rng = SplitMix64::new(2);
    let x: Vec<f32> = (0..COLS).map(|_| rng.next_normal(1.0)).collect();
    let mut g = c.benchmark_group("matvec_14336x4096");
    g.sample_size(20);
    for ty in [GgmlType::Q4_0, GgmlType::Q8_0, GgmlType::Q4_K, GgmlType::F16] {
        let data = weights(ty);
        let w = MatRef::new(ty, ROWS, COLS, &data).expect("matref");
        g.throughput(Throughput::Bytes(data.len() as u64));
        let mut acts = QActs::new();
        let mut out = vec![0f32; ROWS];
        g.bench_function(BenchmarkId::new("pool2", ty.name()), |b| {
            b.iter(|| matmul(&pool, w, &x, &mut acts, &mut out))
        });
        g.bench_function(BenchmarkId::new("single", ty.name()), |b| {
            b.iter(|| matmul(&one, w, &x, &mut acts, &mut out))
        });
        if repack::repackable(ty, ROWS, COLS).is_some() {
            let mut packed = vec![0u8; data.len()];
            repack::repack_q4_0x8(&data, ROWS, COLS, &mut packed);
            g.bench_function(BenchmarkId::new("repacked_single", ty.name()), |b| {
                b.iter(|| {
                    acts.quantize(w.kernels(), &x, COLS);
                    // SAFETY: all ROWS repacked rows, one Q8_0 row, room for ROWS outputs.
                    unsafe {
                        repack::gemv(
                            repack::Layout::Q4_0x8,
                            COLS,
                            packed.as_ptr(),
                            acts.row(0).as_ptr(),
                            out.as_mut_ptr(),
                            ROWS,
                        )
                    }
                })
            });
        }
        g.bench_function(BenchmarkId::new("rayon2", ty.name()), |b| {
            b.iter(|| {
                acts.quantize(w.kernels(), &x, COLS);
                let shared = SharedOut::new(&mut out);
                let k = w.kernels();
                let next = AtomicUsize::new(0);
                rayon_pool.install(|| {
                    (0..threads).into_par_iter().for_each(|_| loop {
                        let r0 = next.fetch_add(16, Ordering::Relaxed);
                        if r0 >= ROWS {
                            break;
                        }
                        for r in r0..(r0 + 16).min(ROWS) {
                            // SAFETY: row r belongs to the chunk this thread claimed.
                            unsafe { shared.set(r, k.dot(COLS, w.row(r), acts.row(0))) };
                        }
                    })
                });
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
