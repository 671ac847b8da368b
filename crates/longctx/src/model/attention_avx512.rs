//! AVX-512 kernels for [`super::attention::attend_block`]: a group of up to four query rows
//! that see the same slots (the query heads sharing a KV head, at one token) scored and summed
//! together, with the arithmetic of the one-row kernels, bit for bit.
//!
//! Written by hand because the bits must be llama.cpp's (see the attention module): a 16-lane
//! zmm lane is exactly one of tinyBLAS's lanes, so each score is the same FMA chain and the same
//! halving tree. What changes is traffic: the one-row kernels load a key (or a value) once per
//! query and a query chunk once per key, two loads per FMA, and at head size 256 a tile of keys
//! lives in L2, not L1. Here a 16-dimension chunk of four keys meets the same chunk of every
//! row of the group in registers (half a load per FMA), and each value chunk weights every row's
//! sums at once. At 32k on Gemma 3 the global layers' attention is most of a prefill's time.

use std::arch::x86_64::*;
use std::sync::OnceLock;

/// Keys per pass of [`scores16`].
const KEYS: usize = 4;

/// Whether the CPU runs these kernels.
pub fn available() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx512f"))
}

/// Lane m of the result is `_mm512_reduce_add_ps(v[m])`, the same additions (lane i + i+8,
/// then i + i+4, i + i+2, i + i+1), done for the 16 vectors at once.
#[inline(always)]
unsafe fn tree16x16(v: [__m512; 16]) -> __m512 {
    // Lanes i + i+8: each result holds the 8 partials of two vectors.
    let mut eights = [_mm512_setzero_ps(); 8];
    for (m, e) in eights.iter_mut().enumerate() {
        let (a, b) = (v[2 * m], v[2 * m + 1]);
        *e = _mm512_add_ps(
            _mm512_shuffle_f32x4::<0b01_00_01_00>(a, b),
            _mm512_shuffle_f32x4::<0b11_10_11_10>(a, b),
        );
    }
    // Lanes i + i+4: 128-bit lane k of `fours[m]` holds vector 4m + k.
    let mut fours = [_mm512_setzero_ps(); 4];
    for (m, f) in fours.iter_mut().enumerate() {
        let (a, b) = (eights[2 * m], eights[2 * m + 1]);
        *f = _mm512_add_ps(
            _mm512_shuffle_f32x4::<0b10_00_10_00>(a, b),
            _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b),
        );
    }
    // Lanes i + i+2: 128-bit lane k of `twos[m]` holds vectors 8m + k and 8m + 4 + k.
    let mut twos = [_mm512_setzero_ps(); 2];
    for (m, t) in twos.iter_mut().enumerate() {
        let (a, b) = (fours[2 * m], fours[2 * m + 1]);
        *t = _mm512_add_ps(
            _mm512_shuffle_ps::<0b01_00_01_00>(a, b),
            _mm512_shuffle_ps::<0b11_10_11_10>(a, b),
        );
    }
    // Lanes i + i+1: element e of 128-bit lane k holds vector 4e + k.
    let sums = _mm512_add_ps(
        _mm512_shuffle_ps::<0b10_00_10_00>(twos[0], twos[1]),
        _mm512_shuffle_ps::<0b11_01_11_01>(twos[0], twos[1]),
    );
    let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    _mm512_permutexvar_ps(order, sums)
}

/// `s_r[j] = q_r·k_j · scale` in tinyBLAS's 16-lane order, for `R` rows at once: row r's query
/// is `q[r·q_stride..][..d]`, its scores `s[r·s_stride..][..n]`, the keys `[n][d]`.
///
/// # Safety
/// The CPU has AVX-512F ([`available`]); `d % 16 == 0`; the pointers hold what is said above.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn scores16<const R: usize>(
    q: *const f32,
    q_stride: usize,
    keys: *const f32,
    n: usize,
    d: usize,
    scale: f32,
    s: *mut f32,
    s_stride: usize,
) {
    let scale = _mm512_set1_ps(scale);
    let mut sums = [0f32; 16];
    for j in (0..n).step_by(KEYS) {
        // Past the last key, the last one again: its scores are not stored.
        let key = |k: usize| keys.add((j + k).min(n - 1) * d);
        let mut acc = [_mm512_setzero_ps(); 16];
        for c in (0..d).step_by(16) {
            let k = [0, 1, 2, 3].map(|m| _mm512_loadu_ps(key(m).add(c)));
            for r in 0..R {
                let qr = _mm512_loadu_ps(q.add(r * q_stride + c));
                for m in 0..KEYS {
                    acc[r * KEYS + m] = _mm512_fmadd_ps(qr, k[m], acc[r * KEYS + m]);
                }
            }
        }
        _mm512_storeu_ps(sums.as_mut_ptr(), _mm512_mul_ps(tree16x16(acc), scale));
        let keys_here = KEYS.min(n - j);
        for r in 0..R {
            let out = s.add(r * s_stride + j);
            for m in 0..keys_here {
                *out.add(m) = sums[r * KEYS + m];
            }
        }
    }
}

/// Lane l of each row's sums (`acc[r·acc_stride..]`, `[LANES][d]`) += Σ p_r[j]·v_j over the
/// slots j ≡ l (mod LANES) of the tile, in slot order: the one-row kernel's chains, with each
/// 64-dimension chunk of a value loaded once for the `R` rows (weights `p[r·p_stride..][..n]`).
///
/// # Safety
/// The CPU has AVX-512F ([`available`]); `d % 64 == 0`; `values` holds `[n][d]`; the tile
/// starts at a slot that is a multiple of `LANES`.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn accumulate<const LANES: usize, const R: usize>(
    values: *const f32,
    n: usize,
    d: usize,
    p: *const f32,
    p_stride: usize,
    acc: *mut f32,
    acc_stride: usize,
) {
    for lane in 0..LANES.min(n) {
        for dc in (0..d).step_by(64) {
            let at = |r: usize| acc.add(r * acc_stride + lane * d + dc);
            let mut sums = [[_mm512_setzero_ps(); 4]; R];
            for (r, row) in sums.iter_mut().enumerate() {
                for (m, v) in row.iter_mut().enumerate() {
                    *v = _mm512_loadu_ps(at(r).add(16 * m));
                }
            }
            for j in (lane..n).step_by(LANES) {
                let value = values.add(j * d + dc);
                let v = [0, 1, 2, 3].map(|m| _mm512_loadu_ps(value.add(16 * m)));
                for (r, row) in sums.iter_mut().enumerate() {
                    let w = _mm512_set1_ps(*p.add(r * p_stride + j));
                    for (m, sum) in row.iter_mut().enumerate() {
                        *sum = _mm512_fmadd_ps(v[m], w, *sum);
                    }
                }
            }
            for (r, row) in sums.iter().enumerate() {
                for (m, v) in row.iter().enumerate() {
                    _mm512_storeu_ps(at(r).add(16 * m), *v);
                }
            }
        }
    }
}
