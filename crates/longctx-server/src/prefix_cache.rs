//! Sessions of finished requests, kept with the tokens their caches hold so that a new request
//! sharing a prefix with one of them skips that prefix's prefill (llama-server's `cache_prompt`,
//! vLLM's automatic prefix caching). Least recently used first out, bounded in bytes of KV.
//!
//! Only a cache that holds every token at its own position can be cut back to a prefix: the
//! full cache. A session under a compressing policy is still kept, emptied, so the next request
//! with the same options does not allocate its buffers again.

use longctx::session::{Session, SessionOptions};

pub struct PrefixCache {
    idle: Vec<Idle>,
    max_bytes: usize,
    max_sessions: usize,
    clock: u64,
}

struct Idle {
    key: String,
    session: Session,
    /// The tokens the session's cache holds, in order.
    tokens: Vec<u32>,
    last_used: u64,
}

/// Sessions are interchangeable only when made with the same options.
pub fn options_key(options: &SessionOptions) -> String {
    format!(
        "ctx={} dtype={:?} chunk={} rope={} kv={}",
        options.n_ctx, options.kv_dtype, options.chunk_size, options.rope, options.kv
    )
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl PrefixCache {
    /// `max_bytes` bounds the KV bytes kept; `max_sessions` the sessions (each also holds its
    /// scratch buffers).
    pub fn new(max_bytes: usize, max_sessions: usize) -> Self {
        Self {
            idle: Vec::new(),
            max_bytes,
            max_sessions,
            clock: 0,
        }
    }

    /// A session made with `key`'s options whose cache holds the longest prefix of `prompt`
    /// that any kept session has, and that prefix's length. At least the prompt's last two
    /// tokens are left to feed: the last one's logits give the first generated token, and a
    /// chunk of two or more tokens runs the attention kernel a whole prompt runs (a single
    /// token runs the decoding one, whose other summation order moves this model's logits by
    /// up to ~0.1), so a request served from the cache gets the logits it would get without it.
    pub fn take(&mut self, key: &str, prompt: &[u32]) -> Option<(Session, usize)> {
        let limit = prompt.len().saturating_sub(2);
        let best = self
            .idle
            .iter()
            .enumerate()
            .filter(|(_, idle)| idle.key == key)
            .max_by_key(|(_, idle)| {
                (
                    common_prefix(&idle.tokens, prompt).min(limit),
                    idle.last_used,
                )
            })
            .map(|(i, _)| i)?;
        let Idle {
            mut session,
            tokens,
            ..
        } = self.idle.swap_remove(best);
        let shared = common_prefix(&tokens, prompt).min(limit);
        if shared == 0 || session.truncate(shared).is_err() {
            session.reset();
            return Some((session, 0));
        }
        Some((session, shared))
    }

    /// Keeps a finished request's session; `tokens` are those its cache holds.
    pub fn put(&mut self, key: String, mut session: Session, mut tokens: Vec<u32>) {
        if self.max_bytes == 0 || self.max_sessions == 0 {
            return;
        }
        if !session.holds_prefix() {
            session.reset();
            tokens.clear();
        }
        self.clock += 1;
        self.idle.push(Idle {
            key,
            session,
            tokens,
            last_used: self.clock,
        });
        while self.idle.len() > self.max_sessions || self.bytes() > self.max_bytes {
            let oldest = (0..self.idle.len())
                .min_by_key(|&i| self.idle[i].last_used)
                .expect("not empty while over a bound");
            self.idle.swap_remove(oldest);
        }
    }

    /// KV bytes held by the kept sessions.
    pub fn bytes(&self) -> usize {
        self.idle.iter().map(|i| i.session.kv_bytes()).sum()
    }

    /// Of [`PrefixCache::bytes`], what sliding-window (local) layers hold.
    pub fn local_layer_bytes(&self) -> usize {
        self.idle
            .iter()
            .map(|i| i.session.kv_bytes_by_kind().0)
            .sum()
    }
}
