//! Decoding a token allocates nothing, on any thread. This file holds one test so that the
//! counting allocator sees this engine's allocations only (each test file is its own process).

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use longctx::session::{decode_batch, DecodeBatch, KvDtype, Model, Session, SessionOptions};
use longctx::threads::ThreadPool;

struct CountingAllocator;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);
static ARMED: AtomicBool = AtomicBool::new(false);

unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if ARMED.load(Ordering::Relaxed) {
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

/// Also with the far attentions of Self-Extend (grouped keys) and STRING: 200 tokens reach past
/// both windows. And sessions of all three decoding together in a batch.
#[test]
fn decoding_allocates_nothing() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models/llama-q4_1.gguf");
    let model = Model::load(&path).unwrap();
    let ropes = ["none", "self_extend:group=2,window=64", "string"];
    let options = |rope: &str| SessionOptions {
        n_ctx: 256,
        kv_dtype: KvDtype::F16,
        chunk_size: 512,
        threads: 2,
        rope: rope.parse().unwrap(),
        ..SessionOptions::default()
    };
    let ids: Vec<u32> = (0..200).map(|i| (i * 37 % 300 + 5) as u32).collect();
    let count = |what: &str, decode: &mut dyn FnMut()| {
        ALLOCATIONS.store(0, Ordering::SeqCst);
        ARMED.store(true, Ordering::SeqCst);
        decode();
        ARMED.store(false, Ordering::SeqCst);
        assert_eq!(ALLOCATIONS.load(Ordering::SeqCst), 0, "{what}");
    };
    for rope in ropes {
        let mut s = Session::new(model.clone(), options(rope)).unwrap();
        s.prefill(&ids[..10]).unwrap();
        s.decode(ids[10]).unwrap();
        count(
            &format!("{rope}: allocations while decoding 189 tokens"),
            &mut || {
                for &id in &ids[11..] {
                    s.decode(id).unwrap();
                }
            },
        );
    }
    let pool = Arc::new(ThreadPool::new(2));
    let mut batch = DecodeBatch::new(&model, pool.clone(), ropes.len());
    let mut sessions: Vec<Session> = ropes
        .iter()
        .map(|rope| Session::with_pool(model.clone(), options(rope), pool.clone()).unwrap())
        .collect();
    for s in &mut sessions {
        s.prefill(&ids[..10]).unwrap();
    }
    let mut refs: Vec<&mut Session> = sessions.iter_mut().collect();
    decode_batch(&mut batch, &mut refs, &[ids[10]; 3]).unwrap();
    count(
        "allocations while decoding 189 tokens in a batch",
        &mut || {
            for &id in &ids[11..] {
                decode_batch(&mut batch, &mut refs, &[id; 3]).unwrap();
            }
        },
    );
}
