//! Decoding a token allocates nothing, on any thread. This file holds one test so that the
//! counting allocator sees this engine's allocations only (each test file is its own process).

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use longctx::session::{KvDtype, Model, Session, SessionOptions};

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
/// both windows.
#[test]
fn decoding_allocates_nothing() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models/llama-q4_1.gguf");
    let model = Model::load(&path).unwrap();
    for rope in ["none", "self_extend:group=2,window=64", "string"] {
        let options = SessionOptions {
            n_ctx: 256,
            kv_dtype: KvDtype::F16,
            chunk_size: 512,
            threads: 2,
            rope: rope.parse().unwrap(),
            ..SessionOptions::default()
        };
        let mut s = Session::new(model.clone(), options).unwrap();
        let ids: Vec<u32> = (0..200).map(|i| (i * 37 % 300 + 5) as u32).collect();
        s.prefill(&ids[..10]).unwrap();
        s.decode(ids[10]).unwrap();
        ALLOCATIONS.store(0, Ordering::SeqCst);
        ARMED.store(true, Ordering::SeqCst);
        for &id in &ids[11..] {
            s.decode(id).unwrap();
        }
        ARMED.store(false, Ordering::SeqCst);
        assert_eq!(
            ALLOCATIONS.load(Ordering::SeqCst),
            0,
            "{rope}: allocations while decoding 189 tokens"
        );
    }
}
