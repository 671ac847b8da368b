//! STRING (An et al., "Why Does the Effective Context Length of LLMs Fall Short?",
//! arXiv:2410.18745, §4.1; HKUNLP/STRING `string_for_llama.py`). Models are trained on few long
//! distances, so they use distant tokens badly even inside their trained length L. STRING drops
//! the `shift` (S) longest, least-trained distances: a key at distance d = i − j < S is seen as
//! trained, and a key at d ≥ S is seen from the query moved to i − S + W (`window`, W), at
//! distance d − S + W, among the well-trained ones; keys stay where they are. Both kinds of scores
//! go through one softmax (the code's two flash passes merged by log-sum-exp are the same thing).
//! Distances never exceed L, so the scheme does not extrapolate: the context must fit in L.
//!
//! Two details of the released code, and what is done here:
//! * `replace_with_string` multiplies cos and sin by 0.1·ln 2 + 1 ≈ 1.0693 for queries and keys
//!   of both passes ("STRING will make the attention map smooth, we use the attention_factor to
//!   recover it, similar with Yarn"), so every logit grows by ≈ 1.143. The paper does not mention
//!   it; its results come from that code, so it is the default, and `attention_factor=1` gives
//!   the paper's formula alone.
//! * Its prefill counts the key at d = S in both flash passes (`window_size=[S, 0]` includes it,
//!   and so does the shifted causal pass); its decoding, like the paper, splits at d < S and
//!   d ≥ S, which is what is done here, in prefill too.

use super::{Base, FarPositions, ModelRope, PositionScheme, RotaryTable, ATTENTION_FACTOR};
use crate::spec::{Params, SpecPart, MAX_TOKENS};
use crate::{Error, Result};

pub struct StringScheme {
    rope: ModelRope,
    shift: usize,
    window: usize,
    attention_factor: f32,
    trained_ctx: usize,
}

pub fn build(part: &SpecPart, base: &Base, n_ctx: usize) -> Result<Box<dyn PositionScheme>> {
    let trained = base.trained_ctx;
    let mut params = Params::new(part);
    let shift: usize = params.get_in("shift", trained / 3, 1..=MAX_TOKENS)?;
    let window: usize = params.get_in("window", 128, 0..=MAX_TOKENS)?;
    let attention_factor: f64 =
        params.get_in("attention_factor", 0.1 * 2f64.ln() + 1.0, ATTENTION_FACTOR)?;
    params.finish(&["shift", "window", "attention_factor"])?;
    if !(window < shift && shift < trained) {
        return Err(Error::InvalidOption(format!(
            "`{part}`: needs window < shift < trained length, but window={window}, shift={shift} and the model was trained on {trained} tokens (the paper uses shift = trained/3, window = 128)"
        )));
    }
    if n_ctx > trained {
        return Err(Error::InvalidOption(format!(
            "`{part}` works within the trained length of {trained} tokens (it moves distant keys onto well-trained distances and does not extrapolate), but the context is {n_ctx}; shorten the context, or stretch the window with another scheme such as yarn or self_extend"
        )));
    }
    Ok(Box::new(StringScheme {
        rope: base.rope.clone(),
        shift,
        window,
        attention_factor: attention_factor as f32,
        trained_ctx: trained,
    }))
}

impl PositionScheme for StringScheme {
    fn frequencies(&self, seq_len: usize, out: &mut Vec<f64>) {
        self.rope.frequencies(seq_len, out);
    }

    fn attention_factor(&self) -> f32 {
        self.attention_factor
    }

    fn reach(&self) -> Option<usize> {
        Some(self.trained_ctx)
    }

    /// The model's own arithmetic, times the attention factor.
    fn fill_table(
        &self,
        positions: &[i32],
        seq_len: usize,
        freqs: &mut Vec<f64>,
        table: &mut RotaryTable,
    ) {
        self.rope.fill_table(positions, seq_len, freqs, table);
        if self.attention_factor != 1.0 {
            let af = self.attention_factor;
            table.cos.iter_mut().for_each(|c| *c *= af);
            table.sin.iter_mut().for_each(|s| *s *= af);
        }
    }

    fn far(&self) -> Option<FarPositions> {
        let (s, w) = (self.shift as i32, self.window as i32);
        Some(FarPositions {
            distance: s,
            group: 1,
            query_offset: w - s,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::{build, test_base, Base};
    use super::*;

    fn base(trained_ctx: usize) -> Base {
        test_base(10000.0, 8, trained_ctx)
    }

    fn scheme(spec: &str, trained: usize, n_ctx: usize) -> Result<Box<dyn PositionScheme>> {
        build(&spec.parse().unwrap(), &base(trained), n_ctx)
    }

    /// S = 6, W = 2, L = 12, query i = 11 over keys j = 0..=11: keys 6..=11 (d < 6) keep their
    /// distance; keys 0..=5 are seen from the query at 11 − 6 + 2 = 7, at distance d − 4.
    #[test]
    fn positions_follow_the_paper_for_a_small_case() {
        let f = scheme("string:shift=6,window=2", 12, 12)
            .unwrap()
            .far()
            .unwrap();
        let keys: Vec<i32> = (0..=11).collect();
        assert_eq!(f.far_slots(&keys, 11), 6);
        assert_eq!(f.query(11), 7);
        assert!(!f.moves_keys());
        let distances: Vec<i32> = keys
            .iter()
            .map(|&j| {
                if 11 - j >= f.distance {
                    f.query(11) - f.key(j)
                } else {
                    11 - j
                }
            })
            .collect();
        // The longest distance is L − S + W − 1 = 7; distances 8..=11 are never used.
        assert_eq!(distances, [7, 6, 5, 4, 3, 2, 5, 4, 3, 2, 1, 0]);
    }

    #[test]
    fn defaults_are_the_papers_and_the_codes_factor() {
        let s = scheme("string", 8192, 8192).unwrap();
        assert_eq!(
            s.far(),
            Some(FarPositions {
                distance: 2730,
                group: 1,
                query_offset: 128 - 2730
            })
        );
        assert!((s.attention_factor() - 1.0693).abs() < 1e-4);
        assert_eq!(s.reach(), Some(8192));
        let plain = scheme("string:attention_factor=1", 8192, 8192).unwrap();
        let (mut a, mut b) = (RotaryTable::default(), RotaryTable::default());
        plain.fill_table(&[5, 900], 0, &mut Vec::new(), &mut a);
        base(8192)
            .rope
            .fill_table(&[5, 900], 0, &mut Vec::new(), &mut b);
        assert_eq!((a.cos, a.sin), (b.cos, b.sin));
    }

    #[test]
    fn bad_parameters_say_what_is_wrong() {
        for (spec, n_ctx, needle) in [
            (
                "string:shift=12",
                12,
                "needs window < shift < trained length, but window=128, shift=12",
            ),
            (
                "string:shift=20,window=2",
                12,
                "shift=20 and the model was trained on 12 tokens",
            ),
            ("string:shift=6,window=6", 12, "window=6, shift=6"),
            (
                "string:shift=6,window=2,attention_factor=0",
                12,
                "attention_factor must be a number above 0 and at most 16 (got 0)",
            ),
            (
                "string:shift=6,window=2",
                13,
                "works within the trained length of 12 tokens",
            ),
            ("string:offset=6", 12, "no parameter `offset`"),
        ] {
            let err = match scheme(spec, 12, n_ctx) {
                Ok(_) => panic!("{spec} was accepted"),
                Err(e) => e.to_string(),
            };
            assert!(err.contains(needle), "{spec}: {err}");
        }
    }
}
