//! Dynamic NTK scaling (emozilla, "Dynamically Scaled RoPE further increases performance of long
//! context LLaMA with zero fine-tuning", 2023; HF `_compute_dynamic_ntk_parameters` and
//! `dynamic_rope_update`): the model's own RoPE up to its trained length, then an NTK base that
//! grows with the sequence, b' = b·(s·n/L − (s−1))^(d/(d−2)) for a sequence of n > L tokens.
//!
//! HF keeps keys rotated with the frequencies of the moment they were cached, so a key and a
//! query later disagree; here the session re-rotates cached keys whenever the frequencies change
//! ([`PositionScheme::varies_with_length`]), so every attention score uses one set.

use super::{ntk, original_length, scale_factor, Base, ModelRope, PositionScheme};
use crate::spec::{Params, SpecPart};
use crate::Result;

pub struct Dynamic {
    rope: ModelRope,
    factor: f64,
    original: usize,
}

pub fn build(part: &SpecPart, base: &Base) -> Result<Box<dyn PositionScheme>> {
    let mut params = Params::new(part);
    let factor = scale_factor(&mut params)?;
    let original = original_length(&mut params, base)?;
    params.finish(&["factor", "original_max_position_embeddings"])?;
    Ok(Box::new(Dynamic {
        rope: base.rope.clone(),
        factor,
        original,
    }))
}

impl Dynamic {
    /// The base in use for a sequence of `seq_len` tokens.
    pub fn base_at(&self, seq_len: usize) -> f64 {
        if seq_len <= self.original {
            return self.rope.base;
        }
        let n = seq_len as f64;
        let stretch = self.factor * n / self.original as f64 - (self.factor - 1.0);
        ntk::scaled_base(self.rope.base, self.rope.dims, stretch)
    }
}

impl PositionScheme for Dynamic {
    fn frequencies(&self, seq_len: usize, out: &mut Vec<f64>) {
        self.rope.frequencies_with_base(self.base_at(seq_len), out);
    }

    fn model_rope(&self) -> Option<&ModelRope> {
        Some(&self.rope)
    }

    fn varies_with_length(&self) -> bool {
        true
    }
}
