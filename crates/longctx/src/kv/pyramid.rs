//! PyramidKV — Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal
//! Information Funneling", arXiv 2406.02069 (2024); kvpress `PyramidKVPress`.
//!
//! The paper observes that attention funnels with depth: lower layers spread their attention
//! over the whole prompt, upper layers concentrate it on a few tokens. So the same total budget
//! does better spent unevenly: SnapKV's vote chooses the tokens (see [`super::snapkv`]), but
//! layer l keeps a budget that falls linearly from the first layer to the last, the mean being
//! the budget asked for. The budgets follow kvpress's `get_layer_budget` (itself from the
//! authors' KVCache-Factory), fallback included: with the mean `B`, the window `w` and `L` the
//! prompt's length, the last layer keeps `B/β`, the first `2B − B/β` (capped at `L − w`, the
//! last then taking what the cap leaves), and when these are out of order or the last is below
//! the window, every layer keeps `B`, as SnapKV. Rounding is Python's (half to even), so the
//! numbers are kvpress's to the token.
//!
//! With chunked prefill the budgets are those of the whole prompt, and every chunk that leaves a
//! layer above its budget is voted on by its last `window` queries, as SnapKV does here.
//!
//! On a model with sliding-window layers (Gemma 3: 3 of 18 layers see everything) the pyramid
//! slopes over the layers a policy compresses, in their order, so that their mean is still the
//! budget asked for; sloping over all layers would leave Gemma's 3 global layers 72% of it.

use super::policy::{bounded_peak, AfterChunk, Budget, ChunkInfo, KvPolicy, Shape};
use super::snapkv::SnapKv;
use super::{AttentionObserver, KvCache};
use crate::spec::{Params, SpecPart, MAX_TOKENS};
use crate::{Error, Result};

pub struct PyramidKv {
    snap: SnapKv,
    beta: usize,
    n_layer: usize,
    /// The layers the pyramid slopes over, top to bottom: all but the sliding-window ones.
    compressed: Vec<usize>,
    /// Tokens each layer keeps, resolved for the current prompt (a local layer's is unused).
    budgets: Vec<usize>,
}

pub fn build(part: &SpecPart, shape: &Shape) -> Result<Box<dyn KvPolicy>> {
    let mut params = Params::new(part);
    let policy = PyramidKv::new(&mut params, shape)?;
    params.finish(&["budget", "ratio", "window", "kernel", "pooling", "beta"])?;
    Ok(Box::new(policy))
}

impl PyramidKv {
    /// SnapKV's parameters (`window` 32, `kernel` 7, `pooling` avg) and `beta` (20, kvpress's
    /// and the authors' default), the ratio of the first layer's share to the last one's.
    pub fn new(params: &mut Params, shape: &Shape) -> Result<Self> {
        let snap = SnapKv::named(params, shape, "pyramid", 7)?;
        let beta = params.get_in("beta", 20usize, 1..=MAX_TOKENS)?;
        if beta == 0 {
            return Err(Error::InvalidOption(
                "`pyramid:beta=0`: beta divides the budget of the last layer; give at least 1"
                    .into(),
            ));
        }
        Ok(Self {
            snap,
            beta,
            n_layer: shape.n_layer,
            compressed: (0..shape.n_layer)
                .filter(|&l| shape.is_compressed(l))
                .collect(),
            budgets: Vec::new(),
        })
    }

    /// Tokens each layer keeps out of a prompt of `tokens`: kvpress's formula over the
    /// compressed layers, in its order of operations so that the floats round alike.
    fn layer_budgets(&self, tokens: usize) -> Vec<usize> {
        let q_len = tokens as f64;
        let window = self.snap.window as f64;
        let kept = match self.snap.budget {
            Budget::Tokens(n) => n as f64,
            Budget::Ratio(r) => q_len * r,
        };
        let max_capacity = window + kept;
        let mut min_num = (max_capacity - window) / self.beta as f64;
        let mut max_num = (max_capacity - window) * 2.0 - min_num;
        if max_num >= q_len - window {
            max_num = q_len - window;
            min_num = (max_capacity - window) * 2.0 - max_num;
        }
        let even = (kept.round_ties_even() as usize).max(1);
        let mut budgets = vec![even; self.n_layer];
        // kvpress divides by `L − 1` layers; one layer has nothing to slope over.
        let ordered = q_len >= max_num && max_num >= min_num && min_num >= window;
        let sloped = self.compressed.len();
        if !ordered || sloped < 2 {
            return budgets;
        }
        let steps = (max_num - min_num) / (sloped - 1) as f64;
        for (rank, &layer) in self.compressed.iter().enumerate() {
            budgets[layer] = (max_num - rank as f64 * steps).round_ties_even() as usize;
        }
        budgets
    }

    /// The budgets of the layers that keep one.
    fn compressed_budgets<'a>(&'a self, budgets: &'a [usize]) -> impl Iterator<Item = usize> + 'a {
        self.compressed.iter().map(|&layer| budgets[layer])
    }
}

impl AttentionObserver for PyramidKv {
    fn wants(&self, layer: usize, position: i32) -> bool {
        self.snap.wants(layer, position)
    }

    fn observe(&self, layer: usize, head: usize, kv_head: usize, position: i32, weights: &[f32]) {
        self.snap.observe(layer, head, kv_head, position, weights);
    }
}

impl KvPolicy for PyramidKv {
    fn spec(&self) -> String {
        format!(
            "pyramid:{},window={},kernel={},pooling={},beta={}",
            self.snap.budget,
            self.snap.window,
            self.snap.kernel,
            self.snap.pooling.name(),
            self.beta
        )
    }

    fn begin(&mut self, tokens: usize) {
        self.budgets = self.layer_budgets(tokens);
    }

    fn before_chunk(&mut self, chunk: &ChunkInfo) {
        // The fullest layer holds `cache_len_after`; the vote is needed as soon as it overflows
        // the smallest budget (the last layer's).
        self.snap.observing = match self.compressed_budgets(&self.budgets).min() {
            Some(least) => chunk.voters(least, self.snap.window),
            None => 0..0,
        };
    }

    fn after_chunk(&mut self, cache: &mut KvCache, _: &AfterChunk) -> Option<i32> {
        if self.snap.observing.is_empty() {
            return None;
        }
        let budgets = &self.budgets;
        self.snap.compress(cache, &|layer| budgets[layer]);
        None
    }

    fn peak_slots(&self, prompt: usize, chunk: usize, generated: usize) -> usize {
        let budgets = self.layer_budgets(prompt);
        let most = self.compressed_budgets(&budgets).max().unwrap_or(0);
        bounded_peak(most, prompt, chunk, generated, false)
    }

    fn reset(&mut self) {
        self.snap.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::policy::testing;
    use crate::kv::policy::Phase;
    use crate::kv::KvDtype;
    use crate::spec::Spec;

    fn pyramid(spec: &str, n_layer: usize) -> PyramidKv {
        pyramid_over(spec, &vec![false; n_layer])
    }

    /// A pyramid for layers of which those marked `local` slide.
    fn pyramid_over(spec: &str, local: &[bool]) -> PyramidKv {
        let spec: Spec = spec.parse().unwrap();
        let mut params = Params::new(&spec.parts[0]);
        let shape = Shape {
            n_layer: local.len(),
            n_head: 1,
            n_kv_head: 1,
            head_dim: 4,
            local: local.to_vec(),
        };
        PyramidKv::new(&mut params, &shape).unwrap()
    }

    #[test]
    fn layer_budgets_are_kvpress_s() {
        // L = 4000, ratio 0.25: B = 1000, w = 32, β = 20. min = 1000/20 = 50, max = 2000 − 50 =
        // 1950 (below L − w = 3968: no cap); 4000 ≥ 1950 ≥ 50 ≥ 32 holds. steps = 1900/3 =
        // 633.33…: 1950, 1316.67 → 1317, 683.33 → 683, 50. Their mean is B.
        let p = pyramid("pyramid:ratio=0.25", 4);
        assert_eq!(p.layer_budgets(4000), [1950, 1317, 683, 50]);
        // L = 1000, budget 900: min = 45, max = 1755 ≥ L − w = 968, so max = 968 and min =
        // 1800 − 968 = 832; steps = 136/3 = 45.33…: 968, 922.67 → 923, 877.33 → 877, 832.
        let p = pyramid("pyramid:budget=900", 4);
        assert_eq!(p.layer_budgets(1000), [968, 923, 877, 832]);
        // L = 1000, ratio 0.25: min = 250/20 = 12.5 is below the window: SnapKV's 250 each.
        let p = pyramid("pyramid:ratio=0.25", 4);
        assert_eq!(p.layer_budgets(1000), [250; 4]);
        // β = 16, B = 1000, two layers: min = 62.5, max = 1937.5, steps = 1875. Python rounds
        // half to even: 1938 and 62 (half away from zero would give 63 and overshoot B).
        let p = pyramid("pyramid:ratio=0.25,beta=16", 2);
        assert_eq!(p.layer_budgets(4000), [1938, 62]);
        // One layer has no slope: the budget itself.
        assert_eq!(pyramid("pyramid:ratio=0.25", 1).layer_budgets(4000), [1000]);
    }

    #[test]
    fn on_a_hybrid_model_the_pyramid_slopes_over_the_global_layers() {
        // Gemma 3 270M: 18 layers, 5, 11 and 17 global. Three sloped layers at L = 4000,
        // B = 1000: steps = 1900/2 = 950, so 1950, 1000, 50, whose mean is B.
        let local: Vec<bool> = (0..18).map(|l| l % 6 != 5).collect();
        let p = pyramid_over("pyramid:ratio=0.25", &local);
        let budgets = p.layer_budgets(4000);
        assert_eq!([budgets[5], budgets[11], budgets[17]], [1950, 1000, 50]);
        assert_eq!(p.peak_slots(4000, 512, 0), 1950 + 512);
    }

    #[test]
    fn each_layer_keeps_its_own_budget_of_the_best_slots() {
        // Eight tokens, budget 4, window 1, β 2, two layers: min = 4/2 = 2, max = 8 − 2 = 6
        // (below L − w = 7); 8 ≥ 6 ≥ 2 ≥ 1, steps = 4: layer 0 keeps 6, layer 1 keeps 2, the
        // window (slot 7) included.
        let mut p = pyramid("pyramid:budget=4,window=1,kernel=1,beta=2", 2);
        p.begin(8);
        assert_eq!(p.budgets, [6, 2]);
        let mut cache = KvCache::new(KvDtype::F32, 2, 1, 4, 16);
        cache.push_slots(&(0..8).collect::<Vec<i32>>()).unwrap();
        p.before_chunk(&testing::chunk(Phase::PrefillEnd, 0, 8, 0));
        assert!(!p.wants(0, 6) && p.wants(0, 7) && p.wants(1, 7));
        p.observe(0, 0, 0, 7, &[0.3, 0.0, 0.1, 0.2, 0.0, 0.15, 0.05, 0.2]);
        p.observe(1, 0, 0, 7, &[0.1, 0.0, 0.0, 0.0, 0.6, 0.1, 0.0, 0.2]);
        assert_eq!(
            p.after_chunk(&mut cache, &testing::after(Phase::PrefillEnd, 8)),
            None
        );
        assert_eq!(cache.layer_len(0), 6);
        assert_eq!(cache.positions(0, 0), [0, 2, 3, 5, 6, 7]);
        assert_eq!(cache.layer_len(1), 2);
        assert_eq!(cache.positions(1, 0), [4, 7]);
        // The widest layer's budget plus a chunk.
        assert_eq!(p.peak_slots(8, 1, 0), 7);
    }

    #[test]
    fn a_budget_at_or_above_the_input_keeps_everything() {
        let mut p = pyramid("pyramid:budget=100", 2);
        p.begin(8);
        let mut cache = KvCache::new(KvDtype::F32, 2, 1, 4, 16);
        cache.push_slots(&(0..8).collect::<Vec<i32>>()).unwrap();
        p.before_chunk(&testing::chunk(Phase::PrefillEnd, 0, 8, 0));
        assert!(!p.wants(0, 7));
        assert_eq!(
            p.after_chunk(&mut cache, &testing::after(Phase::PrefillEnd, 8)),
            None
        );
        assert_eq!(cache.layer_len(0), 8);
        assert_eq!(cache.layer_len(1), 8);
        assert_eq!(p.peak_slots(8, 512, 4), 12);
    }

    #[test]
    fn spec_names_every_parameter() {
        let p = pyramid("pyramid:ratio=0.5", 2);
        assert_eq!(
            p.spec(),
            "pyramid:ratio=0.5,window=32,kernel=7,pooling=avg,beta=20"
        );
        let p = testing::build("pyramid:budget=64,window=8,kernel=3,pooling=max,beta=4").unwrap();
        assert_eq!(
            p.spec(),
            "pyramid:budget=64,window=8,kernel=3,pooling=max,beta=4"
        );
    }

    #[test]
    fn refuses_bad_parameters_by_name() {
        for bad in [
            "pyramid",
            "pyramid:budget=0",
            "pyramid:ratio=1.5",
            "pyramid:ratio=0",
            "pyramid:budget=64,kernel=4",
            "pyramid:budget=64,window=0",
            "pyramid:budget=64,beta=0",
            "pyramid:budget=64,beta=-1",
            "pyramid:budget=64,size=8",
        ] {
            let err = testing::refusal(bad);
            assert!(err.contains("pyramid"), "{bad}: {err}");
        }
    }
}
