//! StreamingLLM — Xiao et al., "Efficient Streaming Language Models with Attention Sinks",
//! ICLR 2024 (arXiv 2309.17453); mit-han-lab/streaming-llm `kv_cache.py`, `pos_shift`.
//!
//! Keeps the first `sinks` tokens (the attention sinks) and the most recent `window`, evicting
//! the middle after every chunk and every decoded token. As in the paper, positions are taken
//! inside the cache: kept tokens move to slots 0, 1, … and the next token comes right after
//! them, so the model never sees a distance above sinks + window. The paper re-rotates every
//! cached key at every step; rotations compose, so moving each kept key by (new − old) once, on
//! eviction, is the same (HF SinkCache and kvpress's KeyRerotationPress do this too).
//!
//! That move still re-rotates the whole window, so evicting one token per decoded token costs
//! O(window) rotations per token: at a 1k window it took decode at depth 8k from 70 to 19 tok/s.
//! While decoding, the cache therefore grows `step` tokens past the window before the oldest are
//! evicted at once (llama.cpp's context shift batches the same way); `step=1` is the paper's
//! schedule exactly. Prompt chunks are always cut back to sinks + window.

use super::policy::{AfterChunk, Budget, KvPolicy, Phase, Shape};
use super::{AttentionObserver, KvCache};
use crate::spec::{Params, SpecPart, MAX_TOKENS};
use crate::{Error, Result};

pub struct Streaming {
    sinks: usize,
    window: usize,
    /// `ratio=R`: the cache (sinks included) keeps this fraction of each prefill's input, the
    /// window resolved when the input's length is known.
    ratio: Option<Budget>,
    /// Decoded tokens the cache may hold past the window before an eviction.
    step: usize,
}

pub fn build(part: &SpecPart, _: &Shape) -> Result<Box<dyn KvPolicy>> {
    let mut params = Params::new(part);
    let sinks = params.get_in("sinks", 4usize, 0..=MAX_TOKENS)?;
    let window = params.optional_in::<usize>("window", 1..=MAX_TOKENS)?;
    let given = |key: &str| part.params.iter().any(|(k, _)| k == key);
    let budget = if given("budget") || given("ratio") {
        if window.is_some() {
            return Err(Error::InvalidOption(
                "`streaming` takes `window=N` or a budget (`budget=N`, `ratio=R`), not both".into(),
            ));
        }
        Some(Budget::from_params(&mut params, "streaming")?)
    } else {
        None
    };
    let step = params.get_in("step", 64usize, 1..=MAX_TOKENS)?;
    params.finish(&["sinks", "window", "budget", "ratio", "step"])?;
    let (window, ratio) = match (window, budget) {
        (Some(w), _) => (w, None),
        // A budget names the whole cache, sinks included, like the other policies' budgets.
        (None, Some(Budget::Tokens(b))) if b > sinks => (b - sinks, None),
        (None, Some(Budget::Tokens(b))) => {
            return Err(Error::InvalidOption(format!(
                "`streaming:budget={b}` leaves no room after its {sinks} sink tokens"
            )))
        }
        (None, Some(ratio)) => (usize::MAX, Some(ratio)),
        (None, None) => (2044, None),
    };
    if window == 0 {
        return Err(Error::InvalidOption(
            "`streaming:window=0` keeps no recent token; the window must be at least 1".into(),
        ));
    }
    if step == 0 {
        return Err(Error::InvalidOption(
            "`streaming:step=0`: decoded tokens are evicted every `step` tokens; use at least 1"
                .into(),
        ));
    }
    Ok(Box::new(Streaming {
        sinks,
        window,
        ratio,
        step,
    }))
}

impl Streaming {
    /// Slots kept out of `len`: the sinks and the recent window.
    fn kept(&self, len: usize) -> Vec<usize> {
        (0..self.sinks.min(len))
            .chain(len.saturating_sub(self.window).max(self.sinks)..len)
            .collect()
    }

    /// The window for an input of `tokens`: the fixed one, or what the ratio leaves after the
    /// sinks (at least one token).
    fn window_for(&self, tokens: usize) -> usize {
        match self.ratio {
            Some(ratio) => ratio.resolve(tokens).saturating_sub(self.sinks).max(1),
            None => self.window,
        }
    }
}

impl AttentionObserver for Streaming {}

impl KvPolicy for Streaming {
    fn spec(&self) -> String {
        match self.ratio {
            Some(ratio) => format!("streaming:sinks={},{ratio},step={}", self.sinks, self.step),
            None => format!(
                "streaming:sinks={},window={},step={}",
                self.sinks, self.window, self.step
            ),
        }
    }

    fn begin(&mut self, tokens: usize) {
        self.window = self.window_for(tokens);
    }

    fn after_chunk(&mut self, cache: &mut KvCache, step: &AfterChunk) -> Option<i32> {
        let len = cache.len();
        let slack = if step.phase == Phase::Decode {
            self.step - 1
        } else {
            0
        };
        if len <= self.sinks + self.window + slack {
            return None;
        }
        cache.retain(&self.kept(len));
        cache.move_to_slots(step.frequencies, step.rope_style);
        Some(cache.len() as i32)
    }

    fn repositions(&self) -> bool {
        true
    }

    fn peak_slots(&self, prompt: usize, chunk: usize, generated: usize) -> usize {
        let budget = self.sinks + self.window_for(prompt);
        let decode = (prompt.min(budget) + generated).min(budget + self.step);
        prompt.min(budget + chunk).max(decode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::{KvData, KvDtype};
    use crate::positions::{RopeStyle, RotaryTable};

    #[test]
    fn keeps_sinks_and_the_recent_window_and_moves_them_into_the_cache() {
        let mut p = Streaming {
            sinks: 2,
            window: 3,
            ratio: None,
            step: 1,
        };
        assert_eq!(p.kept(10), [0, 1, 7, 8, 9]);
        assert_eq!(p.kept(4), [0, 1, 2, 3]);

        let freqs = [0.5, 0.05];
        let raw = [1.0f32, 0.0, 0.0, 1.0];
        let rotated = |pos: i32| {
            let mut t = RotaryTable::default();
            t.fill(&[pos], &freqs, 1.0);
            let mut k = raw.to_vec();
            t.rotate(&mut k, 0, RopeStyle::Normal);
            k
        };
        let mut cache = KvCache::new(KvDtype::F32, 1, 1, 4, 16);
        let positions: Vec<i32> = (0..10).collect();
        cache.push_slots(&positions).unwrap();
        for (slot, &pos) in positions.iter().enumerate() {
            cache.write(0, 0, slot, &rotated(pos), &[pos as f32; 4]);
        }
        let step = AfterChunk {
            phase: super::super::policy::Phase::Decode,
            guide: false,
            next_position: 10,
            frequencies: &freqs,
            rope_style: RopeStyle::Normal,
        };
        assert_eq!(p.after_chunk(&mut cache, &step), Some(5));
        assert_eq!(cache.positions(0, 0), [0, 1, 2, 3, 4]);
        let (KvData::F32(k), KvData::F32(v)) = (&cache.k, &cache.v) else {
            unreachable!()
        };
        for (slot, was) in [(2usize, 7.0f32), (4, 9.0)] {
            let at = cache.offset(0, 0, slot);
            assert_eq!(v[at], was, "slot {slot} holds the token that was at {was}");
            for (a, b) in k[at..at + 4].iter().zip(rotated(slot as i32)) {
                assert!(
                    (a - b).abs() < 1e-5,
                    "slot {slot}: key as if rotated at {slot}"
                );
            }
        }
    }

    #[test]
    fn decoding_evicts_once_per_step_tokens() {
        let mut p = Streaming {
            sinks: 2,
            window: 3,
            ratio: None,
            step: 4,
        };
        let mut cache = KvCache::new(KvDtype::F32, 1, 1, 4, 16);
        let step = |phase| AfterChunk {
            phase,
            guide: false,
            next_position: 0,
            frequencies: &[1.0, 1.0],
            rope_style: RopeStyle::Normal,
        };
        cache.push_slots(&(0..8).collect::<Vec<i32>>()).unwrap();
        // Up to window + step − 1 decoded tokens stay; the step-th evicts back to the window.
        assert_eq!(p.after_chunk(&mut cache, &step(Phase::Decode)), None);
        cache.push_slots(&[8]).unwrap();
        assert_eq!(p.after_chunk(&mut cache, &step(Phase::Decode)), Some(5));
        assert_eq!(p.peak_slots(5, 512, 100), 9);
        // A prompt chunk is cut back at once.
        cache.push_slots(&[5, 6]).unwrap();
        assert_eq!(p.after_chunk(&mut cache, &step(Phase::Prefill)), Some(5));
    }

    /// `ratio=R` keeps that fraction of each prefill's input, sinks included, as the other
    /// policies' ratios do; a window and a budget together are refused.
    #[test]
    fn a_ratio_resolves_against_the_input() {
        use super::super::policy::testing::{build, refusal};
        let mut p = build("streaming:ratio=0.25").unwrap();
        assert_eq!(p.spec(), "streaming:sinks=4,ratio=0.25,step=64");
        assert_eq!(p.peak_slots(1000, 100, 0), 250 + 100);
        p.begin(1000);
        let mut cache = KvCache::new(KvDtype::F32, 1, 1, 4, 1024);
        cache.push_slots(&(0..1000).collect::<Vec<i32>>()).unwrap();
        let step = AfterChunk {
            phase: Phase::Prefill,
            guide: false,
            next_position: 1000,
            frequencies: &[1.0, 1.0],
            rope_style: RopeStyle::Normal,
        };
        assert_eq!(p.after_chunk(&mut cache, &step), Some(250));
        assert_eq!(cache.positions(0, 0).len(), 250);
        assert!(refusal("streaming:window=8,ratio=0.5").contains("not both"));
        assert!(refusal("streaming:ratio=1.5").contains("above 0 and at most 1 (got 1.5)"));
        assert!(refusal("streaming:budget=4").contains("no room"));
    }

    #[test]
    fn a_window_covering_the_input_keeps_everything_in_place() {
        let mut p = Streaming {
            sinks: 4,
            window: 100,
            ratio: None,
            step: 1,
        };
        let mut cache = KvCache::new(KvDtype::F32, 1, 1, 4, 16);
        cache.push_slots(&[0, 1, 2]).unwrap();
        let step = AfterChunk {
            phase: super::super::policy::Phase::Prefill,
            guide: false,
            next_position: 3,
            frequencies: &[1.0, 1.0],
            rope_style: RopeStyle::Normal,
        };
        assert_eq!(p.after_chunk(&mut cache, &step), None);
        assert_eq!(cache.positions(0, 0), [0, 1, 2]);
    }
}
