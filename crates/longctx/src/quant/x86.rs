//! AVX2 kernels for the 32-value block formats, written by hand because candle has no SIMD path
//! for Q4_1 (its `vec_dot_unopt` is scalar) and because the prefill kernel reads each weight
//! block once for several activation rows.
//!
//! Every weight block is turned into 32 unsigned bytes (Q4_1, Q5_1) or into |w| plus a sign
//! (Q4_0, Q5_0, Q8_0, ggml's sign trick), so that one `maddubs` multiplies it with 32 signed
//! activation bytes. The float order of each type is documented in `blocks.rs`, whose
//! `dot_scalar` is the bit-for-bit oracle of these kernels.
//!
//! The kernels are stamped out twice by `block_kernels!`, once for AVX2 and once with AVX512-VNNI
//! enabled: every helper must carry the same target features as its caller, or LLVM leaves the
//! intrinsics inside it as out-of-line calls (measured: a third of prefill time).

use std::arch::x86_64::*;
use std::sync::OnceLock;

use super::WeightType;

pub(crate) fn has_avx2() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    })
}

/// Σ u·s over 32 byte pairs, as 8 i32 lanes (lane i = the 4 products of bytes 4i..4i+4).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn products_i_avx2(unsigned: __m256i, signed: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(unsigned, signed), _mm256_set1_epi16(1))
}

/// The same with one `vpdpbusd`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
unsafe fn products_i_vnni(unsigned: __m256i, signed: __m256i) -> __m256i {
    _mm256_dpbusd_epi32(_mm256_setzero_si256(), unsigned, signed)
}

/// `acc` plus Σ u·s over 32 byte pairs, as 8 i32 lanes (lane i = the 4 products of bytes
/// 4i..4i+4). `maddubs` saturates at 16 bits: only for unsigned bytes ≤ 31.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn products_acc_avx2(acc: __m256i, unsigned: __m256i, signed: __m256i) -> __m256i {
    _mm256_add_epi32(acc, products_i_avx2(unsigned, signed))
}

/// The same with one `vpdpbusd`, which adds into `acc` for free.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
unsafe fn products_acc_vnni(acc: __m256i, unsigned: __m256i, signed: __m256i) -> __m256i {
    _mm256_dpbusd_epi32(acc, unsigned, signed)
}

/// Σ u·s over 32 byte pairs, as 8 f32 lanes (lane i = the 4 products of bytes 4i..4i+4).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn products_avx2(unsigned: __m256i, signed: __m256i) -> __m256 {
    let pairs = _mm256_maddubs_epi16(unsigned, signed);
    _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
}

/// The same with one `vpdpbusd`; the integer results are identical.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
unsafe fn products_vnni(unsigned: __m256i, signed: __m256i) -> __m256 {
    _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(
        _mm256_setzero_si256(),
        unsigned,
        signed,
    ))
}

/// One activation row in our layout: 8-bit values, then f32 scales, then (Q8_1) f32 sums or
/// (Q8_0) the blocks' −16·Σ4 vectors.
#[derive(Clone, Copy)]
struct Row {
    qs: *const u8,
    d: *const f32,
    s: *const f32,
}

impl Row {
    #[inline(always)]
    unsafe fn new(a: &[u8], cols: usize) -> Self {
        let qs = a.as_ptr();
        let d = qs.add(cols).cast::<f32>();
        Self {
            qs,
            d,
            s: d.add(cols / 32),
        }
    }
}

macro_rules! block_kernels {
    ($features:literal, $products:ident, $products_i:ident, $products_acc:ident) => {
        use super::*;

        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn half(p: *const u8) -> f32 {
            let bits = std::ptr::read_unaligned(p.cast::<u16>());
            _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
        }

        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn hsum(v: __m256) -> f32 {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_movehdup_ps(s));
            _mm_cvtss_f32(s)
        }

        /// 16 packed bytes of nibbles → 32 bytes, values 0..15, in element order.
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn unpack_nibbles(p: *const u8) -> __m256i {
            let packed = _mm_loadu_si128(p.cast());
            let low = _mm_and_si128(packed, _mm_set1_epi8(15));
            let high = _mm_and_si128(_mm_srli_epi16(packed, 4), _mm_set1_epi8(15));
            _mm256_set_m128i(high, low)
        }

        /// The 32 high bits of a Q5 block (qh, a little-endian u32 at `p`) → 32 bytes, 0xff
        /// where bit j is set, 0 where not. Both 128-bit halves hold all four qh bytes, so the
        /// in-lane byte shuffle can hand byte j the qh byte j/8; one AND picks bit j%8.
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn high_bits(p: *const u8) -> __m256i {
            let qh = _mm256_set1_epi32(std::ptr::read_unaligned(p.cast::<i32>()));
            let spread = _mm256_shuffle_epi8(
                qh,
                _mm256_setr_epi64x(
                    0,
                    0x0101_0101_0101_0101,
                    0x0202_0202_0202_0202,
                    0x0303_0303_0303_0303,
                ),
            );
            let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
            _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit)
        }

        /// The 32 unsigned codes 0..31 of the Q5_0 block at `b`.
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn q5_codes(b: *const u8) -> __m256i {
            let high = _mm256_and_si256(high_bits(b.add(2)), _mm256_set1_epi8(0x10));
            _mm256_or_si256(unpack_nibbles(b.add(6)), high)
        }

        /// d and m of a Q4_1/Q5_1 block: adjacent f16s, one conversion for both.
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn half_pair(p: *const u8) -> (f32, f32) {
            let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(p.cast::<i32>())));
            (_mm_cvtss_f32(dm), _mm_cvtss_f32(_mm_movehdup_ps(dm)))
        }

        /// The weight block ready for the products: (unsigned bytes, sign source, d, m).
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn load_weight(wtype: WeightType, b: *const u8) -> (__m256i, __m256i, f32, f32) {
            match wtype {
                WeightType::Q4_1 => {
                    let (d, m) = half_pair(b);
                    (unpack_nibbles(b.add(4)), _mm256_setzero_si256(), d, m)
                }
                WeightType::Q5_1 => {
                    // Codes 0..31: the nibble with 0x10 where the high bit is set.
                    let (d, m) = half_pair(b);
                    let high = _mm256_and_si256(high_bits(b.add(4)), _mm256_set1_epi8(0x10));
                    let codes = _mm256_or_si256(unpack_nibbles(b.add(8)), high);
                    (codes, _mm256_setzero_si256(), d, m)
                }
                WeightType::Q5_0 => {
                    // code − 16 as i8: the nibble itself where the high bit is set, the nibble
                    // with 0xf0 (−16 + nibble) where it is not.
                    let low = _mm256_andnot_si256(high_bits(b.add(2)), _mm256_set1_epi8(-16));
                    let signed = _mm256_or_si256(unpack_nibbles(b.add(6)), low);
                    (_mm256_sign_epi8(signed, signed), signed, half(b), 0.0)
                }
                WeightType::Q4_0 => {
                    let signed = _mm256_sub_epi8(unpack_nibbles(b.add(2)), _mm256_set1_epi8(8));
                    (_mm256_sign_epi8(signed, signed), signed, half(b), 0.0)
                }
                _ => {
                    let signed = _mm256_loadu_si256(b.add(2).cast());
                    (_mm256_sign_epi8(signed, signed), signed, half(b), 0.0)
                }
            }
        }

        /// Adds block `i` of row `x` times the weight block to `acc`, and for Q4_1/Q5_1 the
        /// minimum term to `summs` as `fma(m, s, summs)` (ggml sums it apart from the vector
        /// accumulator too, and GCC fuses its `summs += m*s`).
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn block(
            wtype: WeightType,
            w: (__m256i, __m256i, f32, f32),
            x: Row,
            i: usize,
            acc: &mut __m256,
            summs: &mut f32,
        ) {
            let (unsigned, sign, dw, m) = w;
            let q = _mm256_loadu_si256(x.qs.add(32 * i).cast());
            let scale = _mm256_set1_ps(dw * std::ptr::read_unaligned(x.d.add(i)));
            if matches!(wtype, WeightType::Q4_1 | WeightType::Q5_1) {
                *acc = _mm256_fmadd_ps(scale, $products(unsigned, q), *acc);
                *summs = m.mul_add(std::ptr::read_unaligned(x.s.add(i)), *summs);
            } else {
                *acc = _mm256_fmadd_ps(scale, $products(unsigned, _mm256_sign_epi8(q, sign)), *acc);
            }
        }

        /// Σ of the 8 i32 lanes (integer, so the order is free).
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn hsum_i32(v: __m256i) -> i32 {
            let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
            _mm_cvtsi128_si32(s)
        }

        /// Q4_0 as llama.cpp runs it on AVX2 CPUs: the weights are repacked at load and
        /// `ggml_gemv_q4_0_8x8_q8_0` / `ggml_gemm_q4_0_8x8_q8_0` keep one f32 accumulator per
        /// output, `acc = fma(Σq_w·q_x, d_w·d_x, acc)` block after block, with no lane split
        /// and no final horizontal float sum; the block's integer sum is order-free.
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn q4_0_block(w: (__m256i, __m256i, f32, f32), x: Row, i: usize, acc: f32) -> f32 {
            let (unsigned, sign, dw, _) = w;
            let q = _mm256_loadu_si256(x.qs.add(32 * i).cast());
            let p = $products_i(unsigned, _mm256_sign_epi8(q, sign));
            (hsum_i32(p) as f32).mul_add(dw * std::ptr::read_unaligned(x.d.add(i)), acc)
        }

        /// One row, every type. For Q5_0 and Q8_0 this is also what `dot_q5_q8` computes, but
        /// for a decoded token this loop measured faster (Gemma 3 270M: 47 against 41 tokens/s,
        /// most of it the Q8_0 output layer).
        #[target_feature(enable = $features)]
        pub(super) unsafe fn dot(wtype: WeightType, w: &[u8], a: &[u8], cols: usize) -> f32 {
            let wb = wtype.block().1;
            if wtype == WeightType::Q4_0 {
                let wp = w.as_ptr();
                let x = Row::new(a, cols);
                let mut acc = 0f32;
                for i in 0..cols / 32 {
                    acc = q4_0_block(load_weight(wtype, wp.add(i * wb)), x, i, acc);
                }
                return acc;
            }
            let wp = w.as_ptr();
            let x = Row::new(a, cols);
            let mut acc = _mm256_setzero_ps();
            let mut summs = 0f32;
            for i in 0..cols / 32 {
                let wv = load_weight(wtype, wp.add(i * wb));
                block(wtype, wv, x, i, &mut acc, &mut summs);
            }
            hsum(acc) + summs
        }

        /// Q5_0 (`Q5`) or Q8_0 weights times N activation rows, each weight block decoded once
        /// for all of them. Q5_0 multiplies the unsigned codes 0..31 and starts each lane from
        /// the activations' −16·Σ4 (stored with the row, as it does not depend on the weights):
        /// the same integer lane sums as ggml's signed codes, without a sign flip of every
        /// activation block for every weight row. Q8_0 keeps the sign trick, as its |w| up to
        /// 128 would saturate AVX2's `maddubs`. `set1(d_w)·set1(d_x)` is ggml's scalar
        /// `d_w·d_x` in every lane.
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn dot_q5_q8<const N: usize, const Q5: bool>(
            w: &[u8],
            a: [&[u8]; N],
            cols: usize,
        ) -> [f32; N] {
            let wb = if Q5 { 22 } else { 34 };
            assert!(w.len() >= cols / 32 * wb);
            let wp = w.as_ptr();
            let rows = a.map(|a| Row::new(a, cols));
            let mut acc = [_mm256_setzero_ps(); N];
            for i in 0..cols / 32 {
                let b = wp.add(i * wb);
                let dw = _mm256_set1_ps(half(b));
                if Q5 {
                    let codes = q5_codes(b);
                    for r in 0..N {
                        let x = rows[r];
                        let q = _mm256_loadu_si256(x.qs.add(32 * i).cast());
                        let offset = _mm256_loadu_si256(x.s.add(8 * i).cast());
                        let p = $products_acc(offset, codes, q);
                        let scale = _mm256_mul_ps(dw, _mm256_broadcast_ss(&*x.d.add(i)));
                        acc[r] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(p), acc[r]);
                    }
                } else {
                    let signed = _mm256_loadu_si256(b.add(2).cast());
                    let unsigned = _mm256_sign_epi8(signed, signed);
                    for r in 0..N {
                        let x = rows[r];
                        let q = _mm256_loadu_si256(x.qs.add(32 * i).cast());
                        let p = $products(unsigned, _mm256_sign_epi8(q, signed));
                        let scale = _mm256_mul_ps(dw, _mm256_broadcast_ss(&*x.d.add(i)));
                        acc[r] = _mm256_fmadd_ps(scale, p, acc[r]);
                    }
                }
            }
            acc.map(|v| hsum(v))
        }

        /// Q4_0, Q4_1 and Q5_1 weights times N activation rows.
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn dot_other<const N: usize>(
            wtype: WeightType,
            w: &[u8],
            a: [&[u8]; N],
            cols: usize,
        ) -> [f32; N] {
            let wb = wtype.block().1;
            assert!(w.len() >= cols / 32 * wb);
            let wp = w.as_ptr();
            let rows = a.map(|a| Row::new(a, cols));
            if wtype == WeightType::Q4_0 {
                let mut acc = [0f32; N];
                for i in 0..cols / 32 {
                    let wv = load_weight(wtype, wp.add(i * wb));
                    for r in 0..N {
                        acc[r] = q4_0_block(wv, rows[r], i, acc[r]);
                    }
                }
                return acc;
            }
            let mut acc = [_mm256_setzero_ps(); N];
            let mut summs = [0f32; N];
            for i in 0..cols / 32 {
                let wv = load_weight(wtype, wp.add(i * wb));
                for r in 0..N {
                    block(wtype, wv, rows[r], i, &mut acc[r], &mut summs[r]);
                }
            }
            std::array::from_fn(|r| hsum(acc[r]) + summs[r])
        }

        #[target_feature(enable = $features)]
        pub(super) unsafe fn dot_n<const N: usize>(
            wtype: WeightType,
            w: &[u8],
            a: [&[u8]; N],
            cols: usize,
        ) -> [f32; N] {
            match wtype {
                WeightType::Q5_0 => dot_q5_q8::<N, true>(w, a, cols),
                WeightType::Q8_0 => dot_q5_q8::<N, false>(w, a, cols),
                _ => dot_other(wtype, w, a, cols),
            }
        }
    };
}

mod avx2 {
    block_kernels!(
        "avx2,fma,f16c",
        products_avx2,
        products_i_avx2,
        products_acc_avx2
    );
}

mod vnni {
    block_kernels!(
        "avx2,fma,f16c,avx512f,avx512vl,avx512vnni",
        products_vnni,
        products_i_vnni,
        products_acc_vnni
    );

    /// `dot_q5_q8::<N, true>` for two weight rows at once: row 0 in the low 256 bits of each
    /// zmm, row 1 in the high ones, every lane the same operation as there. The activations'
    /// values and offsets reach both halves by broadcast loads and their scale as an embedded
    /// broadcast, so a product costs half the vector instructions of the one-row kernel, which
    /// issues about one per cycle for Gemma 3's q, k, v, gate and up matrices.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
    pub(super) unsafe fn dot_q5_pair<const N: usize>(
        w: [&[u8]; 2],
        a: [&[u8]; N],
        cols: usize,
    ) -> [[f32; N]; 2] {
        const WB: usize = 22;
        assert!(w.iter().all(|w| w.len() >= cols / 32 * WB));
        let rows = a.map(|a| Row::new(a, cols));
        let mut acc = [_mm512_setzero_ps(); N];
        for i in 0..cols / 32 {
            let (b0, b1) = (w[0].as_ptr().add(i * WB), w[1].as_ptr().add(i * WB));
            let both = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(q5_codes(b0)), q5_codes(b1));
            let dw = _mm512_shuffle_f32x4::<0b01_00_01_00>(
                _mm512_set1_ps(half(b0)),
                _mm512_set1_ps(half(b1)),
            );
            for r in 0..N {
                let x = rows[r];
                let q = _mm512_broadcast_i64x4(_mm256_loadu_si256(x.qs.add(32 * i).cast()));
                let offset = _mm512_broadcast_i64x4(_mm256_loadu_si256(x.s.add(8 * i).cast()));
                let p = _mm512_dpbusd_epi32(offset, both, q);
                let scale = _mm512_mul_ps(dw, _mm512_set1_ps(*x.d.add(i)));
                acc[r] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(p), acc[r]);
            }
        }
        let low = acc.map(|v| hsum(_mm512_castps512_ps256(v)));
        let high = acc.map(|v| {
            hsum(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(
                _mm512_castps_pd(v),
            )))
        });
        [low, high]
    }
}

fn has_vnni() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni")
    })
}

/// # Safety
/// The CPU must have AVX2, FMA and F16C ([`has_avx2`]).
pub(super) unsafe fn dot(wtype: WeightType, w: &[u8], a: &[u8], cols: usize) -> f32 {
    if has_vnni() {
        vnni::dot(wtype, w, a, cols)
    } else {
        avx2::dot(wtype, w, a, cols)
    }
}

/// One weight row times N activation rows, the weight read once.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C ([`has_avx2`]).
pub(super) unsafe fn dot_n<const N: usize>(
    wtype: WeightType,
    w: &[u8],
    a: [&[u8]; N],
    cols: usize,
) -> [f32; N] {
    if has_vnni() {
        vnni::dot_n(wtype, w, a, cols)
    } else {
        avx2::dot_n(wtype, w, a, cols)
    }
}

/// Two weight rows times N activation rows where a kernel takes them together (Q5_0 on
/// AVX-512 VNNI), bit for bit two [`dot_n`]s; `None` elsewhere.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C ([`has_avx2`]).
pub(super) unsafe fn dot_pair_n<const N: usize>(
    wtype: WeightType,
    w: [&[u8]; 2],
    a: [&[u8]; N],
    cols: usize,
) -> Option<[[f32; N]; 2]> {
    (wtype == WeightType::Q5_0 && has_vnni()).then(|| vnni::dot_q5_pair(w, a, cols))
}

/// ggml's x86 `quantize_row_q8_0`/`q8_1` for one 32-value block into our layout: 127/amax scale,
/// `_mm256_round_ps` to nearest even, integer sum for Q8_1. Returns (d, Σq).
///
/// # Safety
/// The CPU must have AVX2 and FMA; `x` holds 32 values and `qs` 32 bytes.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn quantize_block(x: &[f32], qs: &mut [u8]) -> (f32, i32) {
    let p = x.as_ptr();
    let v = [
        _mm256_loadu_ps(p),
        _mm256_loadu_ps(p.add(8)),
        _mm256_loadu_ps(p.add(16)),
        _mm256_loadu_ps(p.add(24)),
    ];
    let sign = _mm256_set1_ps(-0.0);
    let mut m = _mm256_andnot_ps(sign, v[0]);
    for vi in &v[1..] {
        m = _mm256_max_ps(m, _mm256_andnot_ps(sign, *vi));
    }
    let m4 = _mm_max_ps(_mm256_extractf128_ps(m, 1), _mm256_castps256_ps128(m));
    let m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    let m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    let amax = _mm_cvtss_f32(m4);
    let id = _mm256_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
    let q: [__m256i; 4] = std::array::from_fn(|i| {
        _mm256_cvtps_epi32(_mm256_round_ps(
            _mm256_mul_ps(v[i], id),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        ))
    });
    let sum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    let s4 = _mm_add_epi32(
        _mm256_extracti128_si256(sum, 1),
        _mm256_castsi256_si128(sum),
    );
    let s4 = _mm_hadd_epi32(s4, s4);
    let s4 = _mm_hadd_epi32(s4, s4);
    // Pack 32-bit → 16-bit → 8-bit; the packs interleave 128-bit lanes, the permute undoes it.
    let lo = _mm256_packs_epi32(q[0], q[1]);
    let hi = _mm256_packs_epi32(q[2], q[3]);
    let bytes = _mm256_packs_epi16(lo, hi);
    let bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(qs.as_mut_ptr().cast(), bytes);
    (amax / 127.0, _mm_cvtsi128_si32(s4))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::blocks::dot_scalar;
    use crate::quant::Activations;

    /// `dot` and `dot_n` run only the best variant the CPU has; this runs both stamped variants
    /// (the VNNI one where the CPU has it), for one, four and eight rows, against the scalar
    /// oracle.
    #[test]
    fn both_kernel_variants_equal_the_scalar_oracle() {
        if !has_avx2() {
            return;
        }
        let mut s = 3u32;
        let mut next = move || {
            s = s.wrapping_mul(1664525).wrapping_add(1013904223);
            s
        };
        for cols in [32, 96, 640, 2048] {
            for wtype in [
                WeightType::Q4_0,
                WeightType::Q4_1,
                WeightType::Q5_0,
                WeightType::Q5_1,
                WeightType::Q8_0,
            ] {
                let bytes = wtype.block().1;
                let mut w: Vec<u8> = (0..cols / 32 * bytes).map(|_| next() as u8).collect();
                for (i, b) in w.chunks_exact_mut(bytes).enumerate() {
                    let d = half::f16::from_f32(0.001 * (i % 7) as f32 - 0.003);
                    b[..2].copy_from_slice(&d.to_le_bytes());
                    if matches!(wtype, WeightType::Q4_1 | WeightType::Q5_1) {
                        b[2..4].copy_from_slice(&(-d).to_le_bytes());
                    }
                }
                // Eight rows converted together, as the matmul driver has them.
                let x: Vec<f32> = (0..8 * cols)
                    .map(|_| (next() >> 8) as f32 / (1 << 24) as f32 - 0.5)
                    .collect();
                let mut acts = Activations::default();
                acts.quantize(&x, 8, cols, wtype.act_type());
                let a: [&[u8]; 8] = std::array::from_fn(|r| acts.row(r));
                let four = [a[0], a[1], a[2], a[3]];
                let oracle = a.map(|a| dot_scalar(wtype, &w, a, cols).to_bits());
                // SAFETY: has_avx2 (and has_vnni for the VNNI variant) checked.
                unsafe {
                    let mut got = vec![(
                        "avx2",
                        a.map(|a| avx2::dot(wtype, &w, a, cols)),
                        avx2::dot_n(wtype, &w, four, cols),
                        avx2::dot_n(wtype, &w, a, cols),
                    )];
                    if has_vnni() {
                        got.push((
                            "vnni",
                            a.map(|a| vnni::dot(wtype, &w, a, cols)),
                            vnni::dot_n(wtype, &w, four, cols),
                            vnni::dot_n(wtype, &w, a, cols),
                        ));
                    }
                    for (name, one, four, eight) in got {
                        assert_eq!(one.map(f32::to_bits), oracle, "{name} {wtype:?} {cols}");
                        assert_eq!(
                            four.map(f32::to_bits),
                            oracle[..4],
                            "{name} {wtype:?} {cols}"
                        );
                        assert_eq!(eight.map(f32::to_bits), oracle, "{name} {wtype:?} {cols}");
                    }
                    // Two rows at once: the second row is the first's blocks in reverse order.
                    if wtype == WeightType::Q5_0 && has_vnni() {
                        let w2: Vec<u8> = w.chunks_exact(bytes).rev().flatten().copied().collect();
                        let oracle2 = a.map(|a| dot_scalar(wtype, &w2, a, cols).to_bits());
                        let [first, second] = vnni::dot_q5_pair([&w, &w2], a, cols);
                        assert_eq!(first.map(f32::to_bits), oracle, "pair {cols}");
                        assert_eq!(second.map(f32::to_bits), oracle2, "pair {cols}");
                        let [first, second] = vnni::dot_q5_pair([&w, &w2], four, cols);
                        assert_eq!(first.map(f32::to_bits), oracle[..4], "pair {cols}");
                        assert_eq!(second.map(f32::to_bits), oracle2[..4], "pair {cols}");
                    }
                }
            }
        }
    }
}
