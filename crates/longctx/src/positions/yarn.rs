//! YaRN (Peng et al., "YaRN: Efficient Context Window Extension of Large Language Models",
//! arXiv:2309.00071), as HF transformers computes it (`_compute_yarn_parameters`): dimensions
//! that turn more than `beta_fast` times over the original length keep their frequency, those
//! that turn fewer than `beta_slow` times are interpolated by `factor`, a linear ramp blends the
//! ones between, and cos/sin are multiplied by an attention factor (0.1·ln s + 1 by default, or
//! DeepSeek's mscale ratio).

use std::ops::Bound;

use super::{original_length, scale_factor, Base, ModelRope, PositionScheme, ATTENTION_FACTOR};
use crate::spec::{Params, SpecPart};
use crate::{Error, Result};

pub struct Yarn {
    rope: ModelRope,
    factor: f64,
    original: usize,
    /// Per pair: 1 keeps the original frequency, 0 interpolates it fully.
    extrapolation: Vec<f64>,
    attention_factor: f32,
}

/// YaRN's attention factor for a stretch `scale` (`get_mscale`).
pub fn mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

/// The dimension (counted over all `dims`, not pairs) that turns `rotations` times over
/// `original` positions (`find_correction_dim`).
fn correction_dim(rotations: f64, dims: usize, base: f64, original: usize) -> f64 {
    dims as f64 * (original as f64 / (rotations * 2.0 * std::f64::consts::PI)).ln()
        / (2.0 * base.ln())
}

/// The first and last pair of the ramp (`find_correction_range` with truncation).
pub fn correction_range(
    beta_fast: f64,
    beta_slow: f64,
    dims: usize,
    base: f64,
    original: usize,
) -> (f64, f64) {
    let low = correction_dim(beta_fast, dims, base, original).floor();
    let high = correction_dim(beta_slow, dims, base, original).ceil();
    (low.max(0.0), high.min(dims as f64 - 1.0))
}

pub fn build(part: &SpecPart, base: &Base) -> Result<Box<dyn PositionScheme>> {
    let mut params = Params::new(part);
    let factor = scale_factor(&mut params)?;
    let original = original_length(&mut params, base)?;
    // Rotations over the original length: the paper's 32 and 1; past 1024 every pair turns
    // that often over any trained length, and the ramp says nothing.
    let rotations = (Bound::Excluded(0.0), Bound::Included(1024.0));
    let beta_fast: f64 = params.get_in("beta_fast", 32.0, rotations)?;
    let beta_slow: f64 = params.get_in("beta_slow", 1.0, rotations)?;
    let attention: Option<f64> = params.optional_in("attention_factor", ATTENTION_FACTOR)?;
    // DeepSeek's mscale and mscale_all_dim are 0.707 to 1; 0 turns the ratio off, as in HF.
    let m: Option<f64> = params.optional_in("mscale", 0.0..=16.0)?;
    let m_all: Option<f64> = params.optional_in("mscale_all_dim", 0.0..=16.0)?;
    params.finish(&[
        "factor",
        "original_max_position_embeddings",
        "beta_fast",
        "beta_slow",
        "attention_factor",
        "mscale",
        "mscale_all_dim",
    ])?;
    if !(beta_fast > 0.0 && beta_slow > 0.0 && beta_fast > beta_slow) {
        return Err(Error::InvalidOption(format!(
            "yarn: beta_fast ({beta_fast}) must be greater than beta_slow ({beta_slow}), both above 0"
        )));
    }
    let attention_factor = match (attention, m, m_all) {
        (Some(a), _, _) => a,
        // HF applies the ratio only when both are set and non-zero.
        (None, Some(m), Some(all)) if m != 0.0 && all != 0.0 => {
            mscale(factor, m) / mscale(factor, all)
        }
        _ => mscale(factor, 1.0),
    };
    let rope = base.rope.clone();
    let (low, mut high) = correction_range(beta_fast, beta_slow, rope.dims, rope.base, original);
    if low == high {
        high += 0.001;
    }
    let extrapolation = (0..rope.dims / 2)
        .map(|i| 1.0 - ((i as f64 - low) / (high - low)).clamp(0.0, 1.0))
        .collect();
    Ok(Box::new(Yarn {
        rope,
        factor,
        original,
        extrapolation,
        attention_factor: attention_factor as f32,
    }))
}

impl PositionScheme for Yarn {
    fn frequencies(&self, seq_len: usize, out: &mut Vec<f64>) {
        self.rope.frequencies(seq_len, out);
        for (f, &keep) in out.iter_mut().zip(&self.extrapolation) {
            // HF's f/s·(1 − keep) + f·keep, arranged so that factor 1 leaves f exactly as it is.
            *f *= keep + (1.0 - keep) / self.factor;
        }
    }

    fn model_rope(&self) -> Option<&ModelRope> {
        Some(&self.rope)
    }

    fn attention_factor(&self) -> f32 {
        self.attention_factor
    }

    fn reach(&self) -> Option<usize> {
        Some((self.original as f64 * self.factor) as usize)
    }
}
