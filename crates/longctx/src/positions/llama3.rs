//! Llama 3.1's frequency bands (Meta, "The Llama 3 Herd of Models", arXiv:2407.21783; HF
//! `_compute_llama3_parameters`): wavelengths shorter than L/high_freq_factor keep their
//! frequency, those longer than L/low_freq_factor are divided by `factor`, and the band between
//! blends the two by how many times the wavelength fits in L.

use std::ops::Bound;

use super::{original_length, scale_factor, Base, ModelRope, PositionScheme};
use crate::spec::{Params, SpecPart};
use crate::{Error, Result};

pub struct Llama3 {
    rope: ModelRope,
    factor: f64,
    low_freq_factor: f64,
    high_freq_factor: f64,
    original: usize,
}

pub fn build(part: &SpecPart, base: &Base) -> Result<Box<dyn PositionScheme>> {
    let mut params = Params::new(part);
    let factor = scale_factor(&mut params)?;
    // Divisors of the original length (Meta's 1 and 4); past 1024 the band is under a token.
    let band = (Bound::Excluded(0.0), Bound::Included(1024.0));
    let low_freq_factor: f64 = params.get_in("low_freq_factor", 1.0, band)?;
    let high_freq_factor: f64 = params.get_in("high_freq_factor", 4.0, band)?;
    let original = original_length(&mut params, base)?;
    params.finish(&[
        "factor",
        "low_freq_factor",
        "high_freq_factor",
        "original_max_position_embeddings",
    ])?;
    if !(low_freq_factor > 0.0 && high_freq_factor > low_freq_factor) {
        return Err(Error::InvalidOption(format!(
            "llama3: high_freq_factor ({high_freq_factor}) must be greater than low_freq_factor ({low_freq_factor}), both above 0"
        )));
    }
    Ok(Box::new(Llama3 {
        rope: base.rope.clone(),
        factor,
        low_freq_factor,
        high_freq_factor,
        original,
    }))
}

impl PositionScheme for Llama3 {
    fn frequencies(&self, seq_len: usize, out: &mut Vec<f64>) {
        self.rope.frequencies(seq_len, out);
        let original = self.original as f64;
        let high_freq_wavelen = original / self.high_freq_factor;
        let low_freq_wavelen = original / self.low_freq_factor;
        for f in out.iter_mut() {
            let wavelen = 2.0 * std::f64::consts::PI / *f;
            if wavelen < high_freq_wavelen {
                continue;
            }
            if wavelen > low_freq_wavelen {
                *f /= self.factor;
            } else {
                let smooth = (original / wavelen - self.low_freq_factor)
                    / (self.high_freq_factor - self.low_freq_factor);
                // HF's (1 − smooth)·f/s + smooth·f, arranged so that factor 1 leaves f exactly.
                *f *= smooth + (1.0 - smooth) / self.factor;
            }
        }
    }

    fn model_rope(&self) -> Option<&ModelRope> {
        Some(&self.rope)
    }

    fn reach(&self) -> Option<usize> {
        Some((self.original as f64 * self.factor) as usize)
    }
}
