//! Engine properties on a tiny random-weight model (tests/fixtures/models): chunking does not
//! change results, attention weights are observable.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use longctx::kv::AttentionObserver;
use longctx::session::{KvDtype, Model, Session, SessionOptions};

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
        ..SessionOptions::default()
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
        // Prefill that wants only the last logits runs the last layer on that row alone.
        let last = session(&model, 512, kv).prefill(&ids).unwrap().to_vec();
        let v = model.config.vocab;
        assert_eq!(
            last,
            &whole[(ids.len() - 1) * v..],
            "last-row logits, {kv:?} cache"
        );
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

/// One report of attention weights, reduced to what the test checks.
struct Seen {
    layer: usize,
    head: usize,
    kv_head: usize,
    position: i32,
    len: usize,
    sum: f32,
}

/// Records every report for the queries at chosen positions.
struct Collector {
    positions: Vec<i32>,
    seen: Mutex<Vec<Seen>>,
}

impl AttentionObserver for Collector {
    fn wants(&self, _layer: usize, position: i32) -> bool {
        self.positions.contains(&position)
    }
    fn observe(&self, layer: usize, head: usize, kv_head: usize, position: i32, weights: &[f32]) {
        let (len, sum) = (weights.len(), weights.iter().sum());
        let seen = Seen {
            layer,
            head,
            kv_head,
            position,
            len,
            sum,
        };
        self.seen.lock().unwrap().push(seen);
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
    for &Seen {
        layer,
        head,
        kv_head,
        position,
        len,
        sum,
    } in seen.iter()
    {
        assert!(layer < c.n_layer && head < c.n_head);
        assert_eq!(kv_head, head / (c.n_head / c.n_kv_head));
        assert_eq!(
            len,
            position as usize + 1,
            "a query sees itself and everything before it"
        );
        assert!((sum - 1.0).abs() < 1e-5, "softmax weights sum to {sum}");
    }
}
