//! The `KvPolicy` seam: what the cache keeps, and when. The session calls a policy around every
//! chunk it feeds (prompt chunks and decoded tokens); the policy sees the attention weights it
//! asks for while the chunk runs ([`AttentionObserver`]) and then evicts with
//! [`KvCache::retain`] / [`KvCache::retain_layer`], which compact the cache so that evicted
//! tokens give their memory back. Evicting after every prompt chunk, not once at the end, is
//! what bounds the cache by budget + chunk instead of by the input's length.
//!
//! The helpers below are what several policies share: budgets given as tokens or as a ratio,
//! attention accumulated per layer and KV head, pooling and top-k selection.

use std::sync::Mutex;

use super::{AttentionObserver, KvCache};
use crate::positions::RopeStyle;
use std::ops::Bound;

use crate::spec::{Params, MAX_TOKENS};
use crate::{Error, Result};

/// What a policy needs to know of the model: the cache's shape, and which layers attend only a
/// sliding window (a policy never compresses those: their window already bounds them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shape {
    pub n_layer: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    /// One entry per layer, true where it is local; empty where no layer is.
    pub local: Vec<bool>,
}

impl Shape {
    pub fn of(config: &crate::model::Config) -> Self {
        Self {
            n_layer: config.n_layer,
            n_head: config.n_head,
            n_kv_head: config.n_kv_head,
            head_dim: config.head_dim,
            local: (0..config.n_layer).map(|l| config.is_local(l)).collect(),
        }
    }

    /// Whether a policy compresses `layer`: every layer but the local ones.
    pub fn is_compressed(&self, layer: usize) -> bool {
        !self.local.get(layer).copied().unwrap_or(false)
    }

    /// A small shape for unit tests: 2 layers, 4 query heads over 2 KV heads of size 4.
    #[cfg(test)]
    pub fn tiny() -> Self {
        Self {
            n_layer: 2,
            n_head: 4,
            n_kv_head: 2,
            head_dim: 4,
            local: Vec::new(),
        }
    }
}

/// Which part of a sequence a chunk belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// A chunk of the prompt that more chunks follow.
    Prefill,
    /// The prompt's last chunk: after it, the cache is compressed to its budget.
    PrefillEnd,
    /// One generated token.
    Decode,
}

/// The chunk the session is about to feed.
#[derive(Debug, Clone)]
pub struct ChunkInfo {
    pub phase: Phase,
    /// Positions the chunk's tokens take.
    pub positions: std::ops::Range<i32>,
    /// Slots the fullest layer will hold once the chunk is in.
    pub cache_len_after: usize,
    /// The chunk is the question, fed after a chunk of context only to guide its compression
    /// (Finch); the policy drops its tokens again after the chunk.
    pub guide: bool,
}

impl ChunkInfo {
    /// Positions of the last `n` tokens of the chunk (all of them if it is shorter).
    pub fn last(&self, n: usize) -> std::ops::Range<i32> {
        (self.positions.end - n as i32).max(self.positions.start)..self.positions.end
    }

    /// The queries that vote in an observation-window policy (SnapKV and those built on its
    /// vote): the last `window` of a prompt chunk that leaves more than `keep` tokens, none
    /// otherwise.
    pub fn voters(&self, keep: usize, window: usize) -> std::ops::Range<i32> {
        if self.phase != Phase::Decode && self.cache_len_after > keep {
            self.last(window)
        } else {
            0..0
        }
    }
}

/// What a policy may use after a chunk.
pub struct AfterChunk<'a> {
    pub phase: Phase,
    /// See [`ChunkInfo::guide`].
    pub guide: bool,
    /// Position the next token takes.
    pub next_position: i32,
    /// Rotary frequencies and style, for policies that move cached tokens
    /// ([`KvCache::reposition`]).
    pub frequencies: &'a [f64],
    pub rope_style: RopeStyle,
}

/// A KV-cache policy (`--kv`). Observing attention is optional: [`AttentionObserver::wants`]
/// says no by default.
pub trait KvPolicy: AttentionObserver + Send {
    /// The spec with every parameter resolved, as reports record it.
    fn spec(&self) -> String;

    /// A prefill of `tokens` tokens (counting those already cached) begins; budgets given as a
    /// ratio resolve against it.
    fn begin(&mut self, _tokens: usize) {}

    /// The session is about to feed `chunk`: the moment to choose which queries to observe.
    fn before_chunk(&mut self, _chunk: &ChunkInfo) {}

    /// The chunk is in the cache: evict or move tokens. Returns the position the next token
    /// takes when the policy moved the cached tokens (StreamingLLM), None to go on counting.
    fn after_chunk(&mut self, cache: &mut KvCache, step: &AfterChunk) -> Option<i32>;

    /// The most slots a layer holds while a prompt of `prompt` tokens is fed in chunks of
    /// `chunk` and `generated` tokens are decoded after it, so that the session can refuse
    /// what would not fit before doing any work.
    fn peak_slots(&self, prompt: usize, chunk: usize, generated: usize) -> usize;

    /// Forgets everything about the sequence (the session's cache was emptied).
    fn reset(&mut self) {}

    /// Finch: compress each chunk of the context with the question's attention, which the
    /// session then feeds after every chunk ([`crate::session::Session::prefill_guided`]).
    fn question_guided(&self) -> bool {
        false
    }

    /// Whether the policy moves cached tokens to new positions (StreamingLLM, Finch), which
    /// schemes that move them too cannot share the cache with.
    fn repositions(&self) -> bool {
        false
    }
}

/// `full`: keeps every token (the default).
pub struct Full;

impl AttentionObserver for Full {}

impl KvPolicy for Full {
    fn spec(&self) -> String {
        "full".into()
    }

    fn after_chunk(&mut self, _: &mut KvCache, _: &AfterChunk) -> Option<i32> {
        None
    }

    fn peak_slots(&self, prompt: usize, _chunk: usize, generated: usize) -> usize {
        prompt + generated
    }
}

/// How many tokens a policy keeps per KV head: a count, or a fraction of the input.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Budget {
    Tokens(usize),
    Ratio(f64),
}

impl Budget {
    /// `budget=N` or `ratio=R` from a spec (exactly one), checked: N ≥ 1, R in (0, 1].
    pub fn from_params(params: &mut Params, name: &str) -> Result<Self> {
        let tokens: Option<usize> = params.optional_in("budget", 1..=MAX_TOKENS)?;
        let ratio: Option<f64> =
            params.optional_in("ratio", (Bound::Excluded(0.0), Bound::Included(1.0)))?;
        match (tokens, ratio) {
            (Some(_), Some(_)) => Err(Error::InvalidOption(format!(
                "`{name}` takes `budget=N` (tokens) or `ratio=R` (fraction kept), not both"
            ))),
            (None, None) => Err(Error::InvalidOption(format!(
                "`{name}` needs a budget: `budget=N` tokens per KV head or `ratio=R`, the \
                 fraction of the input kept (e.g. `{name}:ratio=0.25`)"
            ))),
            (Some(n), None) => Ok(Self::Tokens(n)),
            (None, Some(r)) => Ok(Self::Ratio(r)),
        }
    }

    /// Tokens kept out of an input of `tokens`.
    pub fn resolve(self, tokens: usize) -> usize {
        match self {
            Self::Tokens(n) => n,
            Self::Ratio(r) => ((tokens as f64 * r).round() as usize).max(1),
        }
    }

    /// Tokens kept before [`KvPolicy::begin`] has told the input's length: a ratio has nothing
    /// to resolve against yet, so it keeps everything.
    pub fn before_input(self) -> usize {
        match self {
            Self::Tokens(n) => n,
            Self::Ratio(_) => usize::MAX,
        }
    }
}

impl std::fmt::Display for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tokens(n) => write!(f, "budget={n}"),
            Self::Ratio(r) => write!(f, "ratio={r}"),
        }
    }
}

/// [`KvPolicy::peak_slots`] of a policy that compresses to `budget` after every prompt chunk
/// that leaves more, and, if `evicts_while_decoding`, after every decoded token too.
pub fn bounded_peak(
    budget: usize,
    prompt: usize,
    chunk: usize,
    generated: usize,
    evicts_while_decoding: bool,
) -> usize {
    let prefill = prompt.min(budget + chunk);
    let after = prompt.min(budget);
    let decode = if evicts_while_decoding {
        (after + generated).min(budget + 1)
    } else {
        after + generated
    };
    prefill.max(decode)
}

/// Attention weights summed per layer, KV head and cache slot (query heads of a GQA group add
/// into their KV head: the sum ranks as their mean). Filled concurrently by the observer.
pub struct AttentionSums {
    n_kv_head: usize,
    sums: Vec<Mutex<Vec<f32>>>,
}

impl AttentionSums {
    pub fn new(n_layer: usize, n_kv_head: usize) -> Self {
        Self {
            n_kv_head,
            sums: (0..n_layer * n_kv_head)
                .map(|_| Mutex::new(Vec::new()))
                .collect(),
        }
    }

    /// Adds one query's weights over the first `weights.len()` slots.
    pub fn add(&self, layer: usize, kv_head: usize, weights: &[f32]) {
        self.add_scaled(layer, kv_head, weights, 1.0);
    }

    /// Adds one query's weights times `factor` (Finch's normalisation), without a copy.
    pub fn add_scaled(&self, layer: usize, kv_head: usize, weights: &[f32], factor: f32) {
        let mut sums = lock(&self.sums[layer * self.n_kv_head + kv_head]);
        if sums.len() < weights.len() {
            sums.resize(weights.len(), 0.0);
        }
        for (s, w) in sums.iter_mut().zip(weights) {
            *s += w * factor;
        }
    }

    /// The sums of one head over `len` slots (zeros where no query looked).
    pub fn get(&self, layer: usize, kv_head: usize, len: usize) -> Vec<f32> {
        let sums = lock(&self.sums[layer * self.n_kv_head + kv_head]);
        let mut out = sums.clone();
        out.resize(len, 0.0);
        out
    }

    /// Keeps the sums of the slots `keep` (ascending), as the cache does on eviction.
    pub fn retain(&self, layer: usize, kv_head: usize, keep: &[usize]) {
        let mut sums = lock(&self.sums[layer * self.n_kv_head + kv_head]);
        let kept: Vec<f32> = keep
            .iter()
            .map(|&s| sums.get(s).copied().unwrap_or(0.0))
            .collect();
        *sums = kept;
    }

    pub fn clear(&self) {
        for s in &self.sums {
            lock(s).clear();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// How scores are smoothed over neighbouring slots before ranking (SnapKV's clustering).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    Avg,
    Max,
}

impl Pooling {
    pub fn from_params(params: &mut Params) -> Result<Self> {
        Ok(match params.choice("pooling", &["avg", "max"])? {
            "max" => Self::Max,
            _ => Self::Avg,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Avg => "avg",
            Self::Max => "max",
        }
    }
}

/// 1-D pooling with stride 1 and `kernel / 2` padding on each side, as PyTorch's
/// `avg_pool1d(count_include_pad=True)` and `max_pool1d` (which pads with −∞) compute it: the
/// output has the input's length for an odd kernel.
pub fn pool1d(scores: &[f32], kernel: usize, pooling: Pooling) -> Vec<f32> {
    let pad = kernel / 2;
    let n = scores.len();
    (0..n)
        .map(|i| {
            let window = i.saturating_sub(pad)..(i + kernel - pad).min(n);
            let values = &scores[window];
            match pooling {
                Pooling::Avg => values.iter().sum::<f32>() / kernel as f32,
                Pooling::Max => values.iter().copied().fold(f32::NEG_INFINITY, f32::max),
            }
        })
        .collect()
}

/// Indices of the `k` highest scores, ascending by index; ties go to the earlier slot.
pub fn top_k(scores: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    if k < order.len() {
        // Stable order on equal scores: the total order puts the earlier index first.
        order.select_nth_unstable_by(k, |&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
        order.truncate(k);
    }
    order.sort_unstable();
    order
}

/// What the policies' unit tests share: a small cache whose every slot is told apart by its
/// contents, the session's calls around a chunk, and the kernel's side of the observer.
#[cfg(test)]
pub mod testing {
    use super::*;
    use crate::kv::KvDtype;
    use crate::positions::RopeStyle;

    /// The policy a spec names, built for [`Shape::tiny`].
    pub fn build(spec: &str) -> Result<Box<dyn KvPolicy>> {
        crate::kv::build_policy(&spec.parse()?, &Shape::tiny())
    }

    /// The message of the error `spec` gives (panics if it builds).
    pub fn refusal(spec: &str) -> String {
        match build(spec) {
            Ok(_) => panic!("`{spec}` should be refused"),
            Err(e) => e.to_string(),
        }
    }

    /// A cache of [`Shape::tiny`] holding tokens at positions `0..len`; each slot's key and
    /// value are filled with a number that names its layer, head and position.
    pub fn cache(len: usize) -> KvCache {
        let s = Shape::tiny();
        let mut cache = KvCache::new(KvDtype::F32, s.n_layer, s.n_kv_head, s.head_dim, 32);
        push(&mut cache, 0..len as i32);
        cache
    }

    /// Appends tokens at `positions` to every layer, filled as [`cache`] fills them.
    pub fn push(cache: &mut KvCache, positions: std::ops::Range<i32>) {
        let positions: Vec<i32> = positions.collect();
        cache.push_slots(&positions).unwrap();
        for layer in 0..cache.n_layer {
            let len = cache.layer_len(layer);
            for head in 0..cache.n_kv_head {
                for (slot, &p) in (len - positions.len()..len).zip(&positions) {
                    let v = vec![(layer * 10_000 + head * 1000) as f32 + p as f32; cache.head_dim];
                    cache.write(layer, head, slot, &v, &v);
                }
            }
        }
    }

    /// Whether two caches hold the same tokens, bit for bit.
    pub fn same(a: &KvCache, b: &KvCache) -> bool {
        let bits = |cache: &KvCache, layer: usize, head: usize, slot: usize| {
            let mut kv = vec![0f32; 2 * cache.head_dim];
            let (k, v) = kv.split_at_mut(cache.head_dim);
            cache.read_key(layer, head, slot, k);
            cache.read_value(layer, head, slot, v);
            kv.iter().map(|x| x.to_bits()).collect::<Vec<u32>>()
        };
        (0..a.n_layer).all(|layer| {
            a.layer_len(layer) == b.layer_len(layer)
                && (0..a.n_kv_head).all(|head| {
                    a.positions(layer, head) == b.positions(layer, head)
                        && (0..a.layer_len(layer))
                            .all(|s| bits(a, layer, head, s) == bits(b, layer, head, s))
                })
        })
    }

    /// The chunk of `len` tokens from `start` about to be fed on top of `cached` slots.
    pub fn chunk(phase: Phase, start: i32, len: usize, cached: usize) -> ChunkInfo {
        ChunkInfo {
            phase,
            positions: start..start + len as i32,
            cache_len_after: cached + len,
            guide: false,
        }
    }

    /// What the session passes to `after_chunk`, for policies that move no token.
    pub fn after(phase: Phase, next_position: i32) -> AfterChunk<'static> {
        AfterChunk {
            phase,
            guide: false,
            next_position,
            frequencies: &[],
            rope_style: RopeStyle::Normal,
        }
    }

    /// One query's weights, one row per query head of [`Shape::tiny`], handed to `observer` as
    /// the kernel does: only if it wants them. Returns whether it did.
    pub fn query<O: AttentionObserver + ?Sized, W: AsRef<[f32]>>(
        observer: &O,
        layer: usize,
        position: i32,
        heads: &[W],
    ) -> bool {
        let s = Shape::tiny();
        assert_eq!(heads.len(), s.n_head, "one row per query head");
        if !observer.wants(layer, position) {
            return false;
        }
        for (head, weights) in heads.iter().enumerate() {
            let kv_head = head / (s.n_head / s.n_kv_head);
            observer.observe(layer, head, kv_head, position, weights.as_ref());
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Spec;

    fn budget(spec: &str) -> Result<Budget> {
        let spec: Spec = spec.parse().unwrap();
        let mut params = Params::new(&spec.parts[0]);
        Budget::from_params(&mut params, "snapkv")
    }

    #[test]
    fn budgets_parse_and_refuse_what_makes_no_sense() {
        assert_eq!(budget("p:budget=64").unwrap(), Budget::Tokens(64));
        assert_eq!(budget("p:ratio=0.25").unwrap(), Budget::Ratio(0.25));
        assert_eq!(Budget::Ratio(0.25).resolve(1000), 250);
        assert_eq!(Budget::Ratio(0.0001).resolve(10), 1);
        for bad in ["p:budget=0", "p:ratio=0", "p:ratio=1.5", "p:ratio=-1", "p"] {
            let err = budget(bad).unwrap_err().to_string();
            // A range names the spec's own part; a missing budget, the policy asked.
            assert!(
                err.contains("`p`") || err.contains("snapkv"),
                "{bad}: {err}"
            );
        }
        assert!(budget("p:budget=4,ratio=0.5").is_err());
        assert!(budget("p:budget=many").is_err());
    }

    #[test]
    fn pooling_matches_pytorch() {
        // torch.nn.functional.avg_pool1d([1,2,3,4,5], 3, 1, 1) = [1, 2, 3, 4, 3] (zero padding
        // counted); max_pool1d gives [2, 3, 4, 5, 5].
        let x = [1.0, 2.0, 3.0, 4.0, 5.0];
        assert_eq!(pool1d(&x, 3, Pooling::Avg), [1.0, 2.0, 3.0, 4.0, 3.0]);
        assert_eq!(pool1d(&x, 3, Pooling::Max), [2.0, 3.0, 4.0, 5.0, 5.0]);
        assert_eq!(pool1d(&x, 1, Pooling::Avg), x);
    }

    #[test]
    fn top_k_keeps_the_highest_in_slot_order() {
        assert_eq!(top_k(&[0.1, 0.5, 0.2, 0.5, 0.0], 2), [1, 3]);
        assert_eq!(top_k(&[0.3, 0.3, 0.3], 2), [0, 1]);
        assert_eq!(top_k(&[0.3, 0.1], 5), [0, 1]);
    }

    #[test]
    fn bounded_peak_counts_chunk_and_decoding() {
        assert_eq!(bounded_peak(100, 50, 512, 10, false), 60);
        assert_eq!(bounded_peak(100, 1000, 64, 10, false), 164);
        assert_eq!(bounded_peak(100, 1000, 64, 200, false), 300);
        assert_eq!(bounded_peak(100, 1000, 64, 200, true), 164);
    }

    #[test]
    fn sums_follow_eviction() {
        let sums = AttentionSums::new(1, 2);
        sums.add(0, 1, &[0.5, 0.5]);
        sums.add(0, 1, &[0.2, 0.3, 0.5]);
        assert_eq!(sums.get(0, 1, 4), [0.7, 0.8, 0.5, 0.0]);
        sums.retain(0, 1, &[1, 2]);
        assert_eq!(sums.get(0, 1, 2), [0.8, 0.5]);
        assert_eq!(sums.get(0, 0, 2), [0.0, 0.0]);
    }
}
