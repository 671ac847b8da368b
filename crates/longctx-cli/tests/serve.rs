//! `longctx serve` driven as applications drive it: the official `openai` Python client against
//! the real server on a free loopback port (the client's tests are in serve/test_openai.py).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// A running server, stopped when dropped.
struct Server {
    child: Child,
    base_url: String,
}

impl Server {
    fn start(args: &[&str]) -> Server {
        let model = longctx::fetch::resolve_model(None).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_longctx"))
            .args(["serve", "--port", "0", "--model"])
            .arg(&model)
            .args(args)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        // Keeps draining stderr after start-up so the server never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[server] {line}");
                if let Some(addr) = line.split("serving on ").nth(1) {
                    let _ = tx.send(addr.split_whitespace().next().unwrap_or("").to_string());
                }
            }
        });
        let base_url = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("the server did not say where it listens");
        Server { child, base_url }
    }

    fn assert_alive(&mut self) {
        assert!(
            self.child.try_wait().unwrap().is_none(),
            "the server exited during the tests"
        );
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Python with the `openai` package: the one on PATH when it has it (CI installs it), else a
/// virtual environment made once under the target directory.
fn python_with_openai() -> PathBuf {
    let has_openai = |python: &Path| {
        Command::new(python)
            .args(["-c", "import openai, httpx"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let system = PathBuf::from("python3");
    if has_openai(&system) {
        return system;
    }
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("openai-venv");
    let python = venv.join("bin/python");
    if !has_openai(&python) {
        let made = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .unwrap();
        assert!(made.success(), "python3 -m venv failed");
        let installed = Command::new(&python)
            .args(["-m", "pip", "install", "--quiet", "openai"])
            .status()
            .unwrap();
        assert!(installed.success(), "pip install openai failed");
    }
    python
}

#[test]
fn the_openai_client_gets_what_openai_would_give_it() {
    let python = python_with_openai();
    let mut server = Server::start(&[
        "--ctx",
        "1024",
        "--max-concurrent",
        "2",
        "--max-queue",
        "2",
        "--max-body-mib",
        "1",
        "--threads",
        "2",
    ]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/serve/test_openai.py");
    let status = Command::new(python)
        .arg(&script)
        .env("LONGCTX_BASE_URL", &server.base_url)
        .env("LONGCTX_CTX", "1024")
        .status()
        .unwrap();
    server.assert_alive();
    assert!(
        status.success(),
        "the openai client tests failed (see above)"
    );
}

#[test]
fn a_bad_default_policy_stops_the_server_at_start() {
    let out = Command::new(env!("CARGO_BIN_EXE_longctx"))
        .args(["serve", "--port", "0", "--kv", "snapkv:budget=0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("budget"), "{err}");
}
