//! Finch — Corallo & Papotti, "FINCH: Prompt-guided Key-Value Cache Compression for Large
//! Language Models", TACL 12 (2024), aclanthology 2024.tacl-1.83; kvpress `FinchPress`, which
//! the authors validated against their code.
//!
//! SnapKV keeps what the end of the prompt attends to, so it only knows what matters once the
//! question has been read. Finch reads the context chunk by chunk with the question behind every
//! chunk: the question's queries vote for the context slots (SnapKV's vote, with the question as
//! the observation window), each KV head keeps its `budget` best, and the question's slots are
//! dropped again before the next chunk (the session feeds them,
//! [`crate::session::Session::prefill_guided`]). A context of any length is so compressed into a
//! fixed budget, conditioned on the question, and never needs more room than budget + chunk +
//! question. Fed for real at the end, the question votes once more over what is left and is
//! kept, like SnapKV's window, the budget counting it.
//!
//! The kept keys are moved to positions 0, 1, … (kvpress `rerotate_keys=True`, the paper's
//! setting), so the next chunk follows them without a gap and the model never sees a distance
//! beyond the cache. Votes are normalised as kvpress does by default (`normalize_scores`): a
//! query spreads its weights over every slot it sees, so later queries give each slot less; each
//! query's weights are scaled by that count so that every question token votes alike (kvpress
//! multiplies by the query's index, one less than the count here). The authors' selection has
//! no pooling, hence `kernel` 1 by default; SnapKV's pooling stays available.
//!
//! Without a question (a plain prompt) it is chunked SnapKV, with each chunk's last `window`
//! queries voting and the same normalisation and re-rotation.

use super::policy::{AfterChunk, ChunkInfo, KvPolicy, Phase, Shape};
use super::snapkv::SnapKv;
use super::{AttentionObserver, KvCache};
use crate::spec::{Params, SpecPart};
use crate::Result;

/// Where the current prompt stands with respect to a question.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// No question: each chunk's last `window` queries vote.
    Plain,
    /// The question has guided the compression of the context so far; the next prompt is the
    /// question fed for real.
    Guided,
    /// The question is being fed for real: it votes once more and is kept.
    Answering,
}

pub struct Finch {
    snap: SnapKv,
    stage: Stage,
    /// First position of the question while its chunks come in: all of them vote, and the
    /// compression waits for the last.
    question: Option<i32>,
}

pub fn build(part: &SpecPart, shape: &Shape) -> Result<Box<dyn KvPolicy>> {
    let mut params = Params::new(part);
    let policy = Finch::new(&mut params, shape)?;
    params.finish(&["budget", "ratio", "window", "kernel", "pooling"])?;
    Ok(Box::new(policy))
}

impl Finch {
    /// Reads `budget|ratio`, `window` (32, the voters of a prompt without a question), `kernel`
    /// (1: no pooling) and `pooling` (avg).
    pub fn new(params: &mut Params, shape: &Shape) -> Result<Self> {
        Ok(Self {
            snap: SnapKv::named(params, shape, "finch", 1)?,
            stage: Stage::Plain,
            question: None,
        })
    }

    /// After a guide chunk: every KV head keeps its best context slots, up to the budget, and
    /// the question (the last slots, all of them voters) goes.
    fn drop_question(&mut self, cache: &mut KvCache) {
        let question = self.snap.observing.len();
        for layer in cache.compressed_layers().collect::<Vec<_>>() {
            let context = cache.layer_len(layer).saturating_sub(question);
            let keep = self.snap.keep.min(context);
            let kept: Vec<Vec<usize>> = (0..cache.n_kv_head)
                .map(|h| {
                    let votes = self.snap.votes.get(layer, h, context);
                    self.snap.select(&votes, context, 0, keep)
                })
                .collect();
            cache.retain_layer(layer, &kept);
        }
        self.snap.votes.clear();
        self.snap.observing = 0..0;
    }
}

impl AttentionObserver for Finch {
    fn wants(&self, layer: usize, position: i32) -> bool {
        self.snap.wants(layer, position)
    }

    fn observe(&self, layer: usize, _head: usize, kv_head: usize, _: i32, weights: &[f32]) {
        let seen = weights.len() as f32;
        self.snap.votes.add_scaled(layer, kv_head, weights, seen);
    }
}

impl KvPolicy for Finch {
    fn spec(&self) -> String {
        format!(
            "finch:{},window={},kernel={},pooling={}",
            self.snap.budget,
            self.snap.window,
            self.snap.kernel,
            self.snap.pooling.name()
        )
    }

    fn begin(&mut self, tokens: usize) {
        self.stage = match self.stage {
            // The session begins the question's own prompt with only it and the compressed
            // context: the budget stays the one resolved for the whole input.
            Stage::Guided => Stage::Answering,
            _ => {
                self.snap.keep = self.snap.budget.resolve(tokens);
                Stage::Plain
            }
        };
        self.question = None;
    }

    fn before_chunk(&mut self, chunk: &ChunkInfo) {
        let positions = &chunk.positions;
        self.snap.observing = if chunk.phase == Phase::Decode {
            0..0
        } else if chunk.guide || self.stage == Stage::Answering {
            *self.question.get_or_insert(positions.start)..positions.end
        } else if chunk.cache_len_after > self.snap.keep {
            chunk.last(self.snap.window)
        } else {
            0..0
        };
    }

    fn after_chunk(&mut self, cache: &mut KvCache, step: &AfterChunk) -> Option<i32> {
        if self.snap.observing.is_empty()
            || (self.question.is_some() && step.phase == Phase::Prefill)
        {
            return None;
        }
        if step.guide {
            self.drop_question(cache);
            self.stage = Stage::Guided;
        } else {
            let keep = self.snap.keep;
            self.snap.compress(cache, &|_| keep);
            self.stage = Stage::Plain;
        }
        self.question = None;
        cache.move_to_slots(step.frequencies, step.rope_style);
        Some(cache.len() as i32)
    }

    fn peak_slots(&self, prompt: usize, chunk: usize, generated: usize) -> usize {
        self.snap.peak_slots(prompt, chunk, generated)
    }

    fn reset(&mut self) {
        self.snap.reset();
        self.stage = Stage::Plain;
        self.question = None;
    }

    fn question_guided(&self) -> bool {
        true
    }

    fn repositions(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::policy::testing;
    use crate::kv::{KvData, KvDtype};
    use crate::positions::{RopeStyle, RotaryTable};

    const FREQS: [f64; 2] = [0.5, 0.05];
    const RAW: [f32; 4] = [1.0, 0.0, 0.0, 1.0];

    fn finch(spec: &str) -> Finch {
        let spec: crate::spec::Spec = spec.parse().unwrap();
        let mut params = Params::new(&spec.parts[0]);
        let shape = Shape {
            n_layer: 1,
            n_head: 1,
            n_kv_head: 1,
            head_dim: 4,
            local: Vec::new(),
        };
        Finch::new(&mut params, &shape).unwrap()
    }

    /// The same key rotated at `pos`, as the forward pass caches it.
    fn rotated(pos: i32) -> Vec<f32> {
        let mut t = RotaryTable::default();
        t.fill(&[pos], &FREQS, 1.0);
        let mut k = RAW.to_vec();
        t.rotate(&mut k, 0, RopeStyle::Normal);
        k
    }

    /// Appends tokens at `positions`, each slot's value naming its token.
    fn feed(cache: &mut KvCache, positions: std::ops::Range<i32>, token: i32) {
        let positions: Vec<i32> = positions.collect();
        cache.push_slots(&positions).unwrap();
        let len = cache.layer_len(0);
        for (i, &p) in positions.iter().enumerate() {
            let slot = len - positions.len() + i;
            cache.write(0, 0, slot, &rotated(p), &[(token + i as i32) as f32; 4]);
        }
    }

    fn chunk(
        phase: Phase,
        positions: std::ops::Range<i32>,
        cached: usize,
        guide: bool,
    ) -> ChunkInfo {
        let len = positions.len();
        ChunkInfo {
            phase,
            positions,
            cache_len_after: cached + len,
            guide,
        }
    }

    fn after(phase: Phase, next_position: i32, guide: bool) -> AfterChunk<'static> {
        AfterChunk {
            phase,
            guide,
            next_position,
            frequencies: &FREQS,
            rope_style: RopeStyle::Normal,
        }
    }

    /// The tokens the cache holds (by their values) and whether every key sits, rotated, at
    /// the position its slot names, which is its slot.
    fn held(cache: &KvCache) -> Vec<i32> {
        assert_eq!(
            cache.positions(0, 0),
            (0..cache.layer_len(0) as i32).collect::<Vec<i32>>(),
            "positions 0..kept"
        );
        let (KvData::F32(k), KvData::F32(v)) = (&cache.k, &cache.v) else {
            unreachable!()
        };
        (0..cache.layer_len(0))
            .map(|slot| {
                let at = cache.offset(0, 0, slot);
                for (a, b) in k[at..at + 4].iter().zip(rotated(slot as i32)) {
                    assert!((a - b).abs() < 1e-5, "slot {slot}: key rotated at {slot}");
                }
                v[at] as i32
            })
            .collect()
    }

    #[test]
    fn a_guide_chunk_keeps_the_context_the_question_votes_for_and_drops_the_question() {
        let mut p = finch("finch:budget=3");
        assert!(p.question_guided() && p.repositions());
        // Six context tokens (values 0..6) and a question of two (values 100, 101).
        p.begin(8);
        let mut cache = KvCache::new(KvDtype::F32, 1, 1, 4, 16);
        feed(&mut cache, 0..6, 0);
        p.before_chunk(&chunk(Phase::PrefillEnd, 6..8, 6, true));
        feed(&mut cache, 6..8, 100);
        assert!(p.wants(0, 6) && p.wants(0, 7));
        // The question token at 6 sees 7 slots, the one at 7 sees 8: normalised, slot 5's .19
        // from the later query (×8 = 1.52) outweighs slot 3's .2 from the earlier (×7 = 1.4),
        // which the raw sums would rank the other way.
        p.observe(0, 0, 0, 6, &[0.50, 0.05, 0.0, 0.20, 0.0, 0.0, 0.25]);
        p.observe(0, 0, 0, 7, &[0.0, 0.46, 0.0, 0.0, 0.0, 0.19, 0.15, 0.20]);
        assert_eq!(
            p.after_chunk(&mut cache, &after(Phase::PrefillEnd, 8, true)),
            Some(3)
        );
        assert_eq!(held(&cache), [0, 1, 5]);

        // The next chunk of context follows at position 3 and is compressed the same way.
        feed(&mut cache, 3..5, 6);
        p.before_chunk(&chunk(Phase::PrefillEnd, 5..7, 5, true));
        feed(&mut cache, 5..7, 100);
        p.observe(0, 0, 0, 5, &[0.0, 0.3, 0.0, 0.0, 0.5, 0.2]);
        p.observe(0, 0, 0, 6, &[0.4, 0.2, 0.0, 0.0, 0.2, 0.1, 0.1]);
        assert_eq!(
            p.after_chunk(&mut cache, &after(Phase::PrefillEnd, 7, true)),
            Some(3)
        );
        assert_eq!(held(&cache), [0, 1, 7]);

        // The question fed for real votes once more and is kept, within the budget.
        p.begin(5);
        p.before_chunk(&chunk(Phase::PrefillEnd, 3..5, 3, false));
        feed(&mut cache, 3..5, 100);
        assert!(p.wants(0, 3) && p.wants(0, 4));
        p.observe(0, 0, 0, 3, &[0.1, 0.1, 0.6, 0.2]);
        p.observe(0, 0, 0, 4, &[0.3, 0.0, 0.2, 0.2, 0.3]);
        assert_eq!(
            p.after_chunk(&mut cache, &after(Phase::PrefillEnd, 5, false)),
            Some(3)
        );
        assert_eq!(held(&cache), [7, 100, 101]);
    }

    #[test]
    fn a_question_longer_than_a_chunk_votes_whole_before_anything_goes() {
        let mut p = finch("finch:budget=2");
        p.begin(7);
        let mut cache = KvCache::new(KvDtype::F32, 1, 1, 4, 16);
        feed(&mut cache, 0..4, 0);
        p.before_chunk(&chunk(Phase::Prefill, 4..6, 4, true));
        feed(&mut cache, 4..6, 100);
        p.observe(0, 0, 0, 4, &[0.0, 0.0, 0.0, 0.9, 0.1]);
        p.observe(0, 0, 0, 5, &[0.0, 0.0, 0.0, 0.9, 0.0, 0.1]);
        assert_eq!(
            p.after_chunk(&mut cache, &after(Phase::Prefill, 6, true)),
            None
        );
        assert_eq!(cache.layer_len(0), 6);
        p.before_chunk(&chunk(Phase::PrefillEnd, 6..7, 6, true));
        feed(&mut cache, 6..7, 102);
        assert!(p.wants(0, 4) && p.wants(0, 6));
        p.observe(0, 0, 0, 6, &[0.0, 0.0, 0.9, 0.0, 0.0, 0.0, 0.1]);
        assert_eq!(
            p.after_chunk(&mut cache, &after(Phase::PrefillEnd, 7, true)),
            Some(2)
        );
        assert_eq!(held(&cache), [2, 3]);
    }

    #[test]
    fn without_a_question_it_is_chunked_snapkv_moved_to_the_front() {
        let mut p = finch("finch:budget=3,window=1");
        p.begin(6);
        let mut cache = KvCache::new(KvDtype::F32, 1, 1, 4, 16);
        p.before_chunk(&chunk(Phase::PrefillEnd, 0..6, 0, false));
        feed(&mut cache, 0..6, 0);
        assert!(!p.wants(0, 4) && p.wants(0, 5));
        p.observe(0, 0, 0, 5, &[0.1, 0.0, 0.5, 0.0, 0.3, 0.1]);
        assert_eq!(
            p.after_chunk(&mut cache, &after(Phase::PrefillEnd, 6, false)),
            Some(3)
        );
        assert_eq!(held(&cache), [2, 4, 5]);
        // Decoding evicts nothing and moves nothing.
        p.before_chunk(&chunk(Phase::Decode, 3..4, 3, false));
        feed(&mut cache, 3..4, 50);
        assert!(!p.wants(0, 3));
        assert_eq!(
            p.after_chunk(&mut cache, &after(Phase::Decode, 4, false)),
            None
        );
        assert_eq!(held(&cache), [2, 4, 5, 50]);
    }

    #[test]
    fn a_budget_at_or_above_the_input_keeps_everything() {
        let mut p = finch("finch:budget=10,window=1");
        p.begin(6);
        let mut cache = KvCache::new(KvDtype::F32, 1, 1, 4, 16);
        p.before_chunk(&chunk(Phase::PrefillEnd, 0..6, 0, false));
        feed(&mut cache, 0..6, 0);
        assert!(!p.wants(0, 5));
        assert_eq!(
            p.after_chunk(&mut cache, &after(Phase::PrefillEnd, 6, false)),
            None
        );
        assert_eq!(held(&cache), [0, 1, 2, 3, 4, 5]);
        assert_eq!(p.peak_slots(6, 512, 2), 8);
        // Guided, the whole context stays and only the question goes.
        let mut p = finch("finch:budget=10");
        p.begin(8);
        p.before_chunk(&chunk(Phase::PrefillEnd, 6..8, 6, true));
        feed(&mut cache, 6..8, 100);
        p.observe(0, 0, 0, 6, &[0.2; 7]);
        assert_eq!(
            p.after_chunk(&mut cache, &after(Phase::PrefillEnd, 8, true)),
            Some(6)
        );
        assert_eq!(held(&cache), [0, 1, 2, 3, 4, 5]);
    }

    #[test]
    fn spec_names_every_parameter() {
        assert_eq!(
            finch("finch:ratio=0.1").spec(),
            "finch:ratio=0.1,window=32,kernel=1,pooling=avg"
        );
        let p = testing::build("finch:budget=64,window=8,kernel=5,pooling=max").unwrap();
        assert_eq!(p.spec(), "finch:budget=64,window=8,kernel=5,pooling=max");
    }

    #[test]
    fn refuses_bad_parameters_by_name() {
        for bad in [
            "finch",
            "finch:budget=0",
            "finch:ratio=1.01",
            "finch:budget=64,kernel=2",
            "finch:budget=64,window=0",
            "finch:budget=64,pooling=min",
            "finch:budget=64,beta=20",
        ] {
            let err = testing::refusal(bad);
            assert!(err.contains("finch"), "{bad}: {err}");
        }
    }
}
