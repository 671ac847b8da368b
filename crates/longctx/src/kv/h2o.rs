//! H2O — Zhang et al., "H₂O: Heavy-Hitter Oracle for Efficient Generative Inference of Large
//! Language Models", NeurIPS 2023 (arXiv 2306.14048); FMInference/H2O `utils_real_drop`.
//!
//! A few tokens, the heavy hitters, draw most of the attention, and the attention a token has
//! drawn so far predicts the attention it will draw next. So every cached token is scored by its
//! softmax weights summed over all the queries that have seen it, and the cache keeps the
//! `budget − window` best plus the `window` most recent tokens: recent tokens have been seen by
//! too few queries for their sum to mean anything yet, and local context needs them anyway. The
//! paper splits the budget half and half, the default here. Sums are kept per KV head, adding
//! the query heads that share it, so that one selection per KV head keeps GQA's saving.
//!
//! The paper's eviction is greedy, step by step; here it runs after every prompt chunk that
//! leaves more than the budget and after every decoded token, so the cache holds at most
//! budget + chunk while the prompt is fed and budget + 1 while decoding. Sums are not divided by
//! the number of queries that could see a token (kvpress's ObservedAttention divides): older
//! tokens collect more, a bias the paper's rule has as well.

use super::policy::{bounded_peak, top_k, AfterChunk, AttentionSums, Budget, KvPolicy, Shape};
use super::{AttentionObserver, KvCache};
use crate::spec::{Params, SpecPart, MAX_TOKENS};
use crate::{Error, Result};

pub struct H2o {
    budget: Budget,
    /// Recent tokens always kept; None: half the budget.
    window: Option<usize>,
    /// Tokens kept per KV head, and how many of them are the recent window, resolved for the
    /// current prompt.
    keep: usize,
    recent: usize,
    scores: AttentionSums,
}

pub fn build(part: &SpecPart, shape: &Shape) -> Result<Box<dyn KvPolicy>> {
    let mut params = Params::new(part);
    let budget = Budget::from_params(&mut params, "h2o")?;
    let window = match params.raw("window") {
        None | Some("half") => None,
        Some(w) => Some(
            w.parse::<usize>()
                .ok()
                .filter(|&w| w <= MAX_TOKENS)
                .ok_or_else(|| {
                    Error::InvalidOption(format!(
                        "`window={w}` for `h2o`: give a number of recent tokens up to {MAX_TOKENS}, or `half` (of the budget)"
                    ))
                })?,
        ),
    };
    params.finish(&["budget", "ratio", "window"])?;
    if let (Budget::Tokens(n), Some(w)) = (budget, window) {
        if w >= n {
            return Err(Error::InvalidOption(format!(
                "`h2o:budget={n},window={w}` leaves no room for heavy hitters; the recent window \
                 must be smaller than the budget"
            )));
        }
    }
    let mut policy = H2o {
        budget,
        window,
        keep: 0,
        recent: 0,
        scores: AttentionSums::new(shape.n_layer, shape.n_kv_head),
    };
    policy.resolve(budget.before_input());
    Ok(Box::new(policy))
}

impl H2o {
    fn resolve(&mut self, keep: usize) {
        self.keep = keep;
        // A window given in tokens may exceed a ratio's budget on a short prompt: the recent
        // tokens then fill the whole budget.
        self.recent = self.window.unwrap_or(keep / 2).min(keep);
    }
}

/// Slots of one KV head to keep out of `len` (more than `keep`): the last `recent`, and the
/// `keep − recent` others with the highest accumulated `scores`.
fn select(scores: &[f32], len: usize, keep: usize, recent: usize) -> Vec<usize> {
    let older = len - recent;
    let mut kept = top_k(&scores[..older], keep - recent);
    kept.extend(older..len);
    kept
}

impl AttentionObserver for H2o {
    fn wants(&self, _layer: usize, _position: i32) -> bool {
        true
    }

    fn observe(&self, layer: usize, _head: usize, kv_head: usize, _: i32, weights: &[f32]) {
        self.scores.add(layer, kv_head, weights);
    }
}

impl KvPolicy for H2o {
    fn spec(&self) -> String {
        let window = match (self.window, self.budget) {
            (Some(w), _) => w.to_string(),
            (None, Budget::Tokens(n)) => (n / 2).to_string(),
            (None, Budget::Ratio(_)) => "half".into(),
        };
        format!("h2o:{},window={window}", self.budget)
    }

    fn begin(&mut self, tokens: usize) {
        self.resolve(self.budget.resolve(tokens));
    }

    fn after_chunk(&mut self, cache: &mut KvCache, _: &AfterChunk) -> Option<i32> {
        for layer in cache.compressed_layers().collect::<Vec<_>>() {
            let len = cache.layer_len(layer);
            if len <= self.keep {
                continue;
            }
            let keep: Vec<Vec<usize>> = (0..cache.n_kv_head)
                .map(|h| select(&self.scores.get(layer, h, len), len, self.keep, self.recent))
                .collect();
            cache.retain_layer(layer, &keep);
            for (h, slots) in keep.iter().enumerate() {
                self.scores.retain(layer, h, slots);
            }
        }
        None
    }

    fn peak_slots(&self, prompt: usize, chunk: usize, generated: usize) -> usize {
        bounded_peak(self.budget.resolve(prompt), prompt, chunk, generated, true)
    }

    fn reset(&mut self) {
        self.scores.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::super::policy::testing::{after, build, cache, chunk, push, query, refusal, same};
    use super::super::policy::Phase;

    #[test]
    fn keeps_the_recent_window_and_the_most_attended_tokens_per_kv_head() {
        let mut p = build("h2o:budget=4,window=2").unwrap();
        let mut c = cache(8);
        p.begin(8);
        p.before_chunk(&chunk(Phase::PrefillEnd, 0, 8, 0));
        // Two queries of the prompt; slots 6 and 7 are the recent window, two of slots 0..6
        // stay. KV head 0 (query heads 0 and 1) sums to [.4, .7, 0, .3, .6, 0] over them: slots
        // 1 and 4, although query 7 alone would rank slot 0 above slot 1.
        assert!(query(
            &*p,
            0,
            6,
            &[
                &[0.1, 0.6, 0.0, 0.0, 0.2, 0.0, 0.1],
                &[0.1, 0.0, 0.0, 0.2, 0.0, 0.0, 0.7],
                &[0.5, 0.0, 0.3, 0.0, 0.0, 0.0, 0.2],
                &[0.4, 0.0, 0.0, 0.0, 0.0, 0.2, 0.4],
            ]
        ));
        assert!(query(
            &*p,
            0,
            7,
            &[
                &[0.1, 0.1, 0.0, 0.0, 0.1, 0.0, 0.2, 0.5],
                &[0.1, 0.0, 0.0, 0.1, 0.3, 0.0, 0.0, 0.5],
                &[0.3, 0.0, 0.2, 0.0, 0.0, 0.1, 0.0, 0.4],
                &[0.3, 0.0, 0.2, 0.0, 0.0, 0.1, 0.0, 0.4],
            ]
        ));
        // Layer 1 attends uniformly: ties go to the earlier tokens.
        let (u7, u8) = ([1.0 / 7.0; 7], [1.0 / 8.0; 8]);
        assert!(query(&*p, 1, 6, &[&u7, &u7, &u7, &u7]));
        assert!(query(&*p, 1, 7, &[&u8, &u8, &u8, &u8]));
        assert_eq!(p.after_chunk(&mut c, &after(Phase::PrefillEnd, 8)), None);
        assert_eq!(c.positions(0, 0), [1, 4, 6, 7]);
        assert_eq!(c.positions(0, 1), [0, 2, 6, 7]);
        assert_eq!(c.positions(1, 0), [0, 1, 6, 7]);
        assert_eq!(c.positions(1, 1), [0, 1, 6, 7]);

        // Decoding evicts one token per step. The new query prefers token 4 to token 1 in KV
        // head 0, but token 1's sum (.7) still beats token 4's (.6 + .08): the sums followed
        // the compaction. Token 6 leaves the window and stays as a heavy hitter (2.6).
        p.before_chunk(&chunk(Phase::Decode, 8, 1, 4));
        push(&mut c, 8..9);
        let q0 = [0.0, 0.04, 0.8, 0.06, 0.1];
        let u = [0.2; 5];
        assert!(query(&*p, 0, 8, &[&q0, &q0, &u, &u]));
        assert!(query(&*p, 1, 8, &[&u, &u, &u, &u]));
        p.after_chunk(&mut c, &after(Phase::Decode, 9));
        assert_eq!(c.positions(0, 0), [1, 6, 7, 8]);
        assert_eq!(c.positions(0, 1), [0, 2, 7, 8]);
        assert_eq!(c.positions(1, 0), [0, 1, 7, 8]);
        assert_eq!((c.layer_len(0), c.layer_len(1)), (4, 4));
    }

    #[test]
    fn a_budget_covering_the_input_keeps_everything() {
        for spec in ["h2o:budget=8", "h2o:ratio=1"] {
            let mut p = build(spec).unwrap();
            let mut c = cache(6);
            p.begin(6);
            p.before_chunk(&chunk(Phase::PrefillEnd, 0, 6, 0));
            let w = [1.0 / 6.0; 6];
            for layer in 0..2 {
                assert!(query(&*p, layer, 5, &[&w, &w, &w, &w]));
            }
            p.after_chunk(&mut c, &after(Phase::PrefillEnd, 6));
            assert!(same(&c, &cache(6)), "{spec}");
        }
    }

    #[test]
    fn specs_resolve_and_bad_parameters_are_refused() {
        let spec = |s: &str| build(s).unwrap().spec();
        assert_eq!(spec("h2o:budget=8"), "h2o:budget=8,window=4");
        assert_eq!(spec("h2o:budget=8,window=3"), "h2o:budget=8,window=3");
        assert_eq!(spec("h2o:ratio=0.5"), "h2o:ratio=0.5,window=half");
        assert_eq!(
            spec("h2o:ratio=0.5,window=half"),
            "h2o:ratio=0.5,window=half"
        );
        // A ratio resolves against the prompt: 4 of 8 tokens, half of them recent.
        let mut p = build("h2o:ratio=0.5").unwrap();
        let mut c = cache(8);
        p.begin(8);
        p.before_chunk(&chunk(Phase::PrefillEnd, 0, 8, 0));
        let w = [0.0, 0.0, 0.0, 0.5, 0.0, 0.5, 0.0, 0.0];
        for layer in 0..2 {
            assert!(query(&*p, layer, 7, &[&w; 4]));
        }
        p.after_chunk(&mut c, &after(Phase::PrefillEnd, 8));
        assert_eq!(c.positions(1, 1), [3, 5, 6, 7]);
        // While the prompt is fed the cache holds the budget and a chunk, unless the chunk
        // holds the whole prompt; decoding then holds no more than the budget and one token.
        assert_eq!(p.peak_slots(100, 16, 50), 66);
        assert_eq!(p.peak_slots(100, 200, 50), 100);
        for bad in [
            "h2o",
            "h2o:budget=0",
            "h2o:ratio=0",
            "h2o:ratio=1.5",
            "h2o:budget=8,window=8",
            "h2o:budget=8,window=many",
            "h2o:budget=8,sinks=4",
        ] {
            let err = refusal(bad);
            assert!(err.contains("h2o"), "{bad}: {err}");
        }
    }
}
