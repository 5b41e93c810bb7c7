//! Where routed experts come from, as the forward pass sees it: the model's own weights (all
//! resident) or the expert cache. Per MoE layer the pass asks for `schedule`d waves, `fetch`es a
//! wave (returns at once), computes the experts already `view`able, `wait`s for that layer, and
//! computes the rest. Invariant: `view` hands out an expert only once its bytes have landed; a
//! wait for layer l never waits for reads started for other layers (prefetches).

use super::Route;
use crate::backend::Backend;
use crate::io::IoError;

/// Errors raised while making experts available (the expert cache's reads).
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("loading experts failed: {0}")]
    Io(#[from] IoError),
    #[error("expert {layer}/{expert}: a low-precision load without a low-precision sidecar")]
    NoSidecar { layer: usize, expert: u16 },
    #[error(transparent)]
    Backend(#[from] crate::backend::BackendError),
}

/// Where an expert of the current (or a prefetched) layer stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpertState {
    /// Its bytes are in place: `view` returns it.
    Ready,
    /// A read is in flight.
    Loading,
    /// The plan skipped it for this token (mixed precision).
    Skipped,
    /// Nobody asked for it.
    Absent,
}

/// How urgent a read is: demand reads jump the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Priority {
    /// A prediction for a later layer.
    Prefetch,
    /// The current layer needs it now.
    Demand,
}

/// A predicted expert of a later layer: its predicted gate weight and how often predictions
/// like it (same distance and rank) have been right.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    pub expert: u16,
    pub weight: f32,
    pub confidence: f32,
}

/// The candidates whose confidence clears `bar`, as (expert, predicted weight) for `prefetch`.
pub fn confident(candidates: &[Candidate], bar: f32) -> Vec<(u16, f32)> {
    candidates.iter().filter(|c| c.confidence >= bar).map(|c| (c.expert, c.weight)).collect()
}

/// Identifies one `prefetch` call until it is used or cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PrefetchId(pub u64);

/// See the module docs.
pub trait ExpertProvider<B: Backend> {
    /// Split the experts the batch needs in layer `l` into waves that fit in memory at once.
    fn schedule(&mut self, l: usize, routes: &[Route]) -> Vec<Vec<u16>>;
    /// Plan `wave` of layer `l` (hits stay, misses start loading, unimportant ones are skipped);
    /// returns at once.
    fn fetch(&mut self, l: usize, wave: &[u16], routes: &[Route]) -> Result<(), ProviderError>;
    /// Block until every read layer `l`'s last `fetch` depends on has landed (its own misses,
    /// and prefetches of the experts it needs), and never for anything else.
    fn wait(&mut self, l: usize) -> Result<(), ProviderError>;
    /// Block until expert `e` of layer `l`'s last `fetch` has landed (or the whole layer, where
    /// reads are not tracked per expert), so the pass can compute it while the rest load.
    fn wait_for(&mut self, l: usize, e: u16) -> Result<(), ProviderError> {
        let _ = e;
        self.wait(l)
    }
    fn state(&self, l: usize, e: u16) -> ExpertState;
    /// The expert's matrices (gate, up, down) if its bytes have landed; `None` while it loads,
    /// when the plan skipped it, or when nobody asked for it.
    fn view(&self, l: usize, e: u16) -> Option<[B::Mat<'_>; 3]>;
    /// Start reading `experts` (index, predicted gate weight, in score order) of layer `l` ahead
    /// of need; returns at once. Never evicts what the current layer uses.
    fn prefetch(&mut self, l: usize, experts: &[(u16, f32)], priority: Priority) -> Result<PrefetchId, ProviderError> {
        let _ = (l, experts, priority);
        Ok(PrefetchId(0))
    }
    /// Drop a prefetch that is no longer wanted: its experts that have not landed are forgotten
    /// (their slots become free once the reads are done).
    fn cancel(&mut self, id: PrefetchId) {
        let _ = id;
    }
    /// How sure a prediction must be for its prefetch to pay off here (0–1): a provider with
    /// nothing to load asks nothing.
    fn prefetch_bar(&self) -> f32 {
        0.0
    }
    /// The predictor's candidates for layer `l` (score order): the planner prefetches those
    /// whose confidence clears `prefetch_bar`. Returns the prefetch and the experts it took
    /// (`None` when it takes none).
    fn predicted(
        &mut self,
        l: usize,
        candidates: &[Candidate],
    ) -> Result<Option<(PrefetchId, Vec<u16>)>, ProviderError> {
        let take = confident(candidates, self.prefetch_bar());
        match take.is_empty() {
            true => Ok(None),
            false => Ok(Some((self.prefetch(l, &take, Priority::Prefetch)?, take.iter().map(|t| t.0).collect()))),
        }
    }
    /// Drop only `experts` of a prefetch (the rest of it is still wanted).
    fn cancel_experts(&mut self, id: PrefetchId, experts: &[u16]) {
        let _ = (id, experts);
    }
}

/// Experts as the backend took them from the model (all resident): one wave, nothing to load.
pub struct ModelExperts<'a, B: Backend> {
    pub model: &'a crate::model::Model,
    pub weights: &'a B::Weights,
}

/// The distinct experts of `routes`, in first-use order.
pub fn used_experts(routes: &[Route]) -> Vec<u16> {
    let mut used: Vec<u16> = Vec::new();
    for r in routes {
        for &e in &r.experts {
            if !used.contains(&(e as u16)) {
                used.push(e as u16);
            }
        }
    }
    used
}

impl<B: Backend> ExpertProvider<B> for ModelExperts<'_, B> {
    fn schedule(&mut self, _l: usize, routes: &[Route]) -> Vec<Vec<u16>> {
        vec![used_experts(routes)]
    }
    fn fetch(&mut self, _l: usize, _wave: &[u16], _routes: &[Route]) -> Result<(), ProviderError> {
        Ok(())
    }
    fn wait(&mut self, _l: usize) -> Result<(), ProviderError> {
        Ok(())
    }
    fn state(&self, l: usize, e: u16) -> ExpertState {
        match self.model.experts(l).and_then(|ex| ex.get(e as usize)) {
            Some(_) => ExpertState::Ready,
            None => ExpertState::Absent,
        }
    }
    fn view(&self, l: usize, e: u16) -> Option<[B::Mat<'_>; 3]> {
        let ex = self.model.experts(l)?.get(e as usize)?;
        Some([B::mat(self.weights, &ex.gate), B::mat(self.weights, &ex.up), B::mat(self.weights, &ex.down)])
    }
}
