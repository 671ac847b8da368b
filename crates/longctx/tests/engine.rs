//! Engine properties on a tiny random-weight model (tests/fixtures/models): chunking does not
//! change results, decoding allocates nothing, attention weights are observable.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use longctx::kv::AttentionObserver;
use longctx::session::{KvDtype, Model, Session, SessionOptions};

/// Counts allocations made by the thread that armed it, so other test threads don't interfere.
struct CountingAllocator;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);
static ARMED: AtomicBool = AtomicBool::new(false);
thread_local! {
    static COUNTING_THREAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if ARMED.load(Ordering::Relaxed) && COUNTING_THREAD.with(|c| c.get()) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
}

fn session(model: &Arc<Model>, chunk_size: usize, kv_dtype: KvDtype) -> Session {
    let options = SessionOptions {
        n_ctx: 256,
        kv_dtype,
        chunk_size,
        threads: 2,
    };
    Session::new(model.clone(), options).unwrap()
}

fn tokens(n: usize, vocab: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((i * 37 + 11) % (vocab - 10) + 5) as u32)
        .collect()
}

#[test]
fn chunk_size_and_decoding_do_not_change_the_logits() {
    let model = Model::load(&fixture("llama-q4_1.gguf")).unwrap();
    let ids = tokens(40, model.config.vocab);
    for kv in [KvDtype::F16, KvDtype::F32] {
        let whole = session(&model, 512, kv).prefill_all_logits(&ids).unwrap();
        let chunked = session(&model, 7, kv).prefill_all_logits(&ids).unwrap();
        assert_eq!(
            whole, chunked,
            "chunks of 7 tokens vs one chunk, {kv:?} cache"
        );
        let mut s = session(&model, 512, kv);
        s.prefill(&ids[..20]).unwrap();
        let v = model.config.vocab;
        for (i, &id) in ids[20..].iter().enumerate() {
            let step = s.decode(id).unwrap();
            assert_eq!(
                step,
                &whole[(20 + i) * v..(21 + i) * v],
                "decode step {i}, {kv:?} cache"
            );
        }
    }
}

#[test]
fn decoding_allocates_nothing() {
    let model = Model::load(&fixture("llama-q4_1.gguf")).unwrap();
    let mut s = session(&model, 512, KvDtype::F16);
    let ids = tokens(30, model.config.vocab);
    s.prefill(&ids[..10]).unwrap();
    s.decode(ids[10]).unwrap();
    COUNTING_THREAD.with(|c| c.set(true));
    ARMED.store(true, Ordering::SeqCst);
    for &id in &ids[11..] {
        s.decode(id).unwrap();
    }
    ARMED.store(false, Ordering::SeqCst);
    COUNTING_THREAD.with(|c| c.set(false));
    assert_eq!(
        ALLOCATIONS.load(Ordering::SeqCst),
        0,
        "allocations while decoding 19 tokens"
    );
}

/// Sums of attention received per (layer, KV head, slot), for the queries at chosen positions.
struct Collector {
    positions: Vec<i32>,
    seen: Mutex<Vec<(usize, usize, usize, i32, usize, f32)>>,
}

impl AttentionObserver for Collector {
    fn wants(&self, _layer: usize, position: i32) -> bool {
        self.positions.contains(&position)
    }
    fn observe(&self, layer: usize, head: usize, kv_head: usize, position: i32, weights: &[f32]) {
        let sum: f32 = weights.iter().sum();
        self.seen
            .lock()
            .unwrap()
            .push((layer, head, kv_head, position, weights.len(), sum));
    }
}

#[test]
fn attention_weights_are_reported_for_the_queries_asked_for() {
    let model = Model::load(&fixture("llama-q8_0.gguf")).unwrap();
    let c = model.config.clone();
    let mut s = session(&model, 8, KvDtype::F16);
    let collector = Arc::new(Collector {
        positions: vec![3, 12],
        seen: Mutex::new(Vec::new()),
    });
    s.set_attention_observer(Some(collector.clone()));
    s.prefill(&tokens(16, c.vocab)).unwrap();
    let seen = collector.seen.lock().unwrap();
    assert_eq!(seen.len(), 2 * c.n_layer * c.n_head);
    for &(layer, head, kv_head, position, len, sum) in seen.iter() {
        assert!(layer < c.n_layer && head < c.n_head);
        assert_eq!(kv_head, head / (c.n_head / c.n_kv_head));
        assert_eq!(
            len,
            position as usize + 1,
            "a query sees itself and everything before it"
        );
        // With an f16 cache the kernel reports the f16-rounded weights it multiplies V by.
        assert!((sum - 1.0).abs() < 1e-3, "softmax weights sum to {sum}");
    }
}
