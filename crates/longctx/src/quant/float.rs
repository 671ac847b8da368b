//! F32, F16 and BF16 weights. As in ggml, activations are first rounded to the weight's own type
//! (f16 for F16, bf16 for BF16); products accumulate in f32.
//!
//! For F32 and F16 the summation order is llama.cpp's: a batch of two or more tokens goes through
//! tinyBLAS (16 lanes, one FMA chain each, then a halving tree), a single token through
//! `ggml_vec_dot_f32`/`_f16` (64 lanes, then a halving tree; a tail past the last 64 is added one
//! product at a time, in f64 for f16). BF16 is summed in 32 lanes: llama.cpp uses `vdpbf16ps`
//! there, whose internal rounding AVX2 cannot reproduce.

use half::{bf16, f16};

use super::{ActType, WeightType};

fn value(wtype: WeightType, b: &[u8], i: usize) -> f32 {
    match wtype {
        WeightType::F32 => f32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]),
        WeightType::F16 => f16::from_le_bytes([b[2 * i], b[2 * i + 1]]).to_f32(),
        _ => bf16::from_le_bytes([b[2 * i], b[2 * i + 1]]).to_f32(),
    }
}

pub(super) fn to_f32(wtype: WeightType, b: &[u8], out: &mut [f32]) {
    for (i, o) in out.iter_mut().enumerate() {
        *o = value(wtype, b, i);
    }
}

pub(super) fn from_f32(act: ActType, x: &[f32], out: &mut [u8]) {
    for (i, &v) in x.iter().enumerate() {
        match act {
            ActType::F32 => out[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes()),
            ActType::F16 => out[2 * i..2 * i + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes()),
            _ => out[2 * i..2 * i + 2].copy_from_slice(&bf16::from_f32(v).to_le_bytes()),
        }
    }
}

/// Lanes of the reference order for a matmul over `tokens` activation rows.
fn lanes(wtype: WeightType, cols: usize, tokens: usize) -> usize {
    match wtype {
        WeightType::BF16 => 32,
        // tinyBLAS takes batches whose rows are a whole number of 16-value vectors.
        _ if tokens >= 2 && cols.is_multiple_of(16) => 16,
        _ => 64,
    }
}

pub(super) fn dot(wtype: WeightType, w: &[u8], a: &[u8], cols: usize, tokens: usize) -> f32 {
    let lanes = lanes(wtype, cols, tokens);
    #[cfg(target_arch = "x86_64")]
    if crate::quant::has_avx2() {
        // SAFETY: the CPU has AVX2, FMA and F16C.
        return unsafe { simd::dot(wtype, w, a, cols, lanes) };
    }
    dot_reference(wtype, w, a, cols, lanes)
}

/// The reference order, one value at a time: lane i%lanes is an FMA chain, the lanes are summed
/// by halving, the tail is added one product at a time.
fn dot_reference(wtype: WeightType, w: &[u8], a: &[u8], cols: usize, lanes: usize) -> f32 {
    let full = cols - cols % lanes;
    let mut acc = [0f32; 64];
    for i in 0..full {
        acc[i % lanes] = value(wtype, w, i).mul_add(value(wtype, a, i), acc[i % lanes]);
    }
    let mut step = lanes / 2;
    while step >= 1 {
        for i in 0..step {
            acc[i] += acc[i + step];
        }
        step /= 2;
    }
    tail(wtype, w, a, full, cols, acc[0])
}

/// Products past the last full set of lanes, as ggml's leftovers loop adds them.
fn tail(wtype: WeightType, w: &[u8], a: &[u8], from: usize, cols: usize, sum: f32) -> f32 {
    if wtype == WeightType::F16 {
        let mut wide = sum as f64;
        for i in from..cols {
            wide += (value(wtype, w, i) * value(wtype, a, i)) as f64;
        }
        wide as f32
    } else {
        let mut sum = sum;
        for i in from..cols {
            sum = value(wtype, w, i).mul_add(value(wtype, a, i), sum);
        }
        sum
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    use super::{tail, WeightType};

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load(wtype: WeightType, p: *const u8, i: usize) -> __m256 {
        match wtype {
            WeightType::F32 => _mm256_loadu_ps(p.cast::<f32>().add(i)),
            WeightType::F16 => _mm256_cvtph_ps(_mm_loadu_si128(p.cast::<u16>().add(i).cast())),
            _ => {
                // bf16 is the top half of an f32.
                let h = _mm_loadu_si128(p.cast::<u16>().add(i).cast());
                _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
            }
        }
    }

    /// `lanes`/8 accumulators of 8 lanes; accumulator m holds lanes 8m..8m+8.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot(
        wtype: WeightType,
        w: &[u8],
        a: &[u8],
        cols: usize,
        lanes: usize,
    ) -> f32 {
        let (pw, pa) = (w.as_ptr(), a.as_ptr());
        let parts = lanes / 8;
        let full = cols - cols % lanes;
        let mut acc = [_mm256_setzero_ps(); 8];
        for i in (0..full).step_by(lanes) {
            for (m, acc) in acc.iter_mut().enumerate().take(parts) {
                let at = i + 8 * m;
                *acc = _mm256_fmadd_ps(load(wtype, pw, at), load(wtype, pa, at), *acc);
            }
        }
        // Halving tree: across accumulators first, then inside the last 8 lanes.
        let mut step = parts / 2;
        while step >= 1 {
            for m in 0..step {
                acc[m] = _mm256_add_ps(acc[m], acc[m + step]);
            }
            step /= 2;
        }
        let s = _mm_add_ps(
            _mm256_castps256_ps128(acc[0]),
            _mm256_extractf128_ps(acc[0], 1),
        );
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let sum = _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
        tail(wtype, w, a, full, cols, sum)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(wtype: WeightType, x: &[f32]) -> Vec<u8> {
        let act = match wtype {
            WeightType::F32 => ActType::F32,
            WeightType::F16 => ActType::F16,
            _ => ActType::BF16,
        };
        let mut out = vec![0u8; x.len() * if act == ActType::F32 { 4 } else { 2 }];
        from_f32(act, x, &mut out);
        out
    }

    #[test]
    fn simd_order_equals_the_reference_order_and_stays_close_to_exact() {
        for cols in [64, 256, 200, 8] {
            let w: Vec<f32> = (0..cols)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013)
                .collect();
            let x: Vec<f32> = (0..cols)
                .map(|i| ((i * 53 % 97) as f32 - 48.0) * 0.021)
                .collect();
            for wtype in [WeightType::F32, WeightType::F16, WeightType::BF16] {
                let (wb, xb) = (bytes(wtype, &w), bytes(wtype, &x));
                for tokens in [1, 4] {
                    let lanes = lanes(wtype, cols, tokens);
                    let fast = dot(wtype, &wb, &xb, cols, tokens);
                    assert_eq!(
                        fast.to_bits(),
                        dot_reference(wtype, &wb, &xb, cols, lanes).to_bits()
                    );
                    let exact: f64 = (0..cols)
                        .map(|i| value(wtype, &wb, i) as f64 * value(wtype, &xb, i) as f64)
                        .sum();
                    assert!(
                        (fast as f64 - exact).abs() < 1e-4,
                        "{wtype:?} {cols} {tokens}"
                    );
                }
            }
        }
    }

    #[test]
    fn batches_use_sixteen_lanes_and_single_tokens_sixty_four() {
        assert_eq!(lanes(WeightType::F16, 256, 8), 16);
        assert_eq!(lanes(WeightType::F16, 256, 1), 64);
        assert_eq!(lanes(WeightType::F32, 200, 8), 64);
        assert_eq!(lanes(WeightType::BF16, 256, 8), 32);
    }
}
