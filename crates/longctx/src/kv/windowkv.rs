//! WindowKV — Zuo et al., "WindowKV: Task-Adaptive Group-Wise KV Cache Window Selection for
//! Efficient LLM Inference", arXiv 2503.17922 (2025); the authors' code is optim996/WindowKV.
//!
//! Token-level selection (SnapKV) keeps scattered tokens and so loses the words around the ones
//! that matter; WindowKV keeps whole windows of `size` consecutive tokens, so that what survives
//! still reads as text. The last `window` queries vote as in SnapKV (softmax weights summed over
//! the observation window and over the query heads of a KV head), each window is scored from
//! its tokens' votes, and each KV head keeps its best windows plus the observation window.
//!
//! The paper adapts the score to the task with a BERT classifier: question answering scores a
//! window by the mean of its ⌊size/2⌋ highest votes with a 32-query observation window
//! (`score=max`), other tasks by the mean of all its votes with 16 queries (`score=avg`). There
//! is no classifier here: `score` chooses, and the defaults are the QA setting, with the
//! authors' `size` 8 and `group` 8.
//!
//! To save the scoring work the paper shares the selection within groups of `group` consecutive
//! layers: the first layer of each group (0, group, 2·group, …) votes and chooses, and the
//! layers after it in the group keep the same slots, as the authors' code reuses the indices of
//! the layer with `layer % group == 0`. Only those first layers are observed here, and their
//! choice is applied to the whole group after the chunk.
//!
//! Where this departs from the authors' code, and why:
//! - each KV head chooses its own windows (the code averages the scores over all heads of a
//!   layer), as every policy here selects per KV head: heads attend to different places;
//! - the budget counts the observation window, as every budget here does, and is the same for
//!   every layer (the code also lowers it group by group, PyramidKV-style with β = 14: that is
//!   `pyramid`'s idea, kept apart);
//! - windows are cut from the first slot, and the fewer than `size` tokens between the last
//!   whole window and the observation window stay with it, as the most recent context (the code
//!   scores a shorter last window instead): every window is then whole, every head keeps as many
//!   slots, and the windows one chunk keeps are still whole windows when the next chunk votes.
//!
//! With chunked prefill the vote runs after every chunk that leaves more than `budget` tokens,
//! with that chunk's last queries as the window, so the cache never holds more than budget +
//! chunk.

use super::policy::{bounded_peak, top_k, AfterChunk, AttentionSums, Budget, ChunkInfo};
use super::policy::{KvPolicy, Shape};
use super::{AttentionObserver, KvCache};
use crate::spec::{Params, SpecPart, MAX_TOKENS};
use crate::{Error, Result};

/// How a window's votes make its score.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Score {
    /// The mean of its ⌊size/2⌋ highest votes (at least one): a few strong tokens carry it.
    Max,
    /// The mean of all its votes.
    Avg,
}

impl Score {
    fn of(self, votes: &[f32]) -> f32 {
        match self {
            Self::Avg => votes.iter().sum::<f32>() / votes.len() as f32,
            Self::Max => {
                let mut sorted = votes.to_vec();
                sorted.sort_unstable_by(|a, b| b.total_cmp(a));
                let k = (votes.len() / 2).max(1);
                sorted[..k].iter().sum::<f32>() / k as f32
            }
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Max => "max",
            Self::Avg => "avg",
        }
    }
}

pub struct WindowKv {
    budget: Budget,
    window: usize,
    size: usize,
    group: usize,
    score: Score,
    /// Tokens kept, resolved for the current prompt.
    keep: usize,
    /// Per layer, whether it votes for its group: the group's first compressed layer.
    voters: Vec<bool>,
    /// Positions whose queries vote in the current chunk (empty: no vote).
    observing: std::ops::Range<i32>,
    votes: AttentionSums,
}

pub fn build(part: &SpecPart, shape: &Shape) -> Result<Box<dyn KvPolicy>> {
    let mut params = Params::new(part);
    let policy = WindowKv::new(&mut params, shape)?;
    params.finish(&["budget", "ratio", "window", "size", "group", "score"])?;
    Ok(Box::new(policy))
}

impl WindowKv {
    /// Reads `budget|ratio`, `window` (32), `size` (8), `group` (8) and `score` (max).
    pub fn new(params: &mut Params, shape: &Shape) -> Result<Self> {
        let budget = Budget::from_params(params, "windowkv")?;
        let window = params.get_in("window", 32usize, 1..=MAX_TOKENS)?;
        let size = params.get_in("size", 8usize, 1..=MAX_TOKENS)?;
        let group = params.get_in("group", 8usize, 1..=MAX_TOKENS)?;
        let score = match params.choice("score", &["max", "avg"])? {
            "avg" => Score::Avg,
            _ => Score::Max,
        };
        if window == 0 || size == 0 || group == 0 {
            return Err(Error::InvalidOption(format!(
                "`windowkv:window={window},size={size},group={group}`: the observation window, \
                 the kept windows and the groups of layers need at least 1 each"
            )));
        }
        let mut voters = vec![false; shape.n_layer];
        for start in (0..shape.n_layer).step_by(group) {
            let end = (start + group).min(shape.n_layer);
            if let Some(first) = (start..end).find(|&l| shape.is_compressed(l)) {
                voters[first] = true;
            }
        }
        Ok(Self {
            budget,
            window,
            size,
            group,
            score,
            voters,
            keep: 0,
            observing: 0..0,
            votes: AttentionSums::new(shape.n_layer, shape.n_kv_head),
        })
    }

    /// Slots of one KV head to keep out of `len`, of which the last `window` are the observers:
    /// the best whole windows, then the tail and the observation window.
    fn select(&self, votes: &[f32], len: usize, window: usize, keep: usize) -> Vec<usize> {
        let window = window.min(keep).min(len);
        let whole = (len - window) / self.size;
        let recent = (len - whole * self.size).min(keep);
        let scores: Vec<f32> = votes[..whole * self.size]
            .chunks_exact(self.size)
            .map(|w| self.score.of(w))
            .collect();
        let mut kept: Vec<usize> = top_k(&scores, (keep - recent) / self.size)
            .into_iter()
            .flat_map(|w| w * self.size..(w + 1) * self.size)
            .collect();
        kept.extend(len - recent..len);
        kept
    }
}

impl AttentionObserver for WindowKv {
    fn wants(&self, layer: usize, position: i32) -> bool {
        self.voters.get(layer) == Some(&true) && self.observing.contains(&position)
    }

    fn observe(&self, layer: usize, _head: usize, kv_head: usize, _: i32, weights: &[f32]) {
        self.votes.add(layer, kv_head, weights);
    }
}

impl KvPolicy for WindowKv {
    fn spec(&self) -> String {
        format!(
            "windowkv:{},window={},size={},group={},score={}",
            self.budget,
            self.window,
            self.size,
            self.group,
            self.score.name()
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
        let window = self.observing.len();
        // The layers of a group have kept the same slots every time, so they hold as many.
        for start in (0..cache.n_layer).step_by(self.group) {
            // Local layers hold their window, not a selection: the group's first compressed
            // layer votes for the others.
            let layers: Vec<usize> = (start..(start + self.group).min(cache.n_layer))
                .filter(|&l| !cache.is_local(l))
                .collect();
            let Some(&first) = layers.first() else {
                continue;
            };
            let len = cache.layer_len(first);
            if len <= self.keep {
                continue;
            }
            let keep: Vec<Vec<usize>> = (0..cache.n_kv_head)
                .map(|h| self.select(&self.votes.get(first, h, len), len, window, self.keep))
                .collect();
            for layer in layers {
                cache.retain_layer(layer, &keep);
            }
        }
        self.votes.clear();
        self.observing = 0..0;
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
    use crate::kv::policy::testing;
    use crate::kv::policy::Phase;
    use crate::kv::KvDtype;
    use crate::spec::Spec;

    /// Four layers of two query heads, each its own KV head; `local` marks sliding layers.
    fn shape(local: &[bool]) -> Shape {
        Shape {
            n_layer: 4,
            n_head: 2,
            n_kv_head: 2,
            head_dim: 4,
            local: local.to_vec(),
        }
    }

    fn windowkv(spec: &str) -> WindowKv {
        windowkv_for(spec, &shape(&[]))
    }

    fn windowkv_for(spec: &str, shape: &Shape) -> WindowKv {
        let spec: Spec = spec.parse().unwrap();
        let mut params = Params::new(&spec.parts[0]);
        WindowKv::new(&mut params, shape).unwrap()
    }

    // Ten slots, the last one observing; windows of 2 cut [0,1] [2,3] [4,5] [6,7], slot 8 is
    // the tail kept with the window. Window means: .225, .5, 0, .3; window maxima: .45, .5, 0,
    // .3.
    const VOTES: [f32; 10] = [0.45, 0.0, 0.5, 0.5, 0.0, 0.0, 0.3, 0.3, 0.9, 0.1];

    #[test]
    fn keeps_the_best_whole_windows_by_mean_or_by_top_votes() {
        // Budget 6: the tail and the window take 2, two windows of 2 the rest.
        let p = windowkv("windowkv:budget=6,window=1,size=2,score=avg");
        assert_eq!(p.select(&VOTES, 10, 1, 6), [2, 3, 6, 7, 8, 9]);
        let p = windowkv("windowkv:budget=6,window=1,size=2,score=max");
        assert_eq!(p.select(&VOTES, 10, 1, 6), [0, 1, 2, 3, 8, 9]);
        // Budget 7 still fits only two whole windows; budget 3, none.
        assert_eq!(p.select(&VOTES, 10, 1, 7), [0, 1, 2, 3, 8, 9]);
        assert_eq!(p.select(&VOTES, 10, 1, 3), [8, 9]);
        // A budget below tail + window keeps the most recent slots.
        assert_eq!(p.select(&VOTES, 10, 1, 1), [9]);
        // Windows of 4 over eleven slots with two observing: [0..4] [4..8], tail 8.
        let p = windowkv("windowkv:budget=7,window=2,size=4,score=avg");
        let votes = [0.0, 0.0, 0.1, 0.0, 0.2, 0.2, 0.0, 0.0, 0.0, 0.5, 0.5];
        assert_eq!(p.select(&votes, 11, 2, 7), [4, 5, 6, 7, 8, 9, 10]);
    }

    #[test]
    fn the_first_layer_of_each_group_chooses_for_the_group_per_kv_head() {
        let mut p = windowkv("windowkv:budget=6,window=1,size=2,group=2,score=avg");
        p.begin(10);
        let mut cache = KvCache::new(KvDtype::F32, 4, 2, 4, 16);
        cache.push_slots(&(0..10).collect::<Vec<i32>>()).unwrap();
        p.before_chunk(&testing::chunk(Phase::PrefillEnd, 0, 10, 0));
        assert!(p.wants(0, 9) && p.wants(2, 9));
        assert!(!p.wants(0, 8) && !p.wants(1, 9) && !p.wants(3, 9));
        p.observe(0, 0, 0, 9, &VOTES);
        p.observe(
            0,
            1,
            1,
            9,
            &[0.3, 0.2, 0.0, 0.1, 0.4, 0.4, 0.0, 0.0, 0.0, 0.1],
        );
        p.observe(
            2,
            0,
            0,
            9,
            &[0.0, 0.0, 0.0, 0.0, 0.2, 0.2, 0.6, 0.6, 0.0, 0.0],
        );
        p.observe(
            2,
            1,
            1,
            9,
            &[0.5, 0.5, 0.3, 0.3, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        );
        assert_eq!(
            p.after_chunk(&mut cache, &testing::after(Phase::PrefillEnd, 10)),
            None
        );
        for (layer, head, kept) in [
            (0, 0, [2, 3, 6, 7, 8, 9]),
            (0, 1, [0, 1, 4, 5, 8, 9]),
            (2, 0, [4, 5, 6, 7, 8, 9]),
            (2, 1, [0, 1, 2, 3, 8, 9]),
        ] {
            assert_eq!(cache.layer_len(layer), 6);
            assert_eq!(
                cache.positions(layer, head),
                kept,
                "layer {layer} head {head}"
            );
            assert_eq!(
                cache.positions(layer + 1, head),
                kept,
                "its group's next layer"
            );
        }
    }

    #[test]
    fn on_a_hybrid_model_the_first_compressed_layer_of_a_group_votes() {
        // Gemma 3's pattern in small: layers 0 and 2 slide over 4 tokens, 1 and 3 see all.
        let local = [true, false, true, false];
        let mut p = windowkv_for(
            "windowkv:budget=6,window=1,size=2,group=2,score=avg",
            &shape(&local),
        );
        p.begin(10);
        let windows = local.map(|l| l.then_some(4));
        let mut cache = KvCache::with_windows(KvDtype::F32, 2, 4, 16, &windows, 16);
        cache.push_slots(&(0..10).collect::<Vec<i32>>()).unwrap();
        p.before_chunk(&testing::chunk(Phase::PrefillEnd, 0, 10, 0));
        assert!(p.wants(1, 9) && p.wants(3, 9));
        assert!(!p.wants(0, 9) && !p.wants(2, 9));
        p.observe(1, 0, 0, 9, &VOTES);
        p.observe(
            1,
            1,
            1,
            9,
            &[0.3, 0.2, 0.0, 0.1, 0.4, 0.4, 0.0, 0.0, 0.0, 0.1],
        );
        p.observe(3, 0, 0, 9, &VOTES);
        p.observe(3, 1, 1, 9, &VOTES);
        p.after_chunk(&mut cache, &testing::after(Phase::PrefillEnd, 10));
        assert_eq!(cache.positions(1, 0), [2, 3, 6, 7, 8, 9]);
        assert_eq!(cache.positions(1, 1), [0, 1, 4, 5, 8, 9]);
        assert_eq!(cache.positions(3, 1), [2, 3, 6, 7, 8, 9]);
        let local_len = cache.layer_len(0);
        assert_eq!(
            local_len,
            cache.layer_len(2),
            "local layers keep their window"
        );
    }

    #[test]
    fn a_budget_at_or_above_the_input_keeps_everything() {
        let mut p = windowkv("windowkv:budget=10,window=1,size=2");
        p.begin(10);
        let mut cache = KvCache::new(KvDtype::F32, 4, 2, 4, 16);
        cache.push_slots(&(0..10).collect::<Vec<i32>>()).unwrap();
        p.before_chunk(&testing::chunk(Phase::PrefillEnd, 0, 10, 0));
        assert!(!p.wants(0, 9));
        assert_eq!(
            p.after_chunk(&mut cache, &testing::after(Phase::PrefillEnd, 10)),
            None
        );
        assert_eq!(cache.positions(3, 1), (0..10).collect::<Vec<i32>>());
        assert_eq!(p.peak_slots(10, 512, 0), 10);
        assert_eq!(p.select(&VOTES, 10, 1, 10), (0..10).collect::<Vec<usize>>());
    }

    #[test]
    fn spec_names_every_parameter() {
        assert_eq!(
            windowkv("windowkv:ratio=0.25").spec(),
            "windowkv:ratio=0.25,window=32,size=8,group=8,score=max"
        );
        let p = testing::build("windowkv:budget=64,window=16,size=4,group=2,score=avg").unwrap();
        assert_eq!(
            p.spec(),
            "windowkv:budget=64,window=16,size=4,group=2,score=avg"
        );
    }

    #[test]
    fn refuses_bad_parameters_by_name() {
        for bad in [
            "windowkv",
            "windowkv:budget=0",
            "windowkv:ratio=2",
            "windowkv:budget=64,window=0",
            "windowkv:budget=64,size=0",
            "windowkv:budget=64,group=0",
            "windowkv:budget=64,score=sum",
            "windowkv:budget=64,kernel=7",
        ] {
            let err = testing::refusal(bad);
            assert!(err.contains("windowkv"), "{bad}: {err}");
        }
    }
}
