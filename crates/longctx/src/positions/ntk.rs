//! Static NTK-aware scaling (bloc97, "NTK-Aware Scaled RoPE", 2023; HF `_compute_ntk_parameters`
//! in transformers ≤ 4.44): the base is raised to b·s^(d/(d−2)), which leaves the fastest
//! dimension untouched and interpolates the slowest one by exactly `factor`.

use super::{scale_factor, Base, ModelRope, PositionScheme};
use crate::spec::{Params, SpecPart};
use crate::Result;

pub struct Ntk {
    rope: ModelRope,
    /// The NTK-aware base that replaces the model's.
    base: f64,
    factor: f64,
    trained_ctx: usize,
}

/// The NTK-aware base for a stretch of `factor` over `dims` rotated dimensions.
pub fn scaled_base(base: f64, dims: usize, factor: f64) -> f64 {
    let d = dims as f64;
    base * factor.powf(d / (d - 2.0))
}

pub fn build(part: &SpecPart, base: &Base) -> Result<Box<dyn PositionScheme>> {
    let mut params = Params::new(part);
    let factor = scale_factor(&mut params)?;
    params.finish(&["factor"])?;
    Ok(Box::new(Ntk {
        rope: base.rope.clone(),
        base: scaled_base(base.rope.base, base.rope.dims, factor),
        factor,
        trained_ctx: base.trained_ctx,
    }))
}

impl PositionScheme for Ntk {
    fn frequencies(&self, _seq_len: usize, out: &mut Vec<f64>) {
        self.rope.frequencies_with_base(self.base, out);
    }

    fn model_rope(&self) -> Option<&ModelRope> {
        Some(&self.rope)
    }

    fn reach(&self) -> Option<usize> {
        Some((self.trained_ctx as f64 * self.factor) as usize)
    }
}
