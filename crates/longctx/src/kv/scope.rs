//! SCOPE — Wu et al., "SCOPE: Optimizing Key-Value Cache Compression in Long-context
//! Generation", ACL 2025 (aclanthology 2025.acl-long.529, arXiv 2412.13649); Linking-ai/SCOPE
//! `model/kv_utils.py`, decoding strategy `slide`.
//!
//! The paper observes that compressing the prompt hard, to leave room for a long output, impairs
//! reasoning over it, and that heavy hitters deviate as a long output goes on, so that one budget
//! and one ranking shared by prompt and output serve neither. SCOPE separates the two phases.
//! The prompt is compressed once with a prefill method (SnapKV here: window 32, kernel 7,
//! average pooling) to `budget|ratio` tokens per KV head, and what it kept stays untouched while
//! decoding. Generated tokens go to a separate decoding pool of `decode` tokens per KV head,
//! managed by the paper's slide strategy: once the pool is full, each new token evicts one pool
//! token, keeping the `recent` newest and, among the others, those the current decoding query
//! attends to most. As in the authors' code, the ranking is that one query's weights over the
//! pool, not a sum over past queries: the decoding heavy hitters are those of the current step,
//! and they move with the output instead of settling on its start. Weights are summed over the
//! query heads of a GQA group, one selection per KV head (the authors' code repeats KV heads and
//! selects per query head, which multiplies the cache by the group size). The default pool of
//! 256 with half of it recent follows the authors' runs, which pair a pool of 512 with a recent
//! window of 256.
//!
//! Only decoded tokens enter the pool: the slots before them in a layer, whatever their number
//! (SnapKV's survivors, tokens appended without compression such as a query-agnostic question),
//! are the prompt's.

use super::policy::{bounded_peak, top_k, AfterChunk, AttentionSums, Budget, ChunkInfo};
use super::policy::{KvPolicy, Phase, Pooling, Shape};
use super::snapkv::SnapKv;
use super::{AttentionObserver, KvCache};
use crate::spec::{Params, SpecPart, MAX_TOKENS};
use crate::{Error, Result};

pub struct Scope {
    budget: Budget,
    /// Decoded tokens kept (the decoding pool), of which the `recent` newest always.
    pool: usize,
    recent: usize,
    prefill: SnapKv,
    /// Decoded tokens in the cache: the last `decoded` slots of every layer.
    decoded: usize,
    /// Position of the decoding query that ranks the pool after the current token (None: the
    /// pool has room for it).
    observing: Option<i32>,
    scores: AttentionSums,
}

pub fn build(part: &SpecPart, shape: &Shape) -> Result<Box<dyn KvPolicy>> {
    let mut params = Params::new(part);
    let budget = Budget::from_params(&mut params, "scope")?;
    let pool = params.get_in("decode", 256usize, 1..=MAX_TOKENS)?;
    let recent = params.get_in("recent", pool / 2, 0..=MAX_TOKENS)?;
    params.finish(&["budget", "ratio", "decode", "recent"])?;
    if pool == 0 {
        return Err(Error::InvalidOption(
            "`scope:decode=0` keeps no generated token; the decoding pool needs at least 1".into(),
        ));
    }
    if recent >= pool {
        return Err(Error::InvalidOption(format!(
            "`scope:decode={pool},recent={recent}` leaves no room for heavy hitters; the recent \
             window must be smaller than the decoding pool"
        )));
    }
    Ok(Box::new(Scope {
        budget,
        pool,
        recent,
        prefill: SnapKv::with(budget, 32, 7, Pooling::Avg, shape),
        decoded: 0,
        observing: None,
        scores: AttentionSums::new(shape.n_layer, shape.n_kv_head),
    }))
}

impl Scope {
    /// Slots of one KV head to keep out of `len`, of which the last `pool` (more than
    /// `self.pool`) are decoded: the prompt, the recent window and the pool's best by `scores`.
    fn select(&self, scores: &[f32], len: usize, pool: usize) -> Vec<usize> {
        let (prompt, older) = (len - pool, len - self.recent);
        let heavy = top_k(&scores[prompt..older], self.pool - self.recent);
        (0..prompt)
            .chain(heavy.into_iter().map(|s| prompt + s))
            .chain(older..len)
            .collect()
    }
}

impl AttentionObserver for Scope {
    fn wants(&self, layer: usize, position: i32) -> bool {
        self.observing == Some(position) || self.prefill.wants(layer, position)
    }

    fn observe(&self, layer: usize, head: usize, kv_head: usize, position: i32, w: &[f32]) {
        if self.observing == Some(position) {
            self.scores.add(layer, kv_head, w);
        } else {
            self.prefill.observe(layer, head, kv_head, position, w);
        }
    }
}

impl KvPolicy for Scope {
    fn spec(&self) -> String {
        format!(
            "scope:{},decode={},recent={}",
            self.budget, self.pool, self.recent
        )
    }

    fn begin(&mut self, tokens: usize) {
        self.prefill.begin(tokens);
        // Tokens generated before this prompt are part of it now.
        self.decoded = 0;
    }

    fn before_chunk(&mut self, chunk: &ChunkInfo) {
        // SnapKV observes prompt chunks only; a decoded token is ranked when it overflows the pool.
        self.prefill.before_chunk(chunk);
        self.observing = (chunk.phase == Phase::Decode && self.decoded >= self.pool)
            .then_some(chunk.positions.start);
    }

    fn after_chunk(&mut self, cache: &mut KvCache, step: &AfterChunk) -> Option<i32> {
        if step.phase != Phase::Decode {
            return self.prefill.after_chunk(cache, step);
        }
        self.decoded += 1;
        self.observing.take()?;
        for layer in cache.compressed_layers().collect::<Vec<_>>() {
            let len = cache.layer_len(layer);
            let pool = self.decoded.min(len);
            if pool <= self.pool {
                continue;
            }
            let keep: Vec<Vec<usize>> = (0..cache.n_kv_head)
                .map(|h| self.select(&self.scores.get(layer, h, len), len, pool))
                .collect();
            cache.retain_layer(layer, &keep);
        }
        self.scores.clear();
        self.decoded = self.pool;
        None
    }

    fn peak_slots(&self, prompt: usize, chunk: usize, generated: usize) -> usize {
        let budget = self.budget.resolve(prompt);
        let prefill = bounded_peak(budget, prompt, chunk, 0, false);
        prefill.max(prompt.min(budget) + generated.min(self.pool + 1))
    }

    fn reset(&mut self) {
        self.prefill.reset();
        self.scores.clear();
        self.decoded = 0;
        self.observing = None;
    }
}

#[cfg(test)]
mod tests {
    use super::super::policy::testing::{after, build, cache, chunk, push, query, refusal, same};
    use super::super::policy::{KvPolicy, Phase};
    use crate::kv::KvCache;

    /// Decodes the token at `position` without the pool overflowing: no query is wanted.
    fn decode_into_room(p: &mut dyn KvPolicy, c: &mut KvCache, position: i32) {
        p.before_chunk(&chunk(Phase::Decode, position, 1, c.len()));
        push(c, position..position + 1);
        let w = vec![0.1; c.len()];
        assert!(!query(&*p, 0, position, &[&w, &w, &w, &w]));
        p.after_chunk(c, &after(Phase::Decode, position + 1));
    }

    #[test]
    fn the_prompt_is_compressed_by_snapkv_then_left_alone() {
        let mut p = build("scope:budget=4,decode=2,recent=1").unwrap();
        let mut c = cache(8);
        p.begin(8);
        p.before_chunk(&chunk(Phase::PrefillEnd, 0, 8, 0));
        // SnapKV's observation window (32 queries) covers this whole prompt and is kept first:
        // the budget holds its last 4 tokens.
        let w = [0.125; 8];
        assert!(query(&*p, 0, 7, &[&w, &w, &w, &w]));
        p.after_chunk(&mut c, &after(Phase::PrefillEnd, 8));
        assert_eq!(c.positions(0, 0), [4, 5, 6, 7]);
        // The pool fills, then slides; however little the prompt's tokens are attended to,
        // they stay.
        decode_into_room(&mut *p, &mut c, 8);
        decode_into_room(&mut *p, &mut c, 9);
        p.before_chunk(&chunk(Phase::Decode, 10, 1, 6));
        push(&mut c, 10..11);
        let w = [0.0, 0.0, 0.0, 0.0, 0.2, 0.3, 0.5];
        for layer in 0..2 {
            assert!(query(&*p, layer, 10, &[&w, &w, &w, &w]));
        }
        p.after_chunk(&mut c, &after(Phase::Decode, 11));
        assert_eq!(c.positions(1, 1), [4, 5, 6, 7, 9, 10]);
    }

    #[test]
    fn the_pool_keeps_its_recent_window_and_what_the_current_query_attends_to() {
        let mut p = build("scope:budget=8,decode=4,recent=2").unwrap();
        let mut c = cache(4);
        p.begin(4);
        p.before_chunk(&chunk(Phase::PrefillEnd, 0, 4, 0));
        p.after_chunk(&mut c, &after(Phase::PrefillEnd, 4));
        for position in 4..8 {
            decode_into_room(&mut *p, &mut c, position);
        }
        assert_eq!(c.positions(0, 0), [0, 1, 2, 3, 4, 5, 6, 7]);

        // Token 8 overflows the pool of 4. Tokens 7 and 8 are the recent window; two of 4, 5
        // and 6 stay, by the weights of query 8 summed over each KV head's query heads. The
        // prompt stays, even where it draws no attention (KV head 1).
        p.before_chunk(&chunk(Phase::Decode, 8, 1, 8));
        push(&mut c, 8..9);
        let kv0 = [0.3, 0.2, 0.1, 0.1, 0.05, 0.0, 0.15, 0.05, 0.05];
        let kv1 = [0.0, 0.0, 0.0, 0.0, 0.0, 0.2, 0.1, 0.3, 0.4];
        let uniform = [1.0 / 9.0; 9];
        assert!(query(&*p, 0, 8, &[&kv0, &kv0, &kv1, &kv1]));
        assert!(query(&*p, 1, 8, &[&uniform; 4]));
        p.after_chunk(&mut c, &after(Phase::Decode, 9));
        assert_eq!(c.positions(0, 0), [0, 1, 2, 3, 4, 6, 7, 8]);
        assert_eq!(c.positions(0, 1), [0, 1, 2, 3, 5, 6, 7, 8]);
        assert_eq!(c.positions(1, 0), [0, 1, 2, 3, 4, 5, 7, 8]);

        // Only the current query ranks: token 6, heavy a step ago, leaves when query 9 ignores
        // it; token 7 has left the window and stays on its own weight.
        p.before_chunk(&chunk(Phase::Decode, 9, 1, 8));
        push(&mut c, 9..10);
        let q = [0.1, 0.1, 0.1, 0.1, 0.2, 0.0, 0.3, 0.05, 0.05];
        assert!(query(&*p, 0, 9, &[&q, &q, &q, &q]));
        assert!(query(&*p, 1, 9, &[&q, &q, &q, &q]));
        p.after_chunk(&mut c, &after(Phase::Decode, 10));
        assert_eq!(c.positions(0, 0), [0, 1, 2, 3, 4, 7, 8, 9]);
        assert_eq!(c.layer_len(1), 8);
    }

    #[test]
    fn a_budget_and_pool_covering_the_input_keep_everything() {
        let mut p = build("scope:budget=8,decode=4").unwrap();
        let mut c = cache(5);
        p.begin(5);
        p.before_chunk(&chunk(Phase::PrefillEnd, 0, 5, 0));
        let w = [0.2; 5];
        assert!(!query(&*p, 0, 4, &[&w, &w, &w, &w]));
        p.after_chunk(&mut c, &after(Phase::PrefillEnd, 5));
        for position in 5..9 {
            decode_into_room(&mut *p, &mut c, position);
        }
        assert!(same(&c, &cache(9)));
    }

    #[test]
    fn specs_resolve_and_bad_parameters_are_refused() {
        let spec = |s: &str| build(s).unwrap().spec();
        assert_eq!(
            spec("scope:budget=64"),
            "scope:budget=64,decode=256,recent=128"
        );
        assert_eq!(
            spec("scope:ratio=0.5,decode=8"),
            "scope:ratio=0.5,decode=8,recent=4"
        );
        assert_eq!(
            spec("scope:budget=8,decode=1"),
            "scope:budget=8,decode=1,recent=0"
        );
        let p = build("scope:budget=8,decode=4,recent=2").unwrap();
        assert_eq!(p.peak_slots(100, 16, 50), 24);
        assert_eq!(p.peak_slots(6, 16, 3), 9);
        assert_eq!(p.peak_slots(6, 16, 30), 11);
        for bad in [
            "scope",
            "scope:budget=0",
            "scope:ratio=0",
            "scope:ratio=1.5",
            "scope:budget=8,decode=0",
            "scope:budget=8,decode=4,recent=4",
            "scope:budget=8,window=32",
        ] {
            let err = refusal(bad);
            assert!(err.contains("scope"), "{bad}: {err}");
        }
    }
}
