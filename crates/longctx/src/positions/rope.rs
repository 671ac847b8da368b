//! The model's own RoPE (Su et al., "RoFormer", arXiv:2104.09864): θ_i = base^(−2i/d), divided
//! per dimension by the GGUF's `rope_freqs` factors where present (Llama 3.1+) and by a linear
//! scaling factor where the GGUF declares one.

use super::{PositionScheme, RotaryTable};

/// Which dimensions form a rotated pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent values (2i, 2i+1): llama-architecture GGUFs.
    Normal,
    /// Values i and i + d/2: Qwen2 and other NeoX-style models.
    Neox,
}

/// RoPE exactly as the model file describes it.
#[derive(Debug, Clone)]
pub struct ModelRope {
    pub base: f64,
    /// Rotated dimensions per head (`rope.dimension_count`).
    pub dims: usize,
    /// Per-pair divisors from the `rope_freqs` tensor.
    pub freq_factors: Option<Vec<f32>>,
    /// Position Interpolation factor declared in the file (`rope.scaling.factor`), 1 if none.
    pub linear_factor: f64,
}

impl ModelRope {
    /// The frequencies this RoPE would have with another base (NTK-style schemes), without
    /// copying the per-pair factors.
    pub fn frequencies_with_base(&self, base: f64, out: &mut Vec<f64>) {
        out.clear();
        out.extend((0..self.dims / 2).map(|i| self.frequency(base, i)));
    }

    /// True when `freqs` are exactly this RoPE's own: a scheme at its identity setting (factor 1)
    /// then fills its table with [`ModelRope`]'s arithmetic and leaves the model as trained, bit
    /// for bit, where forming the same angles in f64 would move the logits by last bits.
    pub fn gives(&self, freqs: &[f64]) -> bool {
        freqs.len() == self.dims / 2
            && freqs
                .iter()
                .enumerate()
                .all(|(i, &f)| f == self.frequency(self.base, i))
    }

    fn frequency(&self, base: f64, i: usize) -> f64 {
        let base_freq = base.powf(-2.0 * i as f64 / self.dims as f64);
        let factor = self.freq_factors.as_ref().map_or(1.0, |f| f[i] as f64);
        base_freq / factor / self.linear_factor
    }
}

impl PositionScheme for ModelRope {
    fn frequencies(&self, _seq_len: usize, out: &mut Vec<f64>) {
        self.frequencies_with_base(self.base, out);
    }

    /// llama.cpp's arithmetic, so logits match it bit for bit: θ starts at the position as f32
    /// and is multiplied by base^(−2/d) (f32) once per pair, divided by the pair's frequency
    /// factor and scaled by 1/linear factor, then cosf/sinf.
    fn fill_table(
        &self,
        positions: &[i32],
        _seq_len: usize,
        _freqs: &mut Vec<f64>,
        table: &mut RotaryTable,
    ) {
        let pairs = self.dims / 2;
        table.clear(pairs);
        let theta_scale = (self.base as f32).powf(-2.0 / self.dims as f32);
        let freq_scale = (1.0 / self.linear_factor) as f32;
        for &p in positions {
            let mut theta = p as f32;
            for i in 0..pairs {
                let factor = self.freq_factors.as_ref().map_or(1.0, |f| f[i]);
                let angle = freq_scale * (theta / factor);
                table.cos.push(angle.cos());
                table.sin.push(angle.sin());
                theta *= theta_scale;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frequencies_follow_the_roformer_formula() {
        let rope = ModelRope {
            base: 100000.0,
            dims: 64,
            freq_factors: None,
            linear_factor: 1.0,
        };
        let mut f = Vec::new();
        rope.frequencies(0, &mut f);
        assert_eq!(f.len(), 32);
        assert_eq!(f[0], 1.0);
        // HF: inv_freq = 1 / base^(arange(0, d, 2) / d); pair 31 → base^(-62/64).
        assert!((f[31] - 100000f64.powf(-62.0 / 64.0)).abs() < 1e-15);
        let scaled = ModelRope {
            freq_factors: Some(vec![2.0; 32]),
            linear_factor: 4.0,
            ..rope
        };
        let mut g = Vec::new();
        scaled.frequencies(0, &mut g);
        assert!((g[1] * 8.0 - f[1]).abs() < 1e-15);
    }
}
