//! Property tests on what reads untrusted input: the tokenizer on arbitrary text and ids, and
//! the chat-template renderer on arbitrary small templates. `LONGCTX_FUZZ_CASES` sets the cases
//! per property (a few dozen to a few hundred by default, so `cargo test` stays quick);
//! `scripts/fuzz_specs.sh` runs them long. A failure found there is kept as a regression case.

use std::path::PathBuf;
use std::sync::OnceLock;

use longctx::chat::{ChatMessage, ChatTemplate};
use longctx::gguf::Gguf;
use longctx::tokenizer::Tokenizer;
use proptest::prelude::*;

/// `LONGCTX_FUZZ_CASES` cases, else `default`: what keeps the property to a second or two in a
/// debug `cargo test`.
fn config(default: u32) -> ProptestConfig {
    let cases = std::env::var("LONGCTX_FUZZ_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(default);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// SmolLM2's byte-level BPE, from the default model.
fn smollm2() -> &'static Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| {
        let path = longctx::fetch::resolve_model(None).expect("the default model (smollm2)");
        Tokenizer::from_gguf_metadata(Gguf::open(&path).unwrap().metadata()).unwrap()
    })
}

/// Which bytes SmolLM2 has a token of their own for.
fn single_bytes() -> &'static [bool; 256] {
    static BYTES: OnceLock<[bool; 256]> = OnceLock::new();
    BYTES.get_or_init(|| {
        let tok = smollm2();
        let mut has = [false; 256];
        for id in 0..tok.vocab_size() as u32 {
            if let [b] = tok.token_bytes(id)[..] {
                has[b as usize] = true;
            }
        }
        has
    })
}

/// Gemma 3's SentencePiece vocabulary, from the tiny fixture model.
fn gemma3() -> &'static Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/models/gemma3-f16.gguf");
        Tokenizer::from_gguf_metadata(Gguf::open(&path).unwrap().metadata()).unwrap()
    })
}

/// Text users and attackers send: any characters, special-token lookalikes, whitespace runs.
fn text() -> impl Strategy<Value = String> {
    let pieces = prop_oneof![
        "\\PC{0,8}",
        ".{0,8}",
        prop::sample::select(vec![
            "<|im_start|>",
            "<|im_end|>",
            "<start_of_turn>",
            "<eos>",
            "<bos>",
            "<|endoftext|>",
            "  ",
            "\n\n",
            "\t",
            "\r\n",
            "\u{feff}",
            "\u{200b}",
            "é",
            "😀",
            "\u{10ffff}",
            "'s",
            "123456",
            "\u{0}",
        ])
        .prop_map(str::to_string),
    ];
    prop::collection::vec(pieces, 0..8).prop_map(|p| p.concat())
}

proptest! {
    #![proptest_config(config(64))]

    /// Decoding gives the text back, but for the bytes SmolLM2's vocabulary has no token for
    /// (0xF1, for one: a lead byte of planes 4 to 7, which its training text never held),
    /// which every implementation of this vocabulary drops.
    #[test]
    fn smollm2_encodes_any_text_and_decodes_it_back(text in text(), special in any::<bool>()) {
        let tok = smollm2();
        let plain = tok.encode(&text, false, false).unwrap();
        let kept: Vec<u8> = text.bytes().filter(|&b| single_bytes()[b as usize]).collect();
        prop_assert_eq!(tok.decode(&plain), String::from_utf8_lossy(&kept).into_owned());
        let _ = tok.encode(&text, special, true);
    }

}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn gemma3_encodes_any_text_without_panicking(text in text(), special in any::<bool>()) {
        let _ = gemma3().encode(&text, special, special);
        let _ = gemma3().encode(&text, !special, special);
    }

    #[test]
    fn any_ids_in_the_vocabulary_decode(ids in prop::collection::vec(any::<u32>(), 0..32)) {
        for tok in [smollm2(), gemma3()] {
            let vocab = tok.vocab_size() as u32;
            let ids: Vec<u32> = ids.iter().map(|id| id % vocab).collect();
            let _ = tok.decode(&ids);
        }
    }

}

proptest! {
    // A template that runs away spends its 2M steps before it is stopped.
    #![proptest_config(config(32))]

    #[test]
    fn small_templates_render_or_fail_without_panicking(source in template(), n in 0usize..4) {
        if let Ok(t) = ChatTemplate::new(&source, "<s>", "</s>") {
            let messages: Vec<ChatMessage> = (0..n)
                .map(|i| ChatMessage {
                    role: ["system", "user", "assistant"][i % 3].to_string(),
                    content: format!(" message {i} "),
                })
                .collect();
            let _ = t.render(&messages, n % 2 == 0);
            let _ = t.render_chat(&messages, true);
        }
    }
}

/// Templates built from the constructs chat templates use, nested at random, with loops,
/// macros and string arithmetic that can run away.
fn template() -> impl Strategy<Value = String> {
    let leaf = prop::sample::select(vec![
        "x",
        "{{ bos_token }}",
        "{{ m.role }}",
        "{{ m.content | trim }}",
        "{{ messages | length }}",
        "{{ m | tojson }}",
        "{{ loop.index }}",
        "{{ raise_exception('no') }}",
        "{{ 'ab' * 3 }}",
        "{{ 'x' * 100000000 }}",
        "{{ m.content.strip().upper() }}",
        "{{ range(5) | join(',') }}",
        "{{ 1 / 0 }}",
        "{{ f(1) }}",
        "{% set n = 3 %}",
        "{{ n + 1 }}",
        "{{ messages[0].content }}",
        "{{ undefined.x }}",
        "{% break %}",
        "{{ m['role'] }}",
        "{{ '%s' % 1 }}",
    ])
    .prop_map(str::to_string);
    leaf.prop_recursive(4, 32, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 1..4).prop_map(|v| v.concat()),
            inner
                .clone()
                .prop_map(|b| format!("{{% for m in messages %}}{b}{{% endfor %}}")),
            inner
                .clone()
                .prop_map(|b| format!("{{% for i in range(100000) %}}{b}{{% endfor %}}")),
            inner.clone().prop_map(|b| format!(
                "{{% if add_generation_prompt %}}{b}{{% else %}}y{{% endif %}}"
            )),
            inner
                .clone()
                .prop_map(|b| format!("{{% macro f(k) %}}{b}{{{{ f(k) }}}}{{% endmacro %}}{b}")),
            "\\PC{0,6}".prop_map(|s| s.replace(['{', '}', '%'], "")),
        ]
    })
}

/// Findings of the property tests, kept as they were found (the template that made
/// `render_chat` panic is `chat::tests::adjacent_placeholders_do_not_share_a_pad`): U+40000 (bytes F1 80 80 80) came
/// back as three replacement characters, SmolLM2 having no token for the byte F1; the property
/// above now says which bytes round-trip, and this pins the case.
#[test]
fn regressions_found_by_the_property_tests() {
    let tok = smollm2();
    assert!(!single_bytes()[0xF1]);
    let ids = tok.encode("a\u{40000}b", false, false).unwrap();
    assert_eq!(tok.decode(&ids), "a\u{FFFD}\u{FFFD}\u{FFFD}b");
}
