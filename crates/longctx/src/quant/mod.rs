//! Weight matrices as GGUF stores them, and the matrix product the forward pass is made of.
//!
//! Activations are converted to the companion format ggml pairs with each weight type (Q8_1 for
//! Q4_1/Q5_1, Q8_0 for Q4_0/Q5_0/Q8_0, Q8_K for K-quants, f16 for F16, bf16 for BF16) before the dot
//! products, exactly as llama.cpp does: the logits then agree with llama.cpp's to rounding, which
//! a float path would not.

mod blocks;
mod float;
mod kquants;
#[cfg(target_arch = "x86_64")]
mod kquants_x86;
mod matmul;
#[cfg(target_arch = "x86_64")]
mod x86;

use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use memmap2::Mmap;

use crate::threads::ThreadPool;
use crate::{Error, Result};

pub use kquants::KPath;
pub use matmul::{matmul, ActCache, MatmulJob};

/// Whether the AVX2 + FMA + F16C kernels run on this CPU.
pub fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    return x86::has_avx2();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// How the rows of a weight matrix are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
}

/// The format a row of activations is converted to before it meets a weight row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ActType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q8_1,
    Q8K,
}

impl WeightType {
    pub fn from_ggml(dtype: GgmlDType, tensor: &str) -> Result<Self> {
        Ok(match dtype {
            GgmlDType::F32 => Self::F32,
            GgmlDType::F16 => Self::F16,
            GgmlDType::BF16 => Self::BF16,
            GgmlDType::Q4_0 => Self::Q4_0,
            GgmlDType::Q4_1 => Self::Q4_1,
            GgmlDType::Q5_0 => Self::Q5_0,
            GgmlDType::Q5_1 => Self::Q5_1,
            GgmlDType::Q8_0 => Self::Q8_0,
            GgmlDType::Q4K => Self::Q4K,
            GgmlDType::Q5K => Self::Q5K,
            GgmlDType::Q6K => Self::Q6K,
            other => {
                return Err(Error::UnsupportedWeightType {
                    tensor: format!("tensor `{tensor}`"),
                    dtype: format!("{other:?}"),
                })
            }
        })
    }

    /// Values per block and bytes per block.
    pub fn block(self) -> (usize, usize) {
        match self {
            Self::F32 => (1, 4),
            Self::F16 | Self::BF16 => (1, 2),
            Self::Q4_0 => (32, 18),
            Self::Q4_1 => (32, 20),
            Self::Q5_0 => (32, 22),
            Self::Q5_1 => (32, 24),
            Self::Q8_0 => (32, 34),
            Self::Q4K => (256, 144),
            Self::Q5K => (256, 176),
            Self::Q6K => (256, 210),
        }
    }

    pub fn act_type(self) -> ActType {
        match self {
            Self::F32 => ActType::F32,
            Self::F16 => ActType::F16,
            Self::BF16 => ActType::BF16,
            Self::Q4_0 | Self::Q5_0 | Self::Q8_0 => ActType::Q8_0,
            Self::Q4_1 | Self::Q5_1 => ActType::Q8_1,
            Self::Q4K | Self::Q5K | Self::Q6K => ActType::Q8K,
        }
    }
}

impl ActType {
    /// Values per block and bytes per block.
    pub fn block(self) -> (usize, usize) {
        match self {
            Self::F32 => (1, 4),
            Self::F16 | Self::BF16 => (1, 2),
            Self::Q8_0 => (32, 34),
            Self::Q8_1 => (32, 36),
            Self::Q8K => (256, 292),
        }
    }

    /// Bytes of one converted row of `cols` values, padded to 4 so every row starts aligned for
    /// f32 scales.
    pub fn row_stride(self, cols: usize) -> usize {
        match self {
            // Our own layout, not ggml's: all 8-bit values first, then the f32 scales (and sums,
            // or Q5_0's activation term, see `blocks::store_q5_offsets`), so the kernels read
            // scales without converting from f16 in the inner loop.
            Self::Q8_0 => cols + cols / 32 * 36,
            Self::Q8_1 => cols + cols / 32 * 8,
            _ => {
                let (values, bytes) = self.block();
                (cols / values * bytes).div_ceil(4) * 4
            }
        }
    }
}

/// A span of the memory-mapped model file; keeps the map alive.
#[derive(Clone)]
pub struct MapSlice {
    map: Arc<Mmap>,
    start: usize,
    len: usize,
}

impl MapSlice {
    pub fn new(map: Arc<Mmap>, start: usize, len: usize) -> Self {
        Self { map, start, len }
    }
    pub fn bytes(&self) -> &[u8] {
        &self.map[self.start..self.start + self.len]
    }
}

/// A weight matrix `[rows, cols]` (one output per row), stored as in the file.
#[derive(Clone)]
pub struct Weight {
    pub name: String,
    pub wtype: WeightType,
    pub rows: usize,
    pub cols: usize,
    data: MapSlice,
}

impl Weight {
    pub fn new(
        name: &str,
        wtype: WeightType,
        rows: usize,
        cols: usize,
        data: MapSlice,
    ) -> Result<Self> {
        let (values, bytes) = wtype.block();
        if !cols.is_multiple_of(values) || data.len != rows * cols / values * bytes {
            return Err(Error::BadShape {
                name: name.to_string(),
                expected: vec![rows, cols],
                actual: vec![data.len],
            });
        }
        // K-quant blocks are read in place as structs with f16 fields: they need an f16's
        // alignment, which GGUF's 32-byte tensor alignment gives unless a file overrides it.
        if matches!(wtype, WeightType::Q4K | WeightType::Q5K | WeightType::Q6K)
            && !(data.bytes().as_ptr() as usize).is_multiple_of(2)
        {
            return Err(Error::Misaligned(name.to_string()));
        }
        Ok(Self {
            name: name.to_string(),
            wtype,
            rows,
            cols,
            data,
        })
    }

    pub fn row_bytes(&self) -> usize {
        let (values, bytes) = self.wtype.block();
        self.cols / values * bytes
    }

    pub fn row(&self, r: usize) -> &[u8] {
        let n = self.row_bytes();
        &self.data.bytes()[r * n..(r + 1) * n]
    }

    /// Whether llama.cpp's CPU backend repacks this matrix at load on an AVX2 CPU, which
    /// changes the kernel and so the float order of its products: it does for matrices with a
    /// row count divisible by 8 (`ggml_repack_get_optimal_repack_type`), except the token
    /// embeddings, which stay in the plain buffer for their row look-ups even where the output
    /// layer shares them.
    pub fn repacked(&self) -> bool {
        self.rows.is_multiple_of(8) && self.name != "token_embd.weight"
    }

    /// Bytes the matrix occupies.
    pub fn size_bytes(&self) -> usize {
        self.data.len
    }

    /// Row `r` as f32 (embedding look-ups).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let row = self.row(r);
        match self.wtype {
            WeightType::F32 | WeightType::F16 | WeightType::BF16 => {
                float::to_f32(self.wtype, row, out)
            }
            WeightType::Q4_0
            | WeightType::Q4_1
            | WeightType::Q5_0
            | WeightType::Q5_1
            | WeightType::Q8_0 => blocks::dequantize(self.wtype, row, out),
            WeightType::Q4K | WeightType::Q5K | WeightType::Q6K => {
                kquants::dequantize(self.wtype, row, out)
            }
        }
    }
}

/// Rows of activations converted to one [`ActType`], reused across calls.
#[derive(Default)]
pub struct Activations {
    data: Vec<u32>,
    stride: usize,
    rows: usize,
    act: Option<ActType>,
}

impl Activations {
    /// Converts `rows` rows of `cols` values from `x` (row-major).
    pub fn quantize(&mut self, x: &[f32], rows: usize, cols: usize, act: ActType) {
        let bytes = self.resize(rows, cols, act);
        for (src, dst) in x
            .chunks_exact(cols)
            .zip(bytes.chunks_exact_mut(act.row_stride(cols)))
        {
            convert_row(act, src, dst);
        }
    }

    /// The same, the rows split across the pool's threads: a prefill's conversion would
    /// otherwise leave all but the calling thread waiting.
    pub fn quantize_on(
        &mut self,
        pool: &ThreadPool,
        x: &[f32],
        rows: usize,
        cols: usize,
        act: ActType,
    ) {
        let stride = act.row_stride(cols);
        let out = SyncBytes(self.resize(rows, cols, act).as_mut_ptr());
        pool.for_ranges(rows, &|range| {
            for r in range {
                // SAFETY: row r lies inside the buffer just sized for `rows` rows, and each row
                // is written by the one thread whose range holds it.
                let dst =
                    unsafe { std::slice::from_raw_parts_mut(out.get().add(r * stride), stride) };
                convert_row(act, &x[r * cols..(r + 1) * cols], dst);
            }
        });
    }

    /// Sizes the buffer for `rows` converted rows and returns their bytes.
    fn resize(&mut self, rows: usize, cols: usize, act: ActType) -> &mut [u8] {
        let stride = act.row_stride(cols);
        let words = rows * stride / 4;
        if self.data.len() < words {
            self.data.resize(words, 0);
        }
        self.stride = stride;
        self.rows = rows;
        self.act = Some(act);
        bytemuck_bytes_mut(&mut self.data[..words])
    }

    pub fn row(&self, r: usize) -> &[u8] {
        let bytes = bytemuck_bytes(&self.data);
        &bytes[r * self.stride..(r + 1) * self.stride]
    }

    pub fn act(&self) -> Option<ActType> {
        self.act
    }

    pub fn rows(&self) -> usize {
        self.rows
    }
}

fn convert_row(act: ActType, src: &[f32], dst: &mut [u8]) {
    match act {
        ActType::F32 | ActType::F16 | ActType::BF16 => float::from_f32(act, src, dst),
        ActType::Q8_0 | ActType::Q8_1 => blocks::quantize_act(act, src, dst),
        ActType::Q8K => kquants::quantize_act(src, dst),
    }
}

struct SyncBytes(*mut u8);
// SAFETY: threads write disjoint rows (see `Activations::quantize_on`).
unsafe impl Sync for SyncBytes {}

impl SyncBytes {
    /// Through a method, so that closures capture the `Sync` wrapper, not the raw pointer.
    fn get(&self) -> *mut u8 {
        self.0
    }
}

fn bytemuck_bytes(words: &[u32]) -> &[u8] {
    // SAFETY: u32 has no padding and any byte pattern is a valid u8.
    unsafe { std::slice::from_raw_parts(words.as_ptr().cast(), words.len() * 4) }
}

fn bytemuck_bytes_mut(words: &mut [u32]) -> &mut [u8] {
    // SAFETY: as above, and the borrow is unique.
    unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast(), words.len() * 4) }
}

/// The matmul a product belongs to, as far as it decides which of llama.cpp's kernels (and so
/// which float order) a product must mirror: some weight types take different kernels for one
/// token and for a batch (see [`kquants::KPath`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Batch {
    /// Activation rows of the whole matmul.
    pub tokens: usize,
    /// Whether llama.cpp repacks this matrix at load (see [`Weight::repacked`]).
    pub repacked: bool,
}

impl Batch {
    /// A single-token product with a repacked matrix (decode of most weights).
    pub const SINGLE: Self = Self {
        tokens: 1,
        repacked: true,
    };
}

/// Dot product of one weight row with one converted activation row that is not part of a
/// group of four (a single token, or one of the `tokens % 4` rows after the last group).
pub fn dot(wtype: WeightType, w: &[u8], a: &[u8], cols: usize, batch: Batch) -> f32 {
    match wtype {
        WeightType::F32 | WeightType::F16 | WeightType::BF16 => {
            float::dot(wtype, w, a, cols, batch.tokens)
        }
        WeightType::Q4_0
        | WeightType::Q4_1
        | WeightType::Q5_0
        | WeightType::Q5_1
        | WeightType::Q8_0 => blocks::dot(wtype, w, a, cols),
        WeightType::Q4K | WeightType::Q5K | WeightType::Q6K => {
            let path = kquants::KPath::choose(wtype, batch.repacked, batch.tokens, false);
            kquants::dot(wtype, w, a, cols, path)
        }
    }
}

/// N dot products of one weight row with N activation rows, reading the weight once.
///
/// Not always N [`dot`]s bit for bit: llama.cpp's batched kernels for some weight types
/// (repacked Q4_K) sum in another grouping than its single-row ones, and it hands them the
/// rows in groups of four, the `tokens % 4` rest going to the single-row kernel. The matmul
/// driver calls this for rows of exactly those groups (whole groups, N a multiple of four), so
/// both paths match.
pub fn dot_n<const N: usize>(
    wtype: WeightType,
    w: &[u8],
    a: [&[u8]; N],
    cols: usize,
    batch: Batch,
) -> [f32; N] {
    match wtype {
        WeightType::Q4_0
        | WeightType::Q4_1
        | WeightType::Q5_0
        | WeightType::Q5_1
        | WeightType::Q8_0 => blocks::dot_n(wtype, w, a, cols),
        WeightType::Q4K | WeightType::Q5K | WeightType::Q6K => {
            let path = kquants::KPath::choose(wtype, batch.repacked, batch.tokens, true);
            kquants::dot_n(wtype, w, a, cols, path)
        }
        _ => a.map(|a| dot(wtype, w, a, cols, batch)),
    }
}

/// Two weight rows times N activation rows, each weight and activation block read once for
/// both rows, where a kernel does that; bit for bit two [`dot_n`]s. `None`: call [`dot_n`].
pub fn dot_pair_n<const N: usize>(
    wtype: WeightType,
    w: [&[u8]; 2],
    a: [&[u8]; N],
    cols: usize,
) -> Option<[[f32; N]; 2]> {
    match wtype {
        WeightType::Q5_0 => blocks::dot_pair_n(wtype, w, a, cols),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_misaligned_k_quant_tensor_is_an_error_not_a_panic() {
        let file = tempfile::tempfile().unwrap();
        file.set_len(1 + 144).unwrap();
        // SAFETY: the temporary file is private to this test and not resized while mapped.
        let map = Arc::new(unsafe { Mmap::map(&file) }.unwrap());
        let odd = MapSlice::new(map.clone(), 1, 144);
        let err = Weight::new("w", WeightType::Q4K, 1, 256, odd)
            .err()
            .unwrap();
        assert!(matches!(err, Error::Misaligned(_)), "{err}");
        let even = MapSlice::new(map, 0, 144);
        assert!(Weight::new("w", WeightType::Q4K, 1, 256, even).is_ok());
    }
}
