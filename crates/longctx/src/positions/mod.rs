//! Position schemes: how a token's position becomes a rotation of its query and key.
//!
//! Every scheme from the literature (PI, NTK, YaRN, LongRoPE, Self-Extend, …) changes one of
//! three things, which is all this seam exposes: the rotary frequency of each dimension pair, a
//! temperature on the attention logits, and which position a query or key is seen at. The
//! forward pass asks the scheme, never a constant.

mod rope;

pub use rope::{ModelRope, RopeStyle};

use crate::session::Model;
use crate::spec::{Params, Spec};
use crate::{Error, Result};

/// Every scheme `--rope` can name. The context-extension schemes join this list as they land.
pub const SCHEMES: &[&str] = &["none"];

/// The position scheme a `--rope` spec selects for `model`.
pub fn scheme_for(spec: &Spec, model: &Model) -> Result<Box<dyn PositionScheme>> {
    let [part] = spec.parts.as_slice() else {
        return Err(Error::InvalidOption(format!(
            "`{spec}` composes several position schemes, but only one scheme is implemented yet"
        )));
    };
    match part.name.as_str() {
        "none" => {
            Params::new(part).finish(&[])?;
            Ok(Box::new(model.rope()))
        }
        other => Err(Error::UnknownMethod {
            kind: "position scheme",
            name: other.to_string(),
            known: SCHEMES.join(", "),
        }),
    }
}

/// A way to turn positions into rotary angles.
pub trait PositionScheme: Send + Sync {
    /// Angular frequency (radians per position) of each rotated dimension pair, `rot_dims / 2`
    /// values written into `out`, for a sequence currently `seq_len` tokens long (dynamic schemes
    /// depend on it). Writes into a caller's buffer so decoding allocates nothing.
    fn frequencies(&self, seq_len: usize, out: &mut Vec<f64>);
    /// Factor on cos/sin (YaRN's mscale); the attention logits scale by its square.
    fn attention_factor(&self) -> f32 {
        1.0
    }
    /// Fills `table` with cos/sin for `positions`. The default forms angles from
    /// [`PositionScheme::frequencies`] in f64; a scheme may override it to reproduce a peer's
    /// arithmetic exactly. `freqs` is scratch.
    fn fill_table(
        &self,
        positions: &[i32],
        seq_len: usize,
        freqs: &mut Vec<f64>,
        table: &mut RotaryTable,
    ) {
        self.frequencies(seq_len, freqs);
        table.fill(positions, freqs, self.attention_factor());
    }
}

/// Cos/sin of every (position, pair) needed by one forward call, computed once and shared by all
/// layers and heads.
#[derive(Default)]
pub struct RotaryTable {
    /// `[positions, pairs]`.
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    pub pairs: usize,
}

impl RotaryTable {
    /// Fills the table for `positions` with the given frequencies and cos/sin factor. Angles are
    /// formed in f64 so that positions in the hundreds of thousands keep full f32 accuracy.
    pub fn fill(&mut self, positions: &[i32], freqs: &[f64], factor: f32) {
        self.pairs = freqs.len();
        self.cos.clear();
        self.sin.clear();
        for &p in positions {
            for &f in freqs {
                let angle = p as f64 * f;
                self.cos.push(angle.cos() as f32 * factor);
                self.sin.push(angle.sin() as f32 * factor);
            }
        }
    }

    /// Starts an empty table of `pairs` pairs per position, for schemes that fill it themselves.
    pub fn clear(&mut self, pairs: usize) {
        self.pairs = pairs;
        self.cos.clear();
        self.sin.clear();
    }

    /// Rotates one head vector `x` (`head_dim` values, the first `2·pairs` rotated) for the
    /// `row`-th position of the table.
    pub fn rotate(&self, x: &mut [f32], row: usize, style: RopeStyle) {
        #[cfg(target_arch = "x86_64")]
        if crate::quant::has_avx2() {
            // SAFETY: the CPU has FMA.
            return unsafe { self.rotate_fma(x, row, style) };
        }
        self.rotate_portable(x, row, style);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "fma")]
    unsafe fn rotate_fma(&self, x: &mut [f32], row: usize, style: RopeStyle) {
        self.rotate_portable(x, row, style);
    }

    /// x0' = x0·cos − x1·sin and x1' = x0·sin + x1·cos, each with one fused multiply-add as
    /// llama.cpp's compiled rope kernel does, so rotated keys match it bit for bit.
    #[inline(always)]
    fn rotate_portable(&self, x: &mut [f32], row: usize, style: RopeStyle) {
        let cos = &self.cos[row * self.pairs..(row + 1) * self.pairs];
        let sin = &self.sin[row * self.pairs..(row + 1) * self.pairs];
        let (stride, span) = match style {
            // Llama GGUFs: the converter permuted q/k so that pairs are adjacent values.
            RopeStyle::Normal => (2, 1),
            // Qwen2 and HF-layout models: pair i is (i, i + rot_dims/2).
            RopeStyle::Neox => (1, self.pairs),
        };
        for i in 0..self.pairs {
            let (j, k) = (i * stride, i * stride + span);
            let (a, b) = (x[j], x[k]);
            x[j] = a.mul_add(cos[i], -(b * sin[i]));
            x[k] = a.mul_add(sin[i], b * cos[i]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_preserves_norm_and_matches_complex_multiplication() {
        let mut t = RotaryTable::default();
        t.fill(&[0, 7], &[1.0, 0.1], 1.0);
        let x = [1.0f32, 2.0, 3.0, 4.0];
        let mut y = x;
        t.rotate(&mut y, 0, RopeStyle::Normal);
        assert_eq!(y, x);
        t.rotate(&mut y, 1, RopeStyle::Normal);
        let (c, s) = (7f64.cos() as f32, 7f64.sin() as f32);
        assert!((y[0] - (1.0 * c - 2.0 * s)).abs() < 1e-6);
        assert!((y[1] - (1.0 * s + 2.0 * c)).abs() < 1e-6);
        let mut z = x;
        t.rotate(&mut z, 1, RopeStyle::Neox);
        assert!((z[0] - (1.0 * c - 3.0 * s)).abs() < 1e-6);
        let norm = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>();
        assert!((norm(&y) - norm(&x)).abs() < 1e-4);
    }
}
