//! The KV cache: preallocated once per session, laid out `[layer][kv_head][slot][head_dim]` so
//! that attention reads each head's keys and values as one contiguous run, and so that a policy
//! can later keep a different set of tokens per head.
//!
//! Keys are stored after rotation (as llama.cpp does), together with the position each slot was
//! rotated at; moving a token to another position is then an exact delta rotation by
//! (new − old), never a second application of any attention factor. Self-Extend also attends to
//! every key at a grouped position ⌊p/G⌋; the cache then holds those grouped keys too, in a second
//! key tensor of the same layout, kept in step with the first by every operation here.

pub mod finch;
pub mod h2o;
pub mod kivi;
pub mod knorm;
mod observer;
pub mod policy;
pub mod pyramid;
pub mod scope;
pub mod snapkv;
pub mod streaming;
pub mod tova;
pub mod windowkv;

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
    PolicyEntry {
        name: "h2o",
        about: "H2O: heavy hitters by accumulated attention + recent window, also while decoding",
        build: h2o::build,
    },
    PolicyEntry {
        name: "tova",
        about: "TOVA: keep what the newest query attends to most (averaged over heads)",
        build: tova::build,
    },
    PolicyEntry {
        name: "scope",
        about: "SCOPE: SnapKV-compressed prompt kept whole + a sliding heavy-hitter decoding pool",
        build: scope::build,
    },
    PolicyEntry {
        name: "knorm",
        about: "Knorm: keep the keys with the lowest L2 norm per KV head",
        build: knorm::build,
    },
    PolicyEntry {
        name: "pyramid",
        about: "PyramidKV: SnapKV votes, per-layer budgets falling linearly with depth",
        build: pyramid::build,
    },
    PolicyEntry {
        name: "windowkv",
        about: "WindowKV: whole windows of consecutive tokens, chosen once per group of layers",
        build: windowkv::build,
    },
    PolicyEntry {
        name: "finch",
        about: "Finch: context chunks compressed by the question's votes, moved to the front",
        build: finch::build,
    },
];

/// The eviction policy a `--kv` spec names, with its parameters checked: the spec's first
/// part, or `full` when the spec is `kivi:…` alone (see [`build_kivi`]).
pub fn build_policy(spec: &Spec, shape: &Shape) -> Result<Box<dyn KvPolicy>> {
    let full = SpecPart {
        name: "full".into(),
        params: Vec::new(),
    };
    let (eviction, kivi) = split_spec(spec)?;
    if let Some(kivi) = kivi {
        Kivi::from_spec(kivi, shape)?;
    }
    let part = eviction.unwrap_or(&full);
    let entry = POLICIES
        .iter()
        .find(|e| e.name == part.name)
        .ok_or_else(|| Error::UnknownMethod {
            kind: "KV policy",
            name: part.name.clone(),
            known: POLICIES
                .iter()
                .map(|e| e.name)
                .chain(["kivi"])
                .collect::<Vec<_>>()
                .join(", "),
        })?;
    (entry.build)(part, shape)
}

/// The KIVI quantization a `--kv` spec asks for (`…+kivi:…` or `kivi:…`), if any.
pub fn build_kivi(spec: &Spec, shape: &Shape) -> Result<Option<Kivi>> {
    let (_, kivi) = split_spec(spec)?;
    kivi.map(|part| Kivi::from_spec(part, shape)).transpose()
}

/// A `--kv` spec's eviction policy and KIVI part. Quantization stores what eviction keeps, so
/// KIVI comes last, once, after at most one eviction policy.
fn split_spec(spec: &Spec) -> Result<(Option<&SpecPart>, Option<&SpecPart>)> {
    let refuse = |why: &str| {
        Err(Error::InvalidOption(format!(
            "`--kv {spec}`: {why}; write one eviction policy, optionally followed by \
             `+kivi:…` (e.g. `snapkv:budget=1024+kivi:bits=4`), or `kivi:…` alone"
        )))
    };
    match spec.parts.as_slice() {
        [kivi] if kivi.name == "kivi" => Ok((None, Some(kivi))),
        [eviction] => Ok((Some(eviction), None)),
        [eviction, kivi] if kivi.name == "kivi" && eviction.name != "kivi" => {
            Ok((Some(eviction), Some(kivi)))
        }
        parts if parts.iter().filter(|p| p.name == "kivi").count() > 1 => {
            refuse("`kivi` is given more than once")
        }
        parts if parts[..parts.len() - 1].iter().any(|p| p.name == "kivi") => refuse(
            "`kivi` quantizes what the eviction policy keeps, so it comes last, not before \
             another method",
        ),
        _ => refuse("only one eviction policy can decide which tokens the cache keeps"),
    }
}

pub use kivi::Kivi;
pub use observer::{AttentionObserver, Observers};

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
        // Zeroed pages: memory is committed as the cache fills, not upfront (which KIVI, whose
        // full-precision rows stay at the front, relies on).
        match dtype {
            KvDtype::F16 => Self::F16(kivi::f16_zeros(n)),
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
///
/// A sliding-window model's local layers ([`KvCache::with_windows`]) hold only their window: as
/// a chunk arrives, slots no query can see any more are dropped from the front, so those layers
/// cost memory for `window + chunk` tokens whatever the context. KV policies compress the
/// other (global) layers: [`KvCache::compressed_layers`].
///
/// With KIVI ([`KvCache::use_kivi`]) the first [`KvCache::quantized`] slots of a head live in a
/// quantized store and slot s ≥ that count in row s − count of `k` and `v`, so the full-precision
/// tensors only ever touch their first rows; [`KvCache::read_key`] and
/// [`KvCache::read_value`] read any slot.
pub struct KvCache {
    pub dtype: KvDtype,
    pub n_layer: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    capacity: usize,
    layout: Layout,
    /// The sliding window of each local layer.
    windows: Vec<Option<usize>>,
    /// The RoPE frequencies local layers' keys are rotated with, for re-positioning them.
    local_frequencies: Vec<f64>,
    /// Slots in use, per layer.
    lens: Vec<usize>,
    pub k: KvData,
    pub v: KvData,
    /// Position each slot's key was rotated at, per `layer * n_kv_head + head`.
    positions: Vec<Vec<i32>>,
    grouped: Option<GroupedKeys>,
    kivi: Option<Box<kivi::QuantizedSlots>>,
    /// Slots in the quantized store, per `layer * n_kv_head + head` (zero without KIVI).
    quantized: Vec<usize>,
}

/// Which of a cache's tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tensor {
    Keys,
    Values,
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
        Self::with_windows(
            dtype,
            n_kv_head,
            head_dim,
            capacity,
            &vec![None; n_layer],
            0,
        )
    }

    /// A cache whose layers with a window (`windows[l]`) hold only the slots it can see, for
    /// chunks of up to `chunk` tokens.
    pub fn with_windows(
        dtype: KvDtype,
        n_kv_head: usize,
        head_dim: usize,
        capacity: usize,
        windows: &[Option<usize>],
        chunk: usize,
    ) -> Self {
        let n_layer = windows.len();
        let capacities: Vec<usize> = windows
            .iter()
            .map(|w| w.map_or(capacity, |w| window_slots(w, chunk).min(capacity)))
            .collect();
        let positions = (0..n_layer * n_kv_head)
            .map(|i| Vec::with_capacity(capacities[i / n_kv_head]))
            .collect();
        let layout = Layout::new(capacities, n_kv_head, head_dim);
        let n = layout.values();
        Self {
            dtype,
            n_layer,
            n_kv_head,
            head_dim,
            capacity,
            layout,
            windows: windows.to_vec(),
            local_frequencies: Vec::new(),
            lens: vec![0; n_layer],
            k: KvData::zeros(dtype, n),
            v: KvData::zeros(dtype, n),
            positions,
            grouped: None,
            kivi: None,
            quantized: vec![0; n_layer * n_kv_head],
        }
    }

    /// Stores settled tokens KIVI-quantized from now on ([`KvCache::settle`]). Self-Extend's
    /// grouped keys have no quantized store, so the two exclude each other.
    pub fn use_kivi(&mut self, kivi: Kivi) {
        assert!(self.is_empty(), "KIVI starts on an empty cache");
        assert!(
            self.grouped.is_none(),
            "KIVI does not quantize grouped keys"
        );
        assert!(
            self.head_dim.is_multiple_of(kivi.group)
                && (self.head_dim * kivi.bits as usize).is_multiple_of(8),
            "KIVI groups divide the head size and codes fill whole bytes"
        );
        let heads = self.n_layer * self.n_kv_head;
        self.kivi = Some(Box::new(kivi::QuantizedSlots::new(
            kivi,
            heads,
            self.head_dim,
            self.capacity,
        )));
    }

    /// The KIVI configuration, if the cache quantizes.
    pub fn kivi(&self) -> Option<&Kivi> {
        self.kivi.as_ref().map(|q| &q.kivi)
    }

    /// Slots of `head` in `layer` held quantized: the first ones.
    pub fn quantized(&self, layer: usize, head: usize) -> usize {
        self.quantized[layer * self.n_kv_head + head]
    }

    /// KIVI: quantizes, in whole groups, the tokens of every head older than the residual, and
    /// moves the rest to the front of the full-precision rows. The session calls it after every
    /// chunk, once the eviction policy has run; without KIVI it does nothing.
    pub fn settle(&mut self) {
        let Some(store) = &mut self.kivi else {
            return;
        };
        let (g, d) = (store.kivi.group, self.head_dim);
        let mut rows = std::mem::take(&mut store.scratch);
        for layer in 0..self.n_layer {
            let len = self.lens[layer];
            let target = len.saturating_sub(store.kivi.residual) / g * g;
            for head in 0..self.n_kv_head {
                let index = layer * self.n_kv_head + head;
                let done = self.quantized[index];
                if target <= done {
                    continue;
                }
                let row = |slot: usize| self.layout.offset(layer, head, slot);
                for group in (done..target).step_by(g) {
                    for (t, r) in rows.chunks_exact_mut(d).enumerate() {
                        self.k.read(row(group - done + t), r);
                    }
                    store.quantize_keys(index, group / g, &rows);
                    for (t, r) in rows.chunks_exact_mut(d).enumerate() {
                        self.v.read(row(group - done + t), r);
                        store.quantize_value(index, group + t, r);
                    }
                }
                let rest = (len - target) * d;
                self.k.copy_within(row(target - done), row(0), rest);
                self.v.copy_within(row(target - done), row(0), rest);
                self.quantized[index] = target;
            }
        }
        store.scratch = rows;
    }

    /// The keys or values of `slots` (all quantized) of `head` in `layer`, dequantized into
    /// `out` (`[slots][D]`).
    pub fn dequantize(
        &self,
        tensor: Tensor,
        layer: usize,
        head: usize,
        slots: std::ops::Range<usize>,
        out: &mut [f32],
    ) {
        assert!(slots.end <= self.quantized(layer, head), "quantized slots");
        let store = self.kivi.as_ref().expect("the cache quantizes");
        let index = layer * self.n_kv_head + head;
        match tensor {
            Tensor::Keys => store.dequantize_keys(index, slots, out),
            Tensor::Values => store.dequantize_values(index, slots, out),
        }
    }

    /// Makes room for grouped keys: each slot's key rotated at ⌊position / group⌋ as well, which
    /// the forward pass stores with [`KvCache::write_grouped_key`]. Costs one more key tensor.
    pub fn keep_grouped_keys(&mut self, group: i32) {
        assert!(group >= 1, "a group of at least 1 position");
        assert!(self.kivi.is_none(), "KIVI does not quantize grouped keys");
        let n = self.layout.values();
        self.grouped = Some(GroupedKeys {
            group,
            k: KvData::zeros(self.dtype, n),
        });
    }

    /// The grouped keys, laid out as [`KvCache::k`]; None unless the cache keeps them.
    pub fn grouped_keys(&self) -> Option<&KvData> {
        self.grouped.as_ref().map(|g| &g.k)
    }

    /// Slots in use in the fullest compressed layer: the tokens the cache holds (local layers
    /// hold only the last of them, and all of them on a model without global layers).
    pub fn len(&self) -> usize {
        let global = self.compressed_layers().map(|l| self.lens[l]).max();
        global.unwrap_or_else(|| self.lens.iter().copied().max().unwrap_or(0))
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

    /// One slot's key, widened to f32 (dequantized if KIVI holds it).
    pub fn read_key(&self, layer: usize, head: usize, slot: usize, out: &mut [f32]) {
        self.read(Tensor::Keys, layer, head, slot, out);
    }

    /// One slot's value, widened to f32 (dequantized if KIVI holds it).
    pub fn read_value(&self, layer: usize, head: usize, slot: usize, out: &mut [f32]) {
        self.read(Tensor::Values, layer, head, slot, out);
    }

    fn read(&self, tensor: Tensor, layer: usize, head: usize, slot: usize, out: &mut [f32]) {
        let quantized = self.quantized(layer, head);
        if slot < quantized {
            return self.dequantize(tensor, layer, head, slot..slot + 1, out);
        }
        let data = match tensor {
            Tensor::Keys => &self.k,
            Tensor::Values => &self.v,
        };
        data.read(self.offset(layer, head, slot - quantized), out);
    }

    /// What [`KvCache::with_windows`] with these arguments will reserve, with grouped keys or
    /// without.
    pub fn bytes_for(
        dtype: KvDtype,
        n_kv_head: usize,
        head_dim: usize,
        capacity: usize,
        windows: &[Option<usize>],
        chunk: usize,
        grouped_keys: bool,
    ) -> usize {
        let tensors = if grouped_keys { 3 } else { 2 };
        let slots: usize = windows
            .iter()
            .map(|w| w.map_or(capacity, |w| window_slots(w, chunk).min(capacity)))
            .sum();
        tensors * slots * n_kv_head * head_dim * dtype.bytes()
    }

    /// Sets the frequencies the local layers' keys are rotated with ([`KvCache::reposition`]
    /// turns them by these).
    pub fn set_local_frequencies(&mut self, freqs: Vec<f64>) {
        self.local_frequencies = freqs;
    }

    /// Whether `layer` is local: it holds a sliding window, which no KV policy compresses.
    pub fn is_local(&self, layer: usize) -> bool {
        self.windows[layer].is_some()
    }

    /// The layers a KV policy compresses: all but the local ones, which their window already
    /// bounds.
    pub fn compressed_layers(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.n_layer).filter(|&l| !self.is_local(l))
    }

    /// Bytes held by the slots in use in local layers, and in the others.
    pub fn bytes_in_use_by_kind(&self) -> (usize, usize) {
        let mut local = 0;
        let mut global = 0;
        for layer in 0..self.n_layer {
            let bytes = self.layer_bytes_in_use(layer);
            if self.is_local(layer) {
                local += bytes;
            } else {
                global += bytes;
            }
        }
        (local, global)
    }

    /// Bytes held by the slots in use (keys, grouped keys if kept, and values; all layers): with
    /// KIVI, the quantized slots' codes, mins and scales plus the full-precision rows.
    pub fn bytes_in_use(&self) -> usize {
        (0..self.n_layer).map(|l| self.layer_bytes_in_use(l)).sum()
    }

    fn layer_bytes_in_use(&self, layer: usize) -> usize {
        let tensors = if self.grouped.is_some() { 3 } else { 2 };
        let heads = layer * self.n_kv_head..(layer + 1) * self.n_kv_head;
        let slots = self.lens[layer] * self.n_kv_head;
        let quantized: usize = self.quantized[heads.clone()].iter().sum();
        let full = tensors * (slots - quantized) * self.head_dim * self.dtype.bytes();
        let packed = self.kivi().map_or(0, |kivi| {
            let bytes = |&q: &usize| kivi.quantized_bytes(self.head_dim, q);
            self.quantized[heads].iter().map(bytes).sum()
        });
        full + packed
    }

    /// Bytes reserved for the whole capacity (the OS commits them as they are first written).
    pub fn bytes_reserved(&self) -> usize {
        let store = self.kivi.as_ref().map_or(0, |q| q.bytes_reserved());
        let tensors = if self.grouped.is_some() { 3 } else { 2 };
        store + tensors * self.layout.values() * self.dtype.bytes()
    }

    /// Start of row `slot` of `(layer, head)` in `k` / `v`: the slot itself without KIVI, the
    /// slot minus [`KvCache::quantized`] with it.
    pub fn offset(&self, layer: usize, head: usize, slot: usize) -> usize {
        self.layout.offset(layer, head, slot)
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
        if let Some(&first) = positions.first() {
            for layer in 0..self.n_layer {
                if let Some(window) = self.windows[layer] {
                    self.slide(layer, window, first, positions.len())?;
                }
            }
        }
        for list in &mut self.positions {
            list.extend_from_slice(positions);
        }
        for len in &mut self.lens {
            *len += positions.len();
        }
        Ok(())
    }

    /// Stores one head's key and value for one slot (not a quantized one).
    pub fn write(&mut self, layer: usize, head: usize, slot: usize, key: &[f32], value: &[f32]) {
        let at = self.offset(layer, head, slot - self.quantized(layer, head));
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

    /// Makes room in local `layer` for `incoming` tokens from position `first` on, when it is
    /// full: drops from its front the slots that no query from `first` on sees (a key `window`
    /// or more positions behind), in whole multiples of [`DROP_ALIGN`].
    fn slide(&mut self, layer: usize, window: usize, first: i32, incoming: usize) -> Result<()> {
        let (len, capacity) = (self.lens[layer], self.layout.capacities[layer]);
        if len + incoming <= capacity {
            return Ok(());
        }
        let dead = (0..self.n_kv_head)
            .map(|h| {
                self.positions(layer, h)
                    .partition_point(|&p| first as i64 - p as i64 >= window as i64)
            })
            .min()
            .unwrap_or(0);
        let drop = dead / DROP_ALIGN * DROP_ALIGN;
        if len - drop + incoming > capacity {
            return Err(Error::InvalidOption(format!(
                "layer {layer} attends a window of {window} positions and holds {capacity} slots, \
                 but {} of its {len} cached tokens are still in the window of position {first}; \
                 positions must grow by one per token on a sliding-window model",
                len - dead
            )));
        }
        let keep: Vec<usize> = (drop..len).collect();
        self.retain_layer(layer, &vec![keep; self.n_kv_head]);
        Ok(())
    }

    /// Keeps only the slots listed (ascending) in every compressed layer
    /// ([`KvCache::compressed_layers`]) and head, compacting them to the front: evicted tokens
    /// give their memory back to the next tokens.
    pub fn retain(&mut self, keep: &[usize]) {
        for layer in 0..self.n_layer {
            if self.is_local(layer) {
                continue;
            }
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
        if self.quantized(layer, head) > 0 {
            self.retain_quantized(layer, head, keep);
        } else {
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
        }
        let positions = &mut self.positions[layer * self.n_kv_head + head];
        for (to, &from) in keep.iter().enumerate() {
            positions[to] = positions[from];
        }
        positions.truncate(keep.len());
    }

    /// [`KvCache::retain_head`] for a head with quantized slots. The kept quantized tokens come
    /// first; whole key groups of them stay quantized ([`kivi::QuantizedSlots::compact`]), and
    /// the few left over (less than a group) go back to full precision, before the kept
    /// full-precision rows, where the next [`KvCache::settle`] takes them again.
    fn retain_quantized(&mut self, layer: usize, head: usize, keep: &[usize]) {
        let (d, index) = (self.head_dim, layer * self.n_kv_head + head);
        let quantized = self.quantized[index];
        let store = self.kivi.as_mut().expect("the cache quantizes");
        let g = store.kivi.group;
        let kept_quantized = keep.partition_point(|&s| s < quantized);
        let still = kept_quantized / g * g;
        let layout = &self.layout;
        let row = |slot: usize| layout.offset(layer, head, slot);
        // The kept full-precision rows, read before the leftovers take their place.
        let full = &keep[kept_quantized..];
        let mut saved = vec![0f32; 2 * full.len() * d];
        let (keys, values) = saved.split_at_mut(full.len() * d);
        for ((&slot, k), v) in full
            .iter()
            .zip(keys.chunks_exact_mut(d))
            .zip(values.chunks_exact_mut(d))
        {
            self.k.read(row(slot - quantized), k);
            self.v.read(row(slot - quantized), v);
        }
        store.compact(index, &keep[..still]);
        let mut kv = vec![0f32; 2 * d];
        let (k, v) = kv.split_at_mut(d);
        for (to, &slot) in keep[still..kept_quantized].iter().enumerate() {
            store.dequantize_keys(index, slot..slot + 1, k);
            store.dequantize_values(index, slot..slot + 1, v);
            self.k.write(row(to), k);
            self.v.write(row(to), v);
        }
        let first = kept_quantized - still;
        for (i, (k, v)) in keys.chunks_exact(d).zip(values.chunks_exact(d)).enumerate() {
            self.k.write(row(first + i), k);
            self.v.write(row(first + i), v);
        }
        self.quantized[index] = still;
    }

    /// Moves the tokens in the cache to new positions by rotating every stored key by the
    /// difference between its new and old position. `remap` turns a head's position list into
    /// the new one, in place (it sees each layer's and head's list, which differ once a policy
    /// has kept different tokens per head). Rotations compose, so this equals rotating the
    /// original key at the new position, and no scheme's cos/sin factor is applied a second
    /// time: the delta rotation uses factor 1. Grouped keys move by the change of their grouped
    /// position, ⌊new/G⌋ − ⌊old/G⌋.
    ///
    /// Local layers keep their tokens' distances, which is all their window sees: they move by
    /// the shift of the newest token of the first compressed layer, and turn with their own
    /// frequencies ([`KvCache::set_local_frequencies`]).
    pub fn reposition(&mut self, remap: &dyn Fn(&mut [i32]), freqs: &[f64], style: RopeStyle) {
        let group = self.grouped.as_ref().map(|g| g.group);
        let mut table = RotaryTable::default();
        let (mut new, mut deltas) = (Vec::new(), Vec::new());
        let newest_shift = self.compressed_layers().next().and_then(|layer| {
            let old = self.positions(layer, 0).to_vec();
            new.clone_from(&old);
            remap(&mut new);
            Some(new.last()? - old.last()?)
        });
        for layer in 0..self.n_layer {
            let local = self.is_local(layer);
            let layer_freqs = if local {
                std::mem::take(&mut self.local_frequencies)
            } else {
                freqs.to_vec()
            };
            for head in 0..self.n_kv_head {
                let old = &self.positions[layer * self.n_kv_head + head];
                new.clone_from(old);
                match newest_shift {
                    Some(shift) if local => new.iter_mut().for_each(|p| *p += shift),
                    _ => remap(&mut new),
                }
                deltas.clear();
                deltas.extend(new.iter().zip(old).map(|(n, o)| n - o));
                self.shift_keys(layer, head, false, &deltas, &mut table, &layer_freqs, style);
                if let Some(group) = group.filter(|_| !local) {
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
            if local {
                self.local_frequencies = layer_freqs;
            }
        }
    }

    /// Moves every kept token to the position of its slot, 0, 1, …: positions inside the cache,
    /// as StreamingLLM and Finch take them after an eviction.
    pub fn move_to_slots(&mut self, freqs: &[f64], style: RopeStyle) {
        self.reposition(
            &|positions| {
                for (slot, p) in positions.iter_mut().enumerate() {
                    *p = slot as i32;
                }
            },
            freqs,
            style,
        );
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
            // Schemes change the global layers' frequencies only.
            if self.is_local(layer) {
                continue;
            }
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
        let (d, n_kv_head, layout) = (self.head_dim, self.n_kv_head, &self.layout);
        let quantized = self.quantized[layer * n_kv_head + head];
        let (in_store, slots) = slots.split_at(slots.partition_point(|&s| s < quantized));
        if !in_store.is_empty() {
            let store = self.kivi.as_mut().expect("the cache quantizes");
            let index = layer * n_kv_head + head;
            store.rewrite_keys(index, in_store, |slot, key| table.rotate(key, slot, style));
        }
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
            let at = layout.offset(layer, head, slot - quantized);
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

    /// Whether the first `len` tokens can be cut back to ([`KvCache::truncate`]): the local
    /// layers must still hold the window of the token that comes next, which they may have
    /// dropped since.
    pub fn holds_window_for(&self, len: usize) -> bool {
        (0..self.n_layer).all(|layer| match self.windows[layer] {
            None => true,
            Some(window) => {
                let first_needed = (len as i64 - window as i64 + 1).max(0);
                (0..self.n_kv_head).all(|h| {
                    self.positions(layer, h)
                        .first()
                        .is_none_or(|&p| p as i64 <= first_needed)
                })
            }
        })
    }

    /// Keeps the tokens at positions below `len` in every layer and head: a prefix of the
    /// tokens, where no policy has thinned or quantized the cache (local layers: what of it
    /// they still hold, [`KvCache::holds_window_for`]).
    pub fn truncate(&mut self, len: usize) {
        assert!(
            self.kivi.is_none(),
            "a KIVI cache does not hold its tokens in slot order"
        );
        for layer in 0..self.n_layer {
            for head in 0..self.n_kv_head {
                let list = &mut self.positions[layer * self.n_kv_head + head];
                list.truncate(list.partition_point(|&p| (p as i64) < len as i64));
                self.lens[layer] = list.len();
            }
        }
    }

    /// Drops everything.
    pub fn clear(&mut self) {
        self.lens.fill(0);
        self.quantized.fill(0);
        for list in &mut self.positions {
            list.clear();
        }
    }
}

/// Where a cache's tensors keep each slot: laid out `[layer][kv_head][slot][head_dim]`, each
/// layer with its own number of slots per head.
struct Layout {
    n_kv_head: usize,
    head_dim: usize,
    capacities: Vec<usize>,
    /// Where each layer starts, in values.
    bases: Vec<usize>,
}

impl Layout {
    fn new(capacities: Vec<usize>, n_kv_head: usize, head_dim: usize) -> Self {
        let bases = capacities
            .iter()
            .scan(0, |at, cap| {
                let base = *at;
                *at += n_kv_head * cap * head_dim;
                Some(base)
            })
            .collect();
        Self {
            n_kv_head,
            head_dim,
            capacities,
            bases,
        }
    }

    /// Values in one tensor.
    fn values(&self) -> usize {
        self.capacities.iter().sum::<usize>() * self.n_kv_head * self.head_dim
    }

    /// Start of `(layer, head, slot)`.
    fn offset(&self, layer: usize, head: usize, slot: usize) -> usize {
        self.bases[layer] + (head * self.capacities[layer] + slot) * self.head_dim
    }
}

/// Slots a local layer with `window` needs for chunks of up to `chunk` tokens: the window's
/// keys still visible to the chunk's first query, the chunk, and up to [`DROP_ALIGN`] − 1 dead
/// slots left behind because drops come in whole multiples of it.
fn window_slots(window: usize, chunk: usize) -> usize {
    window + chunk + DROP_ALIGN
}

/// Local layers drop slots in multiples of this: slot s keeps its place modulo 64, so the lanes
/// and blocks that attention sums slots in (16 or 64 wide, counted from slot 0) keep the same
/// slots together, and the bits are those of a cache that keeps every slot.
const DROP_ALIGN: usize = 64;

#[cfg(test)]
mod tests {
    use super::*;

    /// A local layer holds its window and the chunk, dropping dead slots 64 at a time; the
    /// global layer beside it holds everything, and only it is compressed.
    #[test]
    fn local_layers_hold_only_their_window() {
        let (window, chunk) = (8, 4);
        let windows = [Some(window), None];
        let mut c = KvCache::with_windows(KvDtype::F32, 1, 4, 1000, &windows, chunk);
        assert_eq!(
            c.bytes_reserved(),
            KvCache::bytes_for(KvDtype::F32, 1, 4, 1000, &windows, chunk, false)
        );
        assert_eq!(c.compressed_layers().collect::<Vec<_>>(), vec![1]);
        for start in (0..300).step_by(chunk) {
            let positions: Vec<i32> = (start..start + chunk as i32).collect();
            c.push_slots(&positions).unwrap();
            let local = c.positions(0, 0);
            assert!(local.len() <= window + chunk + DROP_ALIGN);
            assert_eq!(
                local[0] % DROP_ALIGN as i32,
                0,
                "drops are whole multiples of 64"
            );
            assert!(
                local[0] <= (start - window as i32 + 1).max(0),
                "the window is kept"
            );
            assert_eq!(*local.last().unwrap(), start + chunk as i32 - 1);
        }
        assert_eq!(c.layer_len(1), 300);
        let (local, global) = c.bytes_in_use_by_kind();
        assert_eq!(global, 2 * 300 * 4 * 4);
        assert_eq!(local, 2 * c.layer_len(0) * 4 * 4);
        assert!(c.holds_window_for(299) && !c.holds_window_for(100));
        c.retain(&[0, 1, 2]);
        assert_eq!((c.layer_len(1), c.positions(0, 0).last()), (3, Some(&299)));
    }

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

    /// One token's key and value.
    type Token = (Vec<f32>, Vec<f32>);

    fn kivi(bits: u32, group: usize, residual: usize) -> Kivi {
        Kivi {
            bits,
            group,
            residual,
        }
    }

    /// A value in [-4, 4) per call, rounded to f16 as the f16 cache stores it.
    fn sampler(seed: u32) -> impl FnMut() -> f32 {
        let mut rng = seed;
        move || {
            rng = rng.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            f16::from_f32(((rng >> 8) as f32 / (1 << 24) as f32 - 0.5) * 8.0).to_f32()
        }
    }

    /// Appends `n` tokens to every layer and head with random keys and values; returns them,
    /// `[layer][head][token]`, each `(key, value)`.
    fn fill(c: &mut KvCache, n: usize, next: &mut impl FnMut() -> f32) -> Vec<Vec<Vec<Token>>> {
        let first = c.len();
        c.push_slots(&(first as i32..(first + n) as i32).collect::<Vec<_>>())
            .unwrap();
        (0..c.n_layer)
            .map(|layer| {
                (0..c.n_kv_head)
                    .map(|head| {
                        (first..first + n)
                            .map(|slot| {
                                let k: Vec<f32> = (0..c.head_dim).map(|_| next()).collect();
                                let v: Vec<f32> = (0..c.head_dim).map(|_| next()).collect();
                                c.write(layer, head, slot, &k, &v);
                                (k, v)
                            })
                            .collect()
                    })
                    .collect()
            })
            .collect()
    }

    /// The largest difference between `slot`'s key and value and `(key, value)`.
    fn error(c: &KvCache, layer: usize, head: usize, slot: usize, kv: &Token) -> f32 {
        let mut got = vec![0f32; c.head_dim];
        let mut worst = 0f32;
        c.read_key(layer, head, slot, &mut got);
        worst = got
            .iter()
            .zip(&kv.0)
            .fold(worst, |w, (a, b)| w.max((a - b).abs()));
        c.read_value(layer, head, slot, &mut got);
        got.iter()
            .zip(&kv.1)
            .fold(worst, |w, (a, b)| w.max((a - b).abs()))
    }

    /// Half of an 8-bit step over values in [-4, 4).
    const HALF_STEP_8: f32 = 4.0 / 255.0 + 1e-4;

    #[test]
    fn kivi_settles_old_tokens_in_whole_groups_behind_the_residual() {
        let mut next = sampler(3);
        let mut c = KvCache::new(KvDtype::F16, 2, 2, 8, 64);
        c.use_kivi(kivi(8, 4, 6));
        let mut tokens = fill(&mut c, 19, &mut next);
        c.settle();
        // 13 tokens are older than the residual of 6: three whole groups of 4.
        assert_eq!(c.quantized(1, 1), 12);
        for (more, quantized) in [(5, 16), (1, 16), (3, 20)] {
            let added = fill(&mut c, more, &mut next);
            for (all, new) in tokens.iter_mut().flatten().zip(added.into_iter().flatten()) {
                all.extend(new);
            }
            c.settle();
            assert_eq!(c.quantized(0, 1), quantized);
            for (layer, heads) in tokens.iter().enumerate() {
                for (head, kvs) in heads.iter().enumerate() {
                    for (slot, kv) in kvs.iter().enumerate() {
                        let e = error(&c, layer, head, slot, kv);
                        if slot < quantized {
                            assert!(e <= HALF_STEP_8, "slot {slot}: off by {e}");
                        } else {
                            assert_eq!(e, 0.0, "slot {slot} is in full precision");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn kivi_bytes_in_use_count_codes_ranges_and_the_residual() {
        let (layers, heads, d, tokens) = (2, 3, 64, 320);
        let mut next = sampler(5);
        let mut plain = KvCache::new(KvDtype::F16, layers, heads, d, 512);
        fill(&mut plain, tokens, &mut next);
        assert_eq!(plain.bytes_in_use(), layers * heads * tokens * 256);
        for (bits, per_token) in [(8, 144), (4, 80), (2, 48)] {
            let mut c = KvCache::new(KvDtype::F16, layers, heads, d, 512);
            c.use_kivi(kivi(bits, 32, 32));
            fill(&mut c, tokens, &mut next);
            assert_eq!(
                c.bytes_in_use(),
                plain.bytes_in_use(),
                "nothing settled yet"
            );
            c.settle();
            // 288 tokens quantized at 16·bits + 16 bytes per head, 32 kept at 256.
            let expected = layers * heads * (288 * per_token + 32 * 256);
            assert_eq!(c.bytes_in_use(), expected, "{bits} bits");
            assert!(c.bytes_in_use() * 256 / per_token < plain.bytes_in_use() * 2);
        }
    }

    #[test]
    fn eviction_compacts_a_kivi_cache_and_requantizes_only_broken_key_groups() {
        let mut next = sampler(11);
        let mut c = KvCache::new(KvDtype::F16, 1, 2, 8, 32);
        c.use_kivi(kivi(8, 4, 4));
        let tokens = fill(&mut c, 24, &mut next);
        c.settle();
        assert_eq!(c.quantized(0, 0), 20);
        let before = |head: usize, slot: usize| {
            let (mut k, mut v) = (vec![0f32; 8], vec![0f32; 8]);
            c.read_key(0, head, slot, &mut k);
            c.read_value(0, head, slot, &mut v);
            (k, v)
        };
        // Head 0 keeps group 0 in place, moves group 2 whole, and two quantized tokens besides
        // (13, 17) that no longer fill a group; head 1 breaks every group it keeps.
        let keep = vec![
            vec![0, 1, 2, 3, 8, 9, 10, 11, 13, 17, 21, 22, 23],
            vec![1, 2, 3, 4, 5, 6, 7, 8, 19, 20, 21, 22, 23],
        ];
        let dequantized: Vec<Vec<_>> = keep
            .iter()
            .enumerate()
            .map(|(h, slots)| slots.iter().map(|&s| before(h, s)).collect())
            .collect();
        c.retain_layer(0, &keep);
        assert_eq!(c.layer_len(0), 13);
        assert_eq!((c.quantized(0, 0), c.quantized(0, 1)), (8, 8));
        assert_eq!(
            c.positions(0, 0),
            [0, 1, 2, 3, 8, 9, 10, 11, 13, 17, 21, 22, 23]
        );
        for (head, slots) in keep.iter().enumerate() {
            for (to, &from) in slots.iter().enumerate() {
                let kv = &tokens[0][head][from];
                // A requantized key is off by two roundings at most.
                let e = error(&c, 0, head, to, kv);
                assert!(
                    e <= 2.0 * HALF_STEP_8,
                    "head {head}, slot {from} → {to}: off by {e}"
                );
                if (head == 0 && to < 8) || from >= 20 {
                    let mut k = vec![0f32; 8];
                    c.read_key(0, head, to, &mut k);
                    assert_eq!(k, dequantized[head][to].0, "whole groups move as they are");
                }
                let mut v = vec![0f32; 8];
                c.read_value(0, head, to, &mut v);
                let close = v.iter().zip(&dequantized[head][to].1);
                assert!(close
                    .clone()
                    .all(|(a, b)| (a - b).abs() <= b.abs() / 1024.0));
                if to < 8 {
                    assert_eq!(v, dequantized[head][to].1, "values move code for code");
                }
            }
        }
        // The leftovers and the kept full-precision tokens settle again behind the residual.
        c.settle();
        assert_eq!(c.quantized(0, 0), 8);
        fill(&mut c, 3, &mut next);
        c.settle();
        assert_eq!(c.quantized(0, 1), 12);
        for (head, slots) in keep.iter().enumerate() {
            for (to, &from) in slots.iter().enumerate() {
                let e = error(&c, 0, head, to, &tokens[0][head][from]);
                assert!(e <= 3.0 * HALF_STEP_8, "head {head}, slot {to}: off by {e}");
            }
        }
    }

    #[test]
    fn repositioning_a_kivi_cache_rotates_its_quantized_keys() {
        let freqs = [1.0, 0.25, 0.01, 0.001];
        let raw: Vec<Vec<f32>> = (0..12)
            .map(|t| {
                (0..8)
                    .map(|i| ((i * 3 + t) as f32 * 0.7).cos() * 3.0)
                    .collect()
            })
            .collect();
        let mut c = KvCache::new(KvDtype::F32, 1, 1, 8, 16);
        c.use_kivi(kivi(8, 4, 4));
        let positions: Vec<i32> = (0..12).map(|t| 100 + 7 * t).collect();
        c.push_slots(&positions).unwrap();
        for (slot, &p) in positions.iter().enumerate() {
            c.write(0, 0, slot, &rotated(&raw[slot], &freqs, p), &raw[slot]);
        }
        c.settle();
        assert_eq!(c.quantized(0, 0), 8);
        let new: Vec<i32> = (0..12).collect();
        c.reposition(&|p| p.copy_from_slice(&new), &freqs, RopeStyle::Normal);
        assert_eq!(c.positions(0, 0), new.as_slice());
        let mut k = vec![0f32; 8];
        for (slot, raw) in raw.iter().enumerate() {
            c.read_key(0, 0, slot, &mut k);
            let want = rotated(raw, &freqs, slot as i32);
            // Rotated keys lie in [-3√2, 3√2]: two 8-bit roundings of at most 4.25/255 each, the
            // first turned with the key (×√2 at most); none in full precision.
            let bound = if slot < 8 { 11.0 / 255.0 } else { 1e-5 };
            for (a, b) in k.iter().zip(&want) {
                assert!((a - b).abs() <= bound, "slot {slot}: {a} vs {b}");
            }
            c.read_value(0, 0, slot, &mut k);
            for (a, b) in k.iter().zip(raw) {
                assert!((a - b).abs() <= 3.0 / 255.0 + 1e-4, "value of slot {slot}");
            }
        }
    }

    #[test]
    fn kv_specs_compose_one_eviction_policy_with_kivi_last() {
        let shape = Shape::tiny();
        let build = |spec: &str| -> Result<(String, Option<Kivi>)> {
            let spec: Spec = spec.parse()?;
            Ok((
                build_policy(&spec, &shape)?.spec(),
                build_kivi(&spec, &shape)?,
            ))
        };
        let (policy, k) = build("kivi:bits=4,group=4").unwrap();
        assert_eq!((policy.as_str(), k), ("full", Some(kivi(4, 4, 32))));
        let (policy, k) = build("snapkv:budget=8+kivi:group=2,residual=0").unwrap();
        assert!(policy.starts_with("snapkv:budget=8"), "{policy}");
        assert_eq!(k, Some(kivi(2, 2, 0)));
        assert_eq!(build("snapkv:budget=8").unwrap().1, None);
        for (bad, says) in [
            ("snapkv:budget=8+streaming", "only one eviction policy"),
            ("kivi:group=4+snapkv:budget=8", "comes last"),
            ("kivi:group=4+kivi:group=4", "more than once"),
            ("streaming+kivi:group=4+kivi:group=2", "more than once"),
            ("snapkv:budget=8+kivi:bits=3,group=4", "2, 4 or 8"),
            ("nosuch+kivi:group=4", "nosuch"),
        ] {
            let err = build(bad).unwrap_err().to_string();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }
}
