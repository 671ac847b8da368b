//! GeGLU's gate, gelu(g)·u (Shazeer, "GLU Variants Improve Transformer", arXiv:2002.05202), with
//! the tanh approximation of GELU (Hendrycks & Gimpel, arXiv:1606.08415) that Gemma uses.
//!
//! Computed as ggml's `ggml_vec_geglu_f32` does with `GGML_GELU_FP16`, so that the activations
//! fed to the next quantized matmul match llama.cpp's bit for bit: below −10 the gate is 0, from
//! 10 up it is g·u, and between, g is rounded to f16 and looked up in a table of GELU at every
//! f16 value, itself rounded to f16.

use std::sync::OnceLock;

use half::f16;

/// √(2/π) and the cubic coefficient of the tanh approximation, as ggml writes them.
const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_COEF_A: f32 = 0.044_715;

/// GELU, tanh approximation, in f32. `1 + a·x·x` is one FMA, as the compiler contracts
/// ggml's expression when llama.cpp is built for an FMA CPU (it moves one table entry).
pub fn gelu(x: f32) -> f32 {
    let cubic = (GELU_COEF_A * x).mul_add(x, 1.0);
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * cubic).tanh())
}

/// GELU of every f16 value (by its bits), rounded to f16 and widened back.
fn table() -> &'static [f32] {
    static TABLE: OnceLock<Vec<f32>> = OnceLock::new();
    TABLE.get_or_init(|| {
        (0..=u16::MAX)
            .map(|bits| f16::from_f32(gelu(f16::from_bits(bits).to_f32())).to_f32())
            .collect()
    })
}

/// gate ← gelu(gate) ⊙ up.
pub fn geglu(gate: &mut [f32], up: &[f32]) {
    let table = table();
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = if *g <= -10.0 {
            0.0
        } else if *g >= 10.0 {
            *g * u
        } else {
            table[f16::from_f32(*g).to_bits() as usize] * u
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gelu_matches_the_erf_form_closely_and_pins_reference_values() {
        // Exact GELU, x·Φ(x), at a few points (erf from Python's math.erf).
        for (x, exact) in [
            (-3.0f32, -0.004_049_694_f32),
            (-1.0, -0.158_655_3),
            (0.5, 0.345_731_38),
            (1.0, 0.841_344_7),
            (2.5, 2.484_474_6),
        ] {
            assert!((gelu(x) - exact).abs() < 1e-3, "gelu({x}) = {}", gelu(x));
        }
        assert_eq!(gelu(0.0), 0.0);
    }

    /// llama.cpp builds its table at start-up with the C library's tanhf, as `f32::tanh` calls
    /// it; `tests/fixtures/gemma3/gelu_table_hash.py` reads llama.cpp's table out of its library
    /// and prints its hash. NaN inputs give NaN either way; F16C writes them as the quiet NaN of
    /// their sign.
    #[test]
    fn the_table_is_llama_cpps_bit_for_bit() {
        use sha2::{Digest, Sha256};
        let mut hash = Sha256::new();
        for &v in table() {
            let bits = f16::from_f32(v).to_bits();
            let bits = if v.is_nan() {
                bits & 0x8000 | 0x7e00
            } else {
                bits
            };
            hash.update(bits.to_le_bytes());
        }
        assert_eq!(
            format!("{:x}", hash.finalize()),
            "5eceda6f287dec9dc0bcfa24516d6744a031a5c52d1984688b4558aeb1daf909"
        );
    }

    #[test]
    fn geglu_rounds_through_f16_and_clamps_like_ggml() {
        let gate = [-12.0f32, -10.0, -0.333, 0.1234567, 1.0, 9.99, 10.0, 15.0];
        let up = [2.0f32; 8];
        let mut out = gate;
        geglu(&mut out, &up);
        assert_eq!(out[0], 0.0);
        assert_eq!(out[1], 0.0);
        assert_eq!(out[6], 20.0);
        assert_eq!(out[7], 30.0);
        for i in 2..6 {
            let through_f16 = f16::from_f32(gelu(f16::from_f32(gate[i]).to_f32())).to_f32() * 2.0;
            assert_eq!(out[i].to_bits(), through_f16.to_bits(), "element {i}");
            assert!((out[i] - gelu(gate[i]) * 2.0).abs() < 2e-2 * out[i].abs().max(0.1));
        }
    }
}
