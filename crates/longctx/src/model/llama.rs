//! The llama-family forward pass (Llama 2/3, Mistral, SmolLM; Qwen2 adds q/k/v biases; Gemma 3
//! adds norms and a sliding window, below).
//!
//! Read top to bottom, it is the architecture diagram: embed, then per layer
//! `x += Wo·attn(rope(Wq·norm(x)), cache)` and `x += Wdown·(silu(Wgate·norm(x)) ⊙ Wup·norm(x))`,
//! then a final norm and the output projection. Gemma 3 (Gemma Team, "Gemma 3 Technical
//! Report", arXiv:2503.19786) scales the embeddings by √E, norms each head of q and k before
//! rotating them, norms the attention and feed-forward outputs before adding them to x, gates
//! with GELU instead of SiLU (GeGLU), and has local layers that attend only a sliding window
//! of recent positions, rotated with a RoPE base of their own. [`forward`] runs a chunk of one sequence's
//! tokens through it; [`forward_batch`] runs one token of each of several sequences, whose
//! matmuls share one pass over the weights while each attends over its own cache. Shapes: T
//! tokens in the call, E embedding, H/Hkv query/KV heads, D head size, F feed-forward size, V
//! vocabulary.

use crate::gguf::Gguf;
use crate::kv::{AttentionObserver, KvCache, KvData, Observers};
use crate::model::attention::{
    attend, attend_block, block_stride, FarQuery, FarRow, QueryRow, Reduction, BLOCK_TOKENS,
    MAX_HEAD_DIM,
};
use crate::model::config::{Architecture, Config};
use crate::model::geglu::geglu;
use crate::model::swiglu::swiglu;
use crate::positions::{FarPositions, PositionScheme, RotaryTable};
use crate::quant::{matmul, ActCache, MatmulJob, Weight};
use crate::threads::{split_range, ThreadPool};
use crate::{Error, Result};

/// One transformer block's weights, named after their GGUF tensors.
pub struct LayerWeights {
    pub attn_norm: Vec<f32>, // [E]
    pub attn_q: Weight,      // [H·D, E]
    pub attn_k: Weight,      // [Hkv·D, E]
    pub attn_v: Weight,      // [Hkv·D, E]
    pub attn_q_bias: Option<Vec<f32>>,
    pub attn_k_bias: Option<Vec<f32>>,
    pub attn_v_bias: Option<Vec<f32>>,
    pub attn_output: Weight, // [E, H·D]
    pub ffn_norm: Vec<f32>,  // [E]
    pub ffn_gate: Weight,    // [F, E]
    pub ffn_up: Weight,      // [F, E]
    pub ffn_down: Weight,    // [E, F]
    /// Gemma 3: per-head RMSNorm weights of q and k, `[D]`.
    pub attn_q_norm: Option<Vec<f32>>,
    pub attn_k_norm: Option<Vec<f32>>,
    /// Gemma 3: RMSNorm weights of the attention and feed-forward outputs, `[E]`.
    pub post_attention_norm: Option<Vec<f32>>,
    pub post_ffw_norm: Option<Vec<f32>>,
}

/// All weights of a model, mapped in place from the GGUF file.
pub struct Weights {
    pub token_embd: Weight, // [V, E]
    pub layers: Vec<LayerWeights>,
    pub output_norm: Vec<f32>, // [E]
    /// `output.weight`, or `token_embd` when the embeddings are tied.
    pub output: Weight, // [V, E]
    /// `rope_freqs.weight`: per-pair frequency divisors (Llama 3.1+).
    pub rope_freqs: Option<Vec<f32>>,
}

fn vector(g: &Gguf, name: &str, len: usize) -> Result<Vec<f32>> {
    let w = g.weight(name)?;
    if w.rows != 1 || w.cols != len {
        return Err(Error::BadShape {
            name: name.into(),
            expected: vec![len],
            actual: vec![w.rows, w.cols],
        });
    }
    let mut out = vec![0f32; len];
    w.dequantize_row(0, &mut out);
    Ok(out)
}

fn matrix(g: &Gguf, name: &str, rows: usize, cols: usize) -> Result<Weight> {
    let w = g.weight(name)?;
    if w.rows != rows || w.cols != cols {
        return Err(Error::BadShape {
            name: name.into(),
            expected: vec![rows, cols],
            actual: vec![w.rows, w.cols],
        });
    }
    Ok(w)
}

impl Weights {
    pub fn load(g: &Gguf, c: &Config) -> Result<Self> {
        let (e, qd, kvd) = (c.n_embd, c.n_head * c.head_dim, c.n_kv_head * c.head_dim);
        let biased = c.arch == Architecture::Qwen2;
        let gemma = c.arch == Architecture::Gemma3;
        let norm = |name: String, len| -> Result<Option<Vec<f32>>> {
            gemma.then(|| vector(g, &name, len)).transpose()
        };
        let bias = |name: String, len| -> Result<Option<Vec<f32>>> {
            if biased || g.has_tensor(&name) {
                vector(g, &name, len).map(Some)
            } else {
                Ok(None)
            }
        };
        let layers = (0..c.n_layer)
            .map(|i| {
                let p = |s: &str| format!("blk.{i}.{s}");
                Ok(LayerWeights {
                    attn_norm: vector(g, &p("attn_norm.weight"), e)?,
                    attn_q: matrix(g, &p("attn_q.weight"), qd, e)?,
                    attn_k: matrix(g, &p("attn_k.weight"), kvd, e)?,
                    attn_v: matrix(g, &p("attn_v.weight"), kvd, e)?,
                    attn_q_bias: bias(p("attn_q.bias"), qd)?,
                    attn_k_bias: bias(p("attn_k.bias"), kvd)?,
                    attn_v_bias: bias(p("attn_v.bias"), kvd)?,
                    attn_output: matrix(g, &p("attn_output.weight"), e, qd)?,
                    ffn_norm: vector(g, &p("ffn_norm.weight"), e)?,
                    ffn_gate: matrix(g, &p("ffn_gate.weight"), c.n_ff, e)?,
                    ffn_up: matrix(g, &p("ffn_up.weight"), c.n_ff, e)?,
                    ffn_down: matrix(g, &p("ffn_down.weight"), e, c.n_ff)?,
                    attn_q_norm: norm(p("attn_q_norm.weight"), c.head_dim)?,
                    attn_k_norm: norm(p("attn_k_norm.weight"), c.head_dim)?,
                    post_attention_norm: norm(p("post_attention_norm.weight"), e)?,
                    post_ffw_norm: norm(p("post_ffw_norm.weight"), e)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let token_embd = matrix(g, "token_embd.weight", c.vocab, e)?;
        let output = if g.has_tensor("output.weight") {
            matrix(g, "output.weight", c.vocab, e)?
        } else {
            token_embd.clone()
        };
        let rope_freqs = if g.has_tensor("rope_freqs.weight") {
            Some(vector(g, "rope_freqs.weight", c.rope_dims / 2)?)
        } else {
            None
        };
        Ok(Self {
            token_embd,
            layers,
            output_norm: vector(g, "output_norm.weight", e)?,
            output,
            rope_freqs,
        })
    }
}

/// The activations of a forward call's tokens, allocated once for the most tokens a call takes
/// (a session's chunk, or a batch's sequences).
pub struct Buffers {
    x: Vec<f32>,    // [T, E] residual stream
    xn: Vec<f32>,   // [T, E] normalised
    q: Vec<f32>,    // [T, H·D]
    k: Vec<f32>,    // [T, Hkv·D]
    v: Vec<f32>,    // [T, Hkv·D]
    att: Vec<f32>,  // [T, H·D]
    tmp: Vec<f32>,  // [T, E]
    gate: Vec<f32>, // [T, F]
    up: Vec<f32>,   // [T, F]
    acts: ActCache,
}

/// What one sequence's attention needs besides the activations, allocated once per session for
/// its largest chunk.
pub struct Scratch {
    /// Attention scores per thread: one row as long as the cache per query of a block
    /// ([`BLOCK_TOKENS`] tokens times the heads sharing a KV head).
    scores: Vec<std::sync::Mutex<Vec<f32>>>,
    pub rotary: RotaryTable,
    /// The local layers' rotations (their own base, no scheme), for sliding-window models.
    pub local_rotary: RotaryTable,
    /// Set when the position scheme has a far attention (Self-Extend, STRING).
    pub far: Option<FarScratch>,
}

/// What the far attention of a chunk needs besides the plain one.
pub struct FarScratch {
    map: FarPositions,
    /// Each token's queries rotated at its far position, `[T, H·D]`.
    q: Vec<f32>,
    /// Rotations at the chunk's far query positions.
    query_rotary: RotaryTable,
    /// Rotations at the chunk's grouped key positions, when far keys move.
    key_rotary: RotaryTable,
    /// Far positions of the chunk's tokens, reused for each table.
    positions: Vec<i32>,
}

impl FarScratch {
    pub fn new(map: FarPositions, c: &Config, max_tokens: usize) -> Self {
        Self {
            map,
            q: vec![0.0; max_tokens * c.n_head * c.head_dim],
            query_rotary: RotaryTable::default(),
            key_rotary: RotaryTable::default(),
            positions: Vec::with_capacity(max_tokens),
        }
    }

    /// Fills the far rotations for a chunk at `positions`, whose plain table is `near`. The far
    /// query keeps the plain one's scale (log-n): Self-Extend scales the query before either
    /// rotation.
    pub fn fill(
        &mut self,
        scheme: &dyn PositionScheme,
        positions: &[i32],
        seq_len: usize,
        freqs: &mut Vec<f64>,
        near: &RotaryTable,
    ) {
        self.positions.clear();
        self.positions
            .extend(positions.iter().map(|&p| self.map.query(p)));
        scheme.fill_table(&self.positions, seq_len, freqs, &mut self.query_rotary);
        self.query_rotary.query_scale.clone_from(&near.query_scale);
        if self.map.moves_keys() {
            self.positions.clear();
            self.positions
                .extend(positions.iter().map(|&p| self.map.key(p)));
            scheme.fill_table(&self.positions, seq_len, freqs, &mut self.key_rotary);
        }
    }

    /// Rotates token `i`'s queries (`[H·D]`, not yet rotated) at its far position.
    fn rotate_queries(&mut self, q: &[f32], i: usize, c: &Config) {
        let far_q = &mut self.q[i * q.len()..(i + 1) * q.len()];
        far_q.copy_from_slice(q);
        for head in far_q.chunks_exact_mut(c.head_dim) {
            self.query_rotary.rotate_query(head, i, c.rope_style);
        }
        // Gemma scales the rotated query (see `self_attention`); unscaled, the far scores of its
        // global layers came out 16 times too large and Self-Extend and STRING broke the model.
        if let Some(scale) = c.query_scale {
            far_q.iter_mut().for_each(|x| *x *= scale);
        }
    }

    /// Caches token `i`'s keys (`[Hkv·D]`, not yet rotated) rotated at its grouped position.
    fn cache_grouped_keys(
        &self,
        k: &[f32],
        i: usize,
        cache: &mut KvCache,
        layer: usize,
        slot: usize,
        c: &Config,
    ) {
        let mut key = [0f32; MAX_HEAD_DIM];
        let key = &mut key[..c.head_dim];
        for (h, raw) in k.chunks_exact(c.head_dim).enumerate() {
            key.copy_from_slice(raw);
            self.key_rotary.rotate(key, i, c.rope_style);
            cache.write_grouped_key(layer, h, slot, key);
        }
    }
}

impl Buffers {
    pub fn new(c: &Config, max_tokens: usize) -> Self {
        let t = max_tokens;
        Self {
            x: vec![0.0; t * c.n_embd],
            xn: vec![0.0; t * c.n_embd],
            q: vec![0.0; t * c.n_head * c.head_dim],
            k: vec![0.0; t * c.n_kv_head * c.head_dim],
            v: vec![0.0; t * c.n_kv_head * c.head_dim],
            att: vec![0.0; t * c.n_head * c.head_dim],
            tmp: vec![0.0; t * c.n_embd],
            gate: vec![0.0; t * c.n_ff],
            up: vec![0.0; t * c.n_ff],
            acts: ActCache::default(),
        }
    }

    /// Whether the buffers hold `tokens` tokens of a model of this shape.
    pub fn fits(&self, c: &Config, tokens: usize) -> bool {
        self.x.len() >= tokens * c.n_embd
            && self.q.len() >= tokens * c.n_head * c.head_dim
            && self.k.len() >= tokens * c.n_kv_head * c.head_dim
            && self.gate.len() >= tokens * c.n_ff
    }

    /// x ← the tokens' embeddings.
    fn embed(&mut self, w: &Weights, c: &Config, tokens: &[u32]) {
        let e = w.token_embd.cols;
        for (&tok, x) in tokens.iter().zip(self.x.chunks_exact_mut(e)) {
            w.token_embd.dequantize_row(tok as usize, x);
            if let Some(scale) = c.embed_scale {
                x.iter_mut().for_each(|v| *v *= scale);
            }
        }
    }

    /// q, k, v ← Wq·norm(x), Wk·norm(x), Wv·norm(x) (plus biases) for the first `t` tokens.
    fn project_qkv(&mut self, c: &Config, lw: &LayerWeights, pool: &ThreadPool, t: usize) {
        let (e, qd, kvd) = (c.n_embd, c.n_head * c.head_dim, c.n_kv_head * c.head_dim);
        rms_norm(
            &self.x[..t * e],
            &lw.attn_norm,
            c.rms_eps,
            &mut self.xn[..t * e],
        );
        let (q, k, v) = (
            &mut self.q[..t * qd],
            &mut self.k[..t * kvd],
            &mut self.v[..t * kvd],
        );
        matmul(
            pool,
            &mut self.acts,
            &self.xn[..t * e],
            t,
            &mut [job(&lw.attn_q, q), job(&lw.attn_k, k), job(&lw.attn_v, v)],
        );
        add_bias(&mut self.q[..t * qd], lw.attn_q_bias.as_deref());
        add_bias(&mut self.k[..t * kvd], lw.attn_k_bias.as_deref());
        add_bias(&mut self.v[..t * kvd], lw.attn_v_bias.as_deref());
        if let Some(w) = &lw.attn_q_norm {
            rms_norm_in_place(&mut self.q[..t * qd], w, c.rms_eps);
        }
        if let Some(w) = &lw.attn_k_norm {
            rms_norm_in_place(&mut self.k[..t * kvd], w, c.rms_eps);
        }
    }

    /// x += Wo·att (normed first where the model has a post-attention norm) for the first `t`
    /// tokens.
    fn project_back(&mut self, c: &Config, lw: &LayerWeights, pool: &ThreadPool, t: usize) {
        let (e, qd) = (c.n_embd, c.n_head * c.head_dim);
        matmul(
            pool,
            &mut self.acts,
            &self.att[..t * qd],
            t,
            &mut [job(&lw.attn_output, &mut self.tmp[..t * e])],
        );
        if let Some(w) = &lw.post_attention_norm {
            rms_norm_in_place(&mut self.tmp[..t * e], w, c.rms_eps);
        }
        add_into(&mut self.x[..t * e], &self.tmp[..t * e]);
    }

    /// x += Wdown·(silu(Wgate·norm(x)) ⊙ Wup·norm(x)) for the first `t` tokens (SwiGLU; GeGLU
    /// with GELU for Gemma, whose output is normed before it is added).
    fn feed_forward(&mut self, c: &Config, lw: &LayerWeights, pool: &ThreadPool, t: usize) {
        let (e, ff) = (c.n_embd, c.n_ff);
        rms_norm(
            &self.x[..t * e],
            &lw.ffn_norm,
            c.rms_eps,
            &mut self.xn[..t * e],
        );
        let (gate, up) = (&mut self.gate[..t * ff], &mut self.up[..t * ff]);
        matmul(
            pool,
            &mut self.acts,
            &self.xn[..t * e],
            t,
            &mut [job(&lw.ffn_gate, gate), job(&lw.ffn_up, up)],
        );
        let activation = match c.arch {
            Architecture::Gemma3 => geglu,
            Architecture::Llama | Architecture::Qwen2 => swiglu,
        };
        gate_mul(
            pool,
            activation,
            &mut self.gate[..t * ff],
            &self.up[..t * ff],
        );
        matmul(
            pool,
            &mut self.acts,
            &self.gate[..t * ff],
            t,
            &mut [job(&lw.ffn_down, &mut self.tmp[..t * e])],
        );
        if let Some(w) = &lw.post_ffw_norm {
            rms_norm_in_place(&mut self.tmp[..t * e], w, c.rms_eps);
        }
        add_into(&mut self.x[..t * e], &self.tmp[..t * e]);
    }

    /// logits ← Wout·norm(x) for the first `t` tokens, `[t, V]`.
    fn head(&mut self, w: &Weights, c: &Config, pool: &ThreadPool, t: usize, logits: &mut [f32]) {
        let e = c.n_embd;
        rms_norm(
            &self.x[..t * e],
            &w.output_norm,
            c.rms_eps,
            &mut self.xn[..t * e],
        );
        matmul(
            pool,
            &mut self.acts,
            &self.xn[..t * e],
            t,
            &mut [job(&w.output, logits)],
        );
        if let Some(cap) = c.final_softcap {
            for l in &mut logits[..t * c.vocab] {
                *l = (*l / cap).tanh() * cap;
            }
        }
    }

    /// Moves the tokens `rows` of the attention output and of the residual stream to the front
    /// of their buffers; returns how many remain.
    fn keep_rows(&mut self, c: &Config, rows: &std::ops::Range<usize>) -> usize {
        let (e, qd) = (c.n_embd, c.n_head * c.head_dim);
        for (to, from) in rows.clone().enumerate() {
            self.att.copy_within(from * qd..(from + 1) * qd, to * qd);
            self.x.copy_within(from * e..(from + 1) * e, to * e);
        }
        rows.len()
    }
}

impl Scratch {
    pub fn new(c: &Config, max_tokens: usize, ctx: usize, threads: usize) -> Self {
        Self {
            scores: (0..threads)
                .map(|_| std::sync::Mutex::new(vec![0.0; ctx * block_rows(c, max_tokens)]))
                .collect(),
            rotary: RotaryTable::default(),
            local_rotary: RotaryTable::default(),
            far: None,
        }
    }

    /// Threads of the pools this scratch can attend with: its score rows are indexed by thread.
    pub fn threads(&self) -> usize {
        self.scores.len()
    }
}

/// One sequence as the forward pass sees it: the cache it attends over and writes its tokens'
/// keys and values into (in slots reserved with [`KvCache::push_slots`]), the scratch holding
/// the rotary tables filled for those tokens, their positions, and who observes its attention.
pub struct Sequence<'a> {
    pub cache: &'a mut KvCache,
    pub scratch: &'a mut Scratch,
    pub positions: &'a [i32],
    pub observers: Observers<'a>,
}

/// The sequences of a batched decode step ([`forward_batch`]).
pub trait Sequences {
    /// Sequence `i`, which feeds one token.
    fn sequence(&mut self, i: usize) -> Sequence<'_>;
}

/// One chunk of one sequence's tokens on its way through the model.
pub struct Chunk<'a> {
    pub tokens: &'a [u32],
    /// Rows of the chunk whose logits are wanted.
    pub logit_rows: std::ops::Range<usize>,
}

fn job<'a>(weight: &'a Weight, out: &'a mut [f32]) -> MatmulJob<'a> {
    MatmulJob { weight, out }
}

/// Runs a chunk of `seq`'s tokens through the model and writes the logits of
/// `chunk.logit_rows` into `logits` (`[rows, V]`).
pub fn forward(
    w: &Weights,
    c: &Config,
    pool: &ThreadPool,
    b: &mut Buffers,
    mut seq: Sequence,
    chunk: &Chunk,
    logits: &mut [f32],
) {
    let t = chunk.tokens.len();
    debug_assert_eq!(seq.positions.len(), t);
    b.embed(w, c, chunk.tokens);
    for (l, lw) in w.layers.iter().enumerate() {
        // attention: project, rotate, cache, attend, project back
        b.project_qkv(c, lw, pool, t);
        self_attention(c, pool, &mut seq, l, b, 0..t);
        // Only the rows whose logits are wanted need the last layer's output: like llama.cpp
        // (`inp_out_ids`), finish that layer on those rows alone, which also gives its matmuls
        // llama.cpp's row count and hence its kernels.
        let t = if l + 1 == w.layers.len() {
            b.keep_rows(c, &chunk.logit_rows)
        } else {
            t
        };
        if t == 0 {
            return;
        }
        b.project_back(c, lw, pool, t);
        // feed-forward: SwiGLU (GeGLU)
        b.feed_forward(c, lw, pool, t);
    }
    // output head, over the rows kept in the last layer
    b.head(w, c, pool, chunk.logit_rows.len(), logits);
}

/// [`forward`] for one token of each of several sequences (`tokens[i]` is sequence `i`'s): every
/// matmul reads its weights once for all of them, while each sequence attends over its own cache
/// with its own tables and observers. Writes the logits of every token, `[tokens, V]`.
pub fn forward_batch<S: Sequences + ?Sized>(
    w: &Weights,
    c: &Config,
    pool: &ThreadPool,
    b: &mut Buffers,
    seqs: &mut S,
    tokens: &[u32],
    logits: &mut [f32],
) {
    let n = tokens.len();
    b.embed(w, c, tokens);
    for (l, lw) in w.layers.iter().enumerate() {
        // attention: project together, then rotate, cache and attend sequence by sequence
        b.project_qkv(c, lw, pool, n);
        for i in 0..n {
            self_attention(c, pool, &mut seqs.sequence(i), l, b, i..i + 1);
        }
        b.project_back(c, lw, pool, n);
        // feed-forward: SwiGLU (GeGLU)
        b.feed_forward(c, lw, pool, n);
    }
    b.head(w, c, pool, n, logits);
}

/// Attention of `seq`'s tokens, which are rows `rows` of the buffers' projections: rotates
/// their queries and keys at their positions (its tables' row `i` for its `i`-th token), writes
/// their keys and values into the last slots of `layer` of its cache, and attends into `b.att`.
fn self_attention(
    c: &Config,
    pool: &ThreadPool,
    seq: &mut Sequence,
    layer: usize,
    b: &mut Buffers,
    rows: std::ops::Range<usize>,
) {
    let (hd, qd, kvd) = (c.head_dim, c.n_head * c.head_dim, c.n_kv_head * c.head_dim);
    let t = rows.len();
    let (q, k, v) = (
        &mut b.q[rows.start * qd..rows.end * qd],
        &mut b.k[rows.start * kvd..rows.end * kvd],
        &b.v[rows.start * kvd..rows.end * kvd],
    );
    let (cache, s) = (&mut *seq.cache, &mut *seq.scratch);
    // Layers may hold different numbers of tokens (PyramidKV, sliding windows): the chunk fills
    // the end of each.
    let first_slot = cache.layer_len(layer) - t;
    // Local layers rotate with their own table and never attend far: no distance they see
    // reaches past their window.
    let local = c.is_local(layer);
    let (rotary, mut far) = if local {
        (&s.local_rotary, None)
    } else {
        (&s.rotary, s.far.as_mut())
    };
    for i in 0..t {
        let (q, k, v) = (
            &mut q[i * qd..(i + 1) * qd],
            &mut k[i * kvd..(i + 1) * kvd],
            &v[i * kvd..(i + 1) * kvd],
        );
        if let Some(far) = &mut far {
            far.rotate_queries(q, i, c);
            if far.map.moves_keys() {
                far.cache_grouped_keys(k, i, cache, layer, first_slot + i, c);
            }
        }
        for head in q.chunks_exact_mut(hd) {
            rotary.rotate_query(head, i, c.rope_style);
        }
        for head in k.chunks_exact_mut(hd) {
            rotary.rotate(head, i, c.rope_style);
        }
        // Gemma scales the rotated query itself and the softmax by 1 ([`kq_scale`]), as
        // llama.cpp splits it.
        if let Some(scale) = c.query_scale {
            q.iter_mut().for_each(|x| *x *= scale);
        }
        for h in 0..c.n_kv_head {
            let r = h * hd..(h + 1) * hd;
            cache.write(layer, h, first_slot + i, &k[r.clone()], &v[r]);
        }
    }
    let input = AttentionInput {
        layer,
        first_slot,
        positions: seq.positions,
        q,
        far: far.map(|far| (far.map, &far.q[..t * qd])),
        window: c.window(layer),
    };
    let observers = seq.observers.of_layer(!c.is_local(layer));
    attention(
        c,
        pool,
        cache,
        input,
        &mut b.att[rows.start * qd..rows.end * qd],
        &s.scores,
        observers.get(),
    );
}

/// ggml's RMSNorm of each `weight.len()` values of `x` (a token, or one head of it): mean of
/// squares accumulated in f64, then scaled and multiplied by the weight.
fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let e = weight.len();
    for (xr, or) in x.chunks_exact(e).zip(out.chunks_exact_mut(e)) {
        let scale = rms_scale(xr, eps);
        for ((o, &v), &g) in or.iter_mut().zip(xr).zip(weight) {
            *o = v * scale * g;
        }
    }
}

/// [`rms_norm`] in place.
fn rms_norm_in_place(x: &mut [f32], weight: &[f32], eps: f32) {
    for row in x.chunks_exact_mut(weight.len()) {
        let scale = rms_scale(row, eps);
        for (v, &g) in row.iter_mut().zip(weight) {
            *v = *v * scale * g;
        }
    }
}

fn rms_scale(x: &[f32], eps: f32) -> f32 {
    let mean = x.iter().map(|&v| (v * v) as f64).sum::<f64>() / x.len() as f64;
    1.0 / (mean as f32 + eps).sqrt()
}

fn add_bias(x: &mut [f32], bias: Option<&[f32]>) {
    if let Some(b) = bias {
        for row in x.chunks_exact_mut(b.len()) {
            add_into(row, b);
        }
    }
}

fn add_into(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

struct SyncPtr(*mut f32);
// SAFETY: every thread writes a disjoint range (see the callers).
unsafe impl Sync for SyncPtr {}

impl SyncPtr {
    /// Taking the pointer through a method makes closures capture the `Sync` wrapper, not the
    /// raw pointer field.
    fn get(&self) -> *mut f32 {
        self.0
    }
}

/// gate ← act(gate) ⊙ up, split across threads (a prefill chunk has millions of exps).
fn gate_mul(pool: &ThreadPool, activation: fn(&mut [f32], &[f32]), gate: &mut [f32], up: &[f32]) {
    let len = gate.len();
    let g = SyncPtr(gate.as_mut_ptr());
    pool.for_ranges(len, &|r| {
        // SAFETY: ranges from `for_ranges` are disjoint and inside `gate`.
        let gate = unsafe { std::slice::from_raw_parts_mut(g.get().add(r.start), r.len()) };
        activation(gate, &up[r]);
    });
}

/// What one layer's attention reads: the chunk's rotated queries and where its tokens sit.
struct AttentionInput<'a> {
    layer: usize,
    /// Cache slot of the chunk's first token; token i sees slots `..=first_slot + i`.
    first_slot: usize,
    /// Position of each token of the chunk.
    positions: &'a [i32],
    q: &'a [f32], // [T, H·D]
    /// The far map and the far queries `[T, H·D]`, for Self-Extend and STRING.
    far: Option<(FarPositions, &'a [f32])>,
    /// The layer's sliding window, if it is a local one.
    window: Option<usize>,
}

impl AttentionInput<'_> {
    /// The first of `visible` slots of `kv_head` that token `i` sees: past the keys its layer's
    /// window has left behind (`p_q − p_k ≥ window`), as llama.cpp's mask hides them.
    fn first_visible(&self, cache: &KvCache, kv_head: usize, i: usize, visible: usize) -> usize {
        self.window.map_or(0, |window| {
            let query = self.positions[i] as i64;
            cache.positions(self.layer, kv_head)[..visible]
                .partition_point(|&k| query - k as i64 >= window as i64)
        })
    }
}

/// Every (query head, token) of the chunk attends over the slots up to its own.
fn attention(
    c: &Config,
    pool: &ThreadPool,
    cache: &KvCache,
    input: AttentionInput,
    out: &mut [f32], // [T, H·D]
    scores: &[std::sync::Mutex<Vec<f32>>],
    observer: Option<&dyn AttentionObserver>,
) {
    // A KIVI cache is dequantized tile by tile; in blocks, once for all the query heads that
    // share a KV head rather than once per query head. A sliding window starts past slot 0,
    // which only blocks take.
    if input.positions.len() >= 2 || cache.kivi().is_some() || input.window.is_some() {
        return attention_blocks(c, pool, cache, input, out, scores, observer);
    }
    let (hd, group) = (c.head_dim, c.n_head / c.n_kv_head);
    let scale = kq_scale(c);
    let out_ptr = SyncPtr(out.as_mut_ptr());
    let pairs = c.n_head * input.positions.len();
    let reduction = Reduction::for_chunk(input.positions.len());
    let far_keys = far_keys(cache, &input);
    pool.run(&|index, n| {
        let mut scratch = lock(&scores[index]);
        for pair in split_range(pairs, index, n) {
            let (i, h) = (pair / c.n_head, pair % c.n_head);
            let at = (i * c.n_head + h) * hd;
            let visible = input.first_slot + i + 1;
            // SAFETY: each (token, head) pair owns its `hd` outputs and is handled by one thread.
            let o = unsafe { std::slice::from_raw_parts_mut(out_ptr.get().add(at), hd) };
            let q = &input.q[at..at + hd];
            let kv_head = h / group;
            let far = input
                .far
                .zip(far_keys)
                .map(|((map, far_q), keys)| FarQuery {
                    slots: map.far_slots(
                        &cache.positions(input.layer, kv_head)[..visible],
                        input.positions[i],
                    ),
                    q: &far_q[at..at + hd],
                    keys,
                });
            attend(
                cache,
                input.layer,
                kv_head,
                visible,
                q,
                scale,
                &mut scratch,
                o,
                reduction,
                far,
            );
            if let Some(obs) = observer {
                let position = input.positions[i];
                if obs.wants(input.layer, position) {
                    // `attend` leaves the softmax weights in the score scratch.
                    obs.observe(input.layer, h, h / group, position, &scratch[..visible]);
                }
            }
        }
    });
}

/// What the softmax multiplies q·k by: 1/√D, or 1 where the model scales its queries itself.
fn kq_scale(c: &Config) -> f32 {
    match c.query_scale {
        Some(_) => 1.0,
        None => 1.0 / (c.head_dim as f32).sqrt(),
    }
}

/// A thread's score scratch; a panic elsewhere leaves nothing in it worth refusing.
fn lock(scratch: &std::sync::Mutex<Vec<f32>>) -> std::sync::MutexGuard<'_, Vec<f32>> {
    scratch
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The keys a far query is scored against: the grouped keys where the far map moves keys
/// (Self-Extend), the plain ones where it moves only the query (STRING).
fn far_keys<'a>(cache: &'a KvCache, input: &AttentionInput) -> Option<&'a KvData> {
    input.far.map(|(map, _)| {
        if map.moves_keys() {
            cache
                .grouped_keys()
                .expect("the session keeps grouped keys")
        } else {
            &cache.k
        }
    })
}

/// Queries of a chunk that take [`attend_block`] together: up to [`BLOCK_TOKENS`] tokens times
/// the query heads that share a KV head (single-token chunks attend one query at a time).
fn block_rows(c: &Config, max_tokens: usize) -> usize {
    let tokens = if max_tokens >= 2 { BLOCK_TOKENS } else { 1 };
    tokens * (c.n_head / c.n_kv_head)
}

/// [`attention`] for chunks of two or more tokens (and every chunk over a KIVI cache): each unit
/// of work is one KV head and a block of consecutive tokens, whose queries read its cache
/// together.
fn attention_blocks(
    c: &Config,
    pool: &ThreadPool,
    cache: &KvCache,
    input: AttentionInput,
    out: &mut [f32], // [T, H·D]
    scores: &[std::sync::Mutex<Vec<f32>>],
    observer: Option<&dyn AttentionObserver>,
) {
    let (hd, group) = (c.head_dim, c.n_head / c.n_kv_head);
    let scale = kq_scale(c);
    let out_ptr = SyncPtr(out.as_mut_ptr());
    let t = input.positions.len();
    let blocks = t.div_ceil(BLOCK_TOKENS) * c.n_kv_head;
    // Fewer blocks than threads (a decoded token on a model with one KV head, as Gemma 3 270M)
    // would leave threads idle: the heads sharing a KV head are then split between them, each
    // part reading the cache for itself.
    let parts = if blocks < pool.threads() {
        pool.threads().min(group)
    } else {
        1
    };
    let units = blocks * parts;
    let reduction = Reduction::for_chunk(t);
    let far_keys = far_keys(cache, &input);
    pool.run(&|index, n| {
        let mut scratch = lock(&scores[index]);
        let mut rows = Vec::with_capacity(BLOCK_TOKENS * group);
        // Dealt round-robin: a causal block costs more the later its tokens, so halves of the
        // chunk would leave the first thread waiting for the last.
        for unit in (index..units).step_by(n) {
            let (block, kv_head) = (unit / parts / c.n_kv_head, unit / parts % c.n_kv_head);
            let tokens = block * BLOCK_TOKENS..((block + 1) * BLOCK_TOKENS).min(t);
            let part = split_range(group, unit % parts, parts);
            let heads = kv_head * group + part.start..kv_head * group + part.end;
            rows.clear();
            for i in tokens.clone() {
                let visible = input.first_slot + i + 1;
                let from = input.first_visible(cache, kv_head, i, visible);
                for h in heads.clone() {
                    let at = (i * c.n_head + h) * hd;
                    let far = input.far.map(|(map, far_q)| FarRow {
                        q: &far_q[at..at + hd],
                        slots: map.far_slots(
                            &cache.positions(input.layer, kv_head)[..visible],
                            input.positions[i],
                        ),
                    });
                    rows.push(QueryRow {
                        q: &input.q[at..at + hd],
                        from,
                        visible,
                        far,
                        // SAFETY: each (token, head) pair owns its `hd` outputs and belongs to
                        // one unit, handled by one thread.
                        out: unsafe { std::slice::from_raw_parts_mut(out_ptr.get().add(at), hd) },
                    });
                }
            }
            attend_block(
                cache,
                input.layer,
                kv_head,
                &mut rows,
                scale,
                &mut scratch,
                reduction,
                far_keys,
            );
            if let Some(obs) = observer {
                let stride = block_stride(&rows);
                for (r, row) in rows.iter().enumerate() {
                    let (i, h) = (
                        tokens.start + r / heads.len(),
                        heads.start + r % heads.len(),
                    );
                    let position = input.positions[i];
                    if obs.wants(input.layer, position) {
                        obs.observe(
                            input.layer,
                            h,
                            kv_head,
                            position,
                            &scratch[r * stride..][..row.visible],
                        );
                    }
                }
            }
        }
    });
}
