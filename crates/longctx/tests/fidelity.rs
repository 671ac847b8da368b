//! Fidelity against llama.cpp: the engine must give the logits llama.cpp gives on the same file.
//!
//! The golden data come from llama.cpp through llama-cpp-python, made by the scripts beside them:
//! `tests/fixtures/smollm2/make_fixtures.py` (the default model: per-token NLL over a 2.8K-token
//! text, greedy continuations), `tests/fixtures/gemma3/make_fixtures.py` (the same for Gemma 3
//! 270M, with its token ids on the tokenizer corpus) and `tests/fixtures/models/make_models.py` (tiny random-weight
//! models, one per weight type and architecture feature, with full logits fed in one batch and
//! fed one token at a time).
//!
//! The SmolLM2 tests need the default model: `LONGCTX_TEST_MODEL` (a path or a model name) if set,
//! otherwise whatever `fetch::resolve_model(None)` finds or fetches; the Gemma 3 tests take
//! `LONGCTX_GEMMA_MODEL`, otherwise the model `gemma3`, fetched on first use.
//!
//! Every test takes one lock: the forward passes each use two threads, and on a two-core machine
//! running them side by side would only make each slower and the timings meaningless.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use longctx::session::{Model, Session, SessionOptions};
use serde::Deserialize;
use sha2::{Digest, Sha256};

const THREADS: usize = 2;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    // A failed test poisons the lock; the next one should still run.
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> T {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("cannot parse {}: {e}", path.display()))
}

fn session(model: &Arc<Model>, n_ctx: usize) -> Session {
    let options = SessionOptions {
        n_ctx,
        threads: THREADS,
        ..Default::default()
    };
    Session::new(model.clone(), options).expect("session")
}

/// Index of the largest value; the first one on a tie, as numpy's stable argsort picks.
fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best
}

fn log_sum_exp(row: &[f32]) -> f64 {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    max + row
        .iter()
        .map(|&v| (v as f64 - max).exp())
        .sum::<f64>()
        .ln()
}

// ---------------------------------------------------------------------------------------------
// SmolLM2-135M-Instruct (Q4_1)
//
// How close can a second engine get? The fixtures measure llama.cpp against itself: the same
// tokens fed one at a time instead of in 512-token batches (single-row kernels, so different
// float32 rounding, which q8 activation quantization then amplifies over 30 layers). That moves
// the mean NLL by 0.07%, each token's NLL by 0.060 on average (1.9% of the mean), and changes the
// top-1 token at 4% of positions, all of them positions where the two best logits are within
// 0.5 of each other. The limits below sit just outside that floor; a real bug (a wrong position,
// a misread block) lands far outside it.

#[derive(Deserialize)]
struct ModelId {
    file: String,
    sha256: String,
}

#[derive(Deserialize)]
struct NllFixture {
    model: ModelId,
    settings: NllSettings,
    ids: Vec<u32>,
    nll: Vec<f64>,
    top1_id: Vec<usize>,
    top1_logit: Vec<f64>,
    top2_logit: Vec<f64>,
    llama_cpp_token_by_token: SelfCheck,
}

#[derive(Deserialize)]
struct NllSettings {
    n_ctx: usize,
}

#[derive(Deserialize)]
struct SelfCheck {
    mean_nll_relative_difference: f64,
    per_token_mean_abs_diff: f64,
    top1_agreement: f64,
}

#[derive(Deserialize)]
struct GreedyFixture {
    model: ModelId,
    n_generate: usize,
    cases: Vec<GreedyCase>,
}

#[derive(Deserialize)]
struct GreedyCase {
    index: usize,
    prompt: String,
    prompt_ids: Vec<u32>,
    continuation_ids: Vec<u32>,
    margins: Vec<f64>,
    prompt_token_by_token_first_diff: Option<usize>,
}

/// The default model, loaded once and checked to be the file the fixtures were made from:
/// comparing against the logits of a different quantization would fail for no fault of ours.
fn smollm2(expected: &ModelId) -> Arc<Model> {
    static MODEL: OnceLock<(Arc<Model>, String)> = OnceLock::new();
    checked(&MODEL, "LONGCTX_TEST_MODEL", None, expected)
}

/// Gemma 3 270M: `LONGCTX_GEMMA_MODEL` (a path) if set, else fetched by name.
fn gemma3(expected: &ModelId) -> Arc<Model> {
    static MODEL: OnceLock<(Arc<Model>, String)> = OnceLock::new();
    checked(&MODEL, "LONGCTX_GEMMA_MODEL", Some("gemma3"), expected)
}

/// The model `env` names (a path or a model name), else `name` (None: the default model), loaded
/// once into `cell` and checked against the fixture's file.
fn checked(
    cell: &OnceLock<(Arc<Model>, String)>,
    env: &str,
    name: Option<&str>,
    expected: &ModelId,
) -> Arc<Model> {
    let (model, sha) = cell.get_or_init(|| {
        let spec = std::env::var(env).ok().filter(|s| !s.is_empty());
        let path = longctx::fetch::resolve_model(spec.as_deref().or(name))
            .unwrap_or_else(|e| panic!("the fidelity tests need {}: {e}", expected.file));
        let bytes =
            std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        let sha = format!("{:x}", Sha256::digest(&bytes));
        let model =
            Model::load(&path).unwrap_or_else(|e| panic!("cannot load {}: {e}", path.display()));
        (model, sha)
    });
    assert_eq!(
        sha, &expected.sha256,
        "the fixtures were made from {} with sha256 {}; {env} points at another file",
        expected.file, expected.sha256
    );
    model.clone()
}

/// Per-token NLL over our own 2,787-token text, one chunked prefill as the engine does by default
/// (512-token chunks, like llama.cpp's 512-token ubatches).
///
/// The engine reproduces llama.cpp's arithmetic (same chunking, same kernels' rounding), so the
/// limits are the issue's, well inside what llama.cpp achieves against itself when fed
/// differently: mean NLL within 1%, per-token NLL within 1% of the mean on average, top-1 agreement
/// at least 99% overall and where llama.cpp's best logit leads by 0.25 or more.
#[test]
fn smollm2_nll_matches_llama_cpp() {
    let _guard = serial();
    let fx: NllFixture = read_json(&fixtures().join("smollm2/nll.json"));
    nll_matches("smollm2", &smollm2(&fx.model), &fx);
}

/// Factor 1 leaves the default model as trained, bit for bit (issue 19, item 7: the first
/// token's logprob was −1.930 under `linear:factor=1` against −1.776 under `none`).
#[test]
fn smollm2_factor_1_is_none_bit_for_bit() {
    let _guard = serial();
    let fx: NllFixture = read_json(&fixtures().join("smollm2/nll.json"));
    let model = smollm2(&fx.model);
    let ids = &fx.ids[..600];
    let logits = |rope: &str| {
        let options = SessionOptions {
            n_ctx: 1024,
            threads: THREADS,
            rope: rope.parse().unwrap(),
            ..Default::default()
        };
        let mut s = Session::new(model.clone(), options).unwrap();
        s.prefill(ids).unwrap().to_vec()
    };
    let own = logits("none");
    for rope in ["linear:factor=1", "ntk:factor=1", "yarn:factor=1"] {
        let ours = logits(rope);
        assert!(
            ours.iter()
                .zip(&own)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{rope} is not none: {:?} against {:?}",
            &ours[..4],
            &own[..4]
        );
    }
}

/// The same on Gemma 3 (BOS first), whose 2,400 tokens run well past the local layers' 512-token
/// window: a window off by one, or local layers rotated with the global base, lands far outside
/// the limits.
#[test]
fn gemma3_nll_matches_llama_cpp() {
    let _guard = serial();
    let fx: NllFixture = read_json(&fixtures().join("gemma3/nll.json"));
    nll_matches("gemma3", &gemma3(&fx.model), &fx);
}

fn nll_matches(name: &str, model: &Arc<Model>, fx: &NllFixture) {
    const MAX_MEAN_REL: f64 = 0.01;
    const MAX_PER_TOKEN_REL: f64 = 0.01;
    const MIN_TOP1: f64 = 0.99;
    const CLEAR_LEAD: f64 = 0.25;
    const MIN_TOP1_CLEAR: f64 = 0.99;
    let vocab = model.tokenizer.vocab_size();
    let n = fx.ids.len();
    assert_eq!(fx.nll.len(), n - 1);

    let mut s = session(model, fx.settings.n_ctx);
    let start = Instant::now();
    let all = s.prefill_all_logits(&fx.ids).expect("prefill");
    let elapsed = start.elapsed();
    assert_eq!(all.len(), n * vocab);

    let mut ours = Vec::with_capacity(n - 1);
    let (mut agree, mut clear, mut agree_clear) = (0usize, 0usize, 0usize);
    for (i, row) in all.chunks_exact(vocab).enumerate() {
        if i + 1 < n {
            ours.push(log_sum_exp(row) - row[fx.ids[i + 1] as usize] as f64);
        }
        let same = argmax(row) == fx.top1_id[i];
        agree += usize::from(same);
        if fx.top1_logit[i] - fx.top2_logit[i] >= CLEAR_LEAD {
            clear += 1;
            agree_clear += usize::from(same);
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (mean_ours, mean_llama) = (mean(&ours), mean(&fx.nll));
    let abs_diffs: Vec<f64> = ours
        .iter()
        .zip(&fx.nll)
        .map(|(a, b)| (a - b).abs())
        .collect();
    let per_token = mean(&abs_diffs);
    let worst = abs_diffs
        .iter()
        .enumerate()
        .fold((0, 0.0f64), |w, (i, &d)| if d > w.1 { (i, d) } else { w });
    let mean_rel = (mean_ours - mean_llama).abs() / mean_llama;
    let top1 = agree as f64 / n as f64;
    let top1_clear = agree_clear as f64 / clear as f64;
    let floor = &fx.llama_cpp_token_by_token;
    eprintln!(
        "{name} nll: {n} tokens in {:.1} s; mean NLL ours {mean_ours:.5}, llama.cpp {mean_llama:.5}: \
         {:.3}% apart (llama.cpp vs itself {:.3}%); per-token mean |diff| {per_token:.5} \
         (llama.cpp vs itself {:.5}), worst {:.4} at position {}; top-1 agreement {:.2}% \
         (llama.cpp vs itself {:.2}%), {:.2}% of {clear} positions with a lead >= {CLEAR_LEAD}",
        elapsed.as_secs_f64(),
        100.0 * mean_rel,
        100.0 * floor.mean_nll_relative_difference,
        floor.per_token_mean_abs_diff,
        worst.1,
        worst.0,
        100.0 * top1,
        100.0 * floor.top1_agreement,
        100.0 * top1_clear,
    );
    assert!(
        mean_rel <= MAX_MEAN_REL,
        "mean NLL differs from llama.cpp's by {:.3}% (limit {:.1}%)",
        100.0 * mean_rel,
        100.0 * MAX_MEAN_REL
    );
    // A mean can agree while the tokens behind it do not: errors of both signs cancel.
    assert!(
        per_token <= MAX_PER_TOKEN_REL * mean_llama,
        "per-token NLL differs from llama.cpp's by {per_token:.4} on average ({:.2}% of the mean, limit {:.0}%)",
        100.0 * per_token / mean_llama,
        100.0 * MAX_PER_TOKEN_REL
    );
    assert!(
        top1 >= MIN_TOP1,
        "top-1 agrees with llama.cpp at only {:.2}% of positions (limit {:.0}%)",
        100.0 * top1,
        100.0 * MIN_TOP1
    );
    assert!(
        top1_clear >= MIN_TOP1_CLEAR,
        "top-1 agrees with llama.cpp at only {:.2}% of the {clear} positions where its lead is >= {CLEAR_LEAD} \
         (limit {:.0}%)",
        100.0 * top1_clear,
        100.0 * MIN_TOP1_CLEAR
    );
}

/// Greedy decoding of 24 prompts for 64 tokens each: prefill the prompt, then decode the argmax
/// one token at a time, as llama.cpp did (it did not stop at EOS, so neither do we).
///
/// At least `MIN_EXACT` (20, the bar) of the 24 must match all 64 tokens, and none may
/// diverge where llama.cpp's lead was `NEAR_TIE` (0.5) or more. For scale: llama.cpp itself, fed
/// the prompt one token at a time, leaves the stored path in 9 of the 24 (at leads of 0.03 to
/// 0.31), so these limits hold only for an engine that computes as llama.cpp does.
#[test]
fn smollm2_greedy_matches_llama_cpp() {
    let _guard = serial();
    let fx: GreedyFixture = read_json(&fixtures().join("smollm2/greedy.json"));
    greedy_matches("smollm2", &smollm2(&fx.model), &fx);
}

/// The same on Gemma 3: 24 plain prompts (a base model), BOS first.
#[test]
fn gemma3_greedy_matches_llama_cpp() {
    let _guard = serial();
    let fx: GreedyFixture = read_json(&fixtures().join("gemma3/greedy.json"));
    greedy_matches("gemma3", &gemma3(&fx.model), &fx);
}

fn greedy_matches(name: &str, model: &Arc<Model>, fx: &GreedyFixture) {
    const NEAR_TIE: f64 = 0.5;
    const MIN_EXACT: usize = 20;
    let start = Instant::now();
    let longest = fx
        .cases
        .iter()
        .map(|c| c.prompt_ids.len())
        .max()
        .unwrap_or(0);
    let mut s = session(model, (longest + fx.n_generate).next_power_of_two());

    let mut exact = 0;
    let mut forgiven = Vec::new();
    let mut failures = Vec::new();
    for case in &fx.cases {
        assert_eq!(case.continuation_ids.len(), fx.n_generate);
        s.reset();
        let mut logits = s.prefill(&case.prompt_ids).expect("prefill").to_vec();
        let mut diverged = None;
        for (step, &want) in case.continuation_ids.iter().enumerate() {
            let got = argmax(&logits) as u32;
            if got != want {
                let ours_lead = logits[got as usize] - logits[want as usize];
                diverged = Some((step, got, want, ours_lead));
                break;
            }
            if step + 1 < fx.n_generate {
                logits = s.decode(got).expect("decode").to_vec();
            }
        }
        let Some((step, got, want, ours_lead)) = diverged else {
            exact += 1;
            continue;
        };
        let line = format!(
            "prompt {} {:?}: first difference at step {step}: ours {got}, llama.cpp {want} \
             (llama.cpp's lead {:.4}, ours {ours_lead:.4}; llama.cpp fed token by token leaves at {:?})",
            case.index, case.prompt, case.margins[step], case.prompt_token_by_token_first_diff
        );
        if case.margins[step] < NEAR_TIE {
            forgiven.push(line);
        } else {
            failures.push(line);
        }
    }
    eprintln!(
        "{name} greedy: {exact}/{} prompts identical for {} tokens in {:.1} s",
        fx.cases.len(),
        fx.n_generate,
        start.elapsed().as_secs_f64()
    );
    for line in &forgiven {
        eprintln!("  near tie: {line}");
    }
    assert!(
        failures.is_empty() && exact >= MIN_EXACT,
        "greedy continuations differ from llama.cpp's ({exact} identical, {MIN_EXACT} needed):\n{}",
        failures
            .iter()
            .chain(&forgiven)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[derive(Deserialize)]
struct TokensFixture {
    model: ModelId,
    cases: Vec<TokenCase>,
}

#[derive(Deserialize)]
struct TokenCase {
    plain: Vec<u32>,
    special: Vec<u32>,
}

/// Gemma's SentencePiece vocabulary (262k pieces, byte fallback, no space prefix, BOS) on every
/// string of the tokenizer corpus, with special-token parsing off and on.
#[test]
fn gemma3_ids_match_llama_cpp() {
    let fx: TokensFixture = read_json(&fixtures().join("gemma3/tokens.json"));
    let corpus: Vec<String> = read_json(&fixtures().join("tokenizer/corpus.json"));
    assert_eq!(corpus.len(), fx.cases.len(), "one case per corpus string");
    let model = gemma3(&fx.model);
    let mut differ = Vec::new();
    for (i, (text, case)) in corpus.iter().zip(&fx.cases).enumerate() {
        for (parse_special, want) in [(false, &case.plain), (true, &case.special)] {
            let got = model
                .tokenizer
                .encode(text, true, parse_special)
                .expect("encode");
            if &got != want {
                differ.push(format!(
                    "string {i} {text:?} (special parsing {parse_special}): ours {got:?}, llama.cpp {want:?}"
                ));
            }
        }
    }
    assert!(
        differ.is_empty(),
        "{} of {} encodings differ from llama.cpp's:\n{}",
        differ.len(),
        2 * corpus.len(),
        differ.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// Tiny random-weight models: one per weight type, plus rope_freqs, qwen2 and tied embeddings.

#[derive(Deserialize)]
struct TinyFixture {
    file: String,
    weight_type: String,
    n_vocab: usize,
    ids: Vec<u32>,
    /// All ids fed in one batch.
    logits: Vec<Vec<f64>>,
    /// The ids fed one at a time.
    logits_token_by_token: Vec<Vec<f64>>,
}

/// Allowed (max |diff|, mean |diff|), in units of the standard deviation of llama.cpp's logits.
///
/// llama.cpp rounds activations before each matrix product to the format it pairs with the
/// weights, and stores K and V as f16. Measured against an exact float64 forward pass of the same
/// stored weights (`vs_f64_reference` in each fixture), that rounding costs, as max / mean:
/// F32 0.0017 / 0.0003 std (the f16 cache), F16 0.0036 / 0.0006, BF16 0.019 / 0.004, and for the
/// q8-activation types 0.075–0.15 / 0.015–0.025. In these random networks a single f16 or q8
/// rounding that falls the other way moves the later logits by ~0.06–0.1 std: llama.cpp's own
/// batched and one-token-at-a-time results differ by that much on the K-quant and rope_freqs
/// models (`token_by_token_vs_batch_max_abs_diff`), so a correct engine may land anywhere within
/// that band. The limits are about twice the measured band. Real mistakes cost far more:
/// ignoring `rope_freqs` moves the logits of its model by up to 1.4 std, rotating qwen2's pairs
/// the llama way by up to 2.8 std.
fn tolerance(weight_type: &str) -> (f64, f64) {
    match weight_type {
        "F32" => (0.005, 0.001),
        "F16" => (0.01, 0.002),
        "BF16" => (0.05, 0.01),
        _ => (0.25, 0.04),
    }
}

fn tiny_fixtures() -> Vec<(String, Arc<Model>, TinyFixture)> {
    let dir = fixtures().join("models");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    paths.sort();
    assert!(
        paths.len() >= 11,
        "expected the tiny model fixtures in {}",
        dir.display()
    );
    paths
        .into_iter()
        .map(|p| {
            let fx: TinyFixture = read_json(&p);
            let name = p.file_stem().unwrap().to_string_lossy().into_owned();
            let model = Model::load(&dir.join(&fx.file))
                .unwrap_or_else(|e| panic!("{name}: cannot load: {e}"));
            assert_eq!(
                model.tokenizer.vocab_size(),
                fx.n_vocab,
                "{name}: vocabulary size"
            );
            (name, model, fx)
        })
        .collect()
}

fn std_dev(rows: &[Vec<f64>]) -> f64 {
    let n = rows.iter().map(Vec::len).sum::<usize>() as f64;
    let mean = rows.iter().flatten().sum::<f64>() / n;
    (rows
        .iter()
        .flatten()
        .map(|v| (v - mean).powi(2))
        .sum::<f64>()
        / n)
        .sqrt()
}

/// Compares `ours` (row-major `[positions, vocab]`) with reference rows under the tolerance of
/// `weight_type`; returns a one-line report and whether it passed.
fn compare(name: &str, weight_type: &str, ours: &[f32], reference: &[Vec<f64>]) -> (String, bool) {
    let vocab = reference[0].len();
    assert_eq!(ours.len(), reference.len() * vocab, "{name}: logits shape");
    let std = std_dev(reference);
    let (max_tol, mean_tol) = tolerance(weight_type);
    let (mut max_diff, mut sum_diff, mut worst_pos) = (0.0f64, 0.0f64, 0);
    let mut argmax_bad = Vec::new();
    let mut near_ties = 0;
    for (pos, (row, theirs)) in ours.chunks_exact(vocab).zip(reference).enumerate() {
        for (&a, &b) in row.iter().zip(theirs) {
            // NaN would slip through every comparison below; count it as infinitely wrong.
            let d = if a.is_finite() {
                (a as f64 - b).abs()
            } else {
                f64::INFINITY
            };
            sum_diff += d;
            if d > max_diff {
                (max_diff, worst_pos) = (d, pos);
            }
        }
        // Rounding can only swap the top token where the reference's two best logits are about
        // as close as the typical (mean) difference; the max tolerance would excuse nearly every
        // position of these flat random-weight distributions.
        let theirs_f32: Vec<f32> = theirs.iter().map(|&v| v as f32).collect();
        let (best, got) = (argmax(&theirs_f32), argmax(row));
        let second = theirs
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != best)
            .fold(f64::NEG_INFINITY, |m, (_, &v)| m.max(v));
        if theirs[best] - second < 2.0 * mean_tol * std {
            near_ties += 1;
        } else if got != best {
            argmax_bad.push(format!("position {pos}: ours {got}, reference {best}"));
        }
    }
    let mean_diff = sum_diff / ours.len() as f64;
    let ok = max_diff <= max_tol * std && mean_diff <= mean_tol * std && argmax_bad.is_empty();
    let report = format!(
        "{name:24} {weight_type:5}: max |diff| {max_diff:.2e} ({:.4} std, limit {max_tol}) at position {worst_pos}, \
         mean {mean_diff:.2e} ({:.5} std, limit {mean_tol}); {near_ties} near ties excused; argmax differs: [{}]",
        max_diff / std,
        mean_diff / std,
        argmax_bad.join("; ")
    );
    (report, ok)
}

/// All ids in one prefill, against llama.cpp's batched logits.
#[test]
fn tiny_models_prefill_matches_llama_cpp() {
    let _guard = serial();
    let mut failures = Vec::new();
    for (name, model, fx) in tiny_fixtures() {
        let ours = session(&model, 0)
            .prefill_all_logits(&fx.ids)
            .expect("prefill");
        let (report, ok) = compare(&name, &fx.weight_type, &ours, &fx.logits);
        eprintln!("{report}");
        if !ok {
            failures.push(report);
        }
    }
    assert!(
        failures.is_empty(),
        "logits differ from llama.cpp's:\n{}",
        failures.join("\n")
    );
}

/// One token of prefill, then decoding the rest one at a time: against llama.cpp fed the same
/// way, and against our own batched prefill. Neither equality is exact: llama.cpp's one-row
/// kernels round differently from its batched ones, by up to 0.1 std on these models, so the
/// same per-type tolerance applies. A cache that loses, misplaces or mis-rotates a token costs
/// whole standard deviations.
#[test]
fn tiny_models_decode_matches_llama_cpp() {
    let _guard = serial();
    let mut failures = Vec::new();
    for (name, model, fx) in tiny_fixtures() {
        let mut s = session(&model, 0);
        let batch = s.prefill_all_logits(&fx.ids).expect("prefill");
        s.reset();
        let mut decoded = Vec::with_capacity(batch.len());
        for (pos, &id) in fx.ids.iter().enumerate() {
            let row = if pos == 0 {
                s.prefill(&[id])
            } else {
                s.decode(id)
            }
            .expect("step");
            decoded.extend_from_slice(row);
        }
        let vocab = fx.n_vocab;
        let batch_rows: Vec<Vec<f64>> = batch
            .chunks_exact(vocab)
            .map(|r| r.iter().map(|&v| v as f64).collect())
            .collect();
        for (label, reference) in [
            ("vs llama.cpp", &fx.logits_token_by_token),
            ("vs our prefill", &batch_rows),
        ] {
            let (report, ok) = compare(&name, &fx.weight_type, &decoded, reference);
            eprintln!("{report} ({label})");
            if !ok {
                failures.push(format!("{report} ({label})"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "one-token decoding disagrees:\n{}",
        failures.join("\n")
    );
}
