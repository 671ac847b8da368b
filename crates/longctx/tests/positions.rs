//! Every position scheme on a tiny random-weight model (trained on 512 tokens), run past its
//! trained length: decoding after a prefill gives the logits a single prefill of the same
//! tokens gives, so no scheme rotates a cached key differently from a fresh one. "The same" is
//! up to the last bits: one-token and many-token matmuls sum in different orders on this f32
//! model (about 1e-5 here), where a key rotated wrongly moves logits by whole units.

use std::path::PathBuf;
use std::sync::Arc;

use longctx::session::{KvDtype, Model, Session, SessionOptions};

fn model() -> Arc<Model> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models/llama-f32.gguf");
    Model::load(&path).unwrap()
}

fn session(model: &Arc<Model>, rope: &str, chunk_size: usize) -> Session {
    session_in(model, rope, 2048, chunk_size).unwrap()
}

fn session_in(
    model: &Arc<Model>,
    rope: &str,
    n_ctx: usize,
    chunk_size: usize,
) -> longctx::Result<Session> {
    let options = SessionOptions {
        n_ctx,
        kv_dtype: KvDtype::F32,
        chunk_size,
        threads: 2,
        rope: rope.parse().unwrap(),
        ..SessionOptions::default()
    };
    Session::new(model.clone(), options)
}

fn tokens(n: usize, vocab: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((i * 37 + 11) % (vocab - 10) + 5) as u32)
        .collect()
}

const N: usize = 700;

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

fn factors_file(dir: &std::path::Path, pairs: usize) -> PathBuf {
    let path = dir.join("factors.json");
    let factors = longctx::positions::LongRopeFactors {
        short_factor: vec![1.0; pairs],
        long_factor: (0..pairs)
            .map(|i| 1.0 + 3.0 * i as f64 / pairs as f64)
            .collect(),
        original_max_position_embeddings: None,
        max_position_embeddings: None,
    };
    factors.save(&path).unwrap();
    path
}

#[test]
fn decoding_after_prefill_matches_one_prefill_for_every_static_scheme() {
    let model = model();
    let dir = tempfile::tempdir().unwrap();
    let factors = factors_file(dir.path(), model.config.rope_dims / 2);
    let ids = tokens(N, model.config.vocab);
    let v = model.config.vocab;
    let own = session(&model, "none", 512).prefill(&ids).unwrap().to_vec();
    for rope in [
        "none".to_string(),
        "linear:factor=4".into(),
        "ntk:factor=4".into(),
        "yarn:factor=4".into(),
        "llama3:factor=4".into(),
        format!("longrope:factors={},n_hat=8", factors.display()),
        "yarn:factor=4+logn".into(),
        "auto:2048".into(),
    ] {
        let whole = session(&model, &rope, 512)
            .prefill_all_logits(&ids)
            .unwrap();
        if rope != "none" {
            let effect = max_diff(&whole[(N - 1) * v..], &own);
            assert!(effect > 1e-2, "{rope} changed nothing ({effect})");
        }
        let mut s = session(&model, &rope, 512);
        s.prefill(&ids[..N - 4]).unwrap();
        for (i, &id) in ids[N - 4..].iter().enumerate() {
            let step = s.decode(id).unwrap();
            let at = N - 4 + i;
            let diff = max_diff(step, &whole[at * v..(at + 1) * v]);
            assert!(diff < 1e-3, "{rope}: decode step {i} differs by {diff}");
        }
    }
}

/// Dynamic NTK's frequencies change with every token past the trained length; the cache is
/// re-rotated to follow them, so the last logits agree with one prefill up to the hidden states
/// of earlier tokens, which were computed under slightly earlier frequencies (as in HF).
#[test]
fn dynamic_ntk_keeps_cached_keys_on_the_current_frequencies() {
    let model = model();
    let ids = tokens(N, model.config.vocab);
    let one = session(&model, "dynamic:factor=4", 1024)
        .prefill(&ids)
        .unwrap()
        .to_vec();
    let mut s = session(&model, "dynamic:factor=4", 1024);
    s.prefill(&ids[..N - 1]).unwrap();
    let stepped = s.decode(ids[N - 1]).unwrap().to_vec();
    let mut plain = session(&model, "none", 1024);
    let unscaled = plain.prefill(&ids).unwrap().to_vec();
    let scheme_effect = max_diff(&one, &unscaled);
    let drift = max_diff(&one, &stepped);
    assert!(
        scheme_effect > 1e-3,
        "dynamic NTK changed nothing: {scheme_effect}"
    );
    assert!(
        drift < scheme_effect / 100.0,
        "decode drifted {drift} from one prefill (the scheme itself moves logits by {scheme_effect})"
    );
    // Within the trained length nothing is rescaled.
    let short = &ids[..300];
    let inside = max_diff(
        session(&model, "dynamic:factor=4", 1024)
            .prefill(short)
            .unwrap(),
        session(&model, "none", 1024).prefill(short).unwrap(),
    );
    assert!(
        inside < 1e-3,
        "dynamic NTK inside the trained length moved logits by {inside}"
    );
}

/// Self-Extend and STRING score distant keys with a second query (Self-Extend against grouped
/// keys cached beside the plain ones): decoding after a prefill, or prefilling in smaller chunks,
/// still gives one prefill's logits. Each runs in a context it reaches: Self-Extend past the
/// trained 512 tokens ((512 − 128)·4 + 128 = 1664), STRING inside them.
#[test]
fn decoding_after_prefill_matches_one_prefill_with_far_attention() {
    let model = model();
    let v = model.config.vocab;
    for (rope, n_ctx, n) in [
        ("self_extend:group=4,window=128", 1664, N),
        ("self_extend:group=4,window=128+logn", 1664, N),
        ("string", 512, 500),
    ] {
        let ids = tokens(n, v);
        let whole = session_in(&model, rope, n_ctx, 512)
            .unwrap()
            .prefill_all_logits(&ids)
            .unwrap();
        let own = session(&model, "none", 512).prefill(&ids).unwrap().to_vec();
        let effect = max_diff(&whole[(n - 1) * v..], &own);
        assert!(effect > 1e-2, "{rope} changed nothing ({effect})");
        let mut chunked = session_in(&model, rope, n_ctx, 96).unwrap();
        let diff = max_diff(chunked.prefill(&ids).unwrap(), &whole[(n - 1) * v..]);
        assert!(diff < 1e-3, "{rope}: chunks of 96 differ by {diff}");
        let mut s = session_in(&model, rope, n_ctx, 512).unwrap();
        s.prefill(&ids[..n - 4]).unwrap();
        for (i, &id) in ids[n - 4..].iter().enumerate() {
            let step = s.decode(id).unwrap();
            let at = n - 4 + i;
            let diff = max_diff(step, &whole[at * v..(at + 1) * v]);
            assert!(diff < 1e-3, "{rope}: decode step {i} differs by {diff}");
        }
    }
}

/// `--help` says factor 1 leaves the model as trained (issue 19, item 7): every scheme at its
/// identity setting gives `none`'s logits bit for bit, on a Llama, a NeoX-style Qwen2, a model
/// with per-pair `rope_freqs` and Gemma 3 with its local layers.
#[test]
fn factor_1_gives_the_logits_of_none_bit_for_bit() {
    for file in [
        "llama-f32.gguf",
        "qwen2-q8_0.gguf",
        "llama-rope-freqs-q8_0.gguf",
        "gemma3-f16.gguf",
    ] {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/models")
            .join(file);
        let model = Model::load(&path).unwrap();
        let n_ctx = model.config.context_length;
        let ids = tokens(n_ctx - 8, model.config.vocab);
        let prefill = |rope: &str| {
            session_in(&model, rope, n_ctx, 64)
                .unwrap()
                .prefill(&ids)
                .unwrap()
                .to_vec()
        };
        let own = prefill("none");
        for rope in [
            "linear:factor=1",
            "ntk:factor=1",
            "yarn:factor=1",
            "llama3:factor=1",
            "dynamic:factor=1",
            "dynamic:factor=8",
        ] {
            let logits = prefill(rope);
            assert!(
                logits
                    .iter()
                    .zip(&own)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{file}: {rope} moves the logits by {}",
                max_diff(&logits, &own)
            );
        }
    }
}

/// Inside its neighbour window Self-Extend is the model itself, bit for bit.
#[test]
fn self_extend_within_its_window_is_the_model() {
    let model = model();
    let ids = tokens(100, model.config.vocab);
    let extended = session_in(&model, "self_extend:group=4,window=128", 1664, 512)
        .unwrap()
        .prefill(&ids)
        .unwrap()
        .to_vec();
    assert_eq!(
        extended,
        session(&model, "none", 512).prefill(&ids).unwrap()
    );
}

/// With group 1 Self-Extend's far positions are the trained ones, so its far attention is the
/// plain one computed a second way. On Gemma 3, whose query is scaled after its rotation (one
/// global layer, five sliding-window ones here), the far query must be scaled the same way.
#[test]
fn self_extend_with_group_1_is_the_model_on_gemma3() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models/gemma3-f16.gguf");
    let model = Model::load(&path).unwrap();
    assert!(model.config.query_scale.is_some());
    let n_ctx = model.config.context_length;
    let ids = tokens(n_ctx - 8, model.config.vocab);
    let own = session_in(&model, "none", n_ctx, 512)
        .unwrap()
        .prefill(&ids)
        .unwrap()
        .to_vec();
    let far = session_in(&model, "self_extend:group=1,window=32", n_ctx, 512)
        .unwrap()
        .prefill(&ids)
        .unwrap()
        .to_vec();
    let diff = max_diff(&far, &own);
    assert!(diff < 1e-3, "far attention moved the logits by {diff}");
}

#[test]
fn far_schemes_refuse_contexts_they_do_not_reach() {
    let model = model();
    for (rope, n_ctx, needle) in [
        (
            "self_extend:group=4,window=128",
            2048,
            "reaches 1664 tokens",
        ),
        (
            "self_extend:group=4,window=512",
            1024,
            "below the trained length of 512",
        ),
        (
            "string",
            1024,
            "works within the trained length of 512 tokens",
        ),
        (
            "string:shift=600",
            512,
            "needs window < shift < trained length",
        ),
    ] {
        let err = match session_in(&model, rope, n_ctx, 512) {
            Ok(_) => panic!("{rope} accepted a context of {n_ctx}"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(needle), "{rope}: {err}");
    }
}

/// Self-Extend's block mode moves cached keys to grouped positions between chunks; each moved
/// key must be exactly the key rotated at its new position. With one token repeated, layer 0's
/// key at any position is the same vector rotated there, so the model's own cache, filled at
/// positions 0, 1, 2 …, holds the expected key for every grouped position.
#[test]
fn self_extend_block_mode_moves_cached_keys_to_exactly_their_grouped_positions() {
    let model = model();
    let ids = vec![17u32; 600];
    let mut block =
        session_in(&model, "self_extend:group=4,window=64,mode=block", 1792, 32).unwrap();
    let last = block.prefill(&ids).unwrap().to_vec();
    assert!(last.iter().all(|x| x.is_finite()));
    let mut own = session(&model, "none", 512);
    own.prefill(&ids).unwrap();
    let (grouped, plain) = (block.cache(), own.cache());
    let positions = grouped.positions(0, 0);
    // Completed blocks of 64 sit at ⌊t/4⌋; the trailing tokens carry on densely.
    assert_eq!(&positions[..8], &[0, 0, 0, 0, 1, 1, 1, 1]);
    assert!(positions.windows(2).all(|w| w[0] <= w[1]));
    assert!(*positions.last().unwrap() < 512, "{positions:?}");
    let d = grouped.head_dim;
    let (longctx::kv::KvData::F32(k), longctx::kv::KvData::F32(expected)) = (&grouped.k, &plain.k)
    else {
        panic!("f32 caches")
    };
    for head in 0..grouped.n_kv_head {
        for (slot, &p) in positions.iter().enumerate() {
            let at = grouped.offset(0, head, slot);
            let want = plain.offset(0, head, p as usize);
            let diff = max_diff(&k[at..at + d], &expected[want..want + d]);
            assert!(diff < 1e-4, "head {head} slot {slot} at {p}: {diff}");
        }
    }
}
