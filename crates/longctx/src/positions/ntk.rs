//! Static NTK-aware scaling (bloc97, "NTK-Aware Scaled RoPE", 2023; HF `_compute_ntk_parameters`
//! in transformers ≤ 4.44): the base is raised to b·s^(d/(d−2)), which leaves the fastest
//! dimension untouched and interpolates the slowest one by exactly `factor`.

use super::{scale_factor, Base, ModelRope, PositionScheme};
use crate::spec::{Params, SpecPart};
use crate::Result;

pub struct Ntk {
    rope: ModelRope,
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
    let factor = scale_factor(&mut params, "ntk")?;
    params.finish(&["factor"])?;
    let mut rope = base.rope.clone();
    rope.base = scaled_base(rope.base, rope.dims, factor);
    Ok(Box::new(Ntk {
        rope,
        factor,
        trained_ctx: base.trained_ctx,
    }))
}

impl PositionScheme for Ntk {
    fn frequencies(&self, seq_len: usize, out: &mut Vec<f64>) {
        self.rope.frequencies(seq_len, out);
    }

    fn reach(&self) -> Option<usize> {
        Some((self.trained_ctx as f64 * self.factor) as usize)
    }
}
