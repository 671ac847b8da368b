//! `longctx serve` driven as applications drive it: the official `openai` Python client against
//! the real server on a free loopback port (the client's tests are in serve/test_openai.py).

use std::ffi::OsString;
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
            .env("LONGCTX_API_KEY", TEST_KEY)
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

/// The Python the client tests run under: `LONGCTX_PYTHON` or `python3`, as the model fetch uses.
fn python() -> OsString {
    std::env::var_os("LONGCTX_PYTHON").unwrap_or_else(|| OsString::from("python3"))
}

/// A folder with the packages the client tests import (serve/requirements.txt), installed once
/// under the target directory with `pip install --target`: a newcomer's machine has pip but not
/// necessarily the `venv` module (Debian ships it separately), and whatever the machine's own
/// Python has installed must not decide which client version is tested.
fn openai_client_packages() -> PathBuf {
    let requirements = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/serve/requirements.txt");
    let wanted = std::fs::read_to_string(&requirements).unwrap();
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("openai-client");
    let stamp = dir.join("installed-requirements.txt");
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(wanted.as_str()) {
        return dir;
    }
    let _ = std::fs::remove_dir_all(&dir);
    let installed = Command::new(python())
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .arg("--target")
        .arg(&dir)
        .arg("-r")
        .arg(&requirements)
        .status()
        .expect("cannot run python3; the tests need Python 3 with pip (README)");
    assert!(
        installed.success(),
        "pip install -r {requirements:?} failed"
    );
    std::fs::write(&stamp, wanted).unwrap();
    dir
}

/// The key the client tests' server requires (given through the environment, as an operator
/// should, so that `ps` does not show it).
const TEST_KEY: &str = "key-for-the-client-tests";

#[test]
fn the_openai_client_gets_what_openai_would_give_it() {
    let packages = openai_client_packages();
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
        "--alias",
        "smollm2",
    ]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/serve/test_openai.py");
    let status = Command::new(python())
        .arg("-s")
        .arg(&script)
        .env("PYTHONPATH", &packages)
        .env("LONGCTX_BASE_URL", &server.base_url)
        .env("LONGCTX_CTX", "1024")
        .env("LONGCTX_API_KEY", TEST_KEY)
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

#[test]
fn serving_beyond_loopback_needs_a_key_or_insecure() {
    let out = Command::new(env!("CARGO_BIN_EXE_longctx"))
        .args(["serve", "--port", "0", "--host", "0.0.0.0"])
        .env_remove("LONGCTX_API_KEY")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--api-key") && err.contains("--insecure"),
        "{err}"
    );
}
