//! The CPU backend's weights: copies of what the residency decision selects, in one anonymous
//! (huge-page advised) buffer, Q4_0 and MXFP4 repacked for ggml's interleaved GEMV/GEMM (what
//! llama.cpp does for every such weight with rows in groups of 8), and views of the file mapping
//! for the rest.
//! Invariant: a weight is read either from its copy or from the mapping, never half of each.

use std::collections::HashMap;
use std::sync::Arc;

use super::matmul::MatRef;
use super::repack::{self, Layout};
use crate::backend::BackendError;
use crate::model::{resident_set, Model, Residency, Resident, WeightDesc};

/// The weights of one model as the CPU backend holds them.
pub struct CpuWeights {
    model: Arc<Model>,
    copies: Option<Copies>,
    resident: Resident,
}

/// Copies of weights, keyed by their file offset.
struct Copies {
    buf: memmap2::MmapMut,
    index: HashMap<u64, (usize, Layout)>,
}

impl CpuWeights {
    /// Copy the weights `residency` selects out of `model`'s mapping (a few threads, each copying a
    /// contiguous share). The token embedding stays plain: its rows are looked up.
    pub fn take(model: &Arc<Model>, residency: Residency) -> Result<CpuWeights, BackendError> {
        let which = residency.resolve(model);
        let ws = resident_set(model, which);
        let total: u64 = ws.iter().map(|w| w.bytes).sum();
        let mut weights = CpuWeights { model: Arc::clone(model), copies: None, resident: which };
        if total == 0 {
            return Ok(weights);
        }
        let t0 = std::time::Instant::now();
        let mut buf = memmap2::MmapMut::map_anon(total as usize).map_err(|e| BackendError::Resident {
            path: model.file.path().display().to_string(),
            bytes: total,
            reason: e.to_string(),
        })?;
        // Huge pages cut TLB misses when streaming gigabytes of weights; a hint, so ignore failure.
        let _ = buf.advise(memmap2::Advice::HugePage);
        // Each weight's layout and place in the buffer, decided up front.
        let mut index = HashMap::with_capacity(ws.len());
        let mut at = 0usize;
        let mut jobs: Vec<(&WeightDesc, Layout, &mut [u8])> = Vec::with_capacity(ws.len());
        let mut rest: &mut [u8] = &mut buf;
        for w in &ws {
            let layout = match repack::repackable(w.ty, w.rows, w.cols) {
                Some(l) if w.offset != model.tok_embd.offset => l,
                _ => Layout::Plain,
            };
            let (dst, tail) = std::mem::take(&mut rest).split_at_mut(w.bytes as usize);
            rest = tail;
            jobs.push((w, layout, dst));
            index.insert(w.offset, (at, layout));
            at += w.bytes as usize;
        }
        let repacked = jobs.iter().filter(|j| j.1 != Layout::Plain).count();
        // A few threads each copy a contiguous share of the weights (repacking is CPU work, and
        // several readers keep the disk busy on a cold load).
        let n_threads = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 8);
        let share = total.div_ceil(n_threads as u64);
        let mut groups: Vec<Vec<(&WeightDesc, Layout, &mut [u8])>> = Vec::new();
        let mut acc = u64::MAX;
        for j in jobs {
            if acc >= share {
                groups.push(Vec::new());
                acc = 0;
            }
            acc += j.0.bytes;
            groups.last_mut().expect("a group was just pushed").push(j);
        }
        std::thread::scope(|sc| {
            for g in groups {
                sc.spawn(move || copy_weights(model, g));
            }
        });
        tracing::info!(
            "{} weights ({:.1} MiB) resident, {repacked} repacked for ggml's interleaved kernels, in {:.2} s",
            ws.len(),
            total as f64 / 1048576.0,
            t0.elapsed().as_secs_f64()
        );
        weights.copies = Some(Copies { buf, index });
        Ok(weights)
    }

    /// What was copied (`Auto` resolved) and the bytes the copies hold.
    pub fn resident(&self) -> (Resident, u64) {
        (self.resident, self.copies.as_ref().map_or(0, |c| c.buf.len() as u64))
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// A weight for multiplication: its copy (repacked or plain) if it has one, else the mapping.
    pub fn mat(&self, w: &WeightDesc) -> MatRef<'_> {
        match self.copy(w) {
            Some((data, Layout::Plain)) => plain(w, data),
            Some((data, layout)) => {
                MatRef::repacked(w.ty, w.rows, w.cols, data, layout).expect("resident copies are validated at load")
            }
            None => plain(w, self.model.bytes_of(w)),
        }
    }

    fn copy(&self, w: &WeightDesc) -> Option<(&[u8], Layout)> {
        let c = self.copies.as_ref()?;
        let &(at, layout) = c.index.get(&w.offset)?;
        Some((&c.buf[at..at + w.bytes as usize], layout))
    }
}

/// A view of `w`'s bytes in ggml's plain layout.
pub fn plain<'a>(w: &WeightDesc, data: &'a [u8]) -> MatRef<'a> {
    MatRef::new(w.ty, w.rows, w.cols, data).expect("weight views are validated at load")
}

/// Copy (or repack) weights out of the mapping into their resident places, in order. Reads one
/// weight ahead (MADV_WILLNEED) while copying the one before, and drops copied ranges from the
/// mapping every 32 MiB (MADV_DONTNEED; each flushes TLBs), a large weight in pieces of whole
/// 8-row groups (what the interleaved layouts repack together): cold loads read at the disk's pace
/// instead of one page fault at a time, and RSS never counts more than 32 MiB of the model twice.
fn copy_weights(model: &Model, jobs: Vec<(&WeightDesc, Layout, &mut [u8])>) {
    let file = &model.file;
    const RELEASE_BATCH: u64 = 32 << 20;
    let (mut pending, mut pending_bytes) = (Vec::new(), 0u64);
    if let Some(j) = jobs.first() {
        file.will_need(j.0.offset, j.0.bytes);
    }
    let mut it = jobs.into_iter().peekable();
    while let Some((w, layout, dst)) = it.next() {
        if let Some(next) = it.peek() {
            file.will_need(next.0.offset, next.0.bytes);
        }
        let src = model.bytes_of(w);
        // Pieces of whole 8-row groups, about RELEASE_BATCH bytes each (one piece when the bytes
        // are not in rows).
        let row_bytes = match w.rows {
            r if r > 0 && src.len().is_multiple_of(r) => src.len() / r,
            _ => src.len(),
        }
        .max(1);
        let piece = ((RELEASE_BATCH as usize / row_bytes) / 8 * 8).max(8) * row_bytes;
        for (i, (s, d)) in src.chunks(piece).zip(dst.chunks_mut(piece)).enumerate() {
            repack::repack(layout, s, s.len().div_ceil(row_bytes), w.cols, d);
            pending.push((w.offset + (i * piece) as u64, s.len() as u64));
            pending_bytes += s.len() as u64;
            if pending_bytes >= RELEASE_BATCH {
                pending.drain(..).for_each(|(o, l)| file.release(o, l));
                pending_bytes = 0;
            }
        }
    }
    pending.into_iter().for_each(|(o, l)| file.release(o, l));
}
