//! The KV cache: preallocated once per session, laid out `[layer][kv_head][slot][head_dim]` so
//! that attention reads each head's keys and values as one contiguous run, and so that a policy
//! can later keep a different set of tokens per head.
//!
//! Keys are stored after rotation (as llama.cpp does), together with the position each slot was
//! rotated at; moving a token to another position is then an exact delta rotation by
//! (new − old), never a second application of any attention factor. Self-Extend also attends to
//! every key at a grouped position ⌊p/G⌋; the cache then holds those grouped keys too, in a second
//! key tensor of the same layout, kept in step with the first by every operation here.

mod observer;
pub mod policy;
pub mod snapkv;
pub mod streaming;

pub use policy::{KvPolicy, Shape};

/// A KV policy's name, what it does, and how to build it from its spec.
pub struct PolicyEntry {
    pub name: &'static str,
    pub about: &'static str,
    pub build: fn(&SpecPart, &Shape) -> Result<Box<dyn KvPolicy>>,
}

/// Every policy `--kv` can name.
pub const POLICIES: &[PolicyEntry] = &[
    PolicyEntry {
        name: "full",
        about: "keep every token (default)",
        build: |part, _| {
            Params::new(part).finish(&[])?;
            Ok(Box::new(policy::Full))
        },
    },
    PolicyEntry {
        name: "streaming",
        about: "StreamingLLM: attention sinks + recent window, positions inside the cache",
        build: streaming::build,
    },
    PolicyEntry {
        name: "snapkv",
        about: "SnapKV: observation-window votes, pooled, top-k per KV head",
        build: snapkv::build,
    },
];

/// The policy a `--kv` spec names, with its parameters checked.
pub fn build_policy(spec: &Spec, shape: &Shape) -> Result<Box<dyn KvPolicy>> {
    let [part] = spec.parts.as_slice() else {
        return Err(Error::InvalidOption(format!(
            "`{spec}` composes several KV policies; only an eviction policy followed by \
             `+kivi:…` composes"
        )));
    };
    let entry = POLICIES
        .iter()
        .find(|e| e.name == part.name)
        .ok_or_else(|| Error::UnknownMethod {
            kind: "KV policy",
            name: part.name.clone(),
            known: POLICIES
                .iter()
                .map(|e| e.name)
                .collect::<Vec<_>>()
                .join(", "),
        })?;
    (entry.build)(part, shape)
}

pub use observer::AttentionObserver;

use half::f16;

use crate::positions::{RopeStyle, RotaryTable};
use crate::spec::{Params, Spec, SpecPart};
use crate::{Error, Result};

/// Element type of the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvDtype {
    F16,
    F32,
}

impl KvDtype {
    pub fn bytes(self) -> usize {
        match self {
            Self::F16 => 2,
            Self::F32 => 4,
        }
    }
}

/// Storage of one tensor (all keys or all values) of all layers.
pub enum KvData {
    F16(Vec<f16>),
    F32(Vec<f32>),
}

impl KvData {
    fn zeros(dtype: KvDtype, n: usize) -> Self {
        // `vec![0; n]` comes from zeroed pages: memory is committed as the cache fills, not upfront.
        match dtype {
            KvDtype::F16 => Self::F16(vec![f16::ZERO; n]),
            KvDtype::F32 => Self::F32(vec![0.0; n]),
        }
    }

    fn write(&mut self, at: usize, values: &[f32]) {
        match self {
            Self::F16(d) => {
                for (o, &v) in d[at..at + values.len()].iter_mut().zip(values) {
                    *o = f16::from_f32(v);
                }
            }
            Self::F32(d) => d[at..at + values.len()].copy_from_slice(values),
        }
    }

    fn read(&self, at: usize, out: &mut [f32]) {
        let n = out.len();
        match self {
            Self::F16(d) => {
                for (o, v) in out.iter_mut().zip(&d[at..at + n]) {
                    *o = v.to_f32();
                }
            }
            Self::F32(d) => out.copy_from_slice(&d[at..at + n]),
        }
    }

    fn copy_within(&mut self, from: usize, to: usize, len: usize) {
        match self {
            Self::F16(d) => d.copy_within(from..from + len, to),
            Self::F32(d) => d.copy_within(from..from + len, to),
        }
    }
}

/// Cached keys and values of one sequence.
///
/// Every KV head of a layer holds the same number of slots, so attention's visible count is the
/// layer's; but each head may hold different tokens (SnapKV selects per KV head), and each layer
/// a different number of them (PyramidKV), so positions are kept per layer and head.
pub struct KvCache {
    pub dtype: KvDtype,
    pub n_layer: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    capacity: usize,
    /// Slots in use, per layer.
    lens: Vec<usize>,
    pub k: KvData,
    pub v: KvData,
    /// Position each slot's key was rotated at, per `layer * n_kv_head + head`.
    positions: Vec<Vec<i32>>,
    grouped: Option<GroupedKeys>,
}

/// Every key rotated a second time, at ⌊position / group⌋ (Self-Extend's grouped keys).
struct GroupedKeys {
    group: i32,
    k: KvData,
}

impl KvCache {
    pub fn new(
        dtype: KvDtype,
        n_layer: usize,
        n_kv_head: usize,
        head_dim: usize,
        capacity: usize,
    ) -> Self {
        let n = n_layer * n_kv_head * capacity * head_dim;
        Self {
            dtype,
            n_layer,
            n_kv_head,
            head_dim,
            capacity,
            lens: vec![0; n_layer],
            k: KvData::zeros(dtype, n),
            v: KvData::zeros(dtype, n),
            positions: (0..n_layer * n_kv_head)
                .map(|_| Vec::with_capacity(capacity))
                .collect(),
            grouped: None,
        }
    }

    /// Makes room for grouped keys: each slot's key rotated at ⌊position / group⌋ as well, which
    /// the forward pass stores with [`KvCache::write_grouped_key`]. Costs one more key tensor.
    pub fn keep_grouped_keys(&mut self, group: i32) {
        assert!(group >= 1, "a group of at least 1 position");
        let n = self.n_layer * self.n_kv_head * self.capacity * self.head_dim;
        self.grouped = Some(GroupedKeys {
            group,
            k: KvData::zeros(self.dtype, n),
        });
    }

    /// The grouped keys, laid out as [`KvCache::k`]; None unless the cache keeps them.
    pub fn grouped_keys(&self) -> Option<&KvData> {
        self.grouped.as_ref().map(|g| &g.k)
    }

    /// Slots in use in the fullest layer.
    pub fn len(&self) -> usize {
        self.lens.iter().copied().max().unwrap_or(0)
    }

    /// Slots in use in `layer` (every KV head of a layer holds as many).
    pub fn layer_len(&self, layer: usize) -> usize {
        self.lens[layer]
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Positions of the tokens `head` of `layer` holds, slot by slot (ascending).
    pub fn positions(&self, layer: usize, head: usize) -> &[i32] {
        &self.positions[layer * self.n_kv_head + head]
    }

    /// One slot's key, widened to f32.
    pub fn read_key(&self, layer: usize, head: usize, slot: usize, out: &mut [f32]) {
        self.k.read(self.offset(layer, head, slot), out);
    }

    /// One slot's value, widened to f32.
    pub fn read_value(&self, layer: usize, head: usize, slot: usize, out: &mut [f32]) {
        self.v.read(self.offset(layer, head, slot), out);
    }

    /// What [`KvCache::new`] with these arguments will reserve, with grouped keys or without.
    pub fn bytes_for(
        dtype: KvDtype,
        n_layer: usize,
        n_kv_head: usize,
        head_dim: usize,
        capacity: usize,
        grouped_keys: bool,
    ) -> usize {
        let tensors = if grouped_keys { 3 } else { 2 };
        tensors * n_layer * n_kv_head * capacity * head_dim * dtype.bytes()
    }

    /// Bytes held by the slots in use (keys, grouped keys if kept, and values; all layers).
    pub fn bytes_in_use(&self) -> usize {
        let tensors = if self.grouped.is_some() { 3 } else { 2 };
        let slots: usize = self.lens.iter().sum();
        tensors * self.n_kv_head * slots * self.head_dim * self.dtype.bytes()
    }

    /// Bytes reserved for the whole capacity.
    pub fn bytes_reserved(&self) -> usize {
        Self::bytes_for(
            self.dtype,
            self.n_layer,
            self.n_kv_head,
            self.head_dim,
            self.capacity,
            self.grouped.is_some(),
        )
    }

    /// Start of `(layer, head, slot)` in `k` / `v`.
    pub fn offset(&self, layer: usize, head: usize, slot: usize) -> usize {
        offset(
            self.n_kv_head,
            self.capacity,
            self.head_dim,
            layer,
            head,
            slot,
        )
    }

    /// Reserves slots at the end of every layer for tokens at `positions`; layer l then fills
    /// slots `layer_len(l) - n..layer_len(l)` with [`KvCache::write`]. Fails rather than
    /// overwrite when the cache is full.
    pub fn push_slots(&mut self, positions: &[i32]) -> Result<()> {
        let needed = self.len() + positions.len();
        if needed > self.capacity {
            return Err(Error::ContextOverflow {
                tokens: needed,
                reserve: 0,
                ctx: self.capacity,
            });
        }
        for list in &mut self.positions {
            list.extend_from_slice(positions);
        }
        for len in &mut self.lens {
            *len += positions.len();
        }
        Ok(())
    }

    /// Stores one head's key and value for one slot.
    pub fn write(&mut self, layer: usize, head: usize, slot: usize, key: &[f32], value: &[f32]) {
        let at = self.offset(layer, head, slot);
        self.k.write(at, key);
        self.v.write(at, value);
    }

    /// Stores one head's grouped key for one slot (see [`KvCache::keep_grouped_keys`]).
    pub fn write_grouped_key(&mut self, layer: usize, head: usize, slot: usize, key: &[f32]) {
        let at = self.offset(layer, head, slot);
        self.grouped
            .as_mut()
            .expect("the cache keeps grouped keys")
            .k
            .write(at, key);
    }

    /// Keeps only the slots listed (ascending) in every layer and head, compacting them to the
    /// front: evicted tokens give their memory back to the next tokens.
    pub fn retain(&mut self, keep: &[usize]) {
        for layer in 0..self.n_layer {
            for head in 0..self.n_kv_head {
                self.retain_head(layer, head, keep);
            }
            self.lens[layer] = keep.len();
        }
    }

    /// Keeps, in `layer`, the slots `keep[head]` (ascending) of each KV head: heads may keep
    /// different tokens, but as many each.
    pub fn retain_layer(&mut self, layer: usize, keep: &[Vec<usize>]) {
        assert_eq!(keep.len(), self.n_kv_head, "one slot list per KV head");
        let kept = keep[0].len();
        assert!(
            keep.iter().all(|k| k.len() == kept),
            "every KV head of a layer keeps as many slots"
        );
        for (head, slots) in keep.iter().enumerate() {
            self.retain_head(layer, head, slots);
        }
        self.lens[layer] = kept;
    }

    fn retain_head(&mut self, layer: usize, head: usize, keep: &[usize]) {
        let len = self.lens[layer];
        assert!(
            keep.windows(2).all(|w| w[0] < w[1]) && keep.last().is_none_or(|&s| s < len),
            "kept slots ascending and in use"
        );
        for (to, &from) in keep.iter().enumerate() {
            if to != from {
                let (src, dst) = (self.offset(layer, head, from), self.offset(layer, head, to));
                self.k.copy_within(src, dst, self.head_dim);
                self.v.copy_within(src, dst, self.head_dim);
                if let Some(g) = &mut self.grouped {
                    g.k.copy_within(src, dst, self.head_dim);
                }
            }
        }
        let positions = &mut self.positions[layer * self.n_kv_head + head];
        for (to, &from) in keep.iter().enumerate() {
            positions[to] = positions[from];
        }
        positions.truncate(keep.len());
    }

    /// Moves the tokens in the cache to new positions by rotating every stored key by the
    /// difference between its new and old position. `remap` turns a head's position list into
    /// the new one, in place (it sees each layer's and head's list, which differ once a policy
    /// has kept different tokens per head). Rotations compose, so this equals rotating the
    /// original key at the new position, and no scheme's cos/sin factor is applied a second
    /// time: the delta rotation uses factor 1. Grouped keys move by the change of their grouped
    /// position, ⌊new/G⌋ − ⌊old/G⌋.
    pub fn reposition(&mut self, remap: &dyn Fn(&mut [i32]), freqs: &[f64], style: RopeStyle) {
        let group = self.grouped.as_ref().map(|g| g.group);
        let mut table = RotaryTable::default();
        let (mut new, mut deltas) = (Vec::new(), Vec::new());
        for layer in 0..self.n_layer {
            for head in 0..self.n_kv_head {
                let old = &self.positions[layer * self.n_kv_head + head];
                new.clone_from(old);
                remap(&mut new);
                deltas.clear();
                deltas.extend(new.iter().zip(old).map(|(n, o)| n - o));
                self.shift_keys(layer, head, false, &deltas, &mut table, freqs, style);
                if let Some(group) = group {
                    let old = &self.positions[layer * self.n_kv_head + head];
                    deltas.clear();
                    deltas.extend(
                        new.iter()
                            .zip(old)
                            .map(|(n, o)| n.div_euclid(group) - o.div_euclid(group)),
                    );
                    self.shift_keys(layer, head, true, &deltas, &mut table, freqs, style);
                }
                self.positions[layer * self.n_kv_head + head].copy_from_slice(&new);
            }
        }
    }

    /// Rotates the plain or grouped key of every slot of one head by its `deltas` entry.
    #[allow(clippy::too_many_arguments)]
    fn shift_keys(
        &mut self,
        layer: usize,
        head: usize,
        grouped: bool,
        deltas: &[i32],
        table: &mut RotaryTable,
        freqs: &[f64],
        style: RopeStyle,
    ) {
        if deltas.iter().all(|&d| d == 0) {
            return;
        }
        table.fill(deltas, freqs, 1.0);
        let moved: Vec<usize> = (0..deltas.len()).filter(|&s| deltas[s] != 0).collect();
        self.rotate_keys(layer, head, grouped, &moved, table, style);
    }

    /// Re-rotates every cached key from frequencies `old` to `new` (dynamic schemes whose
    /// frequencies change as the sequence grows): the angle of pair i moves by
    /// position · (new_i − old_i), a pure rotation with factor 1, so each key ends as if it had
    /// been rotated at its position with `new` in the first place. Grouped keys turn by their
    /// grouped position.
    pub fn change_frequencies(&mut self, old: &[f64], new: &[f64], style: RopeStyle) {
        let deltas: Vec<f64> = new.iter().zip(old).map(|(n, o)| n - o).collect();
        let mut table = RotaryTable::default();
        for layer in 0..self.n_layer {
            let all: Vec<usize> = (0..self.lens[layer]).collect();
            for head in 0..self.n_kv_head {
                let positions = &self.positions[layer * self.n_kv_head + head];
                table.fill(positions, &deltas, 1.0);
                self.rotate_keys(layer, head, false, &all, &table, style);
                if let Some(group) = self.grouped.as_ref().map(|g| g.group) {
                    let positions = &self.positions[layer * self.n_kv_head + head];
                    let grouped: Vec<i32> = positions.iter().map(|p| p.div_euclid(group)).collect();
                    table.fill(&grouped, &deltas, 1.0);
                    self.rotate_keys(layer, head, true, &all, &table, style);
                }
            }
        }
    }

    /// Rotates the plain or grouped key of each slot in `slots` of one head by row `slot` of
    /// `table`.
    fn rotate_keys(
        &mut self,
        layer: usize,
        head: usize,
        grouped: bool,
        slots: &[usize],
        table: &RotaryTable,
        style: RopeStyle,
    ) {
        let (d, n_kv_head, capacity) = (self.head_dim, self.n_kv_head, self.capacity);
        // Borrows one key tensor mutably, so offsets come from the free function, not `self`.
        let keys = match &mut self.grouped {
            Some(g) if grouped => &mut g.k,
            _ => {
                assert!(!grouped, "the cache keeps no grouped keys");
                &mut self.k
            }
        };
        let mut key = vec![0f32; d];
        for &slot in slots {
            let at = offset(n_kv_head, capacity, d, layer, head, slot);
            match keys {
                KvData::F16(k) => {
                    for (o, v) in key.iter_mut().zip(&k[at..at + d]) {
                        *o = v.to_f32();
                    }
                    table.rotate(&mut key, slot, style);
                    for (o, &v) in k[at..at + d].iter_mut().zip(&key) {
                        *o = f16::from_f32(v);
                    }
                }
                KvData::F32(k) => table.rotate(&mut k[at..at + d], slot, style),
            }
        }
    }

    /// Drops everything.
    pub fn clear(&mut self) {
        self.lens.fill(0);
        for list in &mut self.positions {
            list.clear();
        }
    }
}

/// Start of `(layer, head, slot)` in a tensor laid out `[layer][kv_head][slot][head_dim]`.
fn offset(
    n_kv_head: usize,
    capacity: usize,
    head_dim: usize,
    layer: usize,
    head: usize,
    slot: usize,
) -> usize {
    ((layer * n_kv_head + head) * capacity + slot) * head_dim
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retain_compacts_every_head_and_keeps_positions() {
        let mut c = KvCache::new(KvDtype::F32, 2, 2, 4, 8);
        c.push_slots(&[10, 11, 12, 13]).unwrap();
        for s in 0..4 {
            for l in 0..2 {
                for h in 0..2 {
                    let v = [(s * 100 + l * 10 + h) as f32; 4];
                    c.write(l, h, s, &v, &v);
                }
            }
        }
        c.retain(&[0, 2, 3]);
        assert_eq!(c.len(), 3);
        assert_eq!(c.positions(1, 0), &[10, 12, 13]);
        let KvData::F32(k) = &c.k else { unreachable!() };
        assert_eq!(k[c.offset(1, 1, 1)], 211.0);
        assert_eq!(k[c.offset(0, 1, 2)], 301.0);
        assert_eq!(c.bytes_in_use(), 2 * 2 * 2 * 3 * 4 * 4);
    }

    /// `raw` rotated at position `p` with `freqs`.
    fn rotated(raw: &[f32], freqs: &[f64], p: i32) -> Vec<f32> {
        let mut t = RotaryTable::default();
        t.fill(&[p], freqs, 1.0);
        let mut k = raw.to_vec();
        t.rotate(&mut k, 0, RopeStyle::Normal);
        k
    }

    #[test]
    fn repositioning_equals_rotating_at_the_new_position() {
        let freqs = [1.0, 0.25, 0.01, 0.001];
        let raw: Vec<f32> = (0..8).map(|i| (i as f32 * 0.7).cos()).collect();
        let rotated_at = |p: i32| rotated(&raw, &freqs, p);
        let mut c = KvCache::new(KvDtype::F32, 1, 1, 8, 4);
        c.push_slots(&[40, 900]).unwrap();
        c.write(0, 0, 0, &rotated_at(40), &raw);
        c.write(0, 0, 1, &rotated_at(900), &raw);
        c.reposition(&|p| p.copy_from_slice(&[3, 4]), &freqs, RopeStyle::Normal);
        assert_eq!(c.positions(0, 0), &[3, 4]);
        let KvData::F32(k) = &c.k else { unreachable!() };
        for (slot, p) in [(0, 3), (1, 4)] {
            let at = c.offset(0, 0, slot);
            for (a, b) in k[at..at + 8].iter().zip(rotated_at(p)) {
                assert!((a - b).abs() < 1e-5, "slot {slot}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn grouped_keys_follow_compaction_and_repositioning() {
        let freqs = [1.0, 0.25, 0.01, 0.001];
        let raw: Vec<f32> = (0..8).map(|i| (i as f32 * 0.7).cos()).collect();
        let rotated_at = |p: i32| rotated(&raw, &freqs, p);
        let mut c = KvCache::new(KvDtype::F32, 1, 1, 8, 4);
        c.keep_grouped_keys(4);
        assert_eq!(c.bytes_reserved(), 3 * 4 * 8 * 4);
        c.push_slots(&[5, 41, 90]).unwrap();
        for (slot, p) in [(0, 5), (1, 41), (2, 90)] {
            c.write(0, 0, slot, &rotated_at(p), &raw);
            c.write_grouped_key(0, 0, slot, &rotated_at(p / 4));
        }
        c.retain(&[1, 2]);
        // Moving 41 → 7 and 90 → 8 moves their grouped keys from 10 → 1 and 22 → 2.
        c.reposition(&|p| p.copy_from_slice(&[7, 8]), &freqs, RopeStyle::Normal);
        let (KvData::F32(k), Some(KvData::F32(g))) = (&c.k, c.grouped_keys()) else {
            unreachable!()
        };
        for (slot, p) in [(0, 7), (1, 8)] {
            let at = c.offset(0, 0, slot);
            let close = |a: &[f32], b: Vec<f32>| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-5);
            assert!(close(&k[at..at + 8], rotated_at(p)), "key of slot {slot}");
            assert!(
                close(&g[at..at + 8], rotated_at(p / 4)),
                "grouped key of slot {slot}"
            );
        }
        assert_eq!(c.bytes_in_use(), 3 * 2 * 8 * 4);
    }

    #[test]
    fn a_full_cache_refuses_more_tokens() {
        let mut c = KvCache::new(KvDtype::F16, 1, 1, 2, 2);
        c.push_slots(&[0, 1]).unwrap();
        assert!(matches!(
            c.push_slots(&[2]),
            Err(Error::ContextOverflow { .. })
        ));
    }
}
