//! Clients that stall, hoard connections or lack the key cannot starve the others: each case
//! starts a real server on a real socket and plays the bad client byte by byte.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use longctx::session::{Model, SessionOptions};
use longctx_server::connections::Limits;
use longctx_server::ServerConfig;

fn model() -> Arc<Model> {
    static MODEL: OnceLock<Arc<Model>> = OnceLock::new();
    MODEL
        .get_or_init(|| Model::load(&longctx::fetch::resolve_model(None).unwrap()).unwrap())
        .clone()
}

/// Starts a server with these limits (and key) on a free port, on a runtime with two async
/// workers as `longctx serve` has.
fn start(limits: Limits, api_key: Option<&str>, body_limit: usize) -> SocketAddr {
    let config = ServerConfig {
        model: model(),
        model_name: "smollm2".into(),
        aliases: Vec::new(),
        defaults: SessionOptions {
            n_ctx: 128,
            threads: 1,
            ..SessionOptions::default()
        },
        max_concurrent: 2,
        max_queue: 8,
        prefix_cache_bytes: 0,
        body_limit,
        default_max_tokens: 2,
        factors_dir: None,
        api_key: api_key.map(str::to_string),
        limits,
    };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            let app = longctx_server::build(config);
            longctx_server::connections::serve(listener, app, limits, std::future::pending()).await;
        });
    });
    rx.recv().unwrap()
}

fn short(read_timeout_s: u64, max_connections: usize) -> Limits {
    Limits {
        max_connections,
        read_timeout: Duration::from_secs(read_timeout_s),
        write_timeout: Duration::from_secs(read_timeout_s),
    }
}

fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).unwrap();
    // Far past every server timeout here: a read that ends this way means the server held on.
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream
}

/// Everything the server sends until it closes; panics if it never closes.
fn read_until_closed(stream: &mut TcpStream) -> String {
    let mut response = Vec::new();
    match stream.read_to_end(&mut response) {
        Ok(_) => String::from_utf8_lossy(&response).into_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
            String::from_utf8_lossy(&response).into_owned()
        }
        Err(e) => panic!(
            "the server held the connection open ({e}); it had sent {:?}",
            String::from_utf8_lossy(&response)
        ),
    }
}

fn request(addr: SocketAddr, head: &str, body: &[u8]) -> String {
    let mut stream = connect(addr);
    stream.write_all(head.as_bytes()).unwrap();
    let _ = stream.write_all(body);
    read_until_closed(&mut stream)
}

fn get(addr: SocketAddr, path: &str, extra: &str) -> String {
    request(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: x\r\n{extra}Connection: close\r\n\r\n"),
        b"",
    )
}

#[test]
fn a_silent_or_half_sent_request_is_dropped_after_the_read_timeout() {
    let addr = start(short(1, 16), None, 1 << 20);
    // Connected, nothing sent.
    let mut silent = connect(addr);
    assert_eq!(read_until_closed(&mut silent), "");
    // Half a header.
    let mut half = connect(addr);
    half.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    read_until_closed(&mut half);
    // A kept-alive connection that goes quiet after its first answer.
    let mut idle = connect(addr);
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let answered = read_until_closed(&mut idle);
    assert!(answered.starts_with("HTTP/1.1 200"), "{answered}");
}

#[test]
fn a_body_that_trickles_gets_408() {
    let addr = start(short(1, 16), None, 1 << 20);
    let mut stream = connect(addr);
    stream
        .write_all(
            b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
              Content-Length: 100\r\n\r\n{\"content\":",
        )
        .unwrap();
    let response = read_until_closed(&mut stream);
    assert!(response.starts_with("HTTP/1.1 408"), "{response}");
    assert!(response.contains("did not arrive within"), "{response}");
}

#[test]
fn connections_past_the_limit_get_503_and_the_server_recovers() {
    let addr = start(short(2, 2), None, 1 << 20);
    let mut hoarded: Vec<TcpStream> = (0..2).map(|_| connect(addr)).collect();
    // Both permits held: let the server accept them before the third arrives.
    std::thread::sleep(Duration::from_millis(300));
    let refused = get(addr, "/health", "");
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    assert!(refused.contains("limit of 2 connections"), "{refused}");
    for stream in &mut hoarded {
        read_until_closed(stream);
    }
    let answered = get(addr, "/health", "");
    assert!(answered.starts_with("HTTP/1.1 200"), "{answered}");
}

#[test]
fn every_route_but_health_needs_the_key() {
    let addr = start(Limits::default(), Some("s3cret"), 1 << 20);
    let missing = get(addr, "/v1/models", "");
    assert!(missing.starts_with("HTTP/1.1 401"), "{missing}");
    assert!(missing.contains("invalid_api_key"), "{missing}");
    assert!(missing.contains("Authorization: Bearer"), "{missing}");
    let wrong = get(addr, "/v1/models", "Authorization: Bearer s3creT\r\n");
    assert!(wrong.starts_with("HTTP/1.1 401"), "{wrong}");
    let right = get(addr, "/v1/models", "Authorization: Bearer s3cret\r\n");
    assert!(right.starts_with("HTTP/1.1 200"), "{right}");
    let body = br#"{"content":"hello"}"#;
    let refused = request(
        addr,
        &format!(
            "POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        ),
        body,
    );
    assert!(refused.starts_with("HTTP/1.1 401"), "{refused}");
    let health = get(addr, "/health", "");
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
}

#[test]
fn health_answers_while_tokenizing_fills_the_cores() {
    let addr = start(Limits::default(), None, 32 << 20);
    let words = ["river ", "stone ", "lamp ", "quiet ", "orbit ", "copper "];
    let text: String = (0..1_200_000).map(|i| words[i * 7 % 6]).collect();
    let body = Arc::new(serde_json::to_vec(&serde_json::json!({ "content": text })).unwrap());
    let head = format!(
        "POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    // As many tokenizing requests as the runtime has async workers: were they tokenized on
    // those workers, nothing else could run until one finished.
    let (sent_tx, sent_rx) = std::sync::mpsc::channel();
    let tokenizing: Vec<_> = (0..2)
        .map(|_| {
            let (head, body, sent_tx) = (head.clone(), body.clone(), sent_tx.clone());
            std::thread::spawn(move || {
                let mut stream = connect(addr);
                stream.write_all(head.as_bytes()).unwrap();
                stream.write_all(&body).unwrap();
                sent_tx.send(()).unwrap();
                let mut first = [0u8; 1];
                stream.read_exact(&mut first).unwrap();
                let answered = std::time::Instant::now();
                let rest = read_until_closed(&mut stream);
                assert!(
                    rest.starts_with("TTP/1.1 200"),
                    "{}",
                    &rest[..rest.len().min(200)]
                );
                answered
            })
        })
        .collect();
    for _ in 0..2 {
        sent_rx.recv().unwrap();
    }
    // The bodies are in; the server is reading and tokenizing them.
    std::thread::sleep(Duration::from_millis(300));
    let health = get(addr, "/health", "");
    let health_answered = std::time::Instant::now();
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    for handle in tokenizing {
        let answered = handle.join().unwrap();
        assert!(
            health_answered < answered,
            "/health waited for a tokenizing request to finish"
        );
    }
}
