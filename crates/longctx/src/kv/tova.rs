//! TOVA — Oren et al., "Transformers are Multi-State RNNs", EMNLP 2024 (arXiv 2401.06104);
//! kvpress `TOVAPress`.
//!
//! Seen as an RNN whose state is the cache, a transformer with a bounded cache must choose the
//! states to drop. TOVA (Token Omission Via Attention) drops those the newest query attends to
//! least: its attention is the whole signal, nothing is accumulated over past queries, so a
//! token that mattered long ago but no longer does goes first. The weights are averaged over
//! every head of a layer, as in the paper and kvpress, so all KV heads of a layer keep the same
//! tokens: one ranking per layer, by the query as a whole rather than by any one head.
//!
//! While decoding, each token beyond the budget evicts exactly one: the lowest-scoring, which
//! may be the new token itself, as in the paper (kvpress always keeps it). A prompt chunk that
//! leaves more than the budget is cut to it with the chunk's last query, as kvpress compresses
//! a whole prompt with its last token; evicting after every chunk bounds the cache by budget +
//! chunk.

use super::policy::{bounded_peak, top_k, AfterChunk, AttentionSums, Budget, ChunkInfo};
use super::policy::{KvPolicy, Shape};
use super::{AttentionObserver, KvCache};
use crate::spec::{Params, SpecPart};
use crate::Result;

pub struct Tova {
    budget: Budget,
    /// Tokens kept, resolved for the current prompt.
    keep: usize,
    /// Position of the query that ranks the cache after the current chunk (None: no eviction).
    observing: Option<i32>,
    /// That query's weights summed over all heads of a layer: one row per layer.
    scores: AttentionSums,
}

pub fn build(part: &SpecPart, shape: &Shape) -> Result<Box<dyn KvPolicy>> {
    let mut params = Params::new(part);
    let budget = Budget::from_params(&mut params, "tova")?;
    params.finish(&["budget", "ratio"])?;
    Ok(Box::new(Tova {
        budget,
        keep: budget.before_input(),
        observing: None,
        scores: AttentionSums::new(shape.n_layer, 1),
    }))
}

impl AttentionObserver for Tova {
    fn wants(&self, _layer: usize, position: i32) -> bool {
        self.observing == Some(position)
    }

    fn observe(&self, layer: usize, _head: usize, _kv_head: usize, _: i32, weights: &[f32]) {
        self.scores.add(layer, 0, weights);
    }
}

impl KvPolicy for Tova {
    fn spec(&self) -> String {
        format!("tova:{}", self.budget)
    }

    fn begin(&mut self, tokens: usize) {
        self.keep = self.budget.resolve(tokens);
    }

    fn before_chunk(&mut self, chunk: &ChunkInfo) {
        self.observing = (chunk.cache_len_after > self.keep).then(|| chunk.positions.end - 1);
    }

    fn after_chunk(&mut self, cache: &mut KvCache, _: &AfterChunk) -> Option<i32> {
        self.observing.take()?;
        for layer in cache.compressed_layers().collect::<Vec<_>>() {
            let len = cache.layer_len(layer);
            if len > self.keep {
                let kept = top_k(&self.scores.get(layer, 0, len), self.keep);
                cache.retain_layer(layer, &vec![kept; cache.n_kv_head]);
            }
        }
        self.scores.clear();
        None
    }

    fn peak_slots(&self, prompt: usize, chunk: usize, generated: usize) -> usize {
        bounded_peak(self.budget.resolve(prompt), prompt, chunk, generated, true)
    }

    fn reset(&mut self) {
        self.scores.clear();
        self.observing = None;
    }
}

#[cfg(test)]
mod tests {
    use super::super::policy::testing::{after, build, cache, chunk, push, query, refusal, same};
    use super::super::policy::Phase;

    #[test]
    fn keeps_what_the_last_query_attends_to_averaged_over_all_heads() {
        let mut p = build("tova:budget=3").unwrap();
        let mut c = cache(8);
        p.begin(8);
        p.before_chunk(&chunk(Phase::PrefillEnd, 0, 8, 0));
        assert!(
            !query(&*p, 0, 6, &[&[1.0 / 7.0; 7]; 4]),
            "only the last query ranks"
        );
        // Over the four heads, layer 0 sums to [1.4, .6, .1, .2, .4, .3, .1, .9]: tokens 0, 1
        // and 7 in both KV heads, although KV head 0 alone would keep 0, 5 and 7.
        assert!(query(
            &*p,
            0,
            7,
            &[
                &[0.4, 0.0, 0.1, 0.0, 0.0, 0.3, 0.0, 0.2],
                &[0.4, 0.0, 0.0, 0.2, 0.0, 0.0, 0.1, 0.3],
                &[0.1, 0.6, 0.0, 0.0, 0.0, 0.0, 0.0, 0.3],
                &[0.5, 0.0, 0.0, 0.0, 0.4, 0.0, 0.0, 0.1],
            ]
        ));
        let recent = [0.0, 0.0, 0.0, 0.0, 0.0, 0.2, 0.3, 0.5];
        assert!(query(&*p, 1, 7, &[&recent; 4]));
        p.after_chunk(&mut c, &after(Phase::PrefillEnd, 8));
        for head in 0..2 {
            assert_eq!(c.positions(0, head), [0, 1, 7]);
            assert_eq!(c.positions(1, head), [5, 6, 7]);
        }

        // Each decoded token evicts the one token its query attends to least: in layer 0 the
        // new token itself.
        p.before_chunk(&chunk(Phase::Decode, 8, 1, 3));
        push(&mut c, 8..9);
        assert!(query(&*p, 0, 8, &[&[0.5, 0.2, 0.25, 0.05]; 4]));
        assert!(query(&*p, 1, 8, &[&[0.05, 0.3, 0.3, 0.35]; 4]));
        p.after_chunk(&mut c, &after(Phase::Decode, 9));
        assert_eq!(c.positions(0, 1), [0, 1, 7]);
        assert_eq!(c.positions(1, 1), [6, 7, 8]);
    }

    #[test]
    fn a_budget_covering_the_input_keeps_everything() {
        for spec in ["tova:budget=8", "tova:ratio=1"] {
            let mut p = build(spec).unwrap();
            let mut c = cache(6);
            p.begin(6);
            p.before_chunk(&chunk(Phase::PrefillEnd, 0, 6, 0));
            assert!(!query(&*p, 0, 5, &[&[1.0 / 6.0; 6]; 4]));
            p.after_chunk(&mut c, &after(Phase::PrefillEnd, 6));
            assert!(same(&c, &cache(6)), "{spec}");
        }
        // Decoding fills the budget before it evicts.
        let mut p = build("tova:budget=8").unwrap();
        let mut c = cache(6);
        for pos in 6..8 {
            p.before_chunk(&chunk(Phase::Decode, pos, 1, pos as usize));
            push(&mut c, pos..pos + 1);
            assert!(!query(&*p, 0, pos, &[&[0.1; 8][..pos as usize + 1]; 4]));
            p.after_chunk(&mut c, &after(Phase::Decode, pos + 1));
        }
        assert!(same(&c, &cache(8)));
    }

    #[test]
    fn specs_resolve_and_bad_parameters_are_refused() {
        assert_eq!(build("tova:budget=64").unwrap().spec(), "tova:budget=64");
        assert_eq!(build("tova:ratio=0.25").unwrap().spec(), "tova:ratio=0.25");
        assert_eq!(
            build("tova:budget=64").unwrap().peak_slots(1000, 32, 500),
            96
        );
        for bad in [
            "tova",
            "tova:budget=0",
            "tova:ratio=0",
            "tova:ratio=1.5",
            "tova:budget=8,ratio=0.5",
            "tova:budget=8,window=2",
        ] {
            let err = refusal(bad);
            assert!(err.contains("tova"), "{bad}: {err}");
        }
    }
}
