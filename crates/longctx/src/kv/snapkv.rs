//! SnapKV — Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation",
//! arXiv 2404.14469 (2024); kvpress `SnapKVPress`.
//!
//! The last `window` queries of the prompt (the observation window, where the question sits)
//! vote for the keys before them: their softmax weights are summed over the window and over the
//! query heads sharing a KV head (one selection per KV head, so GQA keeps its saving, as kvpress
//! does), smoothed by a 1-D pooling of width `kernel`, and each KV head keeps its `budget −
//! window` best tokens plus the window itself. Kept tokens keep their positions.
//!
//! With chunked prefill the vote runs after every chunk that leaves more than `budget` tokens,
//! with that chunk's last queries as the window, so the cache never holds more than budget +
//! chunk; a prompt that fits in one chunk is compressed exactly as in the paper.

use super::policy::{bounded_peak, top_k, AfterChunk, AttentionSums, Budget, ChunkInfo, Pooling};
use super::policy::{pool1d, KvPolicy, Shape};
use super::{AttentionObserver, KvCache};
use crate::spec::{Params, SpecPart, MAX_TOKENS};
use crate::Result;

/// Fields are open to the policies built on SnapKV's vote (PyramidKV, Finch), which share its
/// settings, votes and selection and differ in how much each layer keeps and when.
pub struct SnapKv {
    pub(super) budget: Budget,
    pub(super) window: usize,
    pub(super) kernel: usize,
    pub(super) pooling: Pooling,
    /// Tokens kept, resolved for the current prompt.
    pub(super) keep: usize,
    /// Positions whose queries vote in the current chunk (empty: no vote).
    pub(super) observing: std::ops::Range<i32>,
    pub(super) votes: AttentionSums,
}

pub fn build(part: &SpecPart, shape: &Shape) -> Result<Box<dyn KvPolicy>> {
    let mut params = Params::new(part);
    let policy = SnapKv::new(&mut params, shape)?;
    params.finish(&["budget", "ratio", "window", "kernel", "pooling"])?;
    Ok(Box::new(policy))
}

impl SnapKv {
    /// Reads `budget|ratio`, `window` (32), `kernel` (7) and `pooling` (avg); the paper's
    /// LongBench settings are window 32, kernel 7, max pooling.
    pub fn new(params: &mut Params, shape: &Shape) -> Result<Self> {
        Self::named(params, shape, "snapkv", 7)
    }

    /// As [`SnapKv::new`], for a policy built on SnapKV's vote: errors name the policy `name`,
    /// and the kernel defaults to `kernel`.
    pub fn named(params: &mut Params, shape: &Shape, name: &str, kernel: usize) -> Result<Self> {
        let budget = Budget::from_params(params, name)?;
        let window = params.get_in("window", 32usize, 1..=MAX_TOKENS)?;
        let kernel = params.get_in("kernel", kernel, 1..=MAX_TOKENS)?;
        let pooling = Pooling::from_params(params)?;
        if window == 0 || kernel == 0 || kernel.is_multiple_of(2) {
            return Err(crate::Error::InvalidOption(format!(
                "`{name}:window={window},kernel={kernel}`: the window needs at least 1 query and \
                 the pooling kernel an odd width"
            )));
        }
        Ok(Self::with(budget, window, kernel, pooling, shape))
    }

    /// SnapKV with settings already checked (a window of at least 1, an odd kernel), for the
    /// policies that compress the prompt with it (SCOPE).
    pub fn with(
        budget: Budget,
        window: usize,
        kernel: usize,
        pooling: Pooling,
        shape: &Shape,
    ) -> Self {
        Self {
            budget,
            window,
            kernel,
            pooling,
            keep: 0,
            observing: 0..0,
            votes: AttentionSums::new(shape.n_layer, shape.n_kv_head),
        }
    }

    /// Slots of one KV head to keep out of `len`, of which the last `window` are the observers.
    pub fn select(&self, votes: &[f32], len: usize, window: usize, keep: usize) -> Vec<usize> {
        let window = window.min(keep).min(len);
        let candidates = len - window;
        let pooled = pool1d(&votes[..candidates], self.kernel, self.pooling);
        let mut kept = top_k(&pooled, keep - window);
        kept.extend(candidates..len);
        kept
    }

    /// Keeps, in every layer holding more than `budget(layer)` slots, each KV head's
    /// `budget(layer)` best by the votes of the observed queries (the last slots, kept too);
    /// then forgets the votes.
    pub(super) fn compress(&mut self, cache: &mut KvCache, budget: &dyn Fn(usize) -> usize) {
        let window = self.observing.len();
        for layer in cache.compressed_layers().collect::<Vec<_>>() {
            let (len, keep) = (cache.layer_len(layer), budget(layer));
            if len <= keep {
                continue;
            }
            let keep: Vec<Vec<usize>> = (0..cache.n_kv_head)
                .map(|h| self.select(&self.votes.get(layer, h, len), len, window, keep))
                .collect();
            cache.retain_layer(layer, &keep);
        }
        self.votes.clear();
        self.observing = 0..0;
    }
}

impl AttentionObserver for SnapKv {
    fn wants(&self, _layer: usize, position: i32) -> bool {
        self.observing.contains(&position)
    }

    fn observe(&self, layer: usize, _head: usize, kv_head: usize, _: i32, weights: &[f32]) {
        self.votes.add(layer, kv_head, weights);
    }
}

impl KvPolicy for SnapKv {
    fn spec(&self) -> String {
        format!(
            "snapkv:{},window={},kernel={},pooling={}",
            self.budget,
            self.window,
            self.kernel,
            self.pooling.name()
        )
    }

    fn begin(&mut self, tokens: usize) {
        self.keep = self.budget.resolve(tokens);
    }

    fn before_chunk(&mut self, chunk: &ChunkInfo) {
        self.observing = chunk.voters(self.keep, self.window);
    }

    fn after_chunk(&mut self, cache: &mut KvCache, _: &AfterChunk) -> Option<i32> {
        if self.observing.is_empty() {
            return None;
        }
        let keep = self.keep;
        self.compress(cache, &|_| keep);
        None
    }

    fn peak_slots(&self, prompt: usize, chunk: usize, generated: usize) -> usize {
        bounded_peak(self.budget.resolve(prompt), prompt, chunk, generated, false)
    }

    fn reset(&mut self) {
        self.votes.clear();
        self.observing = 0..0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Spec;

    fn snapkv(spec: &str) -> SnapKv {
        let spec: Spec = spec.parse().unwrap();
        let mut params = Params::new(&spec.parts[0]);
        SnapKv::new(&mut params, &Shape::tiny()).unwrap()
    }

    #[test]
    fn keeps_the_pooled_top_k_and_the_whole_window() {
        // Ten slots; the last two are the observation window. Votes peak at slot 2 and less at
        // slots 6 and 7. Avg pooling with kernel 3 (zero padding) gives the candidates
        // [.1, .4, .4, .33, .03, .1, .2, .2]: slot 2's neighbourhood wins.
        let votes = [0.1, 0.2, 0.9, 0.1, 0.0, 0.0, 0.3, 0.3, 0.5, 0.5];
        let p = snapkv("snapkv:budget=5,window=2,kernel=3");
        assert_eq!(p.select(&votes, 10, 2, 5), [1, 2, 3, 8, 9]);
        // Without pooling (kernel 1) the three highest raw votes win.
        let p = snapkv("snapkv:budget=5,window=2,kernel=1");
        assert_eq!(p.select(&votes, 10, 2, 5), [2, 6, 7, 8, 9]);
        // Max pooling spreads each peak to its neighbours unchanged.
        let p = snapkv("snapkv:budget=5,window=2,kernel=3,pooling=max");
        assert_eq!(p.select(&votes, 10, 2, 5), [1, 2, 3, 8, 9]);
    }

    #[test]
    fn a_budget_at_or_above_the_input_keeps_everything() {
        let p = snapkv("snapkv:budget=8,window=2,kernel=3");
        assert_eq!(p.peak_slots(6, 512, 0), 6);
        let votes = [0.5; 6];
        assert_eq!(p.select(&votes, 6, 2, 6), [0, 1, 2, 3, 4, 5]);
    }

    #[test]
    fn refuses_even_kernels_and_empty_windows() {
        for bad in ["snapkv:budget=8,kernel=4", "snapkv:budget=8,window=0"] {
            let spec: Spec = bad.parse().unwrap();
            let mut params = Params::new(&spec.parts[0]);
            assert!(SnapKv::new(&mut params, &Shape::tiny()).is_err());
        }
    }
}
