//! SwiGLU's gate, silu(g)·u (Shazeer, "GLU Variants Improve Transformer", arXiv:2002.05202),
//! computed as ggml's `ggml_vec_swiglu_f32` does — x / (1 + ggml_v_expf(−x)) · u — so that the
//! activations fed to the next quantized matmul match llama.cpp's bit for bit.

use super::attention::expf;

/// gate ← silu(gate) ⊙ up.
pub fn swiglu(gate: &mut [f32], up: &[f32]) {
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if crate::quant::has_avx2() {
        // SAFETY: the CPU has AVX2 and FMA.
        done = unsafe { swiglu8(gate, up) };
    }
    for (g, &u) in gate[done..].iter_mut().zip(&up[done..]) {
        *g = *g / (1.0 + expf(-*g)) * u;
    }
}

/// The 8-lane body; returns how many values it handled (a multiple of 8).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn swiglu8(gate: &mut [f32], up: &[f32]) -> usize {
    use std::arch::x86_64::*;
    let n = gate.len() / 8 * 8;
    let one = _mm256_set1_ps(1.0);
    for i in (0..n).step_by(8) {
        let g = gate.as_mut_ptr().add(i);
        let x = _mm256_loadu_ps(g);
        let e = super::attention::simd::expf8(_mm256_sub_ps(_mm256_setzero_ps(), x));
        let silu = _mm256_div_ps(x, _mm256_add_ps(one, e));
        _mm256_storeu_ps(g, _mm256_mul_ps(silu, _mm256_loadu_ps(up.as_ptr().add(i))));
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swiglu_is_silu_times_up_and_simd_matches_scalar() {
        let xs: Vec<f32> = (0..37).map(|i| (i as f32 - 18.0) * 0.61).collect();
        let up: Vec<f32> = (0..37).map(|i| 1.0 + i as f32 * 0.01).collect();
        let mut fast = xs.clone();
        swiglu(&mut fast, &up);
        for i in 0..37 {
            let scalar = xs[i] / (1.0 + expf(-xs[i])) * up[i];
            assert_eq!(fast[i].to_bits(), scalar.to_bits(), "element {i}");
            let exact = xs[i] as f64 / (1.0 + (-xs[i] as f64).exp()) * up[i] as f64;
            assert!((fast[i] as f64 - exact).abs() <= 1e-6 * exact.abs().max(1.0));
        }
    }
}
