//! The session: the one place where the model, the KV cache and the position scheme meet.
//! A [`Model`] is loaded once and shared; each [`Session`] is one sequence with its own cache.

use std::path::Path;
use std::sync::Arc;

use crate::gguf::Gguf;
use crate::kv::policy::{AfterChunk, ChunkInfo, Phase};
use crate::kv::{AttentionObserver, Kivi, KvCache, KvPolicy, Observers, Shape};
use crate::model::{forward, Buffers, Chunk, Config, FarScratch, Scratch, Sequence, Weights};
use crate::positions::{GroupBlocks, ModelRope, PositionScheme};
use crate::spec::Spec;
use crate::threads::ThreadPool;
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

pub use crate::kv::KvDtype;

mod batch;
pub use batch::{decode_batch, DecodeBatch};

/// A loaded model: weights (memory-mapped, shared read-only), configuration and tokenizer.
pub struct Model {
    pub config: Config,
    pub weights: Weights,
    pub tokenizer: Tokenizer,
    /// `tokenizer.chat_template` from the GGUF, if any.
    pub chat_template: Option<String>,
    /// The opened file, for metadata beyond what the engine reads.
    pub gguf: Gguf,
}

impl Model {
    pub fn load(path: &Path) -> Result<Arc<Model>> {
        let gguf = Gguf::open(path)?;
        let config = Config::from_gguf(&gguf)?;
        let weights = Weights::load(&gguf, &config)?;
        let tokenizer = Tokenizer::from_gguf_metadata(gguf.metadata())?;
        let chat_template = gguf.get_str("tokenizer.chat_template").ok();
        Ok(Arc::new(Model {
            config,
            weights,
            tokenizer,
            chat_template,
            gguf,
        }))
    }

    /// Trained context length (`{arch}.context_length`).
    pub fn trained_ctx(&self) -> usize {
        self.config.context_length
    }

    /// The model's own RoPE, as its file describes it.
    pub fn rope(&self) -> ModelRope {
        ModelRope {
            base: self.config.rope_base,
            dims: self.config.rope_dims,
            freq_factors: self.weights.rope_freqs.clone(),
            linear_factor: self.config.rope_linear_factor,
        }
    }

    /// The RoPE of a sliding-window model's local layers: their own base, unscaled, whatever
    /// `--rope` does to the global ones (as llama.cpp and transformers apply schemes).
    pub fn local_rope(&self) -> Option<ModelRope> {
        self.config.sliding.as_ref().map(|s| ModelRope {
            base: s.rope_base,
            dims: self.config.rope_dims,
            freq_factors: None,
            linear_factor: 1.0,
        })
    }
}

/// How a session is set up.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    /// Context size in tokens; 0 means the model's trained length.
    pub n_ctx: usize,
    pub kv_dtype: KvDtype,
    /// Tokens per prefill chunk.
    pub chunk_size: usize,
    /// Worker threads for the forward pass.
    pub threads: usize,
    /// Position scheme (`--rope`); `none` is the model's own RoPE.
    pub rope: Spec,
    /// KV-cache policy (`--kv`); `full` keeps every token.
    pub kv: Spec,
}

impl Default for SessionOptions {
    fn default() -> Self {
        Self {
            n_ctx: 0,
            kv_dtype: KvDtype::F16,
            chunk_size: 512,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            rope: Spec::named("none"),
            kv: Spec::named("full"),
        }
    }
}

/// Refuses a context whose KV cache could not fit in the memory the machine has free, which
/// would otherwise end in the kernel killing the process halfway through a long run.
fn check_memory(kv_bytes: usize, n_ctx: usize) -> Result<()> {
    let Some(available) = available_memory() else {
        return Ok(());
    };
    if kv_bytes <= available {
        return Ok(());
    }
    const MIB: usize = 1 << 20;
    Err(Error::ContextTooLarge {
        n_ctx,
        need_mib: kv_bytes.div_ceil(MIB),
        available_mib: available / MIB,
    })
}

/// `MemAvailable` from /proc/meminfo; None where the system does not say.
fn available_memory() -> Option<usize> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// One sequence being processed: a KV cache and scratch buffers over a shared model.
pub struct Session {
    pub model: Arc<Model>,
    options: SessionOptions,
    pool: Arc<ThreadPool>,
    cache: KvCache,
    buffers: Buffers,
    scratch: Scratch,
    scheme: Box<dyn PositionScheme>,
    /// The local layers' RoPE, for sliding-window models.
    local_rope: Option<ModelRope>,
    /// Position the next token will take.
    next_position: i32,
    /// End of the positions already grouped, for Self-Extend's block mode (llama.cpp's `ga_i`).
    grouped_until: i32,
    /// `[V]` logits of the last token fed.
    logits: Vec<f32>,
    /// Reused per chunk so that decoding allocates nothing.
    positions: Vec<i32>,
    frequencies: Vec<f64>,
    /// Frequencies the cached keys were rotated with, for schemes whose frequencies vary with
    /// the length (empty otherwise).
    cached_frequencies: Vec<f64>,
    observer: Option<Arc<dyn AttentionObserver + Send>>,
    policy: Box<dyn KvPolicy>,
}

/// How a call feeds its tokens.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Feeding {
    /// A prompt: the policy compresses between chunks and after the last.
    Prompt,
    /// One generated token.
    Decode,
    /// Tokens the policy neither sees nor compresses (the question of kvpress's query-agnostic
    /// protocol, appended after the context was compressed).
    Uncompressed,
    /// The question fed after a chunk of context only to guide its compression (Finch).
    Guide,
}

/// A chunk between [`Session::prepare_chunk`] and [`Session::finish_chunk`].
#[derive(Clone, Copy)]
struct Step {
    feeding: Feeding,
    phase: Phase,
    /// The position after the chunk's last token.
    end: i32,
}

impl Step {
    /// Whether the policy observes the chunk's attention and compresses the cache after it.
    fn compress(self) -> bool {
        matches!(
            self.feeding,
            Feeding::Prompt | Feeding::Decode | Feeding::Guide
        )
    }

    fn guide(self) -> bool {
        self.feeding == Feeding::Guide
    }
}

/// What a session's options resolve to, checked: everything but the allocations.
struct Plan {
    n_ctx: usize,
    chunk: usize,
    rope: Spec,
    scheme: Box<dyn PositionScheme>,
    policy: Box<dyn KvPolicy>,
    kivi: Option<Kivi>,
}

impl Plan {
    fn new(model: &Arc<Model>, options: &SessionOptions) -> Result<Self> {
        if options.chunk_size == 0 {
            return Err(Error::InvalidOption(
                "the chunk size must be at least 1 token".into(),
            ));
        }
        let c = &model.config;
        let n_ctx = if options.n_ctx == 0 {
            model.trained_ctx()
        } else {
            options.n_ctx
        };
        let rope = crate::positions::resolve(&options.rope, model)?;
        let scheme = crate::positions::scheme_for(&rope, model, n_ctx)?;
        let policy = crate::kv::build_policy(&options.kv, &Shape::of(c))?;
        let kivi = crate::kv::build_kivi(&options.kv, &Shape::of(c))?;
        if policy.repositions() && (scheme.group_blocks().is_some() || scheme.varies_with_length())
        {
            return Err(Error::InvalidOption(format!(
                "--kv {} moves cached tokens to new positions, and so does --rope {}; \
                 use one of them, or a static scheme (linear, ntk, yarn, …) with this policy",
                policy.spec(),
                options.rope
            )));
        }
        let far = scheme.far();
        if let (Some(kivi), Some(_)) = (&kivi, far) {
            return Err(Error::InvalidOption(format!(
                "--kv {}: --rope {} attends with a second, far query over the cached keys, \
                 which reads them in full precision; use KIVI with a scheme without one (not \
                 self_extend or string)",
                kivi.spec(),
                options.rope
            )));
        }
        let chunk = options.chunk_size.min(n_ctx);
        let kv_bytes = match &kivi {
            Some(kivi) => kivi.bytes_for(options.kv_dtype, &Shape::of(c), n_ctx, chunk),
            None => KvCache::bytes_for(
                options.kv_dtype,
                c.n_kv_head,
                c.head_dim,
                n_ctx,
                &windows(c),
                chunk,
                far.is_some_and(|f| f.moves_keys()),
            ),
        };
        check_memory(kv_bytes, n_ctx)?;
        Ok(Self {
            n_ctx,
            chunk,
            rope,
            scheme,
            policy,
            kivi,
        })
    }
}

/// Each layer's sliding window, if it is local.
fn windows(c: &Config) -> Vec<Option<usize>> {
    (0..c.n_layer).map(|l| c.window(l)).collect()
}

/// Whether `tokens` in the cache and `generated` more fit `options.n_ctx` under `policy`.
fn fits(
    policy: &dyn KvPolicy,
    options: &SessionOptions,
    tokens: usize,
    generated: usize,
) -> Result<()> {
    let peak = policy.peak_slots(tokens, options.chunk_size, generated);
    if peak <= options.n_ctx {
        return Ok(());
    }
    if policy.spec() == "full" {
        return Err(Error::ContextOverflow {
            tokens,
            reserve: generated,
            ctx: options.n_ctx,
        });
    }
    Err(Error::PolicyOverflow {
        policy: policy.spec(),
        peak,
        ctx: options.n_ctx,
    })
}

impl Session {
    /// A session with a thread pool of its own, of `options.threads` threads.
    pub fn new(model: Arc<Model>, options: SessionOptions) -> Result<Self> {
        if options.threads == 0 {
            return Err(Error::InvalidOption(
                "the thread count must be at least 1".into(),
            ));
        }
        let pool = Arc::new(ThreadPool::new(options.threads));
        Self::with_pool(model, options, pool)
    }

    /// A session whose forward passes run on `pool`, which it can share with other sessions and
    /// with a [`DecodeBatch`] (a server's, whose sessions would otherwise spawn threads each).
    /// `options.threads` gives way to the pool's size (never 0: the caller's thread counts).
    pub fn with_pool(
        model: Arc<Model>,
        options: SessionOptions,
        pool: Arc<ThreadPool>,
    ) -> Result<Self> {
        let options = SessionOptions {
            threads: pool.threads(),
            ..options
        };
        let c = &model.config;
        let Plan {
            n_ctx,
            chunk,
            rope,
            scheme,
            policy,
            kivi,
        } = Plan::new(&model, &options)?;
        let far = scheme.far();
        let local_rope = model.local_rope();
        let grouped_keys = far.filter(|f| f.moves_keys());
        let mut cache = KvCache::with_windows(
            options.kv_dtype,
            c.n_kv_head,
            c.head_dim,
            n_ctx,
            &windows(c),
            chunk,
        );
        if let Some(local) = &local_rope {
            let mut freqs = Vec::new();
            local.frequencies(0, &mut freqs);
            cache.set_local_frequencies(freqs);
        }
        if let Some(f) = grouped_keys {
            cache.keep_grouped_keys(f.group);
        }
        if let Some(kivi) = kivi {
            cache.use_kivi(kivi);
        }
        let mut scratch = Scratch::new(c, chunk, n_ctx, options.threads);
        scratch.far = far.map(|map| FarScratch::new(map, c, chunk));
        Ok(Self {
            pool,
            buffers: Buffers::new(c, chunk),
            logits: vec![0.0; c.vocab],
            model,
            options: SessionOptions {
                n_ctx,
                chunk_size: chunk,
                rope,
                ..options
            },
            cache,
            scratch,
            scheme,
            local_rope,
            next_position: 0,
            grouped_until: 0,
            positions: Vec::with_capacity(chunk),
            frequencies: Vec::new(),
            cached_frequencies: Vec::new(),
            observer: None,
            policy,
        })
    }

    /// The KV policy's spec with every parameter resolved, KIVI's included.
    pub fn policy_spec(&self) -> String {
        match self.cache.kivi() {
            Some(kivi) => format!("{}+{}", self.policy.spec(), kivi.spec()),
            None => self.policy.spec(),
        }
    }

    /// Checks, before any work, that feeding `prompt` more tokens and generating `generated`
    /// after them fits the cache under its policy.
    pub fn check_fits(&self, prompt: usize, generated: usize) -> Result<()> {
        let tokens = self.cache.len() + prompt;
        fits(self.policy.as_ref(), &self.options, tokens, generated)
    }

    /// Checks that a session made with `options` would take a prompt of `prompt` tokens and
    /// generate `generated` after it, without making one (no cache is allocated): what a server
    /// answers before it queues a request. The errors are those of [`Session::new`] and
    /// [`Session::check_fits`].
    pub fn check_request(
        model: &Arc<Model>,
        options: &SessionOptions,
        prompt: usize,
        generated: usize,
    ) -> Result<()> {
        let plan = Plan::new(model, options)?;
        let options = SessionOptions {
            n_ctx: plan.n_ctx,
            chunk_size: plan.chunk,
            ..options.clone()
        };
        fits(plan.policy.as_ref(), &options, prompt, generated)
    }

    /// Whether the cache holds every token fed, in order, at its own position: the full
    /// policy without KIVI, under a scheme that does not regroup positions.
    pub fn holds_prefix(&self) -> bool {
        self.policy_spec() == "full" && self.scheme.group_blocks().is_none()
    }

    /// Cuts the cache back to its first `len` tokens, so that a prompt sharing them goes on
    /// from there (a server's prefix cache). Only a cache that holds every token at its own
    /// position holds a prefix of them: the full policy, without KIVI or grouped positions.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        if !self.holds_prefix() || len > self.cache.len() || !self.cache.holds_window_for(len) {
            return Err(Error::InvalidOption(format!(
                "cannot cut a cache of {} tokens under --kv {} --rope {} back to {len} tokens;                  only the full cache holds a prefix of its tokens",
                self.cache.len(),
                self.policy_spec(),
                self.options.rope
            )));
        }
        self.cache.truncate(len);
        self.next_position = len as i32;
        self.policy.reset();
        Ok(())
    }

    /// Feeds a prompt (chunked, the KV policy compressing between chunks); returns the logits
    /// of its last token.
    pub fn prefill(&mut self, tokens: &[u32]) -> Result<&[f32]> {
        self.feed(tokens, None, Feeding::Prompt)?;
        Ok(&self.logits)
    }

    /// Feeds a prompt and returns logits for every one of its tokens, row-major
    /// `[tokens, vocab]`.
    pub fn prefill_all_logits(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        let mut all = vec![0.0; tokens.len() * self.model.config.vocab];
        self.feed(tokens, Some(&mut all), Feeding::Prompt)?;
        Ok(all)
    }

    /// Feeds tokens that the KV policy neither observes nor compresses: kvpress's
    /// query-agnostic protocol compresses the context alone, then appends the question so.
    pub fn prefill_uncompressed(&mut self, tokens: &[u32]) -> Result<&[f32]> {
        self.feed(tokens, None, Feeding::Uncompressed)?;
        Ok(&self.logits)
    }

    /// Feeds a context and the question about it (query-aware): as one prompt, except for
    /// question-guided policies (Finch), which see the question after every chunk of the
    /// context and compress that chunk by the question's attention before the next comes.
    pub fn prefill_guided(&mut self, context: &[u32], question: &[u32]) -> Result<&[f32]> {
        if !self.policy.question_guided() || question.is_empty() {
            let whole = [context, question].concat();
            return self.prefill(&whole);
        }
        if context.is_empty() {
            return self.prefill(question);
        }
        self.policy
            .begin(self.cache.len() + context.len() + question.len());
        for chunk in context.chunks(self.options.chunk_size) {
            self.feed(chunk, None, Feeding::Uncompressed)?;
            self.feed(question, None, Feeding::Guide)?;
        }
        self.feed(question, None, Feeding::Prompt)?;
        Ok(&self.logits)
    }

    /// Feeds one generated token; returns its logits.
    pub fn decode(&mut self, token: u32) -> Result<&[f32]> {
        self.feed(&[token], None, Feeding::Decode)?;
        Ok(&self.logits)
    }

    /// Logits of the last token fed.
    pub fn logits(&self) -> &[f32] {
        &self.logits
    }

    /// Tokens in the cache.
    pub fn n_past(&self) -> usize {
        self.cache.len()
    }

    pub fn n_ctx(&self) -> usize {
        self.options.n_ctx
    }

    pub fn options(&self) -> &SessionOptions {
        &self.options
    }

    /// Bytes of KV cache holding the tokens in it.
    pub fn kv_bytes(&self) -> usize {
        self.cache.bytes_in_use()
    }

    /// [`Session::kv_bytes`] of the local (sliding-window) layers, and of the others.
    pub fn kv_bytes_by_kind(&self) -> (usize, usize) {
        self.cache.bytes_in_use_by_kind()
    }

    pub fn cache(&self) -> &KvCache {
        &self.cache
    }

    /// Mutable access for KV policies: eviction ([`KvCache::retain`]) and re-positioning.
    pub fn cache_mut(&mut self) -> &mut KvCache {
        &mut self.cache
    }

    /// Reports the attention weights of the queries `observer` asks for during later calls.
    pub fn set_attention_observer(&mut self, observer: Option<Arc<dyn AttentionObserver + Send>>) {
        self.observer = observer;
    }

    /// Empties the cache.
    pub fn reset(&mut self) {
        self.policy.reset();
        self.cache.clear();
        self.cached_frequencies.clear();
        self.next_position = 0;
        self.grouped_until = 0;
    }

    /// Self-Extend's block mode: moves completed blocks of cached tokens to grouped positions
    /// before the next chunk, re-rotating their keys by the change (a pure rotation).
    fn regroup_cache(&mut self, blocks: GroupBlocks) {
        if !blocks.due(self.next_position, self.grouped_until) {
            return;
        }
        // The regrouping is a function of each position alone, so every head's list (which a
        // policy may have thinned differently) moves by the same rule.
        let (next, grouped) = (self.next_position, self.grouped_until);
        let remap = |positions: &mut [i32]| {
            blocks.regroup(positions, &mut next.clone(), &mut grouped.clone());
        };
        let mut scratch = Vec::new();
        if blocks.regroup(
            &mut scratch,
            &mut self.next_position,
            &mut self.grouped_until,
        ) {
            self.scheme
                .frequencies(self.next_position as usize, &mut self.frequencies);
            self.cache
                .reposition(&remap, &self.frequencies, self.model.config.rope_style);
        }
    }

    /// Brings the cached keys to the frequencies of a sequence of `seq_len` tokens, when the
    /// scheme's frequencies have changed since they were rotated.
    fn rerotate_cache(&mut self, seq_len: usize) {
        self.scheme.frequencies(seq_len, &mut self.frequencies);
        if !self.cache.is_empty() && self.cached_frequencies != self.frequencies {
            self.cache.change_frequencies(
                &self.cached_frequencies,
                &self.frequencies,
                self.model.config.rope_style,
            );
        }
        self.cached_frequencies.clone_from(&self.frequencies);
    }

    /// Refuses, before any work, tokens that cannot be fed: none, an id outside the vocabulary,
    /// or more than the cache holds.
    fn check_feed(&self, tokens: &[u32], feeding: Feeding) -> Result<()> {
        if tokens.is_empty() {
            return Err(Error::EmptyPrompt);
        }
        let vocab = self.model.config.vocab;
        if let Some(&id) = tokens.iter().find(|&&id| id as usize >= vocab) {
            return Err(Error::BadToken { id, vocab });
        }
        match feeding {
            Feeding::Prompt => self.check_fits(tokens.len(), 0),
            _ if self.cache.len() + tokens.len() > self.cache.capacity() => {
                Err(Error::ContextOverflow {
                    tokens: self.cache.len() + tokens.len(),
                    reserve: 0,
                    ctx: self.cache.capacity(),
                })
            }
            _ => Ok(()),
        }
    }

    fn feed(
        &mut self,
        tokens: &[u32],
        mut all_logits: Option<&mut [f32]>,
        feeding: Feeding,
    ) -> Result<()> {
        self.check_feed(tokens, feeding)?;
        if feeding == Feeding::Prompt {
            self.policy.begin(self.cache.len() + tokens.len());
        }
        let (model, pool) = (self.model.clone(), self.pool.clone());
        let vocab = model.config.vocab;
        let mut done = 0;
        for chunk in tokens.chunks(self.options.chunk_size) {
            let last = done + chunk.len() == tokens.len();
            let step = self.prepare_chunk(chunk.len(), feeding, last)?;
            let (buffers, sequence, logits) = self.split(step.compress());
            let (rows, out): (std::ops::Range<usize>, &mut [f32]) = match all_logits.as_deref_mut()
            {
                Some(all) => (
                    0..chunk.len(),
                    &mut all[done * vocab..(done + chunk.len()) * vocab],
                ),
                None if last => (chunk.len() - 1..chunk.len(), logits),
                None => (0..0, &mut []),
            };
            let chunk = Chunk {
                tokens: chunk,
                logit_rows: rows,
            };
            forward(
                &model.weights,
                &model.config,
                &pool,
                buffers,
                sequence,
                &chunk,
                out,
            );
            done += chunk.tokens.len();
            self.finish_chunk(step);
        }
        if let Some(all) = all_logits {
            self.logits
                .copy_from_slice(&all[(tokens.len() - 1) * vocab..]);
        }
        Ok(())
    }

    /// Readies the session for its next `len` tokens (the call's last if `last`): Self-Extend's
    /// regrouping, the policy's choice of queries to observe, the tokens' positions, their slots
    /// in the cache and their rotary tables.
    fn prepare_chunk(&mut self, len: usize, feeding: Feeding, last: bool) -> Result<Step> {
        if let Some(blocks) = self.scheme.group_blocks() {
            self.regroup_cache(blocks);
        }
        let phase = match feeding {
            Feeding::Decode => Phase::Decode,
            _ if last => Phase::PrefillEnd,
            _ => Phase::Prefill,
        };
        let start = self.next_position;
        let step = Step {
            feeding,
            phase,
            end: start + len as i32,
        };
        if step.compress() {
            self.policy.before_chunk(&ChunkInfo {
                phase,
                positions: start..step.end,
                cache_len_after: self.cache.len() + len,
                guide: step.guide(),
            });
        }
        self.positions.clear();
        self.positions.extend(start..step.end);
        // The sequence length a dynamic scheme sees: the highest position so far, plus one.
        let seq_len = step.end as usize;
        if self.scheme.varies_with_length() {
            self.rerotate_cache(seq_len);
        }
        self.cache.push_slots(&self.positions)?;
        self.scheme.fill_table(
            &self.positions,
            seq_len,
            &mut self.frequencies,
            &mut self.scratch.rotary,
        );
        if let Some(local) = &self.local_rope {
            local.fill_table(
                &self.positions,
                seq_len,
                &mut self.frequencies,
                &mut self.scratch.local_rotary,
            );
        }
        if let Some(far) = &mut self.scratch.far {
            far.fill(
                self.scheme.as_ref(),
                &self.positions,
                seq_len,
                &mut self.frequencies,
                &self.scratch.rotary,
            );
        }
        Ok(step)
    }

    /// The session as a forward pass takes it: its activation buffers, the sequence it attends
    /// over (observed by the policy when it compresses, and by the external observer), and its
    /// logits.
    fn split(&mut self, compress: bool) -> (&mut Buffers, Sequence<'_>, &mut [f32]) {
        let policy: &dyn AttentionObserver = self.policy.as_ref();
        let observers = Observers {
            policy: compress.then_some(policy),
            external: self
                .observer
                .as_deref()
                .map(|o| o as &dyn AttentionObserver),
        };
        let sequence = Sequence {
            cache: &mut self.cache,
            scratch: &mut self.scratch,
            positions: &self.positions,
            observers,
        };
        (&mut self.buffers, sequence, &mut self.logits)
    }

    /// Ends a chunk the model has been through: the policy evicts or re-positions, and the cache
    /// settles.
    fn finish_chunk(&mut self, step: Step) {
        self.next_position = step.end;
        if step.compress() {
            if self.policy.repositions() {
                // The model's own RoPE fills its table without the frequencies (it reproduces
                // llama.cpp's f32 angles), so a policy that moves keys needs them made here.
                self.scheme
                    .frequencies(step.end as usize, &mut self.frequencies);
            }
            let after = AfterChunk {
                phase: step.phase,
                guide: step.guide(),
                next_position: step.end,
                frequencies: &self.frequencies,
                rope_style: self.model.config.rope_style,
            };
            if let Some(next) = self.policy.after_chunk(&mut self.cache, &after) {
                self.next_position = next;
            }
        }
        self.cache.settle();
    }
}
