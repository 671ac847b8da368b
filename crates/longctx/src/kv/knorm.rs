//! Knorm — Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache
//! Compression", EMNLP 2024 (arXiv 2406.11430); kvpress `KnormPress`.
//!
//! The paper finds that a key's L2 norm predicts the attention it will receive, inversely:
//! keys with a low norm draw high attention during decoding. A key's importance can then be read
//! off the key alone, before any query has seen it, so this baseline needs no attention weights
//! (and works with kernels that never produce them). Each KV head keeps its `budget`
//! lowest-norm keys, scored −‖k‖₂ as kvpress does, in every layer. Keys are cached after RoPE,
//! which rotates pairs of dimensions and so leaves the norm unchanged.
//!
//! Eviction runs after every prompt chunk that leaves more than the budget, which bounds the
//! cache by budget + chunk; decoded tokens are kept, as in kvpress, which compresses the prompt
//! only.

use super::policy::{bounded_peak, top_k, AfterChunk, Budget, KvPolicy, Phase, Shape};
use super::{AttentionObserver, KvCache};
use crate::spec::{Params, SpecPart};
use crate::Result;

pub struct Knorm {
    budget: Budget,
    /// Tokens kept, resolved for the current prompt.
    keep: usize,
}

pub fn build(part: &SpecPart, _: &Shape) -> Result<Box<dyn KvPolicy>> {
    let mut params = Params::new(part);
    let budget = Budget::from_params(&mut params, "knorm")?;
    params.finish(&["budget", "ratio"])?;
    Ok(Box::new(Knorm {
        budget,
        keep: budget.before_input(),
    }))
}

impl Knorm {
    /// −‖k‖² of every slot of one head: ranks as −‖k‖₂ without the square roots.
    fn scores(cache: &KvCache, layer: usize, head: usize) -> Vec<f32> {
        let mut key = vec![0f32; cache.head_dim];
        (0..cache.layer_len(layer))
            .map(|slot| {
                cache.read_key(layer, head, slot, &mut key);
                -key.iter().map(|x| x * x).sum::<f32>()
            })
            .collect()
    }
}

impl AttentionObserver for Knorm {}

impl KvPolicy for Knorm {
    fn spec(&self) -> String {
        format!("knorm:{}", self.budget)
    }

    fn begin(&mut self, tokens: usize) {
        self.keep = self.budget.resolve(tokens);
    }

    fn after_chunk(&mut self, cache: &mut KvCache, step: &AfterChunk) -> Option<i32> {
        if step.phase == Phase::Decode {
            return None;
        }
        for layer in cache.compressed_layers().collect::<Vec<_>>() {
            if cache.layer_len(layer) > self.keep {
                let keep: Vec<Vec<usize>> = (0..cache.n_kv_head)
                    .map(|head| top_k(&Self::scores(cache, layer, head), self.keep))
                    .collect();
                cache.retain_layer(layer, &keep);
            }
        }
        None
    }

    fn peak_slots(&self, prompt: usize, chunk: usize, generated: usize) -> usize {
        bounded_peak(self.budget.resolve(prompt), prompt, chunk, generated, false)
    }
}

#[cfg(test)]
mod tests {
    use super::super::policy::testing::{after, build, cache, push, refusal, same};
    use super::super::policy::Phase;
    use crate::kv::KvCache;

    /// Gives the key of (`layer`, `head`) at each slot the norm listed.
    fn set_norms(c: &mut KvCache, layer: usize, head: usize, norms: &[f32]) {
        for (slot, &n) in norms.iter().enumerate() {
            // Signs differ so that only the norm, not the sum, ranks.
            let key = [0.6 * n, -0.8 * n, 0.0, 0.0];
            c.write(layer, head, slot, &key, &key);
        }
    }

    #[test]
    fn keeps_the_lowest_norm_keys_per_kv_head() {
        let mut p = build("knorm:budget=3").unwrap();
        let mut c = cache(6);
        set_norms(&mut c, 0, 0, &[3.0, 1.0, 2.0, 5.0, 0.5, 4.0]);
        set_norms(&mut c, 0, 1, &[0.1, 9.0, 9.0, 0.2, 9.0, 0.3]);
        set_norms(&mut c, 1, 0, &[1.0, 1.0, 1.0, 1.0, 1.0, 1.0]);
        set_norms(&mut c, 1, 1, &[6.0, 5.0, 4.0, 3.0, 2.0, 1.0]);
        p.begin(6);
        p.after_chunk(&mut c, &after(Phase::Prefill, 6));
        assert_eq!(c.positions(0, 0), [1, 2, 4]);
        assert_eq!(c.positions(0, 1), [0, 3, 5]);
        assert_eq!(
            c.positions(1, 0),
            [0, 1, 2],
            "ties go to the earlier tokens"
        );
        assert_eq!(c.positions(1, 1), [3, 4, 5]);

        // Decoded tokens are not evicted.
        push(&mut c, 6..7);
        p.after_chunk(&mut c, &after(Phase::Decode, 7));
        assert_eq!(c.positions(0, 0), [1, 2, 4, 6]);
    }

    #[test]
    fn a_budget_covering_the_input_keeps_everything() {
        for spec in ["knorm:budget=8", "knorm:ratio=1"] {
            let mut p = build(spec).unwrap();
            let mut c = cache(6);
            p.begin(6);
            p.after_chunk(&mut c, &after(Phase::PrefillEnd, 6));
            assert!(same(&c, &cache(6)), "{spec}");
        }
    }

    #[test]
    fn specs_resolve_and_bad_parameters_are_refused() {
        assert_eq!(build("knorm:budget=64").unwrap().spec(), "knorm:budget=64");
        assert_eq!(build("knorm:ratio=0.5").unwrap().spec(), "knorm:ratio=0.5");
        assert_eq!(
            build("knorm:budget=64").unwrap().peak_slots(1000, 32, 500),
            564
        );
        for bad in [
            "knorm",
            "knorm:budget=0",
            "knorm:ratio=0",
            "knorm:ratio=2",
            "knorm:budget=8,window=2",
        ] {
            let err = refusal(bad);
            assert!(err.contains("knorm"), "{bad}: {err}");
        }
    }
}
