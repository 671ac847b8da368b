//! `longctx eval`: run a long-context task over lengths and depths, resumably, and report it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};
use indicatif::{ProgressBar, ProgressStyle};
use longctx::chat::ChatTemplate;
use longctx::fetch::FetchConfig;
use longctx::session::{KvDtype, Session};
use longctx::spec::Spec;
use longctx_eval::report::{calibration_line, write_report, RunResults};
use longctx_eval::runner::{self, Event, ModelInfo, RunConfig, RunDir, RunLock};
use longctx_eval::task::{task_from_spec, Engine, QueryMode, TaskContext, REGISTRY};
use longctx_eval::tasks::niah::PRESETS;
use longctx_eval::tasks::passkey::{self, Passkey, Wording};
use longctx_eval::text::NaturalText;

use crate::common::{EngineArgs, ModelArgs};

#[derive(clap::Args)]
#[command(
    after_help = "Tasks: run `longctx eval list`. Reports: `longctx eval report DIR… [--out DIR]` rebuilds report.md, summary.json and the plots from one or more result folders, side by side."
)]
pub struct Args {
    /// The task as name:key=value,… (`passkey`, `niah:haystack=text`, `niah_single_2`, `ppl`,
    /// `mecw:task=passkey` …), or `list`, or `report`.
    #[arg(value_name = "TASK")]
    task: String,
    /// With `report`: the result folders to put side by side.
    #[arg(value_name = "DIR")]
    dirs: Vec<PathBuf>,
    #[command(flatten)]
    model: ModelArgs,
    /// Context lengths in tokens, prompt and answer together (1k = 1024).
    #[arg(long, value_delimiter = ',', value_parser = parse_length, default_value = "1k,2k,4k,8k")]
    lengths: Vec<usize>,
    /// Needle depths in percent of the haystack, for tasks that have one.
    #[arg(long, value_delimiter = ',', default_value = "0,25,50,75,100")]
    depths: Vec<f64>,
    /// Cases per length and depth, each with fresh random keys.
    #[arg(long, default_value_t = 1)]
    samples: u32,
    /// Seed of every random choice; a case's prompt depends only on it and the case.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Result folder (default: eval-results/TASK). Rerunning into it resumes.
    #[arg(long, short)]
    out: Option<PathBuf>,
    /// Natural text for haystacks and perplexity: `kjv` (fetched on first use) or a text file.
    #[arg(long, default_value = "kjv")]
    text: String,
    /// Send prompts as plain text instead of wrapping them in the model's chat template.
    #[arg(long)]
    no_chat: bool,
    /// Also write each case's prompt tokens to DIR/prompts.jsonl (to replay them in another engine).
    #[arg(long)]
    save_prompts: bool,
    /// What the KV policy sees of the question: `aware` compresses the whole prompt, question
    /// included, as users run it; `agnostic` prefills and compresses the context alone, then
    /// appends the question uncompressed (kvpress's protocol).
    #[arg(long, value_enum, default_value_t = QueryArg::Aware)]
    query: QueryArg,
    #[command(flatten)]
    engine: EngineArgs,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum QueryArg {
    Aware,
    Agnostic,
}

impl From<QueryArg> for QueryMode {
    fn from(q: QueryArg) -> Self {
        match q {
            QueryArg::Aware => Self::Aware,
            QueryArg::Agnostic => Self::Agnostic,
        }
    }
}

pub fn parse_length(text: &str) -> Result<usize, String> {
    longctx::spec::parse_length(text)
        .ok_or_else(|| format!("`{text}` is not a length; write tokens as 4096 or 4k (1k = 1024)"))
}

pub fn main(args: Args) -> Result<()> {
    match args.task.as_str() {
        "list" => list(),
        "report" => report(&args),
        _ => evaluate(args),
    }
}

fn list() -> Result<()> {
    for entry in REGISTRY {
        println!("{:<18} {}", entry.name, entry.about);
    }
    for (name, params) in PRESETS {
        println!("{name:<18} RULER preset: niah:{params}");
    }
    Ok(())
}

fn report(args: &Args) -> Result<()> {
    if args.dirs.is_empty() {
        bail!("`longctx eval report` needs one or more result folders: longctx eval report DIR… [--out DIR]");
    }
    let runs = args
        .dirs
        .iter()
        .map(|d| RunResults::load(d))
        .collect::<Result<Vec<_>, _>>()?;
    let out = args.out.clone().unwrap_or_else(|| {
        if runs.len() == 1 {
            args.dirs[0].clone()
        } else {
            PathBuf::from("eval-results/comparison")
        }
    });
    for path in write_report(&out, &runs)? {
        println!("{}", path.display());
    }
    Ok(())
}

fn evaluate(args: Args) -> Result<()> {
    if !args.dirs.is_empty() {
        bail!(
            "unexpected argument `{}`: only `longctx eval report` takes folders",
            args.dirs[0].display()
        );
    }
    let mut spec: Spec = args.task.parse()?;
    // `passkey:wording=auto` is built with a stand-in wording until calibration chooses one, so
    // its other parameters are checked before the model loads.
    let auto_wording = auto_wording(&mut spec)?;
    let mut task = task_from_spec(&spec)?;
    if args.lengths.is_empty() {
        bail!("--lengths is empty; give at least one length, e.g. --lengths 1k,2k");
    }
    if let Some(d) = args.depths.iter().find(|d| !(0.0..=100.0).contains(*d)) {
        bail!("depth {d} is outside 0–100; depths are percentages of the haystack");
    }
    if args.samples == 0 {
        bail!("--samples must be at least 1");
    }
    // A bad --rope or --kv is reported before the model loads, not after.
    args.engine.session_options(0)?;
    let mut lengths = args.lengths.clone();
    lengths.sort_unstable();
    lengths.dedup();
    // Planned before the folder is touched, so a sweep the task refuses (a span too short for a
    // length) leaves nothing behind.
    let mut cases = runner::plan(task.as_ref(), &lengths, &args.depths, args.samples)?;
    if args.save_prompts && task.as_synthetic().is_none() {
        bail!(
            "--save-prompts is for tasks that generate an answer, not `{}`",
            task.spec()
        );
    }
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("eval-results").join(slug(&args.task)));
    // Taken before the model loads, so a second run into the folder is refused at once, and
    // held through calibration too, which writes under it.
    let lock = RunLock::acquire(&out)?;

    let model = args.model.load()?;
    let model_path = longctx::fetch::resolve_model(args.model.model.as_deref())?;
    let sha256 = longctx::fetch::file_sha256(&model_path)?;
    let chat = match (&model.chat_template, args.no_chat) {
        (Some(source), false) => {
            let tok = &model.tokenizer;
            let token_text = |id: Option<u32>| id.and_then(|id| tok.token_text(id)).unwrap_or("");
            Some(ChatTemplate::new(
                source,
                token_text(tok.bos()),
                token_text(tok.eos()),
            )?)
        }
        (None, false) => {
            eprintln!(
                "note: the model has no chat template (a base model): prompts are plain text ending in the answer prefix, as RULER prompts base models"
            );
            None
        }
        (_, true) => None,
    };
    let text = if task.needs_text() {
        Some(Arc::new(load_text(&args.text)?))
    } else {
        None
    };

    let max_length = *lengths.last().expect("lengths is not empty");
    let trained = model.trained_ctx();
    if max_length > trained && args.engine.rope == "none" {
        eprintln!(
            "note: lengths past the model's trained {trained} tokens run with its own RoPE (--rope none); expect it to break down there"
        );
    }
    let mut session = Session::new(model.clone(), args.engine.session_options(max_length)?)?;
    // Recorded as the session resolved it (`auto:…` becomes the scheme that ran).
    let options = session.options().clone();
    let mut config = RunConfig {
        task: task.spec(),
        model: ModelInfo {
            file: model_path
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
            sha256,
            architecture: format!("{:?}", model.config.arch).to_lowercase(),
            trained_ctx: trained,
        },
        rope: options.rope.to_string(),
        kv: session.policy_spec(),
        query: args.query.into(),
        kv_dtype: match options.kv_dtype {
            KvDtype::F16 => "f16".into(),
            KvDtype::F32 => "f32".into(),
        },
        chunk_size: args.engine.chunk_size,
        chat_template: chat.is_some(),
        seed: args.seed,
        text: text.as_ref().map(|t| t.source.clone()),
        longctx_version: env!("CARGO_PKG_VERSION").to_string(),
    };
    let ctx = TaskContext {
        model,
        chat,
        text,
        seed: args.seed,
    };
    let mut engine = Engine {
        session: &mut session,
        query: args.query.into(),
    };
    if let Some(digits) = auto_wording {
        let chosen = choose_wording(&config, &ctx, &mut engine, &out, digits)?;
        config.task = longctx_eval::Task::spec(&chosen);
        task = Box::new(chosen);
        cases = runner::plan(task.as_ref(), &lengths, &args.depths, args.samples)?;
    }
    let mut dir = RunDir::open_locked(lock, &config)?;
    if let Some(synthetic) = task.as_synthetic().filter(|_| args.save_prompts) {
        save_prompts(&out, synthetic, &ctx, &cases)?;
    }
    let mut progress = Progress::default();
    runner::run(
        task.as_ref(),
        &ctx,
        &mut engine,
        &mut dir,
        &cases,
        &mut |event| progress.on(event),
    )?;
    progress.finish();
    let run = RunResults::load(&out)?;
    if let Some(line) = calibration_line(&run) {
        eprintln!("{line}");
    }
    write_report(&out, &[run])?;
    print_summary(&out);
    Ok(())
}

/// For `passkey:wording=auto`, replaces the wording with a stand-in (so the spec builds and its
/// other parameters are checked) and returns the key length calibration will use.
fn auto_wording(spec: &mut Spec) -> Result<Option<u32>> {
    let [part] = spec.parts.as_mut_slice() else {
        return Ok(None);
    };
    if part.name != "passkey" {
        return Ok(None);
    }
    let Some(wording) = part.params.iter_mut().find(|(k, _)| k == "wording") else {
        return Ok(None);
    };
    if wording.1 != passkey::AUTO {
        return Ok(None);
    }
    wording.1 = Wording::ALL[0].name().to_string();
    Ok(Some(Passkey::from_spec(part)?.digits))
}

/// Runs every passkey wording at lengths inside the trained window (resumable, under
/// OUT/calibration) and returns the task with the wording the model retrieves best.
fn choose_wording(
    config: &RunConfig,
    ctx: &TaskContext,
    engine: &mut Engine,
    out: &Path,
    digits: u32,
) -> Result<Passkey> {
    let lengths =
        passkey::calibration_lengths(config.model.trained_ctx, engine.session.options().n_ctx);
    eprintln!(
        "choosing the passkey wording: each of {} at {} tokens, depths {:?}",
        Wording::ALL.map(|w| w.name()).join(", "),
        lengths
            .iter()
            .map(|l| l.to_string())
            .collect::<Vec<_>>()
            .join(" and "),
        passkey::CALIBRATION_DEPTHS
    );
    let mut progress = Progress::default();
    let (chosen, scores) = passkey::calibrate(
        config,
        ctx,
        engine,
        &out.join("calibration"),
        &lengths,
        digits,
        &mut |event| progress.on(event),
    )?;
    progress.finish();
    for s in &scores {
        eprintln!(
            "  {:<8} {:>5.1} over {} cases",
            s.wording.name(),
            s.score,
            s.cases
        );
    }
    eprintln!(
        "using passkey:wording={} (folders in {})",
        chosen.wording.name(),
        out.join("calibration").display()
    );
    Ok(chosen)
}

pub fn load_text(name: &str) -> Result<NaturalText> {
    if name == "kjv" {
        if !longctx::fetch::is_cached(&longctx_eval::text::KJV) {
            eprintln!("fetching the natural text (King James Bible, public domain) …");
        }
        return Ok(NaturalText::kjv(&FetchConfig::from_env())?);
    }
    let path = Path::new(name);
    if !path.is_file() {
        bail!("--text `{name}` is neither `kjv` nor a text file");
    }
    Ok(NaturalText::from_file(path)?)
}

/// Writes the synthesised prompts, so another engine can be fed exactly the same tokens.
fn save_prompts(
    out: &Path,
    synthetic: &dyn longctx_eval::task::Synthetic,
    ctx: &TaskContext,
    cases: &[longctx_eval::Case],
) -> Result<()> {
    let mut lines = String::new();
    for case in cases {
        let prompt = synthetic.synthesise(case, ctx)?;
        lines.push_str(&serde_json::to_string(&serde_json::json!({
            "length": case.length,
            "depth": case.depth,
            "sample": case.sample,
            "tokens": prompt.tokens,
            "answers": prompt.answers,
            "max_new_tokens": prompt.max_new_tokens,
        }))?);
        lines.push('\n');
    }
    runner::write_atomic(&out.join("prompts.jsonl"), &lines)?;
    Ok(())
}

fn print_summary(out: &Path) {
    let report = out.join("report.md");
    eprintln!("results: {}", out.join(runner::RESULTS_FILE).display());
    eprintln!("report:  {}", report.display());
}

fn slug(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// A progress bar weighted by case length, since a 16k case costs many 1k cases.
#[derive(Default)]
struct Progress {
    bar: Option<ProgressBar>,
    done: usize,
    total: usize,
}

impl Progress {
    fn on(&mut self, event: Event) {
        match event {
            Event::Start {
                total,
                done,
                pending_tokens,
            } => {
                self.done = done;
                self.total = total;
                if done > 0 {
                    eprintln!("resuming: {done} of {total} cases already done");
                }
                let bar = ProgressBar::new(pending_tokens.iter().map(|&t| t as u64).sum());
                bar.set_style(
                    ProgressStyle::with_template(
                        "{spinner} [{elapsed_precise}] {bar:30} {msg} · {per_sec} · ETA {eta}",
                    )
                    .expect("the template is valid")
                    .progress_chars("=> "),
                );
                bar.enable_steady_tick(Duration::from_millis(500));
                bar.set_message(format!("{done}/{total} cases"));
                self.bar = Some(bar);
            }
            Event::Finished(record) => {
                self.done += 1;
                if let Some(bar) = &self.bar {
                    bar.inc(record.case.length as u64);
                    let score = record
                        .outcome
                        .score
                        .map(|s| format!(", last {s:.0}"))
                        .unwrap_or_default();
                    bar.set_message(format!("{}/{} cases{score}", self.done, self.total));
                }
            }
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}
