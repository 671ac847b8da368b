//! The 32-value block formats (Q4_0, Q4_1, Q8_0 weights; Q8_0, Q8_1 activations): scalar
//! reference code, and dispatch to the SIMD kernels in `x86.rs` when the CPU has them.
//!
//! Weight layouts (ggml's): Q4_0 = f16 d, 16 bytes of nibbles (value = d·(q−8)); Q4_1 = f16 d,
//! f16 m, 16 bytes of nibbles (value = d·q + m); Q8_0 = f16 d, 32 i8. Nibble j of a block holds
//! value j in its low half and value j+16 in its high half.
//!
//! Activation rows (ours): all i8 values of the row, then one f32 scale d per block, then for
//! Q8_1 one f32 s = d·Σq per block. The scales hold exactly the f16-rounded values ggml stores,
//! so the arithmetic is ggml's, but the kernels read them without conversion.

use half::f16;

use super::{ActType, WeightType};

pub(super) fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

fn round_f16(v: f32) -> f32 {
    f16::from_f32(v).to_f32()
}

pub(super) fn f32_at(b: &[u8], at: usize) -> f32 {
    f32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Converts activations as ggml's x86 quantize_row_q8_0/q8_1 do: multiply by 127/amax (not by
/// 1/d, which rounds differently), round half to even (`_mm256_round_ps`).
pub(super) fn quantize_act(act: ActType, x: &[f32], out: &mut [u8]) {
    let cols = x.len();
    let blocks = cols / 32;
    let (qs, scales) = out.split_at_mut(cols);
    for (b, xb) in x.chunks_exact(32).enumerate() {
        let (d, sum) = quantize_block(xb, &mut qs[b * 32..(b + 1) * 32]);
        scales[4 * b..4 * b + 4].copy_from_slice(&round_f16(d).to_le_bytes());
        if act == ActType::Q8_1 {
            let at = 4 * (blocks + b);
            scales[at..at + 4].copy_from_slice(&round_f16(d * sum as f32).to_le_bytes());
        }
    }
}

/// One block: (d, Σq); the values go to `qs`.
fn quantize_block(x: &[f32], qs: &mut [u8]) -> (f32, i32) {
    #[cfg(target_arch = "x86_64")]
    if super::x86::has_avx2() {
        // SAFETY: the CPU has AVX2 and FMA; the block has 32 values and 32 bytes.
        return unsafe { super::x86::quantize_block(x, qs) };
    }
    quantize_block_scalar(x, qs)
}

fn quantize_block_scalar(x: &[f32], qs: &mut [u8]) -> (f32, i32) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    let mut sum = 0i32;
    for (o, v) in qs.iter_mut().zip(x) {
        let q = (v * id).round_ties_even() as i32;
        sum += q;
        *o = q as i8 as u8;
    }
    (amax / 127.0, sum)
}

pub(super) fn dequantize(wtype: WeightType, w: &[u8], out: &mut [f32]) {
    let block_bytes = wtype.block().1;
    for (b, o) in w.chunks_exact(block_bytes).zip(out.chunks_exact_mut(32)) {
        let d = f16_at(b, 0);
        match wtype {
            WeightType::Q4_0 => {
                for j in 0..16 {
                    o[j] = d * ((b[2 + j] & 15) as f32 - 8.0);
                    o[j + 16] = d * ((b[2 + j] >> 4) as f32 - 8.0);
                }
            }
            WeightType::Q4_1 => {
                let m = f16_at(b, 2);
                for j in 0..16 {
                    o[j] = d * (b[4 + j] & 15) as f32 + m;
                    o[j + 16] = d * (b[4 + j] >> 4) as f32 + m;
                }
            }
            _ => {
                for j in 0..32 {
                    o[j] = d * (b[2 + j] as i8) as f32;
                }
            }
        }
    }
}

/// Scalar reference: the oracle for the SIMD kernels and the path on CPUs without them.
pub(super) fn dot_scalar(wtype: WeightType, w: &[u8], a: &[u8], cols: usize) -> f32 {
    let wb = wtype.block().1;
    let blocks = cols / 32;
    let mut sum = 0f32;
    for i in 0..blocks {
        let b = &w[i * wb..(i + 1) * wb];
        let x = &a[i * 32..(i + 1) * 32];
        let dw = f16_at(b, 0);
        let dx = f32_at(a, cols + 4 * i);
        match wtype {
            WeightType::Q4_0 => {
                let mut s = 0i32;
                for j in 0..16 {
                    s += ((b[2 + j] & 15) as i32 - 8) * (x[j] as i8) as i32;
                    s += ((b[2 + j] >> 4) as i32 - 8) * (x[16 + j] as i8) as i32;
                }
                // One serial fma per block, as ggml's repacked Q4_0 gemv/gemm (see x86.rs).
                sum = (s as f32).mul_add(dw * dx, sum);
            }
            WeightType::Q4_1 => {
                let mut s = 0i32;
                for j in 0..16 {
                    s += (b[4 + j] & 15) as i32 * (x[j] as i8) as i32;
                    s += (b[4 + j] >> 4) as i32 * (x[16 + j] as i8) as i32;
                }
                sum += dw * dx * s as f32 + f16_at(b, 2) * f32_at(a, cols + 4 * (blocks + i));
            }
            _ => {
                let mut s = 0i32;
                for j in 0..32 {
                    s += (b[2 + j] as i8) as i32 * (x[j] as i8) as i32;
                }
                sum += dw * dx * s as f32;
            }
        }
    }
    sum
}

pub(super) fn dot(wtype: WeightType, w: &[u8], a: &[u8], cols: usize) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if super::x86::has_avx2() {
        // SAFETY: the CPU supports the features the kernel is compiled for.
        return unsafe { super::x86::dot(wtype, w, a, cols) };
    }
    dot_scalar(wtype, w, a, cols)
}

pub(super) fn dot_x4(wtype: WeightType, w: &[u8], a: [&[u8]; 4], cols: usize) -> [f32; 4] {
    #[cfg(target_arch = "x86_64")]
    if super::x86::has_avx2() {
        // SAFETY: as above.
        return unsafe { super::x86::dot_x4(wtype, w, a, cols) };
    }
    a.map(|a| dot_scalar(wtype, w, a, cols))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::Activations;

    fn quantize_weights(wtype: WeightType, x: &[f32]) -> Vec<u8> {
        // Test-only weight quantizer: ggml's round-to-nearest schemes.
        let mut out = Vec::new();
        for b in x.chunks_exact(32) {
            match wtype {
                WeightType::Q4_0 => {
                    let max = b
                        .iter()
                        .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
                    let d = max / -8.0;
                    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                    for j in 0..16 {
                        let q0 = ((b[j] * id + 8.5) as i32).min(15) as u8;
                        let q1 = ((b[j + 16] * id + 8.5) as i32).min(15) as u8;
                        out.push(q0 | (q1 << 4));
                    }
                }
                WeightType::Q4_1 => {
                    let min = b.iter().cloned().fold(f32::MAX, f32::min);
                    let max = b.iter().cloned().fold(f32::MIN, f32::max);
                    let d = (max - min) / 15.0;
                    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                    out.extend_from_slice(&f16::from_f32(min).to_le_bytes());
                    for j in 0..16 {
                        let q0 = (((b[j] - min) * id + 0.5) as i32).min(15) as u8;
                        let q1 = (((b[j + 16] - min) * id + 0.5) as i32).min(15) as u8;
                        out.push(q0 | (q1 << 4));
                    }
                }
                _ => {
                    let mut q = vec![0u8; 36];
                    quantize_act(ActType::Q8_0, b, &mut q);
                    out.extend_from_slice(&f16::from_f32(f32_at(&q, 32)).to_le_bytes());
                    out.extend_from_slice(&q[..32]);
                }
            }
        }
        out
    }

    fn pseudo_random(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(1664525).wrapping_add(1013904223);
                (s >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect()
    }

    #[test]
    fn kernels_match_the_scalar_reference_and_the_float_product() {
        let cols = 576;
        for wtype in [WeightType::Q4_0, WeightType::Q4_1, WeightType::Q8_0] {
            let wf = pseudo_random(cols, 7);
            let w = quantize_weights(wtype, &wf);
            let mut deq = vec![0f32; cols];
            dequantize(wtype, &w, &mut deq);
            let xs: Vec<Vec<f32>> = (0..4).map(|i| pseudo_random(cols, 100 + i)).collect();
            let mut acts: Vec<Activations> = (0..4).map(|_| Activations::default()).collect();
            for (a, x) in acts.iter_mut().zip(&xs) {
                a.quantize(x, 1, cols, wtype.act_type());
            }
            let rows = [
                acts[0].row(0),
                acts[1].row(0),
                acts[2].row(0),
                acts[3].row(0),
            ];
            let four = dot_x4(wtype, &w, rows, cols);
            for i in 0..4 {
                let reference = dot_scalar(wtype, &w, rows[i], cols);
                let fast = dot(wtype, &w, rows[i], cols);
                let exact: f32 = deq.iter().zip(&xs[i]).map(|(a, b)| a * b).sum();
                if wtype == WeightType::Q4_0 {
                    // One serial fma chain per output in both: bit for bit.
                    assert_eq!(fast.to_bits(), reference.to_bits());
                    assert_eq!(four[i].to_bits(), reference.to_bits());
                }
                assert!(
                    (fast - reference).abs() <= 1e-4 * reference.abs().max(1.0),
                    "{wtype:?}"
                );
                assert!(
                    (four[i] - reference).abs() <= 1e-4 * reference.abs().max(1.0),
                    "{wtype:?}"
                );
                // Q8 activations keep ~2 significant digits per value; the sum stays close.
                assert!(
                    (reference - exact).abs() < 0.05,
                    "{wtype:?}: {reference} vs {exact}"
                );
            }
        }
    }

    #[test]
    fn simd_quantizer_matches_the_scalar_one() {
        for seed in 0..50 {
            let mut x = pseudo_random(32, seed);
            // Values that land exactly on .5 after scaling exercise the ties-to-even rule.
            x[5] = x.iter().fold(0f32, |m, v| m.max(v.abs())) * 2.5 / 127.0;
            let (mut a, mut b) = ([0u8; 32], [0u8; 32]);
            assert_eq!(
                quantize_block(&x, &mut a),
                quantize_block_scalar(&x, &mut b)
            );
            assert_eq!(a, b, "seed {seed}");
        }
    }

    #[test]
    fn q8_1_sum_term_is_scale_times_sum() {
        let x = pseudo_random(32, 3);
        let mut q = vec![0u8; 40];
        quantize_act(ActType::Q8_1, &x, &mut q);
        let d = f32_at(&q, 32);
        let s: i32 = q[..32].iter().map(|&b| b as i8 as i32).sum();
        assert!((f32_at(&q, 36) - d * s as f32).abs() < 1e-3);
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(q[..32].iter().any(|&b| (b as i8).unsigned_abs() == 127));
        assert!((d - amax / 127.0).abs() < 1e-5);
        assert_eq!(d, round_f16(d), "scales carry ggml's f16 rounding");
    }
}
