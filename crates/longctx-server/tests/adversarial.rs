//! The server never panics and never stops answering, whatever a client sends: hundreds of
//! generated malformed and hostile bodies go to every endpoint of a real server (real model,
//! real socket), each must get a well-formed 2xx/4xx answer, and afterwards `/health` and a real
//! generation still work.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use longctx::session::{Model, SessionOptions};
use longctx_server::ServerConfig;
use proptest::prelude::*;
use serde_json::{json, Value};

static PANICS: AtomicUsize = AtomicUsize::new(0);

/// One server for every case (loading the model and starting the engine once).
fn server() -> SocketAddr {
    static ADDR: OnceLock<SocketAddr> = OnceLock::new();
    *ADDR.get_or_init(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            previous(info);
        }));
        let path = longctx::fetch::resolve_model(None).unwrap();
        let model = Model::load(&path).unwrap();
        let config = ServerConfig {
            model,
            model_name: "smollm2".into(),
            defaults: SessionOptions {
                n_ctx: 160,
                threads: 2,
                ..SessionOptions::default()
            },
            max_concurrent: 4,
            max_queue: 64,
            prefix_cache_bytes: 16 << 20,
            body_limit: 64 << 10,
            default_max_tokens: 4,
            factors_dir: None,
            aliases: vec!["tiny".into()],
            api_key: None,
            limits: longctx_server::connections::Limits::default(),
        };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Runtime::new().unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(listener.local_addr().unwrap()).unwrap();
                let limits = config.limits;
                let app = longctx_server::build(config);
                longctx_server::connections::serve(listener, app, limits, std::future::pending())
                    .await;
            });
        });
        rx.recv().unwrap()
    })
}

/// Sends raw bytes as one HTTP/1.1 request; returns the status and the body.
fn send(method: &str, path: &str, body: &[u8]) -> (u16, String) {
    let mut stream = TcpStream::connect(server()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    // The server may answer (413) and close before reading a body over its limit.
    let _ = stream.write_all(body);
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

/// A 4xx must carry OpenAI's error object; nothing may be a 5xx.
fn check(status: u16, body: &str, sent: &[u8]) {
    let sent = String::from_utf8_lossy(&sent[..sent.len().min(300)]);
    assert!(status < 500, "{status} for {sent}: {body}");
    if status >= 400 {
        let v: Value = serde_json::from_str(body)
            .unwrap_or_else(|_| panic!("{status} without a JSON body for {sent}: {body}"));
        assert!(v["error"]["message"].is_string(), "{body}");
    }
}

const FIELDS: &[&str] = &[
    "model",
    "messages",
    "prompt",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "n",
    "stream",
    "stream_options",
    "logprobs",
    "top_logprobs",
    "longctx",
    "echo",
    "suffix",
    "content",
    "tokens",
    "role",
    "rope",
    "kv",
    "include_usage",
    "frequency_penalty",
    "presence_penalty",
    "repeat_penalty",
    "logit_bias",
    "tools",
    "tool_choice",
    "response_format",
    "best_of",
    "modalities",
];

fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (-3i64..300).prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,40}".prop_map(Value::from),
        prop::sample::select(vec![
            "full",
            "snapkv:budget=8",
            "streaming:budget=0",
            "yarn:factor=0.5",
            "kivi:bits=3",
            "self_extend",
            "+",
            "::",
            "user",
            "system",
            "assistant",
            "text",
            "\u{0}",
        ])
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            prop::collection::vec(
                (
                    prop::sample::select(FIELDS.to_vec()).prop_map(String::from),
                    inner
                ),
                0..6
            )
            .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// A valid chat request with some fields replaced by arbitrary values.
fn mutated_request() -> impl Strategy<Value = Value> {
    let valid = json!({
        "model": "smollm2",
        "messages": [{"role": "user", "content": "Say one word."}],
        "max_tokens": 3,
        "prompt": "Say one word.",
    });
    prop::collection::vec((prop::sample::select(FIELDS.to_vec()), any_json()), 1..4).prop_map(
        move |changes| {
            let mut request = valid.clone();
            for (field, value) in changes {
                request[field] = value;
            }
            request
        },
    )
}

/// A valid request with its options drawn at random, so that many reach the engine (streaming,
/// stops, logprobs, policies, prefix reuse) rather than the parser; the edges and past them come
/// from the other strategies.
fn plausible_request() -> impl Strategy<Value = Value> {
    let spec = prop::sample::select(vec![
        "full",
        "streaming:budget=16",
        "snapkv:budget=8",
        "kivi:bits=4",
        "h2o:budget=12",
    ]);
    let rope = prop::sample::select(vec![
        "none",
        "yarn:factor=2",
        "self_extend:group=2,window=16",
        "string",
        "ntk:factor=2",
    ]);
    (
        1i64..6,
        prop::option::of(0.0f32..2.0),
        prop::option::of(0.05f32..1.0),
        prop::option::of(any::<i64>()),
        prop::option::of(prop::collection::vec(".{0,3}", 0..4)),
        any::<bool>(),
        any::<bool>(),
        0i64..21,
        prop::option::of((prop::option::of(rope), prop::option::of(spec))),
        prop::sample::select(vec![
            "Hi",
            "",
            "Tell me a story about the sea.",
            "\u{1F30A}",
        ]),
    )
        .prop_map(
            |(max_tokens, temperature, top_p, seed, stop, stream, logprobs, top, ext, text)| {
                let mut r = json!({
                    "messages": [{"role": "user", "content": text}],
                    "prompt": text,
                    "max_tokens": max_tokens,
                    "stream": stream,
                    "stream_options": {"include_usage": true},
                });
                let optional = [
                    ("temperature", temperature.map(|t| json!(t))),
                    ("top_p", top_p.map(|p| json!(p))),
                    ("seed", seed.map(|s| json!(s))),
                    ("stop", stop.map(|s| json!(s))),
                    ("logprobs", logprobs.then_some(json!(true))),
                    ("top_logprobs", logprobs.then_some(json!(top))),
                    (
                        "longctx",
                        ext.map(|(rope, kv)| json!({"rope": rope, "kv": kv})),
                    ),
                ];
                for (key, value) in optional {
                    if let Some(value) = value {
                        r[key] = value;
                    }
                }
                r
            },
        )
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => plausible_request().prop_map(|v| v.to_string().into_bytes()),
        1 => mutated_request().prop_map(|v| v.to_string().into_bytes()),
        1 => any_json().prop_map(|v| v.to_string().into_bytes()),
        1 => prop::collection::vec(any::<u8>(), 0..200),
        // Valid JSON cut short.
        1 => (mutated_request(), any::<prop::sample::Index>()).prop_map(|(v, cut)| {
            let text = v.to_string().into_bytes();
            text[..cut.index(text.len())].to_vec()
        }),
    ]
}

fn path() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        "/v1/chat/completions",
        "/v1/completions",
        "/tokenize",
        "/detokenize",
    ])
}

/// 300 cases in `cargo test`; `LONGCTX_FUZZ_CASES` (scripts/fuzz_requests.sh) runs more.
fn cases() -> u32 {
    std::env::var("LONGCTX_FUZZ_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(300)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn no_body_breaks_the_server(path in path(), body in body()) {
        let (status, reply) = send("POST", path, &body);
        check(status, &reply, &body);
    }
}

#[test]
fn hostile_bodies_get_clean_answers_and_the_server_stays_up() {
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let many_stops =
        json!({"messages": [{"role": "user", "content": "hi"}], "stop": vec!["x"; 10_000]});
    let huge_number =
        br#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":1e400}"#.to_vec();
    let nan = br#"{"messages":[{"role":"user","content":"hi"}],"temperature":NaN}"#.to_vec();
    let bad_utf8 = b"{\"messages\":[{\"role\":\"user\",\"content\":\"\xff\xfe\"}]}".to_vec();
    let nul = json!({"messages": [{"role": "user", "content": "a\u{0}b"}], "max_tokens": 2});
    let unknown_role = json!({"messages": [{"role": "wizard", "content": "hi"}], "max_tokens": 2});
    let bad_ids = json!({"prompt": [-1, 4_294_967_296i64, 99_999_999], "max_tokens": 2});
    let over_limit = vec![b'x'; 70 << 10];
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("/v1/chat/completions", deep.into_bytes()),
        ("/v1/chat/completions", many_stops.to_string().into_bytes()),
        ("/v1/chat/completions", huge_number),
        ("/v1/chat/completions", nan),
        ("/v1/chat/completions", bad_utf8),
        ("/v1/chat/completions", nul.to_string().into_bytes()),
        (
            "/v1/chat/completions",
            unknown_role.to_string().into_bytes(),
        ),
        ("/v1/completions", bad_ids.to_string().into_bytes()),
        ("/v1/completions", over_limit),
        ("/tokenize", b"{\"content\": 5}".to_vec()),
    ];
    for (path, body) in &cases {
        let (status, reply) = send("POST", path, body);
        check(status, &reply, body);
    }
    let (status, reply) = send("GET", "/health", b"");
    assert_eq!((status, reply.as_str()), (200, r#"{"status":"ok"}"#));
    // The engine still generates.
    let request = json!({"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2});
    let (status, reply) = send(
        "POST",
        "/v1/chat/completions",
        request.to_string().as_bytes(),
    );
    assert_eq!(status, 200, "{reply}");
    let v: Value = serde_json::from_str(&reply).unwrap();
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() <= 2);
    assert_eq!(
        PANICS.load(Ordering::SeqCst),
        0,
        "a handler or the engine panicked"
    );
}
