//! The 32-value block formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 weights; Q8_0, Q8_1 activations):
//! scalar reference code, and dispatch to the SIMD kernels in `x86.rs` when the CPU has them.
//!
//! Weight layouts (ggml's): Q4_0 = f16 d, 16 bytes of nibbles (value = d·(q−8)); Q4_1 = f16 d,
//! f16 m, 16 bytes of nibbles (value = d·q + m); Q5_0 = f16 d, 4 bytes qh, 16 bytes of nibbles
//! (value = d·(q−16)); Q5_1 = f16 d, f16 m, 4 bytes qh, 16 bytes of nibbles (value = d·q + m);
//! Q8_0 = f16 d, 32 i8. Byte j of the nibbles holds the low 4 bits of value j in its low half and
//! those of value j+16 in its high half; bit j of qh (a little-endian u32) is bit 4 of value j.
//!
//! Which of llama.cpp's x86 kernels each type meets, and so which float order [`dot_scalar`]
//! mirrors: Q4_0 matrices are repacked at load (one serial fma per block, see `x86.rs`); every
//! other type here runs `ggml_vec_dot_{q4_1_q8_1, q5_0_q8_0, q5_1_q8_1, q8_0_q8_0}`, eight f32
//! lanes (lane k = the integer products of bytes 4k..4k+4 of each block) with one
//! `fma(d_w·d_x, lane, acc)` per block, then `hsum_float_8`, then `+ summs` for the types with a
//! minimum, where `summs = fma(m_w, s_x, summs)` block after block (GCC contracts ggml's
//! `summs += m*s` under `-mfma`; seen in the disassembly of a llama-cpp-python 0.3.36 build, gcc
//! -O3; in rows the quantizer made, m and s are both f16 values, so m·s is exact and fused or
//! not agree). From two tokens on, llamafile's `tinyBLAS_Q0_AVX` takes Q5_0 and
//! Q8_0 instead (Q4_1 and Q5_1 it does not handle): per output one `__m256` accumulator,
//! `madd(set1(d_w·d_x), updot(…), acc)` (an fma) per block over the same byte lanes, `hsum` (the
//! same adds as `hsum_float_8`) at the end: the same float operations, so one kernel serves both.
//!
//! Activation rows (ours): all i8 values of the row, then one f32 scale d per block, then for
//! Q8_1 one f32 s = d·Σq per block, for Q8_0 the integer −16·Σ4 vectors of `store_q5_offsets`.
//! The scales hold exactly the f16-rounded values ggml stores, so the arithmetic is ggml's, but
//! the kernels read them without conversion.

use half::f16;

use super::kquants::hsum8;
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
    if act == ActType::Q8_0 {
        store_q5_offsets(out, cols);
    }
}

/// Appends to a Q8_0 row, after the scales, each block's −16·Σ4 as 8 i32 (lane k: bytes
/// 4k..4k+4): the part of a Q5_0 product Σ(code − 16)·x that does not depend on the weights,
/// which the SIMD kernel then takes once per activation block instead of once per weight row.
pub(super) fn store_q5_offsets(row: &mut [u8], cols: usize) {
    let (qs, rest) = row.split_at_mut(cols);
    let offsets = &mut rest[cols / 32 * 4..cols / 32 * 36];
    for (lane, out) in qs.chunks_exact(4).zip(offsets.chunks_exact_mut(4)) {
        let sum: i32 = lane.iter().map(|&q| q as i8 as i32).sum();
        out.copy_from_slice(&(-16 * sum).to_le_bytes());
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

/// The 5-bit code of value `j` of a Q5_0/Q5_1 block whose qh starts at `qh` (the nibbles follow).
fn q5_code(b: &[u8], qh: usize, j: usize) -> u8 {
    let high = u32::from_le_bytes([b[qh], b[qh + 1], b[qh + 2], b[qh + 3]]);
    let nibble = if j < 16 {
        b[qh + 4 + j] & 15
    } else {
        b[qh + 4 + j - 16] >> 4
    };
    nibble | ((((high >> j) & 1) as u8) << 4)
}

/// The 32 integer codes of a weight block as the kernels multiply them: signed for the types
/// without a minimum (q−8, q−16, the i8 itself), unsigned 0..15 / 0..31 for Q4_1 / Q5_1.
fn codes(wtype: WeightType, b: &[u8]) -> [i32; 32] {
    std::array::from_fn(|j| match wtype {
        WeightType::Q4_0 => ((b[2 + j % 16] >> (4 * (j / 16))) & 15) as i32 - 8,
        WeightType::Q4_1 => ((b[4 + j % 16] >> (4 * (j / 16))) & 15) as i32,
        WeightType::Q5_0 => q5_code(b, 2, j) as i32 - 16,
        WeightType::Q5_1 => q5_code(b, 4, j) as i32,
        _ => b[2 + j] as i8 as i32,
    })
}

/// Whether the type stores a minimum m (value = d·q + m) as a second f16 after d.
fn has_min(wtype: WeightType) -> bool {
    matches!(wtype, WeightType::Q4_1 | WeightType::Q5_1)
}

pub(super) fn dequantize(wtype: WeightType, w: &[u8], out: &mut [f32]) {
    let block_bytes = wtype.block().1;
    for (b, o) in w.chunks_exact(block_bytes).zip(out.chunks_exact_mut(32)) {
        let d = f16_at(b, 0);
        match wtype {
            // ggml's dequantize_row_q5_0/q5_1: (code − 16)·d, and d·code + m (two roundings:
            // ggml-base is built without FMA).
            WeightType::Q5_0 => {
                for (j, o) in o.iter_mut().enumerate() {
                    *o = (q5_code(b, 2, j) as i32 - 16) as f32 * d;
                }
            }
            WeightType::Q5_1 => {
                let m = f16_at(b, 2);
                for (j, o) in o.iter_mut().enumerate() {
                    *o = q5_code(b, 4, j) as f32 * d + m;
                }
            }
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

/// Scalar reference: the oracle for the SIMD kernels, bit for bit, and the path on CPUs without
/// them. The float order is llama.cpp's x86 one for each type (see the module notes).
pub(super) fn dot_scalar(wtype: WeightType, w: &[u8], a: &[u8], cols: usize) -> f32 {
    let wb = wtype.block().1;
    let blocks = cols / 32;
    let mut serial = 0f32;
    let mut lanes = [0f32; 8];
    let mut summs = 0f32;
    for (i, b) in w.chunks_exact(wb).take(blocks).enumerate() {
        let x = &a[i * 32..(i + 1) * 32];
        let q = codes(wtype, b);
        let dw = f16_at(b, 0);
        let dx = f32_at(a, cols + 4 * i);
        if wtype == WeightType::Q4_0 {
            let s: i32 = (0..32).map(|j| q[j] * (x[j] as i8) as i32).sum();
            // One serial fma per block, as ggml's repacked Q4_0 gemv/gemm (see x86.rs).
            serial = (s as f32).mul_add(dw * dx, serial);
            continue;
        }
        let scale = dw * dx;
        for (k, acc) in lanes.iter_mut().enumerate() {
            let lane: i32 = (4 * k..4 * k + 4).map(|j| q[j] * (x[j] as i8) as i32).sum();
            *acc = scale.mul_add(lane as f32, *acc);
        }
        if has_min(wtype) {
            summs = f16_at(b, 2).mul_add(f32_at(a, cols + 4 * (blocks + i)), summs);
        }
    }
    if wtype == WeightType::Q4_0 {
        serial
    } else {
        hsum8(lanes) + summs
    }
}

pub(super) fn dot(wtype: WeightType, w: &[u8], a: &[u8], cols: usize) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if super::x86::has_avx2() {
        // SAFETY: the CPU supports the features the kernel is compiled for.
        return unsafe { super::x86::dot(wtype, w, a, cols) };
    }
    dot_scalar(wtype, w, a, cols)
}

/// One weight row times N activation rows; bit for bit N [`dot`]s.
pub(super) fn dot_n<const N: usize>(
    wtype: WeightType,
    w: &[u8],
    a: [&[u8]; N],
    cols: usize,
) -> [f32; N] {
    #[cfg(target_arch = "x86_64")]
    if super::x86::has_avx2() {
        // SAFETY: the CPU supports the features the kernel is compiled for.
        return unsafe { super::x86::dot_n(wtype, w, a, cols) };
    }
    a.map(|a| dot_scalar(wtype, w, a, cols))
}

/// Two weight rows times N activation rows in one pass where a kernel does that (see
/// [`super::x86::dot_pair_n`]); bit for bit two [`dot_n`]s. `None`: call [`dot_n`] per row.
pub(super) fn dot_pair_n<const N: usize>(
    wtype: WeightType,
    w: [&[u8]; 2],
    a: [&[u8]; N],
    cols: usize,
) -> Option<[[f32; N]; 2]> {
    #[cfg(target_arch = "x86_64")]
    if super::x86::has_avx2() {
        // SAFETY: the CPU supports the features the kernel is compiled for.
        return unsafe { super::x86::dot_pair_n(wtype, w, a, cols) };
    }
    None
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
                WeightType::Q5_0 => {
                    // quantize_row_q5_0_ref: d = max/−16 by the signed extreme, codes
                    // min(31, (i8)(x/d + 16.5)).
                    let max = b
                        .iter()
                        .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
                    let d = max / -16.0;
                    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                    let codes: Vec<u8> = b
                        .iter()
                        .map(|v| ((v * id + 16.5) as i8).min(31) as u8)
                        .collect();
                    pack_q5(&codes, &mut out);
                }
                WeightType::Q5_1 => {
                    // quantize_row_q5_1_ref: d = (max − min)/31, m = min, codes (x−m)/d + 0.5.
                    let min = b.iter().cloned().fold(f32::MAX, f32::min);
                    let max = b.iter().cloned().fold(f32::MIN, f32::max);
                    let d = (max - min) / 31.0;
                    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                    out.extend_from_slice(&f16::from_f32(min).to_le_bytes());
                    let codes: Vec<u8> = b.iter().map(|v| ((v - min) * id + 0.5) as u8).collect();
                    pack_q5(&codes, &mut out);
                }
                _ => {
                    let mut q = vec![0u8; ActType::Q8_0.row_stride(32)];
                    quantize_act(ActType::Q8_0, b, &mut q);
                    out.extend_from_slice(&f16::from_f32(f32_at(&q, 32)).to_le_bytes());
                    out.extend_from_slice(&q[..32]);
                }
            }
        }
        out
    }

    /// Appends qh and the nibbles of 32 five-bit codes.
    fn pack_q5(codes: &[u8], out: &mut Vec<u8>) {
        let qh = (0..32).fold(0u32, |h, j| h | (((codes[j] >> 4) as u32 & 1) << j));
        out.extend_from_slice(&qh.to_le_bytes());
        out.extend((0..16).map(|j| (codes[j] & 15) | ((codes[j + 16] & 15) << 4)));
    }

    const TYPES: [WeightType; 5] = [
        WeightType::Q4_0,
        WeightType::Q4_1,
        WeightType::Q5_0,
        WeightType::Q5_1,
        WeightType::Q8_0,
    ];

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
        for wtype in TYPES {
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
            let four = dot_n(wtype, &w, rows, cols);
            for i in 0..4 {
                let reference = dot_scalar(wtype, &w, rows[i], cols);
                let fast = dot(wtype, &w, rows[i], cols);
                let exact: f32 = deq.iter().zip(&xs[i]).map(|(a, b)| a * b).sum();
                // The same float operations in the same order: bit for bit.
                assert_eq!(fast.to_bits(), reference.to_bits(), "{wtype:?}");
                assert_eq!(four[i].to_bits(), reference.to_bits(), "{wtype:?}");
                // Q8 activations keep ~2 significant digits per value; the sum stays close.
                assert!(
                    (reference - exact).abs() < 0.05,
                    "{wtype:?}: {reference} vs {exact}"
                );
            }
        }
    }

    /// Hand-made blocks: d = −0.25 (Q5_0); d = 0.5, m = −8 (Q5_1); qh = 0xaa55f00f (bytes
    /// 0f f0 55 aa), nibble byte j = j | (15 − j) << 4. So value j < 16 has low bits j and high
    /// bit j of qh (set for j in 0..4 and 12..16); value 16 + j has low bits 15 − j and high bit
    /// 16 + j (set for even j < 8 and odd j ≥ 8). Value 0: code 16 → 0 and 0.5·16 − 8 = 0;
    /// value 4: code 4 → −0.25·(4 − 16) = 3 and 0.5·4 − 8 = −6; value 16: code 15|16 = 31 →
    /// −3.75 and 7.5; value 17: code 14 → 0.5 and −1.
    #[test]
    fn q5_blocks_dequantize_to_hand_computed_values() {
        let mut tail = vec![0x0f, 0xf0, 0x55, 0xaa];
        tail.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let expected_codes: [u8; 32] = [
            16, 17, 18, 19, 4, 5, 6, 7, 8, 9, 10, 11, 28, 29, 30, 31, //
            31, 14, 29, 12, 27, 10, 25, 8, 7, 22, 5, 20, 3, 18, 1, 16,
        ];
        let q5_0 = [
            0.0, -0.25, -0.5, -0.75, 3.0, 2.75, 2.5, 2.25, 2.0, 1.75, 1.5, 1.25, -3.0, -3.25, -3.5,
            -3.75, -3.75, 0.5, -3.25, 1.0, -2.75, 1.5, -2.25, 2.0, 2.25, -1.5, 2.75, -1.0, 3.25,
            -0.5, 3.75, 0.0,
        ];
        let q5_1 = [
            0.0, 0.5, 1.0, 1.5, -6.0, -5.5, -5.0, -4.5, -4.0, -3.5, -3.0, -2.5, 6.0, 6.5, 7.0, 7.5,
            7.5, -1.0, 6.5, -2.0, 5.5, -3.0, 4.5, -4.0, -4.5, 3.0, -5.5, 2.0, -6.5, 1.0, -7.5, 0.0,
        ];
        let mut b0 = f16::from_f32(-0.25).to_le_bytes().to_vec();
        b0.extend(&tail);
        let mut b1 = f16::from_f32(0.5).to_le_bytes().to_vec();
        b1.extend(f16::from_f32(-8.0).to_le_bytes());
        b1.extend(&tail);
        for (wtype, b, expected) in [
            (WeightType::Q5_0, &b0, &q5_0),
            (WeightType::Q5_1, &b1, &q5_1),
        ] {
            assert_eq!(b.len(), wtype.block().1);
            let mut out = [f32::NAN; 32];
            dequantize(wtype, b, &mut out);
            assert_eq!(&out, expected, "{wtype:?}");
            let q = codes(wtype, b);
            let offset = if wtype == WeightType::Q5_0 { 16 } else { 0 };
            assert_eq!(
                q.map(|c| c + offset),
                expected_codes.map(|c| c as i32),
                "{wtype:?}"
            );
        }
        // The test quantizer packs the same codes into the same bytes.
        let mut packed = Vec::new();
        pack_q5(&expected_codes, &mut packed);
        assert_eq!(packed, tail);
    }

    /// candle's dequantizers are an independent port of ggml's: the same bits on random blocks.
    #[test]
    fn q5_dequantize_agrees_with_candle() {
        use candle_core::quantized::k_quants::{BlockQ5_0, BlockQ5_1, GgmlType};
        fn via_candle<T: GgmlType>(bytes: &[u8], out: &mut [f32]) {
            // Copy into u16 words so the f16 fields are aligned.
            let mut words = vec![0u16; bytes.len() / 2];
            for (w, b) in words.iter_mut().zip(bytes.chunks_exact(2)) {
                *w = u16::from_ne_bytes([b[0], b[1]]);
            }
            let n = bytes.len() / std::mem::size_of::<T>();
            // SAFETY: the blocks are repr(C) plain data (f16 and bytes), valid for any bits, and
            // the u16 buffer gives them their alignment.
            let blocks = unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<T>(), n) };
            T::to_float(blocks, out);
        }
        for wtype in [WeightType::Q5_0, WeightType::Q5_1] {
            let blocks = 40;
            let bytes = wtype.block().1;
            let mut s = 5u32;
            let mut w: Vec<u8> = (0..blocks * bytes)
                .map(|_| {
                    s = s.wrapping_mul(1664525).wrapping_add(1013904223);
                    (s >> 24) as u8
                })
                .collect();
            for (i, b) in w.chunks_exact_mut(bytes).enumerate() {
                // Finite scales (random bits may spell inf or NaN, which compare badly).
                b[..2].copy_from_slice(&f16::from_f32(0.01 * i as f32 - 0.2).to_le_bytes());
                if wtype == WeightType::Q5_1 {
                    b[2..4].copy_from_slice(&f16::from_f32(0.3 - 0.02 * i as f32).to_le_bytes());
                }
            }
            let (mut ours, mut theirs) = (vec![0f32; blocks * 32], vec![1f32; blocks * 32]);
            dequantize(wtype, &w, &mut ours);
            if wtype == WeightType::Q5_0 {
                via_candle::<BlockQ5_0>(&w, &mut theirs);
            } else {
                via_candle::<BlockQ5_1>(&w, &mut theirs);
            }
            assert_eq!(
                ours.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                theirs.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{wtype:?}"
            );
        }
    }

    /// Random weight bytes with extreme f16 scales (largest finite, subnormal, zero, negative)
    /// against activation rows both as the quantizer makes them and with arbitrary bytes and
    /// extreme f32 scales and sums, over many row lengths: the SIMD kernels (one row and four)
    /// give the scalar oracle's bits.
    #[test]
    fn simd_kernels_equal_the_scalar_oracle_on_random_blocks() {
        let halves = [65504.0f32, -65504.0, 6e-8, 0.0, -1.0, 0.002, 1.5, -3.0e-5];
        let act_scales = [1e30f32, -1e-30, 0.0, 1.0, -0.007, 3.4e38, 0.01];
        let mut bits = 11u32;
        let mut byte = move || {
            bits = bits.wrapping_mul(1664525).wrapping_add(1013904223);
            (bits >> 24) as u8
        };
        let sizes = (1..=24).map(|n| 32 * n).chain([640, 1024, 2048, 2080]);
        for (case, cols) in sizes.enumerate() {
            let blocks = cols / 32;
            for wtype in TYPES {
                let bytes = wtype.block().1;
                let mut w: Vec<u8> = (0..blocks * bytes).map(|_| byte()).collect();
                for (i, b) in w.chunks_exact_mut(bytes).enumerate() {
                    // Every third length extreme scales (sums overflow, NaN on both sides);
                    // otherwise ordinary ones, where any change of float order shows.
                    let pick = |k: usize| {
                        let v = if case % 3 == 0 {
                            halves[(3 * i + k + case) % halves.len()]
                        } else {
                            0.0007 * ((i * 7 + k) % 11) as f32 - 0.003
                        };
                        f16::from_f32(v).to_le_bytes()
                    };
                    b[..2].copy_from_slice(&pick(0));
                    if has_min(wtype) {
                        b[2..4].copy_from_slice(&pick(5));
                    }
                }
                let act = wtype.act_type();
                let mut rows: Vec<Activations> = (0..4).map(|_| Activations::default()).collect();
                for (r, row) in rows.iter_mut().enumerate() {
                    let x: Vec<f32> = pseudo_random(cols, (100 * case + r) as u32)
                        .iter()
                        .map(|v| v * (1 + r) as f32)
                        .collect();
                    row.quantize(&x, 1, cols, act);
                }
                let quantized: Vec<Vec<u8>> = rows.iter().map(|r| r.row(0).to_vec()).collect();
                // Synthetic rows: any byte but −128 (the quantizer never makes it, and ggml's
                // sign trick cannot negate it), scales and sums that are no f16 values (so the
                // m·s products round: fused or not shows), extreme ones every third length.
                let mut synthetic = quantized.clone();
                for (r, row) in synthetic.iter_mut().enumerate() {
                    for q in &mut row[..cols] {
                        let v = byte();
                        *q = if v == 0x80 { 0x7f } else { v };
                    }
                    for i in 0..blocks * if act == ActType::Q8_1 { 2 } else { 1 } {
                        let v = if case % 3 == 0 {
                            act_scales[(i + r + case) % act_scales.len()]
                        } else if i < blocks {
                            0.0013 * (1 + (i + r) % 5) as f32 - 0.0031
                        } else {
                            // Sums large enough that the minimum term's rounding shows.
                            37.3 * (1 + (i + r) % 5) as f32 - 91.1
                        };
                        row[cols + 4 * i..cols + 4 * i + 4].copy_from_slice(&v.to_le_bytes());
                    }
                    if act == ActType::Q8_0 {
                        store_q5_offsets(row, cols);
                    }
                }
                for set in [&quantized, &synthetic] {
                    let a = [&set[0][..], &set[1][..], &set[2][..], &set[3][..]];
                    let four = dot_n(wtype, &w, a, cols);
                    for r in 0..4 {
                        let oracle = dot_scalar(wtype, &w, a[r], cols);
                        for got in [dot(wtype, &w, a[r], cols), four[r]] {
                            assert!(
                                got.to_bits() == oracle.to_bits()
                                    || (got.is_nan() && oracle.is_nan()),
                                "{wtype:?} cols {cols} row {r}: {got} vs {oracle}"
                            );
                        }
                    }
                }
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
