//! The scheduler: one thread owns every session and runs the engine, so the forward passes of
//! all requests are ordered in one place.
//!
//! Each turn of its loop (continuous batching, as vLLM and llama-server schedule):
//! 1. take new requests, up to `max_concurrent` holding a slot; the rest wait in a bounded queue
//!    (the handler answers 429 when it is full);
//! 2. prefill one chunk of the oldest request still reading its prompt, so a long prompt delays
//!    the others' next token by one chunk, not by the whole prompt;
//! 3. decode one token for every request past its prompt in one batched forward pass, whose
//!    matmuls read each weight once for all of them;
//! 4. drop requests whose client has gone: their sessions, and the memory they hold, go at once.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;

use longctx::generate::FinishReason;
use longctx::sampling::{Sampler, SamplingParams};
use longctx::session::{decode_batch, DecodeBatch, Model, Session, SessionOptions};
use longctx::threads::ThreadPool;
use longctx::tokenizer::{StreamDecoder, Tokenizer};
use tokio::sync::mpsc::UnboundedSender;

use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::prefix_cache::PrefixCache;
use crate::stop::StopMatcher;

/// One generation request, tokenized and checked.
pub struct Job {
    pub prompt: Vec<u32>,
    pub options: SessionOptions,
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    /// Report each token's log-probability and this many alternatives.
    pub logprobs: Option<usize>,
    pub events: UnboundedSender<Event>,
}

/// What the engine tells a request's handler, in order: tokens, then `Done` or `Failed`.
#[derive(Debug)]
pub enum Event {
    Token {
        text: String,
        logprob: Option<TokenLogprob>,
    },
    Done {
        finish_reason: FinishReason,
        usage: Usage,
    },
    Failed(ApiError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens whose KV came from the prefix cache.
    pub cached_tokens: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: Alternative,
    /// The most likely tokens at this step, most likely first.
    pub top: Vec<Alternative>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Alternative {
    pub text: String,
    pub bytes: Vec<u8>,
    pub logprob: f32,
}

pub struct EngineConfig {
    pub max_concurrent: usize,
    pub max_queue: usize,
    pub prefix_cache_bytes: usize,
}

/// The handlers' side of the engine.
#[derive(Clone)]
pub struct EngineHandle {
    jobs: mpsc::Sender<Job>,
    waiting: Arc<AtomicUsize>,
    max_queue: usize,
    metrics: Metrics,
}

impl EngineHandle {
    /// Queues a job, or refuses it when the queue is full.
    pub fn submit(&self, job: Job) -> Result<(), ApiError> {
        let admitted = self
            .waiting
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < self.max_queue).then_some(n + 1)
            });
        if admitted.is_err() {
            self.metrics.requests_rejected.inc();
            return Err(ApiError::overloaded(format!(
                "the server is busy: {} requests are already waiting for a slot; retry later, \
                 or start the server with a larger --max-queue or --max-concurrent",
                self.max_queue
            )));
        }
        self.metrics.requests.inc();
        self.metrics.queue_depth.inc();
        self.jobs
            .send(job)
            .map_err(|_| ApiError::internal("the engine has stopped; restart the server"))
    }
}

/// Starts the engine thread.
pub fn start(
    model: Arc<Model>,
    pool: Arc<ThreadPool>,
    config: EngineConfig,
    metrics: Metrics,
) -> EngineHandle {
    let (jobs, incoming) = mpsc::channel();
    let waiting = Arc::new(AtomicUsize::new(0));
    let handle = EngineHandle {
        jobs,
        waiting: waiting.clone(),
        max_queue: config.max_queue,
        metrics: metrics.clone(),
    };
    let engine = Engine {
        batch: DecodeBatch::new(&model, pool.clone(), config.max_concurrent),
        prefix_cache: PrefixCache::new(config.prefix_cache_bytes, config.max_concurrent),
        model,
        pool,
        max_concurrent: config.max_concurrent,
        waiting_count: waiting,
        waiting: VecDeque::new(),
        running: Vec::new(),
        metrics,
    };
    std::thread::Builder::new()
        .name("longctx-engine".into())
        .spawn(move || engine.run(incoming))
        .unwrap_or_else(|e| panic!("cannot start the engine thread: {e}"));
    handle
}

struct Engine {
    model: Arc<Model>,
    pool: Arc<ThreadPool>,
    batch: DecodeBatch,
    prefix_cache: PrefixCache,
    max_concurrent: usize,
    waiting_count: Arc<AtomicUsize>,
    waiting: VecDeque<Job>,
    running: Vec<Sequence>,
    metrics: Metrics,
}

/// A request holding a slot.
struct Sequence {
    session: Session,
    events: UnboundedSender<Event>,
    /// The prompt, then every generated token: what the repetition penalty looks back over, and
    /// (up to the cache's length) what the prefix cache keys the session by.
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Prompt tokens fed so far (the cached prefix counts).
    fed: usize,
    cached: usize,
    sampler: Sampler,
    decoder: StreamDecoder,
    stop: StopMatcher,
    generated: usize,
    max_tokens: usize,
    logprobs: Option<usize>,
    /// Sampled and sent, to be fed in the next decode step.
    pending: Option<u32>,
    options_key: String,
}

impl Sequence {
    fn prefilling(&self) -> bool {
        self.fed < self.prompt_len
    }

    fn send(&self, event: Event) {
        // A closed channel means the client left; the next turn drops the sequence.
        let _ = self.events.send(event);
    }
}

impl Engine {
    fn run(mut self, incoming: mpsc::Receiver<Job>) {
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                match incoming.recv() {
                    Ok(job) => self.waiting.push_back(job),
                    Err(_) => return,
                }
            }
            while let Ok(job) = incoming.try_recv() {
                self.waiting.push_back(job);
            }
            self.drop_departed();
            while self.running.len() < self.max_concurrent {
                let Some(job) = self.waiting.pop_front() else {
                    break;
                };
                self.unqueue(1);
                self.admit(job);
            }
            self.prefill_one_chunk();
            self.decode_step();
            self.publish_gauges();
        }
    }

    fn unqueue(&self, n: usize) {
        self.waiting_count.fetch_sub(n, Ordering::SeqCst);
        self.metrics.queue_depth.dec_by(n as i64);
    }

    /// Forgets the requests whose clients have gone, queued or running.
    fn drop_departed(&mut self) {
        let before = self.waiting.len();
        self.waiting.retain(|job| !job.events.is_closed());
        let gone = before - self.waiting.len();
        self.unqueue(gone);
        let before_running = self.running.len();
        self.running.retain(|seq| !seq.events.is_closed());
        let gone = gone + before_running - self.running.len();
        self.metrics.requests_cancelled.inc_by(gone as u64);
    }

    fn admit(&mut self, job: Job) {
        let key = crate::prefix_cache::options_key(&job.options);
        let (session, cached) = match self.prefix_cache.take(&key, &job.prompt) {
            Some(hit) => hit,
            None => match Session::with_pool(self.model.clone(), job.options, self.pool.clone()) {
                Ok(session) => (session, 0),
                Err(e) => {
                    let _ = job.events.send(Event::Failed(e.into()));
                    return;
                }
            },
        };
        let sampler = match Sampler::new(job.sampling) {
            Ok(sampler) => sampler,
            Err(e) => {
                let _ = job.events.send(Event::Failed(e.into()));
                return;
            }
        };
        self.metrics.prompt_tokens.inc_by(job.prompt.len() as u64);
        self.metrics.cached_prompt_tokens.inc_by(cached as u64);
        let mut tokens = Vec::with_capacity(job.prompt.len() + job.max_tokens);
        tokens.extend_from_slice(&job.prompt);
        self.running.push(Sequence {
            session,
            events: job.events,
            prompt_len: tokens.len(),
            tokens,
            fed: cached,
            cached,
            sampler,
            decoder: StreamDecoder::new(),
            stop: StopMatcher::new(job.stop),
            generated: 0,
            max_tokens: job.max_tokens,
            logprobs: job.logprobs,
            pending: None,
            options_key: key,
        });
    }

    /// Feeds the next chunk of the oldest prompt. A KV policy that compresses decides what to keep
    /// having seen the whole prompt, so such a prompt goes in one call; with the full cache,
    /// separate chunks give the same cache and logits as one call.
    fn prefill_one_chunk(&mut self) {
        let Some(index) = self.running.iter().position(Sequence::prefilling) else {
            return;
        };
        let seq = &mut self.running[index];
        let chunk = seq.session.options().chunk_size;
        let end = if seq.session.policy_spec() == "full" {
            (seq.fed + chunk).min(seq.prompt_len)
        } else {
            seq.prompt_len
        };
        let start = Instant::now();
        let result = seq.session.prefill(&seq.tokens[seq.fed..end]).map(|_| ());
        let seconds = start.elapsed().as_secs_f64();
        if let Err(e) = result {
            let seq = self.running.swap_remove(index);
            seq.send(Event::Failed(e.into()));
            return;
        }
        let fed = end - seq.fed;
        seq.fed = end;
        self.metrics.prefill_seconds.inc_by(seconds);
        if seconds > 0.0 {
            self.metrics
                .prefill_tokens_per_second
                .set(fed as f64 / seconds);
        }
        if !seq.prefilling() {
            self.advance(index);
        }
    }

    /// One token for every sequence past its prompt, in one forward pass.
    fn decode_step(&mut self) {
        let mut sessions = Vec::new();
        let mut tokens = Vec::new();
        let mut members = Vec::new();
        for (i, seq) in self.running.iter_mut().enumerate() {
            if let Some(token) = seq.pending.take() {
                sessions.push(&mut seq.session);
                tokens.push(token);
                members.push(i);
            }
        }
        if sessions.is_empty() {
            return;
        }
        let start = Instant::now();
        let result = decode_batch(&mut self.batch, &mut sessions, &tokens);
        let seconds = start.elapsed().as_secs_f64();
        drop(sessions);
        self.metrics.decode_seconds.inc_by(seconds);
        self.metrics.decode_batch_size.set(members.len() as i64);
        if seconds > 0.0 {
            self.metrics
                .decode_tokens_per_second
                .set(members.len() as f64 / seconds);
        }
        if let Err(e) = result {
            let error: ApiError = e.into();
            for &i in members.iter().rev() {
                let seq = self.running.swap_remove(i);
                seq.send(Event::Failed(error.clone()));
            }
            return;
        }
        // Highest index first, so that removing a finished sequence moves none still to visit.
        for &i in members.iter().rev() {
            self.advance(i);
        }
    }

    /// Samples the next token of sequence `index` from its logits and sends it; finishes the
    /// sequence on an end-of-generation token, a stop sequence or `max_tokens`.
    fn advance(&mut self, index: usize) {
        let tokenizer = &self.model.tokenizer;
        let seq = &mut self.running[index];
        let logits = seq.session.logits();
        let id = seq.sampler.sample(logits, &seq.tokens);
        if tokenizer.is_end_of_generation(id) {
            return self.finish(index, FinishReason::Stop);
        }
        let logprob = seq
            .logprobs
            .map(|k| token_logprob(tokenizer, logits, id, k));
        seq.generated += 1;
        self.metrics.generated_tokens.inc();
        seq.tokens.push(id);
        let piece = seq.decoder.push(tokenizer, id);
        let released = seq.stop.push(&piece);
        if !released.text.is_empty() || logprob.is_some() {
            seq.send(Event::Token {
                text: released.text,
                logprob,
            });
        }
        if released.stopped {
            return self.finish(index, FinishReason::Stop);
        }
        if seq.generated >= seq.max_tokens {
            return self.finish(index, FinishReason::Length);
        }
        seq.pending = Some(id);
    }

    fn finish(&mut self, index: usize, reason: FinishReason) {
        let mut seq = self.running.swap_remove(index);
        let mut finish_reason = reason;
        let rest = seq.decoder.finish();
        let released = seq.stop.push(&rest);
        let mut text = released.text;
        if released.stopped {
            finish_reason = FinishReason::Stop;
        } else {
            text.push_str(&seq.stop.finish());
        }
        if !text.is_empty() {
            seq.send(Event::Token {
                text,
                logprob: None,
            });
        }
        let done = Event::Done {
            finish_reason,
            usage: Usage {
                prompt_tokens: seq.prompt_len,
                completion_tokens: seq.generated,
                cached_tokens: seq.cached,
            },
        };
        // The cache is kept, and the gauges say so, before `Done` goes: a client that has its
        // answer and asks /metrics or sends the next turn at once finds both.
        if !seq.events.is_closed() {
            let cached = seq.session.n_past();
            seq.tokens.truncate(cached);
            self.prefix_cache
                .put(seq.options_key, seq.session, seq.tokens);
            self.publish_gauges();
        }
        let _ = seq.events.send(done);
    }

    fn publish_gauges(&self) {
        let running: usize = self.running.iter().map(|s| s.session.kv_bytes()).sum();
        let idle = self.prefix_cache.bytes();
        let local: usize = self
            .running
            .iter()
            .map(|s| s.session.kv_bytes_by_kind().0)
            .sum::<usize>()
            + self.prefix_cache.local_layer_bytes();
        self.metrics.kv_bytes_in_use.set((running + idle) as i64);
        self.metrics.kv_bytes_local_layers.set(local as i64);
        self.metrics.prefix_cache_bytes.set(idle as i64);
        self.metrics
            .requests_processing
            .set(self.running.len() as i64);
    }
}

/// The chosen token's log-probability under the model's distribution (before temperature and
/// truncation, as OpenAI reports it) and the `k` most likely tokens.
fn token_logprob(tokenizer: &Tokenizer, logits: &[f32], id: u32, k: usize) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_sum = logits
        .iter()
        .map(|&l| ((l - max) as f64).exp())
        .sum::<f64>()
        .ln() as f32;
    let logprob = |i: usize| logits[i] - max - log_sum;
    let alternative = |i: usize| {
        let bytes = tokenizer.token_bytes(i as u32);
        Alternative {
            text: String::from_utf8_lossy(&bytes).into_owned(),
            bytes,
            logprob: logprob(i),
        }
    };
    let mut order: Vec<usize> = (0..logits.len()).collect();
    let k = k.min(order.len());
    let by_logit = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
    if k > 0 {
        order.select_nth_unstable_by(k - 1, by_logit);
    }
    order.truncate(k);
    order.sort_by(by_logit);
    TokenLogprob {
        token: alternative(id as usize),
        top: order.into_iter().map(alternative).collect(),
    }
}
