//! K-quant weights (Q4_K, Q5_K, Q6_K) with Q8_K activations (candle's block types for the
//! embedding look-ups only).
//!
//! The integer part of a dot product is exact in any order; what makes the result ggml's, bit
//! for bit, is how the integer partial sums are grouped before they become floats and the order
//! of the float operations after. llama.cpp on an AVX2/AVX512 CPU runs one of four kernels,
//! which group differently ([`KPath`]); [`KPath::choose`] picks the one it would run.

use candle_core::quantized::k_quants::{BlockQ4K, BlockQ5K, BlockQ6K, GgmlType};

use super::blocks::{f16_at, f32_at};
use super::WeightType;

/// Reinterprets bytes as blocks. The blocks are `repr(C)` with alignment ≤ 4, and both the
/// model map (GGUF aligns tensor data to 32) and activation rows (u32-backed) satisfy it.
fn as_blocks<T>(bytes: &[u8]) -> &[T] {
    let size = std::mem::size_of::<T>();
    assert_eq!(
        bytes.as_ptr() as usize % std::mem::align_of::<T>(),
        0,
        "misaligned quant block"
    );
    // SAFETY: alignment is checked above; the blocks are plain data valid for any bytes.
    unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast(), bytes.len() / size) }
}

/// Bytes of one Q8_K activation block: f32 d, 256 i8 values, 16 i16 sums of 16 values (ggml's
/// `block_q8_K`, which candle's `BlockQ8K` mirrors, so its Q6_K dot product reads it too).
pub(super) const Q8K_BYTES: usize = 292;

/// ggml's `quantize_row_q8_K_ref`, which x86 uses for single rows (the repacked Q4_K path's
/// `ggml_quantize_mat_q8_K_4x8` produces the same bytes for groups of four): scale −127/max by
/// the signed extreme, round half to even (`nearest_int`'s magic-number add). candle's
/// quantizer rounds half away from zero, which differs on exact ties.
pub(super) fn quantize_act(x: &[f32], out: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if super::x86::has_avx2() {
        // SAFETY: the CPU has AVX2, FMA and F16C.
        return unsafe { quantize_act_avx2(x, out) };
    }
    quantize_act_body(x, out)
}

/// The same code built with AVX2 on: `round_ties_even` then compiles to `vroundss` instead of
/// a call into libm's `rintf` per value, which took 4% of a Gemma 3 prefill.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_act_avx2(x: &[f32], out: &mut [u8]) {
    quantize_act_body(x, out)
}

#[inline(always)]
fn quantize_act_body(x: &[f32], out: &mut [u8]) {
    for (xb, ob) in x.chunks_exact(256).zip(out.chunks_exact_mut(Q8K_BYTES)) {
        let (mut amax, mut max) = (0f32, 0f32);
        for &v in xb {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        let (d, qs) = ob.split_at_mut(4);
        let (qs, bsums) = qs.split_at_mut(256);
        if amax == 0.0 {
            d.fill(0);
            qs.fill(0);
            bsums.fill(0);
            continue;
        }
        let iscale = -127.0 / max;
        for (q, &v) in qs.iter_mut().zip(xb) {
            *q = ((iscale * v).round_ties_even() as i32).min(127) as i8 as u8;
        }
        for (j, s) in bsums.chunks_exact_mut(2).enumerate() {
            let sum: i32 = qs[16 * j..16 * j + 16]
                .iter()
                .map(|&q| q as i8 as i32)
                .sum();
            s.copy_from_slice(&(sum as i16).to_le_bytes());
        }
        d.copy_from_slice(&(1.0 / iscale).to_le_bytes());
    }
}

/// Which of llama.cpp's x86 K-quant matmul kernels a product mirrors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KPath {
    /// `ggml_vec_dot_q{4,5,6}_K_q8_K` (AVX2): eight f32 lanes, lane k holding bytes 4k..4k+4 of
    /// every 32-value chunk, one `fma(d, lane, acc)` per super-block, then `hsum_float_8`.
    VecDot,
    /// The tiled K-quant matmul (`ggml_compute_forward_mul_mat_tiled`, VNNI micro-kernel):
    /// per super-block `r = fnmadd(dmin, Σmin, d·Σ)` (Q6_K: `r = d·Σ`), then
    /// `acc = fma(r, d_x, acc)`, one rounding. The source writes that last step as a separate
    /// multiply and add (`_mm512_add_ps(buf, _mm512_mul_ps(r, d_x))`), but GCC's default
    /// `-ffp-contract=fast` fuses them: the `libggml-cpu.so` of llama-cpp-python 0.3.36 runs
    /// `vfmadd213ps` there for every K-quant, and its AVX2 kernel calls `_mm256_fmadd_ps`
    /// outright. With two roundings most Q6_K products of 2048 columns were an ulp off.
    ///
    /// For few activation rows (≤ 16 in a thread's window) llama.cpp reads K in chunks of
    /// several super-blocks (`ggml_tiled_narrow_k_extent`: 31 KiB over 16 + rows bytes per
    /// value, a multiple of 256 dividing the row), but every chunk still adds its super-blocks
    /// into the one output accumulator one by one, in K order, as the wide path does: the
    /// chunking and the thread split change no rounding, so one order serves every batch.
    Tiled,
    /// Repacked Q4_K, single rows: `ggml_gemv_q4_K_8x8_q8_K`, one `fma` per super-block into
    /// the product and the min accumulators, subtracted at the end.
    Gemv,
    /// Repacked Q4_K, rows in groups of four: `ggml_gemm_q4_K_8x8_q8_K`, the same with one
    /// `fma` per pair of 32-value sub-blocks.
    Gemm,
}

impl KPath {
    /// The kernel llama.cpp runs for a matmul of `tokens` activation rows with these weights.
    /// `repacked`: whether llama.cpp repacks the matrix at load (AVX2 CPUs repack Q4_K with a
    /// row count divisible by 8, but never `token_embd`, which lives in the plain buffer for its
    /// row look-ups even when the output layer shares it). `in_group`: whether this row is one
    /// of the first `tokens - tokens % 4`, which the repacked path hands to its gemm. Matrices
    /// that are not repacked take the tiled kernel from 8 rows on (`ggml_tiled_min_batch`).
    pub fn choose(wtype: WeightType, repacked: bool, tokens: usize, in_group: bool) -> Self {
        if wtype == WeightType::Q4K && repacked {
            if in_group {
                Self::Gemm
            } else {
                Self::Gemv
            }
        } else if tokens >= 8 {
            Self::Tiled
        } else {
            Self::VecDot
        }
    }
}

/// One weight super-block in a common form: unsigned codes, the integer scale of every 16
/// values, the 8 mins (Q4_K/Q5_K), d, dmin, and the code offset (32 for Q6_K, whose values are
/// q − 32; ggml subtracts it as 32·Σ(scale·bsum)).
struct Decoded {
    q: [u8; 256],
    scale16: [i32; 16],
    min: [i32; 8],
    d: f32,
    dmin: f32,
    offset: i32,
}

fn decode(wtype: WeightType, b: &[u8]) -> Decoded {
    let mut q = [0u8; 256];
    let mut scale16 = [0i32; 16];
    let mut min = [0i32; 8];
    match wtype {
        WeightType::Q4K | WeightType::Q5K => {
            let (sc, m) = scales_mins(&b[4..16]);
            min = m;
            for (j, s) in sc.iter().enumerate() {
                scale16[2 * j] = *s;
                scale16[2 * j + 1] = *s;
            }
            let (qh, qs) = if wtype == WeightType::Q5K {
                (Some(&b[16..48]), &b[48..176])
            } else {
                (None, &b[16..144])
            };
            for j in 0..4 {
                for l in 0..32 {
                    let byte = qs[32 * j + l];
                    let (mut lo, mut hi) = (byte & 15, byte >> 4);
                    if let Some(qh) = qh {
                        lo |= ((qh[l] >> (2 * j)) & 1) << 4;
                        hi |= ((qh[l] >> (2 * j + 1)) & 1) << 4;
                    }
                    q[64 * j + l] = lo;
                    q[64 * j + 32 + l] = hi;
                }
            }
            Decoded {
                q,
                scale16,
                min,
                d: f16_at(b, 0),
                dmin: f16_at(b, 2),
                offset: 0,
            }
        }
        _ => {
            // Q6_K: ql[128], qh[64], i8 scales[16], f16 d (ggml's dequantize_row_q6_K order).
            let (ql, qh) = (&b[0..128], &b[128..192]);
            for n in 0..2 {
                for l in 0..32 {
                    let (a, c, h) = (ql[64 * n + l], ql[64 * n + l + 32], qh[32 * n + l]);
                    q[128 * n + l] = (a & 15) | ((h & 3) << 4);
                    q[128 * n + l + 32] = (c & 15) | (((h >> 2) & 3) << 4);
                    q[128 * n + l + 64] = (a >> 4) | (((h >> 4) & 3) << 4);
                    q[128 * n + l + 96] = (c >> 4) | (((h >> 6) & 3) << 4);
                }
            }
            for (j, s) in scale16.iter_mut().enumerate() {
                *s = b[192 + j] as i8 as i32;
            }
            Decoded {
                q,
                scale16,
                min,
                d: f16_at(b, 208),
                dmin: 0.0,
                offset: 32,
            }
        }
    }
}

/// The 6-bit sub-block scales and mins of a Q4_K/Q5_K block (ggml's `get_scale_min_k4`).
pub(super) fn scales_mins(q: &[u8]) -> ([i32; 8], [i32; 8]) {
    let mut sc = [0i32; 8];
    let mut m = [0i32; 8];
    for j in 0..8 {
        let (a, b) = if j < 4 {
            (q[j] & 63, q[j + 4] & 63)
        } else {
            (
                (q[j + 4] & 15) | ((q[j - 4] >> 6) << 4),
                (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
            )
        };
        sc[j] = a as i32;
        m[j] = b as i32;
    }
    (sc, m)
}

/// ggml's 16-value activation sum `j` of a Q8_K block.
fn bsum16(a: &[u8], j: usize) -> i32 {
    i16::from_le_bytes([a[260 + 2 * j], a[261 + 2 * j]]) as i32
}

/// Integer sums of one super-block: per 32-value chunk c and 4-byte lane k, Σ scale·q·x (the
/// code offset taken off per lane as ggml's Q6_K kernel does), and per sub-block pair j the
/// min term Σ min·(sum of the sub-block's activations).
struct Sums {
    lanes: [[i32; 8]; 8],
    mins: [i32; 4],
}

fn sums(w: &Decoded, a: &[u8]) -> Sums {
    let q8 = &a[4..260];
    let mut lanes = [[0i32; 8]; 8];
    for (c, lane) in lanes.iter_mut().enumerate() {
        for t in 0..32 {
            let v = 32 * c + t;
            lane[t / 4] += w.scale16[v / 16] * w.q[v] as i32 * q8[v] as i8 as i32;
        }
    }
    let mut mins = [0i32; 4];
    for (j, m) in mins.iter_mut().enumerate() {
        for s in [2 * j, 2 * j + 1] {
            *m += w.min[s] * (bsum16(a, 2 * s) + bsum16(a, 2 * s + 1));
        }
    }
    Sums { lanes, mins }
}

/// Σ scale·(q − offset)·x of the whole super-block (exact; the offset via the block sums).
fn total(w: &Decoded, s: &Sums, a: &[u8]) -> i32 {
    let products: i32 = s.lanes.iter().flatten().sum();
    let offset: i32 = (0..16).map(|j| w.scale16[j] * bsum16(a, j)).sum();
    products - w.offset * offset
}

fn dot_path(wtype: WeightType, w: &[u8], a: &[u8], cols: usize, path: KPath) -> f32 {
    debug_assert!(
        wtype == WeightType::Q4K || matches!(path, KPath::VecDot | KPath::Tiled),
        "only Q4_K is repacked"
    );
    let wb = wtype.block().1;
    let mut acc = [0f32; 8];
    let (mut acc_min, mut acc_min4) = (0f32, [0f32; 4]);
    for (b, ab) in w
        .chunks_exact(wb)
        .zip(a.chunks_exact(Q8K_BYTES))
        .take(cols / 256)
    {
        let dy = f32_at(ab, 0);
        let blk = decode(wtype, b);
        let s = sums(&blk, ab);
        let imin: i32 = s.mins.iter().sum();
        match path {
            KPath::VecDot => {
                // Lane k: bytes 4k..4k+4 of every chunk; Q6_K takes the offset off lane k as
                // 32·(scale·bsum) of 16-value groups 2k and 2k+1 (its `q8sclsub`).
                let d = dy * blk.d;
                for (k, acc) in acc.iter_mut().enumerate() {
                    let mut lane: i32 = s.lanes.iter().map(|l| l[k]).sum();
                    lane -= blk.offset
                        * (blk.scale16[2 * k] * bsum16(ab, 2 * k)
                            + blk.scale16[2 * k + 1] * bsum16(ab, 2 * k + 1));
                    *acc = d.mul_add(lane as f32, *acc);
                }
                let dmin = -dy * blk.dmin;
                if wtype == WeightType::Q4K {
                    // ggml_vec_dot_q4_K_q8_K keeps the min term in four lanes (sub-block pairs).
                    for (acc, m) in acc_min4.iter_mut().zip(s.mins) {
                        *acc = dmin.mul_add(m as f32, *acc);
                    }
                } else if wtype == WeightType::Q5K {
                    // ggml_vec_dot_q5_K_q8_K: `summs += dmin * Σ` (contracted to an fma).
                    acc_min = dmin.mul_add(imin as f32, acc_min);
                }
            }
            KPath::Tiled => {
                let mut r = total(&blk, &s, ab) as f32 * blk.d;
                if blk.offset == 0 {
                    r = (-blk.dmin).mul_add(imin as f32, r);
                }
                // `buf + r·d_x`, contracted to one fma by the compiler (see `KPath::Tiled`).
                acc[0] = r.mul_add(dy, acc[0]);
            }
            KPath::Gemv => {
                acc[0] = (total(&blk, &s, ab) as f32).mul_add(blk.d * dy, acc[0]);
                acc_min = (imin as f32).mul_add(blk.dmin * dy, acc_min);
            }
            KPath::Gemm => {
                for j in 0..4 {
                    let pair: i32 = s.lanes[2 * j].iter().chain(&s.lanes[2 * j + 1]).sum();
                    acc[0] = (pair as f32).mul_add(blk.d * dy, acc[0]);
                    acc_min = (s.mins[j] as f32).mul_add(blk.dmin * dy, acc_min);
                }
            }
        }
    }
    match path {
        KPath::VecDot => {
            let h = hsum8(acc);
            if wtype == WeightType::Q4K {
                h + ((acc_min4[0] + acc_min4[2]) + (acc_min4[1] + acc_min4[3]))
            } else {
                h + acc_min
            }
        }
        KPath::Tiled => acc[0],
        KPath::Gemv | KPath::Gemm => acc[0] - acc_min,
    }
}

/// ggml's `hsum_float_8`: halves, then pairs, then the last two.
pub(super) fn hsum8(v: [f32; 8]) -> f32 {
    let h: [f32; 4] = std::array::from_fn(|i| v[i] + v[i + 4]);
    (h[0] + h[2]) + (h[1] + h[3])
}

pub(super) fn dequantize(wtype: WeightType, w: &[u8], out: &mut [f32]) {
    match wtype {
        WeightType::Q4K => BlockQ4K::to_float(as_blocks(w), out),
        WeightType::Q5K => BlockQ5K::to_float(as_blocks(w), out),
        _ => BlockQ6K::to_float(as_blocks(w), out),
    }
}

pub(super) fn dot(wtype: WeightType, w: &[u8], a: &[u8], cols: usize, path: KPath) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2() {
        // SAFETY: the CPU has AVX2, FMA and F16C.
        return unsafe { super::kquants_x86::dot(wtype, w, a, cols, path) };
    }
    dot_path(wtype, w, a, cols, path)
}

/// N rows at once, each weight super-block decoded once; bit for bit N [`dot`]s.
pub(super) fn dot_n<const N: usize>(
    wtype: WeightType,
    w: &[u8],
    a: [&[u8]; N],
    cols: usize,
    path: KPath,
) -> [f32; N] {
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2() {
        // SAFETY: the CPU has AVX2, FMA and F16C.
        return unsafe { super::kquants_x86::dot_n(wtype, w, a, cols, path) };
    }
    a.map(|a| dot_path(wtype, w, a, cols, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo_random(n: usize, seed: u32) -> Vec<u8> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(1664525).wrapping_add(1013904223);
                (s >> 24) as u8
            })
            .collect()
    }

    /// Random but valid blocks: arbitrary codes and scales, small finite f16 d and dmin.
    fn weights(wtype: WeightType, blocks: usize, seed: u32) -> Vec<u8> {
        let bytes = wtype.block().1;
        let mut w = pseudo_random(blocks * bytes, seed);
        for (i, b) in w.chunks_exact_mut(bytes).enumerate() {
            let d = half::f16::from_f32(0.002 + 0.001 * (i % 5) as f32).to_le_bytes();
            let at = if wtype == WeightType::Q6K { 208 } else { 0 };
            b[at..at + 2].copy_from_slice(&d);
            if wtype != WeightType::Q6K {
                b[2..4].copy_from_slice(&d);
            }
        }
        w
    }

    #[test]
    fn every_kernel_order_computes_the_same_product() {
        let cols = 512;
        let x: Vec<f32> = pseudo_random(cols, 9)
            .iter()
            .map(|&b| b as f32 / 64.0 - 2.0)
            .collect();
        let mut a = vec![0u8; cols / 256 * Q8K_BYTES];
        quantize_act(&x, &mut a);
        // The activations as the kernels see them: d·q.
        let xq: Vec<f32> = a
            .chunks_exact(Q8K_BYTES)
            .flat_map(|b| {
                let d = f32_at(b, 0);
                b[4..260].iter().map(move |&q| d * q as i8 as f32)
            })
            .collect();
        for wtype in [WeightType::Q4K, WeightType::Q5K, WeightType::Q6K] {
            let w = weights(wtype, cols / 256, 3);
            let mut deq = vec![0f32; cols];
            dequantize(wtype, &w, &mut deq);
            let exact: f64 = deq
                .iter()
                .zip(&xq)
                .map(|(a, b)| *a as f64 * *b as f64)
                .sum();
            let paths: &[KPath] = if wtype == WeightType::Q4K {
                &[KPath::VecDot, KPath::Tiled, KPath::Gemv, KPath::Gemm]
            } else {
                &[KPath::VecDot, KPath::Tiled]
            };
            for &path in paths {
                let got = dot(wtype, &w, &a, cols, path) as f64;
                assert!(
                    (got - exact).abs() <= 1e-4 * exact.abs().max(1.0),
                    "{wtype:?} {path:?}: {got} vs {exact}"
                );
            }
        }
    }

    /// Random blocks with extreme f16 scales (largest finite, subnormal, zero, negative) and
    /// random activation bytes (−128 included, arbitrary block sums) with extreme f32 scales.
    #[test]
    fn simd_kernels_equal_the_scalar_oracle_bit_for_bit() {
        if !super::super::has_avx2() {
            return;
        }
        let halves = [65504.0f32, -65504.0, 6e-8, 0.0, -1.0, 0.002, 1.5, -3.0e-5];
        let act_d = [1e30f32, -1e-30, 0.0, 1.0, -0.007, 3.4e38];
        let cols = 2048;
        for seed in 0..24u32 {
            let mut rows: Vec<Vec<u8>> = (0..8)
                .map(|r| pseudo_random(cols / 256 * Q8K_BYTES, 1000 * seed + r))
                .collect();
            for (r, row) in rows.iter_mut().enumerate() {
                for (i, b) in row.chunks_exact_mut(Q8K_BYTES).enumerate() {
                    let d = act_d[(i + r + seed as usize) % act_d.len()];
                    let d = if seed % 3 == 0 {
                        d
                    } else {
                        0.01 * (1 + i % 3) as f32
                    };
                    b[..4].copy_from_slice(&d.to_le_bytes());
                }
            }
            for wtype in [WeightType::Q4K, WeightType::Q5K, WeightType::Q6K] {
                let bytes = wtype.block().1;
                let mut w = pseudo_random(cols / 256 * bytes, 77 + seed);
                for (i, b) in w.chunks_exact_mut(bytes).enumerate() {
                    let pick = |k: usize| {
                        let v = halves[(i * 3 + k + seed as usize) % halves.len()];
                        half::f16::from_f32(if seed % 2 == 0 { v } else { v * 1e-3 }).to_le_bytes()
                    };
                    if wtype == WeightType::Q6K {
                        b[208..210].copy_from_slice(&pick(0));
                        if seed % 4 == 1 {
                            b[192..208].fill(0x80); // every scale −128
                        }
                    } else {
                        b[0..2].copy_from_slice(&pick(0));
                        b[2..4].copy_from_slice(&pick(5));
                        if seed % 4 == 1 {
                            b[4..16].fill(0xff); // every scale and min 63
                        }
                    }
                    if seed % 4 == 2 {
                        // Every code at its maximum.
                        let codes = if wtype == WeightType::Q6K {
                            0..192
                        } else {
                            16..bytes
                        };
                        b[codes].fill(0xff);
                    }
                }
                for path in [KPath::VecDot, KPath::Tiled, KPath::Gemv, KPath::Gemm] {
                    if wtype != WeightType::Q4K && matches!(path, KPath::Gemv | KPath::Gemm) {
                        continue;
                    }
                    let a: [&[u8]; 8] = std::array::from_fn(|r| &rows[r][..]);
                    let x4 = dot_n(wtype, &w, [a[0], a[1], a[2], a[3]], cols, path);
                    let x8 = dot_n(wtype, &w, a, cols, path);
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: the CPU has AVX2 (checked above).
                    let each =
                        unsafe { super::super::kquants_x86::dot_n_each(wtype, &w, a, cols, path) };
                    #[cfg(not(target_arch = "x86_64"))]
                    let each: Vec<[f32; 8]> = Vec::new();
                    for r in 0..8 {
                        let oracle = dot_path(wtype, &w, a[r], cols, path);
                        let one = dot(wtype, &w, a[r], cols, path);
                        let variants = each.iter().map(|v| v[r]);
                        for got in [one, x8[r]]
                            .into_iter()
                            .chain(x4.get(r).copied())
                            .chain(variants)
                        {
                            assert!(
                                got.to_bits() == oracle.to_bits()
                                    || (got.is_nan() && oracle.is_nan()),
                                "{wtype:?} {path:?} seed {seed} row {r}: {got} vs {oracle}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The tiled path adds each super-block with one fma, as llama.cpp's compiled kernel does.
    /// Q6_K row of two super-blocks whose only live product is value 0 (code 33, scale 1, so
    /// the integer sum is the activation): block 0 gives exactly 1; block 1 gives 3·d_x with
    /// d_x = f32(4/3)·2⁻²⁶, so 3·d_x = 2⁻²⁴·(1 + 2⁻²⁵). Rounded on its own that is 2⁻²⁴, and
    /// 1 + 2⁻²⁴ ties to even, 1; fused, the sum is above the tie and rounds up to 1 + 2⁻²³.
    #[test]
    fn tiled_adds_each_super_block_with_one_fma() {
        let mut w = vec![0u8; 2 * 210];
        let mut a = vec![0u8; 2 * Q8K_BYTES];
        let dx = [1.0f32, (4.0f32 / 3.0) * 2f32.powi(-26)];
        for (i, x) in [1i8, 3].into_iter().enumerate() {
            let b = &mut w[210 * i..210 * (i + 1)];
            b[0] = 1; // low four bits of code 0
            b[128] = 2; // its high two bits: 33
            b[192] = 1; // scale of values 0..16
            b[208..210].copy_from_slice(&half::f16::ONE.to_le_bytes());
            let ab = &mut a[Q8K_BYTES * i..Q8K_BYTES * (i + 1)];
            ab[..4].copy_from_slice(&dx[i].to_le_bytes());
            ab[4] = x as u8;
            ab[260..262].copy_from_slice(&(x as i16).to_le_bytes());
        }
        let want = 1.0 + f32::EPSILON;
        assert_eq!(dot_path(WeightType::Q6K, &w, &a, 512, KPath::Tiled), want);
        assert_eq!(dot(WeightType::Q6K, &w, &a, 512, KPath::Tiled), want);
    }

    #[test]
    fn kernel_choice_follows_llama_cpp() {
        use WeightType::*;
        assert_eq!(KPath::choose(Q4K, true, 1, false), KPath::Gemv);
        assert_eq!(KPath::choose(Q4K, true, 24, true), KPath::Gemm);
        assert_eq!(KPath::choose(Q4K, true, 24, false), KPath::Gemv);
        assert_eq!(KPath::choose(Q4K, false, 24, true), KPath::Tiled);
        assert_eq!(KPath::choose(Q5K, true, 7, true), KPath::VecDot);
        assert_eq!(KPath::choose(Q6K, true, 8, false), KPath::Tiled);
    }

    #[test]
    fn q8k_quantizer_rounds_ties_to_even() {
        let mut x = vec![0f32; 256];
        x[0] = -127.0; // the extreme: scale −127/max = 1
        x[1] = 2.5;
        x[2] = -3.5;
        let mut a = vec![0u8; Q8K_BYTES];
        quantize_act(&x, &mut a);
        assert_eq!(f32_at(&a, 0), 1.0);
        assert_eq!([a[4] as i8, a[5] as i8, a[6] as i8], [-127, 2, -4]);
        assert_eq!(bsum16(&a, 0), -129);
    }
}
