//! Position Interpolation (Chen et al., "Extending Context Window of Large Language Models via
//! Positional Interpolation", arXiv:2306.15595): positions are squeezed by `factor` so that a
//! sequence `factor` times longer than the trained one lands inside the trained range. Dividing
//! every frequency by the factor is the same thing (HF `_compute_linear_scaling_rope_parameters`).

use super::{scale_factor, Base, ModelRope, PositionScheme};
use crate::spec::{Params, SpecPart};
use crate::Result;

pub struct Linear {
    rope: ModelRope,
    factor: f64,
    trained_ctx: usize,
}

pub fn build(part: &SpecPart, base: &Base) -> Result<Box<dyn PositionScheme>> {
    let mut params = Params::new(part);
    let factor = scale_factor(&mut params)?;
    params.finish(&["factor"])?;
    Ok(Box::new(Linear {
        rope: base.rope.clone(),
        factor,
        trained_ctx: base.trained_ctx,
    }))
}

impl PositionScheme for Linear {
    fn frequencies(&self, seq_len: usize, out: &mut Vec<f64>) {
        self.rope.frequencies(seq_len, out);
        out.iter_mut().for_each(|f| *f /= self.factor);
    }

    fn model_rope(&self) -> Option<&ModelRope> {
        Some(&self.rope)
    }

    fn reach(&self) -> Option<usize> {
        Some((self.trained_ctx as f64 * self.factor) as usize)
    }
}
