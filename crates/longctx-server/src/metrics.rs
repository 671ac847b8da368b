//! `/metrics` in Prometheus' text format: what an operator watches on a serving engine (traffic,
//! tokens, speed, queue, KV memory), named like llama-server's where the meaning is the same.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Default)]
pub struct Metrics {
    pub requests: Counter,
    pub requests_rejected: Counter,
    pub requests_cancelled: Counter,
    pub prompt_tokens: Counter,
    pub cached_prompt_tokens: Counter,
    pub generated_tokens: Counter,
    pub prefill_seconds: Counter<f64, AtomicU64>,
    pub decode_seconds: Counter<f64, AtomicU64>,
    pub prefill_tokens_per_second: Gauge<f64, AtomicU64>,
    pub decode_tokens_per_second: Gauge<f64, AtomicU64>,
    pub queue_depth: Gauge,
    pub requests_processing: Gauge,
    pub kv_bytes_in_use: Gauge,
    pub kv_bytes_local_layers: Gauge,
    pub prefix_cache_bytes: Gauge,
    pub decode_batch_size: Gauge,
}

impl Metrics {
    pub fn encode(&self) -> String {
        let mut registry = Registry::with_prefix("longctx");
        let m = self.clone();
        registry.register("requests", "Generation requests accepted", m.requests);
        registry.register(
            "requests_rejected",
            "Requests refused with 429 because the queue was full",
            m.requests_rejected,
        );
        registry.register(
            "requests_cancelled",
            "Requests whose client went away before they finished",
            m.requests_cancelled,
        );
        registry.register("prompt_tokens", "Prompt tokens received", m.prompt_tokens);
        registry.register(
            "cached_prompt_tokens",
            "Prompt tokens served from the prefix cache instead of computed",
            m.cached_prompt_tokens,
        );
        registry.register("generated_tokens", "Tokens generated", m.generated_tokens);
        registry.register(
            "prefill_seconds",
            "Time spent in prefill",
            m.prefill_seconds,
        );
        registry.register(
            "decode_seconds",
            "Time spent in (batched) decode steps",
            m.decode_seconds,
        );
        registry.register(
            "prefill_tokens_per_second",
            "Prefill speed of the last prefill",
            m.prefill_tokens_per_second,
        );
        registry.register(
            "decode_tokens_per_second",
            "Tokens produced per second by the last decode step, all sequences together",
            m.decode_tokens_per_second,
        );
        registry.register("queue_depth", "Requests waiting for a slot", m.queue_depth);
        registry.register(
            "requests_processing",
            "Requests holding a slot (prefilling or decoding)",
            m.requests_processing,
        );
        registry.register(
            "kv_bytes_in_use",
            "Bytes of KV cache held by running requests and the prefix cache",
            m.kv_bytes_in_use,
        );
        registry.register(
            "kv_bytes_local_layers",
            "Of kv_bytes_in_use, the bytes held by sliding-window (local) layers",
            m.kv_bytes_local_layers,
        );
        registry.register(
            "prefix_cache_bytes",
            "Bytes of KV cache kept for prefix reuse",
            m.prefix_cache_bytes,
        );
        registry.register(
            "decode_batch_size",
            "Sequences in the last decode step",
            m.decode_batch_size,
        );
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &registry);
        out
    }
}
