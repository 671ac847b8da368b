//! `longctx rope-search`: LongRoPE's evolutionary search for per-dimension RoPE factors, with
//! perplexity at the target length from the eval harness as the objective.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use longctx::positions::{self, Base, LongRopeFactors, PositionScheme};
use longctx::session::{Session, SessionOptions};
use longctx_eval::rope_search::{self, SearchConfig, SearchDir, SearchEvent};
use longctx_eval::task::{Engine, QueryMode};
use longctx_eval::tasks::ppl::{Mode, Perplexity};
use longctx_eval::{Case, Task, TaskContext};

use crate::common::ModelArgs;
use crate::eval::{load_text, parse_length};

#[derive(clap::Args)]
#[command(
    after_help = "The paper's settings are --population 64 --iterations 40 --mutations 16 --crossovers 16 --parents 32; each evaluation is one perplexity run at the target length, so on a small machine start far smaller. Rerunning with the same flags resumes."
)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Length the factors are searched for (1k = 1024); perplexity is measured at it.
    #[arg(long, value_parser = parse_length)]
    target: usize,
    /// Windows of the target length scored per candidate (consecutive spans of the text).
    #[arg(long, default_value_t = 1)]
    samples: usize,
    #[arg(long, default_value_t = 64)]
    population: usize,
    #[arg(long, default_value_t = 40)]
    iterations: usize,
    /// New candidates per iteration made by mutating a parent.
    #[arg(long, default_value_t = 16)]
    mutations: usize,
    /// New candidates per iteration made by crossing two parents.
    #[arg(long, default_value_t = 16)]
    crossovers: usize,
    /// Best candidates kept as parents each iteration.
    #[arg(long, default_value_t = 32)]
    parents: usize,
    /// Chance that a mutation redraws each factor.
    #[arg(long, default_value_t = 0.3)]
    mutation_prob: f64,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Natural text to measure perplexity on: `kjv` (fetched on first use) or a text file.
    #[arg(long, default_value = "kjv")]
    text: String,
    /// Search folder (default: rope-search/TARGET). Rerunning into it resumes.
    #[arg(long, short)]
    out: Option<PathBuf>,
    /// Worker threads for the forward pass (default: all cores).
    #[arg(long, short)]
    threads: Option<usize>,
}

pub fn main(args: Args) -> Result<()> {
    let model = args.model.load()?;
    let text = Arc::new(load_text(&args.text)?);
    let rope = model.rope();
    let pairs = rope.dims / 2;
    let config = SearchConfig {
        pairs,
        trained_ctx: model.trained_ctx(),
        target: args.target,
        population: args.population,
        iterations: args.iterations,
        mutations: args.mutations,
        crossovers: args.crossovers,
        parents: args.parents,
        mutation_prob: args.mutation_prob,
        step: 0.01,
        seed: args.seed,
    };
    config.check()?;
    if args.samples == 0 {
        anyhow::bail!("--samples must be at least 1");
    }
    let base = Base {
        rope,
        trained_ctx: model.trained_ctx(),
    };
    let stretch = config.stretch();
    let seeds = [("pi", "linear"), ("ntk", "ntk"), ("yarn", "yarn")].map(|(label, scheme)| {
        let spec = format!("{scheme}:factor={stretch}")
            .parse()
            .expect("a valid spec");
        let scheme = positions::build(&spec, &base, args.target).expect("seed schemes build");
        (label, seed_factors(&base, scheme.as_ref()))
    });
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("rope-search").join(args.target.to_string()));
    let mut dir = SearchDir::open(&out, &config)?;

    let ctx = TaskContext {
        model: model.clone(),
        chat: None,
        text: Some(text),
        seed: args.seed,
    };
    let task = Perplexity {
        mode: Mode::Llama,
        span: args.target * args.samples,
    };
    let candidate_file = out.join("candidate.json");
    let defaults = SessionOptions::default();
    let objective = |factors: &[f64]| -> longctx_eval::Result<f64> {
        LongRopeFactors {
            short_factor: vec![1.0; pairs],
            long_factor: factors.to_vec(),
            original_max_position_embeddings: Some(config.trained_ctx),
            max_position_embeddings: Some(config.target),
        }
        .save(&candidate_file)?;
        let options = SessionOptions {
            n_ctx: config.target,
            threads: args.threads.unwrap_or(defaults.threads),
            rope: format!("longrope:factors={}", candidate_file.display()).parse()?,
            ..SessionOptions::default()
        };
        let mut session = Session::new(model.clone(), options)?;
        let mut engine = Engine {
            session: &mut session,
            query: QueryMode::Aware,
        };
        let (mut sum, mut count) = (0.0, 0);
        for sample in 0..args.samples {
            let case = Case {
                length: config.target,
                depth: None,
                sample: sample as u32,
            };
            let outcome = task.run(&case, &ctx, &mut engine)?;
            sum += outcome.nll_sum.unwrap_or(0.0);
            count += outcome.nll_count.unwrap_or(0);
        }
        Ok((sum / count.max(1) as f64).exp())
    };
    let bar = ProgressBar::new(config.evaluations() as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} candidates · {msg} · ETA {eta}",
        )
        .expect("the template is valid")
        .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(500));
    let on = |event: SearchEvent| match event {
        SearchEvent::Start { cached, .. } if cached > 0 => {
            bar.suspend(|| eprintln!("resuming: {cached} candidates already measured"));
        }
        SearchEvent::Start { .. } => {}
        SearchEvent::Evaluated(e, cached) => {
            // Replayed measurements are instant; counting them in the rate would wreck the ETA.
            bar.inc(1);
            if cached {
                bar.reset_eta();
            }
            bar.set_message(format!("last {:.3} ({})", e.perplexity, e.origin));
        }
        SearchEvent::Generation(g) => {
            bar.suspend(|| {
                eprintln!(
                    "generation {}: best perplexity {:.4} after {} candidates",
                    g.iteration, g.best, g.evaluated
                )
            });
        }
    };
    let (best, _) = rope_search::search(&config, seeds, &mut dir, objective, on)?;
    bar.finish();
    std::fs::remove_file(&candidate_file).ok();
    eprintln!(
        "best perplexity {:.4} ({}); factors: {}",
        best.perplexity,
        best.origin,
        out.join("best.json").display()
    );
    eprintln!(
        "use them with --rope longrope:factors={}",
        out.join("best.json").display()
    );
    Ok(())
}

/// The λ_i with which LongRoPE reproduces another scheme's frequencies.
fn seed_factors(base: &Base, scheme: &dyn PositionScheme) -> Vec<f64> {
    let (mut own, mut scaled) = (Vec::new(), Vec::new());
    base.rope.frequencies(0, &mut own);
    scheme.frequencies(0, &mut scaled);
    rope_search::factors_between(&own, &scaled)
}
