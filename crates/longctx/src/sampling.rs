//! Choosing the next token from logits.
//!
//! The chain is llama.cpp's default order, so the same settings mean the same thing to users
//! coming from it: logit bias → penalties (repetition, frequency, presence) → top-k → top-p →
//! min-p → temperature → draw. Temperature 0 is greedy: the bias and penalties still apply, then
//! the highest logit wins, ties going to the lowest id.
//! Draws come from a seeded generator, so a seed reproduces a run exactly.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::{Error, Result};

/// Sampling settings. `Default` gives llama.cpp's defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Divides the logits before the draw; 0 means greedy.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 turns it off.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability adds up to `top_p`; 1 turns it off.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one; 0 turns it off.
    pub min_p: f32,
    /// Divides positive (multiplies negative) logits of recently seen tokens; 1 turns it off.
    pub repeat_penalty: f32,
    /// How many of the most recent tokens the penalties look at.
    pub repeat_last_n: usize,
    /// Subtracted from a recent token's logit once per time it was seen; 0 turns it off.
    pub frequency_penalty: f32,
    /// Subtracted from a recent token's logit once if it was seen at all; 0 turns it off.
    pub presence_penalty: f32,
    /// Added to the logits of the tokens named, before anything else (OpenAI's `logit_bias`).
    pub logit_bias: Vec<(u32, f32)>,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            logit_bias: Vec::new(),
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Settings that always pick the most likely token.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    /// Rejects settings that have no meaning, naming the option and its valid range.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::InvalidOption(msg));
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad(format!(
                "temperature must be 0 (greedy) or positive, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!(
                "top-p must be in (0, 1] (1 turns it off), got {}",
                self.top_p
            ));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad(format!(
                "min-p must be in [0, 1] (0 turns it off), got {}",
                self.min_p
            ));
        }
        if !(self.repeat_penalty.is_finite() && self.repeat_penalty > 0.0) {
            return bad(format!(
                "repeat penalty must be positive (1 turns it off), got {}",
                self.repeat_penalty
            ));
        }
        for (name, value) in [
            ("frequency penalty", self.frequency_penalty),
            ("presence penalty", self.presence_penalty),
        ] {
            if !value.is_finite() {
                return bad(format!(
                    "{name} must be a finite number (0 turns it off), got {value}"
                ));
            }
        }
        if let Some((id, bias)) = self.logit_bias.iter().find(|(_, b)| b.is_nan()) {
            return bad(format!(
                "the logit bias of token {id} is {bias}; give a number"
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy)]
struct Candidate {
    id: u32,
    logit: f32,
}

/// Picks tokens according to [`SamplingParams`]. Buffers are kept between calls, so sampling
/// allocates only when the vocabulary or penalty window grows.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    candidates: Vec<Candidate>,
    recent: Vec<u32>,
    weights: Vec<f64>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        Ok(Self {
            rng: StdRng::seed_from_u64(params.seed),
            params,
            candidates: Vec::new(),
            recent: Vec::new(),
            weights: Vec::new(),
        })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The next token for `logits` (one per vocabulary entry), given the tokens so far in
    /// `history` (prompt included, as llama.cpp's penalty sees it).
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        self.candidates.clear();
        self.candidates
            .extend(logits.iter().enumerate().map(|(id, &logit)| Candidate {
                id: id as u32,
                logit,
            }));
        for &(id, bias) in &self.params.logit_bias {
            if let Some(c) = self.candidates.get_mut(id as usize) {
                c.logit += bias;
            }
        }
        self.apply_penalties(history);
        if self.params.temperature <= 0.0 || self.candidates.len() <= 1 {
            return argmax(&self.candidates);
        }
        self.top_k();
        self.top_p();
        self.min_p();
        let inv_temp = 1.0 / self.params.temperature;
        for c in &mut self.candidates {
            c.logit *= inv_temp;
        }
        self.draw()
    }

    /// Candidates are still indexed by id here, so each recent token is one lookup. The
    /// arithmetic is llama.cpp's: the repetition factor once per token seen, then the frequency
    /// penalty times its count and the presence penalty once.
    fn apply_penalties(&mut self, history: &[u32]) {
        let SamplingParams {
            repeat_penalty,
            frequency_penalty,
            presence_penalty,
            repeat_last_n,
            ..
        } = self.params;
        let off = repeat_penalty == 1.0 && frequency_penalty == 0.0 && presence_penalty == 0.0;
        if off || repeat_last_n == 0 {
            return;
        }
        let window = &history[history.len().saturating_sub(repeat_last_n)..];
        self.recent.clear();
        self.recent.extend_from_slice(window);
        self.recent.sort_unstable();
        for run in self.recent.chunk_by(|a, b| a == b) {
            let Some(c) = self.candidates.get_mut(run[0] as usize) else {
                continue;
            };
            c.logit = if c.logit > 0.0 {
                c.logit / repeat_penalty
            } else {
                c.logit * repeat_penalty
            };
            c.logit -= run.len() as f32 * frequency_penalty + presence_penalty;
        }
    }

    /// Leaves the candidates sorted by descending logit, which the later stages rely on.
    fn top_k(&mut self) {
        let k = self.params.top_k;
        if k > 0 && k < self.candidates.len() {
            self.candidates.select_nth_unstable_by(k - 1, by_logit_desc);
            self.candidates.truncate(k);
        }
        self.candidates.sort_unstable_by(by_logit_desc);
    }

    fn top_p(&mut self) {
        let p = f64::from(self.params.top_p);
        if p >= 1.0 {
            return;
        }
        self.softmax_weights();
        let total: f64 = self.weights.iter().sum();
        let mut cumulative = 0.0;
        let mut keep = self.candidates.len();
        for (i, w) in self.weights.iter().enumerate() {
            cumulative += w / total;
            if cumulative >= p {
                keep = i + 1;
                break;
            }
        }
        self.candidates.truncate(keep);
    }

    /// Compared on logits: `p_i >= min_p * p_max` is `logit_i >= logit_max + ln(min_p)`.
    fn min_p(&mut self) {
        let min_p = self.params.min_p;
        if min_p <= 0.0 {
            return;
        }
        let Some(max) = self.candidates.first().map(|c| c.logit) else {
            return;
        };
        let threshold = max + min_p.ln();
        let keep = self
            .candidates
            .iter()
            .position(|c| c.logit < threshold)
            .unwrap_or(self.candidates.len())
            .max(1);
        self.candidates.truncate(keep);
    }

    fn draw(&mut self) -> u32 {
        self.softmax_weights();
        let total: f64 = self.weights.iter().sum();
        if !(total.is_finite() && total > 0.0) {
            return argmax(&self.candidates);
        }
        let mut target = self.rng.random::<f64>() * total;
        for (c, w) in self.candidates.iter().zip(&self.weights) {
            target -= w;
            if target < 0.0 {
                return c.id;
            }
        }
        // Rounding can leave a sliver past the last weight; it belongs to the last candidate.
        self.candidates.last().map_or(0, |c| c.id)
    }

    /// Unnormalised probabilities of the candidates, in `weights`.
    fn softmax_weights(&mut self) {
        let max = self
            .candidates
            .iter()
            .map(|c| c.logit)
            .fold(f32::NEG_INFINITY, f32::max);
        self.weights.clear();
        self.weights.extend(
            self.candidates
                .iter()
                .map(|c| f64::from(c.logit - max).exp()),
        );
    }
}

fn by_logit_desc(a: &Candidate, b: &Candidate) -> std::cmp::Ordering {
    b.logit.total_cmp(&a.logit).then(a.id.cmp(&b.id))
}

/// Highest logit, ties to the lowest id; 0 for an empty list.
fn argmax(candidates: &[Candidate]) -> u32 {
    let mut best: Option<Candidate> = None;
    for &c in candidates {
        if best.is_none_or(|b| c.logit > b.logit) {
            best = Some(c);
        }
    }
    best.map_or(0, |c| c.id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repeat_penalty: 1.0,
            seed: 7,
            ..SamplingParams::default()
        }
    }

    /// How often each id is drawn in `n` samples.
    fn histogram(p: SamplingParams, logits: &[f32], history: &[u32], n: usize) -> Vec<usize> {
        let mut s = Sampler::new(p).unwrap();
        let mut counts = vec![0; logits.len()];
        for _ in 0..n {
            counts[s.sample(logits, history) as usize] += 1;
        }
        counts
    }

    #[test]
    fn greedy_takes_the_highest_logit_and_the_lowest_id_on_ties() {
        let mut s = Sampler::new(SamplingParams::greedy()).unwrap();
        assert_eq!(s.sample(&[0.1, 2.0, -1.0, 1.9], &[]), 1);
        assert_eq!(s.sample(&[0.5, 3.0, 3.0, 3.0], &[]), 1);
        assert_eq!(s.sample(&[-5.0], &[]), 0);
    }

    #[test]
    fn repeat_penalty_divides_positive_and_multiplies_negative_logits_once() {
        let mut p = SamplingParams::greedy();
        p.repeat_penalty = 2.0;
        let mut s = Sampler::new(p.clone()).unwrap();
        // 3.0 / 2 = 1.5 < 1.6: the seen token loses, however often it was seen.
        assert_eq!(s.sample(&[3.0, 1.6], &[0, 0, 0, 0]), 1);
        // -1.0 * 2 = -2.0 < -1.5.
        assert_eq!(s.sample(&[-1.0, -1.5], &[0]), 1);
        // Tokens outside the window are not penalised.
        p.repeat_last_n = 1;
        let mut s = Sampler::new(p).unwrap();
        assert_eq!(s.sample(&[3.0, 1.6], &[0, 1]), 0);
        // Ids past the vocabulary are ignored rather than indexing out of bounds.
        assert_eq!(s.sample(&[3.0, 1.6], &[99]), 0);
    }

    #[test]
    fn frequency_penalty_counts_each_sighting_and_presence_penalty_counts_once() {
        let mut p = SamplingParams::greedy();
        p.frequency_penalty = 0.5;
        let mut s = Sampler::new(p).unwrap();
        // Token 0 seen three times: 3.0 - 3 * 0.5 = 1.5 < 1.6.
        assert_eq!(s.sample(&[3.0, 1.6], &[0, 0, 0]), 1);
        // Seen twice: 3.0 - 1.0 = 2.0 > 1.6.
        assert_eq!(s.sample(&[3.0, 1.6], &[0, 0]), 0);
        let mut p = SamplingParams::greedy();
        p.presence_penalty = 1.0;
        let mut s = Sampler::new(p).unwrap();
        // However often it was seen, token 0 loses 1.0: 2.5 - 1.0 = 1.5 < 1.6.
        assert_eq!(s.sample(&[2.5, 1.6], &[0, 0, 0, 0, 0]), 1);
        assert_eq!(s.sample(&[2.7, 1.6], &[0, 0, 0, 0, 0]), 0);
        // A negative penalty favours what was seen.
        let mut p = SamplingParams::greedy();
        p.presence_penalty = -2.0;
        let mut s = Sampler::new(p).unwrap();
        assert_eq!(s.sample(&[1.0, 2.5], &[0]), 0);
    }

    #[test]
    fn penalties_combine_as_in_llama_cpp() {
        let mut p = SamplingParams::greedy();
        p.repeat_penalty = 2.0;
        p.frequency_penalty = 0.25;
        p.presence_penalty = 0.5;
        let mut s = Sampler::new(p).unwrap();
        // 4.0 / 2 - 2 * 0.25 - 0.5 = 1.0, just under 1.01; 1.0 + anything would win.
        assert_eq!(s.sample(&[4.0, 1.01], &[0, 0]), 1);
        assert_eq!(s.sample(&[4.0, 0.99], &[0, 0]), 0);
    }

    #[test]
    fn logit_bias_shifts_the_named_tokens_before_anything_else() {
        let mut p = SamplingParams::greedy();
        p.logit_bias = vec![(0, -100.0), (2, 0.5)];
        let mut s = Sampler::new(p.clone()).unwrap();
        // 0 is banned; 2 climbs from 1.8 to 2.3 past 1's 2.0.
        assert_eq!(s.sample(&[9.0, 2.0, 1.8], &[]), 2);
        // Ids past the vocabulary are ignored.
        p.logit_bias = vec![(99, 100.0)];
        let mut s = Sampler::new(p).unwrap();
        assert_eq!(s.sample(&[1.0, 2.0], &[]), 1);
    }

    #[test]
    fn top_k_keeps_only_the_k_best() {
        let mut p = params(1.0);
        p.top_k = 2;
        let counts = histogram(p, &[1.0, 3.0, 0.0, 2.9], &[], 2000);
        assert_eq!(counts[0] + counts[2], 0, "{counts:?}");
        assert!(counts[1] > 0 && counts[3] > 0, "{counts:?}");
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_p() {
        // Probabilities 0.5, 0.3, 0.2 (logits are their logs).
        let logits = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
        let mut p = params(1.0);
        p.top_p = 0.7;
        let counts = histogram(p.clone(), &logits, &[], 2000);
        assert_eq!(counts[2], 0, "{counts:?}");
        assert!(counts[0] > counts[1] && counts[1] > 0, "{counts:?}");
        p.top_p = 0.4;
        let counts = histogram(p, &logits, &[], 200);
        assert_eq!(counts, [200, 0, 0]);
    }

    #[test]
    fn min_p_drops_tokens_below_a_fraction_of_the_best() {
        let logits = [0.5f32.ln(), 0.3f32.ln(), 0.04f32.ln(), 0.16f32.ln()];
        let mut p = params(1.0);
        p.min_p = 0.1; // threshold 0.05: only 0.04 goes
        let counts = histogram(p, &logits, &[], 3000);
        assert_eq!(counts[2], 0, "{counts:?}");
        assert!(
            counts[0] > 0 && counts[1] > 0 && counts[3] > 0,
            "{counts:?}"
        );
    }

    #[test]
    fn temperature_sharpens_and_flattens() {
        let logits = [1.0, 0.0];
        let cold = histogram(params(0.1), &logits, &[], 2000);
        let hot = histogram(params(10.0), &logits, &[], 2000);
        // e^10 : 1 leaves the second token almost never drawn when cold.
        assert!(cold[1] < 10, "{cold:?}");
        // e^0.1 : 1 is close to even when hot.
        assert!(hot[1] > 800, "{hot:?}");
    }

    #[test]
    fn draws_follow_the_distribution() {
        let logits = [0.6f32.ln(), 0.3f32.ln(), 0.1f32.ln()];
        let counts = histogram(params(1.0), &logits, &[], 10_000);
        let expected = [6000.0, 3000.0, 1000.0];
        for (c, e) in counts.iter().zip(expected) {
            assert!((*c as f64 - e).abs() < 0.1 * e, "{counts:?}");
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_tokens() {
        let logits: Vec<f32> = (0..500).map(|i| ((i * 37 % 101) as f32) / 20.0).collect();
        let run = |seed| {
            let p = SamplingParams {
                seed,
                repeat_penalty: 1.1,
                ..SamplingParams::default()
            };
            let mut s = Sampler::new(p).unwrap();
            let mut history = Vec::new();
            for _ in 0..50 {
                let t = s.sample(&logits, &history);
                history.push(t);
            }
            history
        };
        assert_eq!(run(3), run(3));
        assert_ne!(run(3), run(4));
    }

    #[test]
    fn meaningless_settings_are_rejected() {
        let cases = [
            SamplingParams {
                temperature: -0.5,
                ..SamplingParams::default()
            },
            SamplingParams {
                temperature: f32::NAN,
                ..SamplingParams::default()
            },
            SamplingParams {
                top_p: 0.0,
                ..SamplingParams::default()
            },
            SamplingParams {
                top_p: 1.5,
                ..SamplingParams::default()
            },
            SamplingParams {
                min_p: -0.1,
                ..SamplingParams::default()
            },
            SamplingParams {
                repeat_penalty: 0.0,
                ..SamplingParams::default()
            },
            SamplingParams {
                frequency_penalty: f32::INFINITY,
                ..SamplingParams::default()
            },
            SamplingParams {
                presence_penalty: f32::NAN,
                ..SamplingParams::default()
            },
            SamplingParams {
                logit_bias: vec![(3, f32::NAN)],
                ..SamplingParams::default()
            },
        ];
        for p in cases {
            assert!(
                matches!(Sampler::new(p.clone()), Err(Error::InvalidOption(_))),
                "{p:?}"
            );
        }
        assert!(Sampler::new(SamplingParams::default()).is_ok());
    }

    #[test]
    fn empty_logits_do_not_panic() {
        let mut s = Sampler::new(SamplingParams::default()).unwrap();
        assert_eq!(s.sample(&[], &[1, 2]), 0);
    }
}
