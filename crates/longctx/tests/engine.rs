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

/// Logits of a prompt and of tokens decoded after it, and the KV bytes at the end.
fn run_kv(model: &Arc<Model>, kv: &str, ids: &[u32], prompt: usize) -> (Vec<f32>, usize) {
    let options = SessionOptions {
        n_ctx: 256,
        kv_dtype: KvDtype::F16,
        chunk_size: 48,
        threads: 2,
        kv: kv.parse().unwrap(),
        ..SessionOptions::default()
    };
    let mut s = Session::new(model.clone(), options).unwrap();
    let mut logits = s.prefill(&ids[..prompt]).unwrap().to_vec();
    for &id in &ids[prompt..] {
        logits.extend_from_slice(s.decode(id).unwrap());
    }
    (logits, s.kv_bytes())
}

/// KIVI at 8 bits, alone and after eviction policies (one of which moves every kept token at
/// every step, re-quantizing its keys): logits close to those of the same policy over the f16
/// cache, in fewer bytes. For scale: this model's logits have a standard deviation of 1.6, and
/// an f32 cache instead of f16 moves them by up to 0.14.
#[test]
fn kivi_at_8_bits_stays_close_to_full_precision_in_fewer_bytes() {
    let model = Model::load(&fixture("llama-q8_0.gguf")).unwrap();
    let ids = tokens(200, model.config.vocab);
    // With a residual longer than the input nothing is quantized: the same bits.
    let (full, full_bytes) = run_kv(&model, "full", &ids, 150);
    assert_eq!(
        run_kv(&model, "kivi:bits=8,residual=1000", &ids, 150),
        (full.clone(), full_bytes)
    );
    for (policy, tolerance) in [
        ("full", 0.25),
        ("streaming:sinks=4,window=92", 0.5),
        ("snapkv:budget=96", 0.25),
    ] {
        let (plain, plain_bytes) = run_kv(&model, policy, &ids, 150);
        let (quantized, bytes) = run_kv(&model, &format!("{policy}+kivi:bits=8"), &ids, 150);
        let worst = plain
            .iter()
            .zip(&quantized)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < tolerance, "{policy}: logits off by {worst}");
        assert!(
            bytes * 10 < plain_bytes * 8,
            "{policy}: {bytes} vs {plain_bytes} bytes"
        );
    }
    // 200 tokens in each of 2 layers × 2 KV heads: 160 quantized at 144 bytes (64 key and 64
    // value codes, 16 bytes of ranges), 40 in f16 at 256.
    let (_, bytes) = run_kv(&model, "kivi:bits=8", &ids, 150);
    assert_eq!(bytes, 4 * (160 * 144 + 40 * 256));
    assert_eq!(full_bytes, 4 * 200 * 256);
    // A far query reads every cached key in full precision.
    let options = SessionOptions {
        n_ctx: 256,
        rope: "string".parse().unwrap(),
        kv: "kivi:bits=8".parse().unwrap(),
        ..SessionOptions::default()
    };
    let Err(refused) = Session::new(model.clone(), options) else {
        panic!("KIVI with STRING should be refused")
    };
    assert!(refused.to_string().contains("far query"), "{refused}");
}

/// A server's prefix cache: a session cut back to a shared prefix goes on exactly as a session
/// that was fed only that prefix.
#[test]
fn a_truncated_cache_continues_like_one_fed_only_the_prefix() {
    let model = Model::load(&fixture("llama-q4_1.gguf")).unwrap();
    let ids = tokens(60, model.config.vocab);
    let (prefix, rest, other) = (&ids[..20], &ids[20..45], &ids[45..]);
    let mut reused = session(&model, 16, KvDtype::F16);
    reused.prefill(&[prefix, rest].concat()).unwrap();
    reused.decode(7).unwrap();
    reused.truncate(prefix.len()).unwrap();
    assert_eq!(reused.n_past(), prefix.len());
    let mut fresh = session(&model, 16, KvDtype::F16);
    fresh.prefill(prefix).unwrap();
    assert_eq!(
        reused.prefill(other).unwrap(),
        fresh.prefill(other).unwrap()
    );
    assert_eq!(reused.decode(9).unwrap(), fresh.decode(9).unwrap());
    assert!(reused.truncate(1000).is_err());

    let options = SessionOptions {
        n_ctx: 256,
        threads: 2,
        chunk_size: 64,
        kv: "snapkv:budget=16".parse().unwrap(),
        ..SessionOptions::default()
    };
    let mut compressed = Session::new(model.clone(), options.clone()).unwrap();
    compressed.prefill(&ids).unwrap();
    let err = compressed.truncate(10).unwrap_err().to_string();
    assert!(err.contains("only the full cache"), "{err}");

    // The same checks a session makes, without making one.
    assert!(Session::check_request(&model, &options, 5000, 16).is_ok());
    let full = SessionOptions {
        kv: "full".parse().unwrap(),
        ..options
    };
    let err = Session::check_request(&model, &full, 250, 16).unwrap_err();
    assert!(
        matches!(
            err,
            longctx::Error::ContextOverflow {
                tokens: 250,
                reserve: 16,
                ctx: 256
            }
        ),
        "{err}"
    );
}
