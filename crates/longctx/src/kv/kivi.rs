//! KIVI — Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache",
//! ICML 2024 (arXiv 2402.02750); jy-yuan/KIVI (`quant/new_pack.py`, `models/llama_kivi.py`).
//!
//! Cached keys and values are stored as `bits`-bit codes with a zero point (the group's minimum)
//! and a scale, `x ≈ code·scale + min`, `scale = (max − min)/(2^bits − 1)`. The two tensors are
//! grouped differently, which is the paper's point:
//!
//! * keys per channel: a few channels of the keys carry large outliers for every token, so each
//!   channel gets its own range, shared by a group of `group` consecutive tokens; grouping a
//!   token's channels together would stretch every range to the outlier's and round the other
//!   channels to nothing.
//! * values per token, in groups of `group` channels: values have no outlier channels, and the
//!   attention output mixes whole value rows, so each token's error stays its own.
//!
//! The most recent `residual` tokens stay in full precision (the paper's R): a key group needs
//! `group` tokens before it can be quantized, and recent tokens weigh most in attention. After
//! each chunk the cache quantizes, in whole groups, the tokens older than that
//! ([`super::KvCache::settle`]), so between `residual` and `residual + group − 1` tokens per KV
//! head stay in full precision. The paper's code flushes all R residual keys at once and so asks
//! R to be a multiple of the group; settling group by group needs no such rule.
//!
//! Mins and scales are f16 as in the paper. The minimum is rounded down and the scale up, so that
//! the stored grid spans every value of its group and none is off by more than half a stored
//! step. For the f16 cache the minimum, an f16 value itself, is exact, and the step exceeds the
//! ideal one by at most one f16 rounding.

use half::f16;

use super::policy::Shape;
use crate::model::MAX_HEAD_DIM;
use crate::spec::{Params, SpecPart, MAX_TOKENS};
use crate::{Error, Result};

/// A KIVI configuration (`kivi:bits=…,group=…,residual=…`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kivi {
    /// Bits per code: 8, 4 or 2.
    pub bits: u32,
    /// Tokens per key range, channels per value range.
    pub group: usize,
    /// Recent tokens kept in full precision.
    pub residual: usize,
}

impl Kivi {
    /// Reads `bits` (2, the paper's KIVI-2), `group` (32) and `residual` (32), the settings of
    /// the paper's `example.py`; the group must divide the head size (value groups are channels).
    pub fn from_spec(part: &SpecPart, shape: &Shape) -> Result<Self> {
        let mut params = Params::new(part);
        let bits = params.get_in("bits", 2u32, 2..=8)?;
        let group = params.get_in("group", 32usize, 1..=MAX_TOKENS)?;
        let residual = params.get_in("residual", 32usize, 0..=MAX_TOKENS)?;
        params.finish(&["bits", "group", "residual"])?;
        if ![2, 4, 8].contains(&bits) {
            return Err(Error::InvalidOption(format!(
                "`kivi:bits={bits}`: KIVI stores 2-, 4- or 8-bit codes; choose bits=2, 4 or 8"
            )));
        }
        if group == 0 || !shape.head_dim.is_multiple_of(group) {
            let d = shape.head_dim;
            let fits = (1..=32)
                .rev()
                .find(|&g| d.is_multiple_of(g) && 32usize.is_multiple_of(g))
                .unwrap_or(1);
            return Err(Error::InvalidOption(format!(
                "`kivi:group={group}`: values are quantized in groups of channels, so the group \
                 must divide the head size, {d}; try group={fits}"
            )));
        }
        if !(shape.head_dim * bits as usize).is_multiple_of(8) {
            return Err(Error::InvalidOption(format!(
                "`kivi:bits={bits}`: the {} codes of a head do not fill whole bytes; use bits=8",
                shape.head_dim
            )));
        }
        Ok(Self {
            bits,
            group,
            residual,
        })
    }

    pub fn spec(&self) -> String {
        format!(
            "kivi:bits={},group={},residual={}",
            self.bits, self.group, self.residual
        )
    }

    /// Largest code.
    fn levels(&self) -> f32 {
        ((1u32 << self.bits) - 1) as f32
    }

    /// Bytes of one token's codes (key or value) in one KV head.
    fn row_bytes(&self, head_dim: usize) -> usize {
        head_dim * self.bits as usize / 8
    }

    /// Bytes `slots` quantized tokens (a whole number of groups) take in one KV head: the codes
    /// of their keys and values, their key groups' and their own value ranges.
    pub fn quantized_bytes(&self, head_dim: usize, slots: usize) -> usize {
        let key_ranges = slots / self.group * 2 * head_dim;
        let value_ranges = slots * 2 * (head_dim / self.group);
        2 * slots * self.row_bytes(head_dim) + (key_ranges + value_ranges) * 2
    }

    /// The most a session's cache of `capacity` tokens holds with KIVI: every slot quantized,
    /// plus the full-precision rows a head holds at most (the residual, a group not yet
    /// complete, less than a group that eviction gave back to full precision, and a chunk).
    pub fn bytes_for(
        &self,
        dtype: super::KvDtype,
        shape: &Shape,
        capacity: usize,
        chunk: usize,
    ) -> usize {
        let heads = shape.n_layer * shape.n_kv_head;
        let full = (self.residual + 2 * self.group + chunk).min(capacity);
        heads
            * (self.quantized_bytes(shape.head_dim, capacity / self.group * self.group)
                + 2 * full * shape.head_dim * dtype.bytes())
    }
}

/// The quantized slots of every KV head of a cache, stored for its whole capacity (zeroed
/// memory, committed by the OS only as slots are quantized). Heads are indexed
/// `layer * n_kv_head + head`; slot s of a head holds the s-th token that head keeps.
pub(super) struct QuantizedSlots {
    pub kivi: Kivi,
    head_dim: usize,
    capacity: usize,
    /// `[head][slot][row_bytes]`.
    key_codes: Vec<u8>,
    /// `[head][group][2][D]`: each channel's minimum, then its scale.
    key_ranges: Vec<f16>,
    /// `[head][slot][row_bytes]`.
    value_codes: Vec<u8>,
    /// `[head][slot][2][D / group]`: each channel group's minimum, then its scale.
    value_ranges: Vec<f16>,
    /// One key group in f32, `[group][D]`, reused so that decoding allocates nothing.
    pub scratch: Vec<f32>,
}

/// `n` f16 zeros from zeroed pages (`vec![f16::ZERO; n]` writes every element).
pub(super) fn f16_zeros(n: usize) -> Vec<f16> {
    half::vec::HalfBitsVecExt::reinterpret_into(vec![0u16; n])
}

impl QuantizedSlots {
    pub fn new(kivi: Kivi, heads: usize, head_dim: usize, capacity: usize) -> Self {
        let groups = capacity.div_ceil(kivi.group);
        let codes = heads * capacity * kivi.row_bytes(head_dim);
        Self {
            kivi,
            head_dim,
            capacity,
            key_codes: vec![0; codes],
            key_ranges: f16_zeros(heads * groups * 2 * head_dim),
            value_codes: vec![0; codes],
            value_ranges: f16_zeros(heads * capacity * 2 * (head_dim / kivi.group)),
            scratch: vec![0.0; kivi.group * head_dim],
        }
    }

    /// Bytes of the whole reservation.
    pub fn bytes_reserved(&self) -> usize {
        self.key_codes.len()
            + self.value_codes.len()
            + 2 * self.key_ranges.len()
            + 2 * self.value_ranges.len()
    }

    fn code_row(&self, head: usize, slot: usize) -> std::ops::Range<usize> {
        let n = self.kivi.row_bytes(self.head_dim);
        let at = (head * self.capacity + slot) * n;
        at..at + n
    }

    fn key_range(&self, head: usize, group: usize) -> std::ops::Range<usize> {
        let n = 2 * self.head_dim;
        let at = (head * self.capacity.div_ceil(self.kivi.group) + group) * n;
        at..at + n
    }

    fn value_range(&self, head: usize, slot: usize) -> std::ops::Range<usize> {
        let n = 2 * (self.head_dim / self.kivi.group);
        let at = (head * self.capacity + slot) * n;
        at..at + n
    }

    /// Quantizes key group `group` of `head` from `rows` (`[group][D]`), channel by channel.
    pub fn quantize_keys(&mut self, head: usize, group: usize, rows: &[f32]) {
        let (d, g, bits) = (self.head_dim, self.kivi.group, self.kivi.bits);
        let levels = self.kivi.levels();
        let ranges = self.key_range(head, group);
        for c in 0..d {
            let channel = rows.chunks_exact(d).map(|row| row[c]);
            let (min, scale) = range(channel, levels);
            self.key_ranges[ranges.start + c] = min;
            self.key_ranges[ranges.start + d + c] = scale;
            let (min, scale) = (min.to_f32(), scale.to_f32());
            for (t, row) in rows.chunks_exact(d).enumerate() {
                let codes = self.code_row(head, group * g + t);
                put(
                    &mut self.key_codes[codes],
                    c,
                    bits,
                    code(row[c], min, scale, levels),
                );
            }
        }
    }

    /// Quantizes the value of `slot` of `head` from `row` (`[D]`), channel group by group.
    pub fn quantize_value(&mut self, head: usize, slot: usize, row: &[f32]) {
        let (g, bits, levels) = (self.kivi.group, self.kivi.bits, self.kivi.levels());
        let (codes, ranges) = (self.code_row(head, slot), self.value_range(head, slot));
        let groups = self.head_dim / g;
        for (k, channels) in row.chunks_exact(g).enumerate() {
            let (min, scale) = range(channels.iter().copied(), levels);
            self.value_ranges[ranges.start + k] = min;
            self.value_ranges[ranges.start + groups + k] = scale;
            let (min, scale) = (min.to_f32(), scale.to_f32());
            for (i, &x) in channels.iter().enumerate() {
                let c = code(x, min, scale, levels);
                put(&mut self.value_codes[codes.clone()], k * g + i, bits, c);
            }
        }
    }

    /// The keys of `slots` of `head`, dequantized into `out` (`[slots][D]`).
    pub fn dequantize_keys(&self, head: usize, slots: std::ops::Range<usize>, out: &mut [f32]) {
        let (d, g) = (self.head_dim, self.kivi.group);
        assert!(d <= MAX_HEAD_DIM, "head size {d} above {MAX_HEAD_DIM}");
        // A group's ranges are widened once for its tokens, not once per token.
        let mut ranges = [0f32; 2 * MAX_HEAD_DIM];
        let ranges = &mut ranges[..2 * d];
        let mut widened = None;
        for (slot, row) in slots.zip(out.chunks_exact_mut(d)) {
            if widened != Some(slot / g) {
                let stored = &self.key_ranges[self.key_range(head, slot / g)];
                half::slice::HalfFloatSliceExt::convert_to_f32_slice(stored, ranges);
                widened = Some(slot / g);
            }
            unpack(
                &self.key_codes[self.code_row(head, slot)],
                self.kivi.bits,
                row,
            );
            let (mins, scales) = ranges.split_at(d);
            for ((x, min), scale) in row.iter_mut().zip(mins).zip(scales) {
                *x = *x * scale + min;
            }
        }
    }

    /// The values of `slots` of `head`, dequantized into `out` (`[slots][D]`).
    pub fn dequantize_values(&self, head: usize, slots: std::ops::Range<usize>, out: &mut [f32]) {
        let (d, g) = (self.head_dim, self.kivi.group);
        for (slot, row) in slots.zip(out.chunks_exact_mut(d)) {
            unpack(
                &self.value_codes[self.code_row(head, slot)],
                self.kivi.bits,
                row,
            );
            let ranges = &self.value_ranges[self.value_range(head, slot)];
            let (mins, scales) = ranges.split_at(d / g);
            for ((channels, min), scale) in row.chunks_exact_mut(g).zip(mins).zip(scales) {
                let (min, scale) = (min.to_f32(), scale.to_f32());
                for x in channels {
                    *x = *x * scale + min;
                }
            }
        }
    }

    /// Rebuilds the first `kept.len()` slots (a whole number of groups) of `head` from the slots
    /// `kept` (ascending), as eviction compacts them. Values move code for code. A key group
    /// whose tokens are one whole old group moves as it is; any other is dequantized and
    /// quantized again over its new tokens, which adds a second rounding to them.
    pub fn compact(&mut self, head: usize, kept: &[usize]) {
        let (d, g) = (self.head_dim, self.kivi.group);
        // Each new slot comes from an old one at or after it, so ascending order never
        // overwrites a source still to be read.
        for (group, members) in kept.chunks_exact(g).enumerate() {
            let first = members[0];
            let whole = first.is_multiple_of(g) && members[g - 1] == first + g - 1;
            if whole && first == group * g {
                continue;
            }
            if whole {
                let codes = self.code_row(head, first).start..self.code_row(head, first + g).start;
                let to = self.code_row(head, group * g).start;
                self.key_codes.copy_within(codes, to);
                let (from, to) = (self.key_range(head, first / g), self.key_range(head, group));
                self.key_ranges.copy_within(from, to.start);
                continue;
            }
            let mut rows = std::mem::take(&mut self.scratch);
            for (&slot, row) in members.iter().zip(rows.chunks_exact_mut(d)) {
                self.dequantize_keys(head, slot..slot + 1, row);
            }
            self.quantize_keys(head, group, &rows);
            self.scratch = rows;
        }
        for (to, &from) in kept.iter().enumerate() {
            if to != from {
                let (codes, at) = (self.code_row(head, from), self.code_row(head, to).start);
                self.value_codes.copy_within(codes, at);
                let (ranges, at) = (
                    self.value_range(head, from),
                    self.value_range(head, to).start,
                );
                self.value_ranges.copy_within(ranges, at);
            }
        }
    }

    /// Applies `f` to the keys of `slots` (ascending) of `head`: each key group they touch is
    /// dequantized, changed and quantized again (`f` gets the slot and its key).
    pub fn rewrite_keys(&mut self, head: usize, slots: &[usize], f: impl Fn(usize, &mut [f32])) {
        let (d, g) = (self.head_dim, self.kivi.group);
        let mut rows = std::mem::take(&mut self.scratch);
        let mut rest = slots;
        while let Some(&first) = rest.first() {
            let group = first / g;
            let n = rest.partition_point(|&s| s < (group + 1) * g);
            self.dequantize_keys(head, group * g..(group + 1) * g, &mut rows);
            for &slot in &rest[..n] {
                f(slot, &mut rows[(slot - group * g) * d..][..d]);
            }
            self.quantize_keys(head, group, &rows);
            rest = &rest[n..];
        }
        self.scratch = rows;
    }
}

/// The stored minimum (rounded down) and scale (rounded up) of a group, so that
/// `[min, min + levels·scale]` covers every value.
fn range(values: impl Iterator<Item = f32> + Clone, levels: f32) -> (f16, f16) {
    let min = values.clone().fold(f32::INFINITY, f32::min);
    let max = values.fold(f32::NEG_INFINITY, f32::max);
    let min = f16_down(min);
    let scale = f16_up((max - min.to_f32()) / levels);
    (min, scale)
}

/// The code of `x` on the grid `min + k·scale`, k in `0..=levels`.
fn code(x: f32, min: f32, scale: f32, levels: f32) -> u8 {
    if scale == 0.0 {
        return 0;
    }
    ((x - min) / scale).round().clamp(0.0, levels) as u8
}

/// The largest f16 at or below `x`.
fn f16_down(x: f32) -> f16 {
    let h = f16::from_f32(x);
    if h.to_f32() > x {
        -f16_next_up(-h)
    } else {
        h
    }
}

/// The smallest f16 at or above `x`.
fn f16_up(x: f32) -> f16 {
    let h = f16::from_f32(x);
    if h.to_f32() < x {
        f16_next_up(h)
    } else {
        h
    }
}

/// The next f16 above a finite `h`.
fn f16_next_up(h: f16) -> f16 {
    let bits = h.to_bits();
    if h == f16::ZERO {
        f16::from_bits(1)
    } else if bits & 0x8000 == 0 {
        f16::from_bits(bits + 1)
    } else {
        f16::from_bits(bits - 1)
    }
}

/// Stores code `c` as element `i` of a packed row: `8 / bits` codes per byte, the first in the
/// low bits.
fn put(row: &mut [u8], i: usize, bits: u32, c: u8) {
    let per_byte = 8 / bits as usize;
    let shift = (i % per_byte) as u32 * bits;
    let mask = (((1u32 << bits) - 1) << shift) as u8;
    let byte = &mut row[i / per_byte];
    *byte = (*byte & !mask) | (c << shift);
}

/// The codes of a packed row, as f32.
fn unpack(row: &[u8], bits: u32, out: &mut [f32]) {
    match bits {
        8 => {
            for (o, &b) in out.iter_mut().zip(row) {
                *o = b as f32;
            }
        }
        4 => {
            for (o, &b) in out.chunks_exact_mut(2).zip(row) {
                o[0] = (b & 0xf) as f32;
                o[1] = (b >> 4) as f32;
            }
        }
        _ => {
            for (o, &b) in out.chunks_exact_mut(4).zip(row) {
                o[0] = (b & 3) as f32;
                o[1] = ((b >> 2) & 3) as f32;
                o[2] = ((b >> 4) & 3) as f32;
                o[3] = (b >> 6) as f32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Spec;

    fn kivi(spec: &str) -> Result<Kivi> {
        let spec: Spec = spec.parse().unwrap();
        Kivi::from_spec(&spec.parts[0], &Shape::tiny())
    }

    /// Uniform values in [-4, 4) rounded to f16, as the f16 cache holds them.
    fn random(n: usize, seed: u32) -> Vec<f32> {
        let mut rng = seed;
        (0..n)
            .map(|_| {
                rng = rng.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                let x = ((rng >> 8) as f32 / (1 << 24) as f32 - 0.5) * 8.0;
                f16::from_f32(x).to_f32()
            })
            .collect()
    }

    /// `(max − min) / (2^bits − 1)` of some values: the step of an exact grid over them.
    fn step(values: impl Iterator<Item = f32> + Clone, bits: u32) -> f32 {
        let min = values.clone().fold(f32::INFINITY, f32::min);
        let max = values.fold(f32::NEG_INFINITY, f32::max);
        (max - min) / ((1u32 << bits) - 1) as f32
    }

    /// Within half a step, allowing for the f16 scale's rounding up and f32 arithmetic.
    fn assert_within_half_step(x: f32, y: f32, step: f32, what: &str) {
        let bound = step / 2.0 * (1.0 + 2f32.powi(-9)) + 1e-6 * x.abs().max(1.0);
        assert!(
            (x - y).abs() <= bound,
            "{what}: {x} vs {y}, half step {}",
            step / 2.0
        );
    }

    fn store(bits: u32, group: usize, d: usize, slots: usize) -> QuantizedSlots {
        let kivi = Kivi {
            bits,
            group,
            residual: 0,
        };
        QuantizedSlots::new(kivi, 2, d, slots)
    }

    #[test]
    fn keys_and_values_come_back_within_half_a_step_of_their_group() {
        let (d, g) = (16, 8);
        // Hand-made: a constant channel, a two-valued one, a ramp and a negative range.
        let mut hand = vec![0f32; g * d];
        for t in 0..g {
            let row = &mut hand[t * d..(t + 1) * d];
            row[0] = 1.5;
            row[1] = if t % 2 == 0 { -2.0 } else { 3.0 };
            row[2] = t as f32 * 0.25;
            row[3] = -100.0 - t as f32;
            for (c, x) in row.iter_mut().enumerate().skip(4) {
                *x = ((t * d + c) as f32 * 0.37).sin();
            }
        }
        for bits in [8, 4, 2] {
            for (name, data) in [("hand-made", hand.clone()), ("random", random(g * d, bits))] {
                let mut s = store(bits, g, d, 2 * g);
                s.quantize_keys(1, 1, &data);
                let mut keys = vec![0f32; g * d];
                s.dequantize_keys(1, g..2 * g, &mut keys);
                for c in 0..d {
                    let channel = data.chunks_exact(d).map(|r| r[c]);
                    let step = step(channel, bits);
                    for t in 0..g {
                        let (x, y) = (data[t * d + c], keys[t * d + c]);
                        assert_within_half_step(x, y, step, &format!("{name} key {t},{c} {bits}b"));
                    }
                }
                for (t, row) in data.chunks_exact(d).enumerate() {
                    s.quantize_value(0, t, row);
                }
                let mut values = vec![0f32; g * d];
                s.dequantize_values(0, 0..g, &mut values);
                for (t, (row, back)) in data.chunks_exact(d).zip(values.chunks_exact(d)).enumerate()
                {
                    for (k, (xs, ys)) in row.chunks_exact(g).zip(back.chunks_exact(g)).enumerate() {
                        let step = step(xs.iter().copied(), bits);
                        for (&x, &y) in xs.iter().zip(ys) {
                            let what = format!("{name} value {t}, group {k}, {bits}b");
                            assert_within_half_step(x, y, step, &what);
                        }
                    }
                }
                // A constant channel comes back exactly.
                if name == "hand-made" {
                    assert!(keys.chunks_exact(d).all(|r| r[0] == 1.5));
                }
            }
        }
    }

    /// Keys with one outlier channel (as the paper finds in real keys): per-channel ranges keep
    /// the other channels precise, while per-token ranges, stretched by the outlier, round them
    /// away. For values, which have no such channel, per-token ranges are as good.
    #[test]
    fn per_channel_keys_survive_an_outlier_channel_that_per_token_ranges_do_not() {
        let (d, g, bits) = (16, 16, 2);
        let mut keys = random(g * d, 7);
        for row in keys.chunks_exact_mut(d) {
            row[5] += 60.0;
        }
        let error = |back: &[f32]| {
            let normal = (0..g * d).filter(|i| i % d != 5);
            normal
                .map(|i| (keys[i] - back[i]).abs())
                .fold(0f32, f32::max)
        };
        let mut s = store(bits, g, d, g);
        s.quantize_keys(0, 0, &keys);
        let mut per_channel = vec![0f32; g * d];
        s.dequantize_keys(0, 0..g, &mut per_channel);
        // Values' grouping applied to the keys: one range per token over all its channels.
        for (t, row) in keys.chunks_exact(d).enumerate() {
            s.quantize_value(1, t, row);
        }
        let mut per_token = vec![0f32; g * d];
        s.dequantize_values(1, 0..g, &mut per_token);
        // Values in [-4, 4): a per-channel step is at most 8/3; a per-token one is ~64/3.
        assert!(
            error(&per_channel) <= 4.0 / 3.0 + 1e-3,
            "{}",
            error(&per_channel)
        );
        assert!(error(&per_token) > 4.0, "{}", error(&per_token));
    }

    #[test]
    fn codes_pack_and_unpack_at_every_width() {
        for bits in [8u32, 4, 2] {
            let levels = (1u32 << bits) - 1;
            let codes: Vec<u8> = (0..16).map(|i| (i * 7 % (levels + 1)) as u8).collect();
            let mut row = vec![0xa5u8; 16 * bits as usize / 8];
            for (i, &c) in codes.iter().enumerate() {
                put(&mut row, i, bits, c);
            }
            let mut out = vec![0f32; 16];
            unpack(&row, bits, &mut out);
            assert_eq!(out, codes.iter().map(|&c| c as f32).collect::<Vec<_>>());
        }
    }

    #[test]
    fn ranges_round_outwards() {
        for x in [0.1f32, -0.1, 1e-7, -1e-7, 3.0, 65000.0, -0.0] {
            assert!(f16_down(x).to_f32() <= x && f16_up(x).to_f32() >= x, "{x}");
            assert!(f16_up(x).to_f32() - f16_down(x).to_f32() <= x.abs() * 2f32.powi(-9) + 1e-7);
        }
        assert_eq!(f16_down(1.5).to_f32(), 1.5);
        assert_eq!(f16_up(1.5).to_f32(), 1.5);
    }

    #[test]
    fn spec_defaults_and_refusals() {
        let k = kivi("kivi:group=4").unwrap();
        assert_eq!(k.spec(), "kivi:bits=2,group=4,residual=32");
        assert_eq!(kivi("kivi:bits=8,group=2,residual=0").unwrap().bits, 8);
        // The tiny shape's head size is 4: the default group of 32 channels does not divide it.
        let no_group = kivi("kivi").unwrap_err().to_string();
        assert!(
            no_group.contains("group") && no_group.contains("head size"),
            "{no_group}"
        );
        let bits = kivi("kivi:bits=3,group=4").unwrap_err().to_string();
        assert!(bits.contains("2, 4 or 8"), "{bits}");
        assert!(kivi("kivi:group=0").is_err());
        assert!(kivi("kivi:group=4,residual=-1").is_err());
        let typo = kivi("kivi:group=4,bit=4").unwrap_err().to_string();
        assert!(typo.contains("`bit`"), "{typo}");
    }

    #[test]
    fn bytes_per_token_at_each_width() {
        // 30 layers × 3 KV heads × head size 64: f16 keys and values take 23040 bytes a token.
        let shape = Shape {
            n_layer: 30,
            n_head: 9,
            n_kv_head: 3,
            head_dim: 64,
            local: Vec::new(),
        };
        let heads = shape.n_layer * shape.n_kv_head;
        for (bits, bytes) in [(8, 12_960), (4, 7_200), (2, 4_320)] {
            let k = Kivi {
                bits,
                group: 32,
                residual: 32,
            };
            assert_eq!(heads * k.quantized_bytes(64, 32) / 32, bytes, "{bits} bits");
        }
    }
}
