//! KV policies in the engine, on a tiny random-weight model (tests/fixtures/models): a budget
//! the input fits in changes nothing, a small one bounds the cache through chunked prefill and
//! decoding, and bad specs are refused with a message.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use longctx::kv::{AttentionObserver, POLICIES};
use longctx::session::{KvDtype, Model, Session, SessionOptions};

fn model() -> Arc<Model> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models/llama-q8_0.gguf");
    Model::load(&path).unwrap()
}

fn session(
    model: &Arc<Model>,
    kv: &str,
    rope: &str,
    chunk_size: usize,
) -> longctx::Result<Session> {
    let options = SessionOptions {
        n_ctx: 256,
        kv_dtype: KvDtype::F32,
        chunk_size,
        threads: 2,
        rope: rope.parse()?,
        kv: kv.parse()?,
    };
    Session::new(model.clone(), options)
}

fn tokens(n: usize, vocab: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((i * 37 + 11) % (vocab - 10) + 5) as u32)
        .collect()
}

/// Each eviction policy with a budget far above the input, in the form it takes.
fn roomy(name: &str) -> String {
    match name {
        "full" => "full".into(),
        "streaming" => "streaming:sinks=4,window=1000".into(),
        "scope" => "scope:budget=1000,decode=1000".into(),
        other => format!("{other}:budget=1000"),
    }
}

#[test]
fn a_budget_above_the_input_equals_full_bit_for_bit() {
    let model = model();
    let ids = tokens(60, model.config.vocab);
    let mut full = session(&model, "full", "none", 16).unwrap();
    let want_prefill = full.prefill(&ids[..50]).unwrap().to_vec();
    let want_decode: Vec<Vec<f32>> = ids[50..]
        .iter()
        .map(|&id| full.decode(id).unwrap().to_vec())
        .collect();
    for entry in POLICIES.iter().filter(|e| e.name != "kivi") {
        let spec = roomy(entry.name);
        let mut s = session(&model, &spec, "none", 16).unwrap();
        assert_eq!(
            s.prefill(&ids[..50]).unwrap(),
            want_prefill,
            "{spec}: prefill"
        );
        for (i, &id) in ids[50..].iter().enumerate() {
            assert_eq!(
                s.decode(id).unwrap(),
                want_decode[i],
                "{spec}: decode step {i}"
            );
        }
        assert_eq!(s.n_past(), 60, "{spec}");
    }
}

/// The most slots any query of any layer saw.
#[derive(Default)]
struct Widest(AtomicUsize);

impl AttentionObserver for Widest {
    fn wants(&self, _: usize, _: i32) -> bool {
        true
    }

    fn observe(&self, _: usize, _: usize, _: usize, _: i32, weights: &[f32]) {
        self.0.fetch_max(weights.len(), Ordering::Relaxed);
    }
}

#[test]
fn a_small_budget_bounds_the_cache_by_budget_plus_chunk() {
    let model = model();
    let ids = tokens(200, model.config.vocab);
    let (budget, chunk) = (24, 8);
    for spec in [
        format!("snapkv:budget={budget},window=4,kernel=3"),
        format!("streaming:sinks=4,window={}", budget - 4),
        format!("h2o:budget={budget}"),
        format!("tova:budget={budget}"),
        format!("knorm:budget={budget}"),
    ] {
        if !POLICIES.iter().any(|e| spec.starts_with(e.name)) {
            continue;
        }
        let mut s = session(&model, &spec, "none", chunk).unwrap();
        let widest = Arc::new(Widest::default());
        s.set_attention_observer(Some(widest.clone()));
        let logits = s.prefill(&ids[..180]).unwrap();
        assert!(logits.iter().all(|x| x.is_finite()), "{spec}");
        assert!(
            s.n_past() <= budget,
            "{spec}: {} cached after prefill",
            s.n_past()
        );
        assert!(
            widest.0.load(Ordering::Relaxed) <= budget + chunk,
            "{spec}: a query saw {} slots",
            widest.0.load(Ordering::Relaxed)
        );
        for &id in &ids[180..] {
            s.decode(id).unwrap();
        }
        let full_bytes = session(&model, "full", "none", chunk).unwrap();
        drop(full_bytes);
        assert!(
            s.n_past() <= budget + 20,
            "{spec}: {} cached after decoding",
            s.n_past()
        );
    }
}

#[test]
fn kv_bytes_shrink_with_the_budget() {
    let model = model();
    let ids = tokens(200, model.config.vocab);
    let mut full = session(&model, "full", "none", 32).unwrap();
    full.prefill(&ids).unwrap();
    let mut snap = session(&model, "snapkv:ratio=0.25", "none", 32).unwrap();
    snap.prefill(&ids).unwrap();
    assert_eq!(snap.n_past(), 50);
    assert_eq!(snap.kv_bytes() * 4, full.kv_bytes());
}

#[test]
fn a_prompt_longer_than_the_context_streams_through_a_budget() {
    let model = model();
    // 256 slots of context, 600 tokens of prompt: only a policy that evicts between chunks fits.
    let ids = tokens(600, model.config.vocab);
    let err = session(&model, "full", "none", 64)
        .unwrap()
        .prefill(&ids)
        .unwrap_err();
    assert!(err.to_string().contains("--kv"), "{err}");
    let mut s = session(&model, "snapkv:budget=128", "none", 64).unwrap();
    assert!(s.prefill(&ids).unwrap().iter().all(|x| x.is_finite()));
    assert_eq!(s.n_past(), 128);
    let err = session(&model, "snapkv:budget=240", "none", 64)
        .unwrap()
        .prefill(&ids)
        .unwrap_err();
    assert!(
        err.to_string().contains("snapkv") && err.to_string().contains("256"),
        "{err}"
    );
}

#[test]
fn bad_specs_are_refused_with_a_message() {
    let model = model();
    for (spec, rope, says) in [
        ("lru:budget=4", "none", "unknown"),
        ("snapkv:budget=0", "none", "between 1 and 16777216 (got 0)"),
        (
            "snapkv:ratio=1.5",
            "none",
            "above 0 and at most 1 (got 1.5)",
        ),
        ("snapkv", "none", "budget"),
        ("snapkv:budget=8,windw=4", "none", "windw"),
        ("full:budget=8", "none", "no parameter"),
        ("streaming:window=0", "none", "window"),
        (
            "snapkv:budget=8+streaming:window=4",
            "none",
            "one eviction policy",
        ),
        (
            "streaming:window=64",
            "self_extend:group=4,window=64,mode=block",
            "moves cached tokens",
        ),
    ] {
        let err = match session(&model, spec, rope, 16) {
            Ok(_) => panic!("{spec} with --rope {rope} was accepted"),
            Err(err) => err.to_string(),
        };
        assert!(err.contains(says), "{spec}: {err}");
    }
}

/// Compressing after a one-chunk prefill moves kept entries, never changes them: every slot a
/// policy keeps, in every layer and KV head, holds exactly the key and value the full cache holds
/// for the token at that position.
#[test]
fn kept_entries_are_the_full_caches_entries_at_their_positions() {
    let model = model();
    let ids = tokens(120, model.config.vocab);
    let mut full = session(&model, "full", "none", 128).unwrap();
    full.prefill(&ids).unwrap();
    for spec in [
        "snapkv:budget=40,window=8",
        "h2o:budget=40",
        "tova:budget=40",
        "knorm:budget=40",
        "pyramid:budget=40,window=8",
    ] {
        if !POLICIES.iter().any(|e| spec.starts_with(e.name)) {
            continue;
        }
        let mut s = session(&model, spec, "none", 128).unwrap();
        s.prefill(&ids).unwrap();
        let (c, f) = (s.cache(), full.cache());
        let (mut a, mut b) = (vec![0f32; c.head_dim], vec![0f32; c.head_dim]);
        for layer in 0..c.n_layer {
            assert!(
                c.layer_len(layer) < 120,
                "{spec}: layer {layer} kept everything"
            );
            for head in 0..c.n_kv_head {
                let positions = c.positions(layer, head);
                assert!(positions.windows(2).all(|w| w[0] < w[1]), "{spec}: order");
                for (slot, &p) in positions.iter().enumerate() {
                    c.read_key(layer, head, slot, &mut a);
                    f.read_key(layer, head, p as usize, &mut b);
                    assert_eq!(
                        a, b,
                        "{spec}: key of layer {layer} head {head} position {p}"
                    );
                    c.read_value(layer, head, slot, &mut a);
                    f.read_value(layer, head, p as usize, &mut b);
                    assert_eq!(
                        a, b,
                        "{spec}: value of layer {layer} head {head} position {p}"
                    );
                }
            }
        }
    }
}

/// Policies that re-position kept tokens (StreamingLLM, Finch) must leave each key exactly as if
/// it had been rotated at its new position. With one token repeated, layer 0's key at position p
/// is the same vector rotated to p, which the full cache holds at slot p.
#[test]
fn repositioned_keys_equal_keys_rotated_at_their_new_positions() {
    let model = model();
    let ids = vec![17u32; 100];
    let mut full = session(&model, "full", "none", 128).unwrap();
    full.prefill(&ids).unwrap();
    for spec in ["streaming:sinks=4,window=20", "finch:budget=24,window=4"] {
        let mut s = session(&model, spec, "none", 8).unwrap();
        s.prefill(&ids).unwrap();
        let (c, f) = (s.cache(), full.cache());
        assert!(c.layer_len(0) <= 32, "{spec}: {} kept", c.layer_len(0));
        let (mut a, mut b) = (vec![0f32; c.head_dim], vec![0f32; c.head_dim]);
        for head in 0..c.n_kv_head {
            for (slot, &p) in c.positions(0, head).iter().enumerate() {
                assert_eq!(p, slot as i32, "{spec}: positions inside the cache");
                c.read_key(0, head, slot, &mut a);
                f.read_key(0, head, slot, &mut b);
                let diff = a
                    .iter()
                    .zip(&b)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0f32, f32::max);
                assert!(
                    diff < 1e-3,
                    "{spec}: head {head} slot {slot} differs by {diff}"
                );
            }
        }
    }
}

/// On a sliding-window model (tiny Gemma 3: five local layers with a window of 8, one global),
/// every policy compresses the global layer only and the local layers hold their window and a
/// chunk, whatever the policy or the scheme; a local layer's cache never grows with the input.
#[test]
fn policies_compress_global_layers_and_local_layers_hold_their_window() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models/gemma3-q5_0.gguf");
    let model = Model::load(&path).unwrap();
    let window = model.config.sliding.as_ref().expect("sliding").window;
    let ids = tokens(200, model.config.vocab);
    let (budget, chunk) = (24, 8);
    for entry in POLICIES {
        let spec = match entry.name {
            "full" => "full".to_string(),
            "kivi" => "kivi:group=32,residual=32".to_string(),
            "streaming" => format!("streaming:sinks=4,window={}", budget - 4),
            "scope" => format!("scope:budget={budget},decode={budget}"),
            name => format!("{name}:budget={budget}"),
        };
        for rope in ["none", "yarn:factor=2", "dynamic:factor=2"] {
            // A policy and a scheme that both move cached tokens are refused together.
            let Ok(mut s) = session(&model, &spec, rope, chunk) else {
                assert_eq!(rope, "dynamic:factor=2", "{spec}");
                continue;
            };
            let logits = s.prefill(&ids[..180]).unwrap();
            assert!(logits.iter().all(|x| x.is_finite()), "{spec} {rope}");
            for &id in &ids[180..] {
                assert!(s.decode(id).unwrap().iter().all(|x| x.is_finite()));
            }
            let cache = s.cache();
            for layer in 0..cache.n_layer {
                let len = cache.layer_len(layer);
                if cache.is_local(layer) {
                    assert!(
                        len <= window + chunk + 64,
                        "{spec} {rope}: local layer {layer} holds {len}"
                    );
                    // Local layers move with the newest token when a policy re-positions.
                    let global = cache.compressed_layers().next().unwrap();
                    assert_eq!(
                        cache.positions(layer, 0).last(),
                        cache.positions(global, 0).last(),
                        "{spec} {rope}: layer {layer}"
                    );
                } else if !matches!(entry.name, "full" | "kivi") {
                    assert!(
                        len <= budget + 20,
                        "{spec} {rope}: global layer {layer} holds {len}"
                    );
                }
            }
        }
    }
}
