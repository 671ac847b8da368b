//! LongRoPE's evolutionary search for per-dimension RoPE rescale factors (Ding et al.,
//! "LongRoPE: Extending LLM Context Window Beyond 2 Million Tokens", arXiv:2402.13753, §3 and
//! Algorithm 1; released as microsoft/LongRoPE `evolution/algorithms/dim_mono.py`).
//!
//! A candidate is one factor λ_i per rotated dimension pair (θ'_i = θ_i / λ_i), on a grid of
//! `step` within [1, 1.25·s] for a stretch s = target / trained length, and non-decreasing in i
//! (the paper's monotonic constraint, checked before any evaluation). The first population is
//! PI, NTK and YaRN for s plus mutations of them; every iteration keeps the `parents` best,
//! adds `mutations` mutants (each factor redrawn, with probability `mutation_prob`, between its
//! neighbours) and `crossovers` children (each factor from one parent or the other), and the
//! objective is the perplexity the caller measures with the factors.
//!
//! Every evaluated candidate is appended to `candidates.jsonl` at once. The search draws from a
//! seeded generator, so a rerun replays the same candidates and takes their perplexity from the
//! file instead of measuring again: an interrupted search resumes where it stopped.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::runner::{load_jsonl, write_atomic, RunLock};
use crate::{EvalError, Result};

/// The search's settings; the paper's defaults are population 64, 40 iterations, 16 mutations,
/// 16 crossovers, 32 parents, p = 0.3, step 0.01.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SearchConfig {
    /// Rotated dimension pairs of the model.
    pub pairs: usize,
    pub trained_ctx: usize,
    pub target: usize,
    pub population: usize,
    pub iterations: usize,
    pub mutations: usize,
    pub crossovers: usize,
    pub parents: usize,
    pub mutation_prob: f64,
    pub step: f64,
    pub seed: u64,
}

impl SearchConfig {
    pub fn stretch(&self) -> f64 {
        self.target as f64 / self.trained_ctx as f64
    }

    /// Largest factor allowed, 1.25·s (the paper's Table 4).
    pub fn max_factor(&self) -> f64 {
        1.25 * self.stretch()
    }

    pub fn check(&self) -> Result<()> {
        let bad = |why: String| Err(EvalError::Invalid(format!("rope-search: {why}")));
        if self.target <= self.trained_ctx {
            return bad(format!(
                "the target {} is not past the model's trained {} tokens; there is nothing to stretch",
                self.target, self.trained_ctx
            ));
        }
        if self.population < 3 {
            return bad("the population must hold at least the 3 seeds (PI, NTK, YaRN)".into());
        }
        if self.iterations == 0 || self.parents == 0 {
            return bad("iterations and parents must be at least 1".into());
        }
        if self.mutations + self.crossovers == 0 {
            return bad(
                "mutations and crossovers cannot both be 0: nothing new would be tried".into(),
            );
        }
        if !(0.0..=1.0).contains(&self.mutation_prob) || self.step.is_nan() || self.step <= 0.0 {
            return bad("the mutation probability must be in 0..1 and the step above 0".into());
        }
        Ok(())
    }

    /// Candidates the search evaluates at most.
    pub fn evaluations(&self) -> usize {
        self.population + self.iterations * (self.mutations + self.crossovers)
    }
}

/// One evaluated candidate.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Evaluated {
    pub factors: Vec<f64>,
    pub perplexity: f64,
    /// Where it came from: pi, ntk, yarn, mutation or crossover, and the iteration.
    pub origin: String,
    pub iteration: usize,
}

/// The best perplexity after each generation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Generation {
    pub iteration: usize,
    pub best: f64,
    pub evaluated: usize,
}

/// What the search reports as it goes.
pub enum SearchEvent<'a> {
    /// How many evaluations the search will make and how many the file already holds.
    Start {
        total: usize,
        cached: usize,
    },
    Evaluated(&'a Evaluated, bool),
    Generation(&'a Generation),
}

/// λ_i that turn the model's own frequencies into `scaled` ones.
pub fn factors_between(own: &[f64], scaled: &[f64]) -> Vec<f64> {
    own.iter().zip(scaled).map(|(o, s)| o / s).collect()
}

/// Onto the grid and into [1, max], then made non-decreasing by raising each factor to the one
/// before it where it falls below.
pub fn normalise(factors: &mut [f64], step: f64, max: f64) {
    let mut floor = 1.0f64;
    for f in factors.iter_mut() {
        let snapped = ((*f / step).round() * step).clamp(1.0, max);
        *f = snapped.max(floor);
        floor = *f;
    }
}

pub fn is_monotone(factors: &[f64]) -> bool {
    factors.windows(2).all(|w| w[0] <= w[1])
}

/// Each factor, with probability `p`, redrawn on the grid between its neighbours (so the
/// candidate stays non-decreasing).
pub fn mutate(parent: &[f64], config: &SearchConfig, rng: &mut ChaCha8Rng) -> Vec<f64> {
    let mut child = parent.to_vec();
    for i in 0..child.len() {
        if rng.random::<f64>() >= config.mutation_prob {
            continue;
        }
        let low = if i == 0 { 1.0 } else { child[i - 1] };
        let high = child.get(i + 1).copied().unwrap_or(config.max_factor());
        let steps = ((high - low) / config.step).floor() as i64;
        let pick = if steps > 0 {
            rng.random_range(0..=steps)
        } else {
            0
        };
        child[i] = low + pick as f64 * config.step;
    }
    normalise(&mut child, config.step, config.max_factor());
    child
}

/// Each factor from one parent or the other; None when the mix is not non-decreasing (the
/// caller draws again).
pub fn crossover(a: &[f64], b: &[f64], rng: &mut ChaCha8Rng) -> Option<Vec<f64>> {
    let child: Vec<f64> = a
        .iter()
        .zip(b)
        .map(|(x, y)| if rng.random::<bool>() { *x } else { *y })
        .collect();
    is_monotone(&child).then_some(child)
}

/// Grid-exact key of a candidate, so a replayed search finds its earlier measurements.
fn key(factors: &[f64], step: f64) -> String {
    factors
        .iter()
        .map(|f| ((f / step).round() as i64).to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// The search's folder: its settings, every evaluation so far, the best factors. Held by one
/// search at a time, as an evaluation's folder is.
pub struct SearchDir {
    dir: PathBuf,
    cache: HashMap<String, f64>,
    _lock: RunLock,
}

impl SearchDir {
    /// Opens `dir` for `config`, refusing a folder another search is using or one that holds
    /// candidates measured with other settings. Settings are checked first and recorded only
    /// then, and a folder without candidates takes the new ones: a refused run must not leave
    /// behind settings that refuse the corrected one.
    pub fn open(dir: &Path, config: &SearchConfig) -> Result<Self> {
        config.check()?;
        let lock = RunLock::acquire(dir)?;
        let config_path = dir.join("search.json");
        let candidates = load_jsonl::<Evaluated>(&dir.join("candidates.jsonl"))?;
        let recorded = match std::fs::read_to_string(&config_path) {
            Ok(existing) if !candidates.is_empty() => {
                let old: SearchConfig = serde_json::from_str(&existing).map_err(|e| {
                    EvalError::Invalid(format!(
                        "{} is damaged ({e}); remove the folder or choose another --out",
                        config_path.display()
                    ))
                })?;
                if &old != config {
                    return Err(EvalError::Invalid(format!(
                        "{} holds a search with other settings; resume it with the same flags or choose another --out",
                        dir.display()
                    )));
                }
                true
            }
            _ => false,
        };
        if !recorded {
            let text = serde_json::to_string_pretty(config).expect("plain data serialises");
            write_atomic(&config_path, &(text + "\n"))?;
        }
        let cache = candidates
            .into_iter()
            .map(|e| (key(&e.factors, config.step), e.perplexity))
            .collect();
        Ok(Self {
            dir: dir.to_path_buf(),
            cache,
            _lock: lock,
        })
    }

    fn append(&self, evaluated: &Evaluated) -> Result<()> {
        let path = self.dir.join("candidates.jsonl");
        let err = |source| EvalError::Write {
            path: path.clone(),
            source,
        };
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(err)?;
        let line = serde_json::to_string(evaluated).expect("plain data serialises") + "\n";
        file.write_all(line.as_bytes()).map_err(err)?;
        file.sync_data().map_err(err)
    }
}

/// Runs the search; `objective` measures the perplexity of a candidate. Returns the best
/// candidate and the best perplexity after each generation, and keeps `best.json` and
/// `search.md` in the folder current after each generation.
pub fn search(
    config: &SearchConfig,
    seeds: [(&str, Vec<f64>); 3],
    dir: &mut SearchDir,
    objective: impl FnMut(&[f64]) -> Result<f64>,
    mut on: impl FnMut(SearchEvent),
) -> Result<(Evaluated, Vec<Generation>)> {
    config.check()?;
    on(SearchEvent::Start {
        total: config.evaluations(),
        cached: dir.cache.len(),
    });
    let mut run = Run {
        config,
        dir,
        objective,
        on,
        rng: ChaCha8Rng::seed_from_u64(config.seed),
        generations: Vec::new(),
        evaluated: 0,
    };
    let max = config.max_factor();
    let mut population: Vec<Evaluated> = Vec::with_capacity(config.population);
    let mut seeds_normalised = Vec::new();
    for (origin, mut factors) in seeds {
        if factors.len() != config.pairs {
            return Err(EvalError::Invalid(format!(
                "rope-search: the {origin} seed has {} factors for {} pairs",
                factors.len(),
                config.pairs
            )));
        }
        normalise(&mut factors, config.step, max);
        seeds_normalised.push(factors.clone());
        population.push(run.evaluate(factors, origin, 0)?);
    }
    while population.len() < config.population {
        let parent = &seeds_normalised[run.rng.random_range(0..seeds_normalised.len())];
        let child = mutate(parent, config, &mut run.rng);
        population.push(run.evaluate(child, "mutation", 0)?);
    }
    run.close_generation(&mut population, 0)?;
    for iteration in 1..=config.iterations {
        population.truncate(config.parents);
        let parents = population.clone();
        for _ in 0..config.mutations {
            let parent = &parents[run.rng.random_range(0..parents.len())];
            let child = mutate(&parent.factors, config, &mut run.rng);
            population.push(run.evaluate(child, "mutation", iteration)?);
        }
        for _ in 0..config.crossovers {
            let child = run.crossover_child(&parents);
            population.push(run.evaluate(child, "crossover", iteration)?);
        }
        run.close_generation(&mut population, iteration)?;
    }
    Ok((population.swap_remove(0), run.generations))
}

/// The state of one search: where measurements go, the generator, the history.
struct Run<'a, O, E> {
    config: &'a SearchConfig,
    dir: &'a mut SearchDir,
    objective: O,
    on: E,
    rng: ChaCha8Rng,
    generations: Vec<Generation>,
    evaluated: usize,
}

impl<O, E> Run<'_, O, E>
where
    O: FnMut(&[f64]) -> Result<f64>,
    E: FnMut(SearchEvent),
{
    /// The candidate's perplexity: from the folder when an earlier run measured it, else measured
    /// now and appended at once.
    fn evaluate(&mut self, factors: Vec<f64>, origin: &str, iteration: usize) -> Result<Evaluated> {
        let k = key(&factors, self.config.step);
        let (perplexity, cached) = match self.dir.cache.get(&k) {
            Some(&p) => (p, true),
            None => ((self.objective)(&factors)?, false),
        };
        let e = Evaluated {
            factors,
            perplexity,
            origin: origin.to_string(),
            iteration,
        };
        if !cached {
            self.dir.append(&e)?;
            self.dir.cache.insert(k, perplexity);
        }
        self.evaluated += 1;
        (self.on)(SearchEvent::Evaluated(&e, cached));
        Ok(e)
    }

    /// Mixes of two monotone parents are often not monotone; a bounded number of draws keeps the
    /// search moving, and a mutant stands in when none works.
    fn crossover_child(&mut self, parents: &[Evaluated]) -> Vec<f64> {
        for _ in 0..64 {
            let a = &parents[self.rng.random_range(0..parents.len())];
            let b = &parents[self.rng.random_range(0..parents.len())];
            if let Some(child) = crossover(&a.factors, &b.factors, &mut self.rng) {
                return child;
            }
        }
        let parent = &parents[self.rng.random_range(0..parents.len())];
        mutate(&parent.factors, self.config, &mut self.rng)
    }

    /// Ranks the population, records the generation and writes the folder's summaries.
    fn close_generation(&mut self, population: &mut [Evaluated], iteration: usize) -> Result<()> {
        population.sort_by(|a, b| a.perplexity.total_cmp(&b.perplexity));
        let generation = Generation {
            iteration,
            best: population[0].perplexity,
            evaluated: self.evaluated,
        };
        (self.on)(SearchEvent::Generation(&generation));
        self.generations.push(generation);
        write_progress(self.dir, self.config, &population[0], &self.generations)
    }
}

/// `best.json` (the best factors so far, loadable as `--rope longrope:factors=best.json`) and
/// `search.md` (best perplexity per generation).
fn write_progress(
    dir: &SearchDir,
    config: &SearchConfig,
    best: &Evaluated,
    generations: &[Generation],
) -> Result<()> {
    let factors = longctx::positions::LongRopeFactors {
        short_factor: vec![1.0; config.pairs],
        long_factor: best.factors.clone(),
        original_max_position_embeddings: Some(config.trained_ctx),
        max_position_embeddings: Some(config.target),
    };
    let text = serde_json::to_string_pretty(&factors).expect("plain data serialises");
    write_atomic(&dir.dir.join("best.json"), &(text + "\n"))?;
    let mut md = format!(
        "# LongRoPE factor search\n\nTarget {} tokens (stretch {:.2} over the trained {}), population {}, {} iterations of {} mutations and {} crossovers, {} parents, seed {}.\n\n| generation | evaluated | best perplexity |\n|---|---|---|\n",
        config.target,
        config.stretch(),
        config.trained_ctx,
        config.population,
        config.iterations,
        config.mutations,
        config.crossovers,
        config.parents,
        config.seed
    );
    for g in generations {
        md.push_str(&format!(
            "| {} | {} | {:.4} |\n",
            g.iteration, g.evaluated, g.best
        ));
    }
    md.push_str(&format!(
        "\nBest so far ({}, generation {}): `best.json`; use it as `--rope longrope:factors=best.json`.\n",
        best.origin, best.iteration
    ));
    write_atomic(&dir.dir.join("search.md"), &md)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> SearchConfig {
        SearchConfig {
            pairs: 8,
            trained_ctx: 1000,
            target: 4000,
            population: 6,
            iterations: 4,
            mutations: 3,
            crossovers: 3,
            parents: 3,
            mutation_prob: 0.3,
            step: 0.01,
            seed: 7,
        }
    }

    fn seeds() -> [(&'static str, Vec<f64>); 3] {
        [
            ("pi", vec![4.0; 8]),
            ("ntk", (0..8).map(|i| 4f64.powf(i as f64 / 7.0)).collect()),
            ("yarn", vec![1.0, 1.0, 1.0, 1.5, 2.5, 3.5, 4.0, 4.0]),
        ]
    }

    /// A made-up landscape: distance to a hidden monotone factor set.
    fn landscape(f: &[f64]) -> f64 {
        let hidden = [1.0, 1.2, 1.5, 2.0, 2.6, 3.3, 4.1, 4.6];
        10.0 + f
            .iter()
            .zip(hidden)
            .map(|(a, b)| (a - b).powi(2))
            .sum::<f64>()
    }

    #[test]
    fn normalising_snaps_to_the_grid_bounds_and_order() {
        let mut f = vec![0.5, 2.004, 1.5, 9.0];
        normalise(&mut f, 0.01, 5.0);
        assert_eq!(f, vec![1.0, 2.0, 2.0, 5.0]);
        assert!(is_monotone(&f));
    }

    #[test]
    fn mutants_stay_on_the_grid_monotone_and_in_bounds() {
        let c = config();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let parent = seeds()[1].1.clone();
        let mut changed = 0;
        for _ in 0..200 {
            let child = mutate(&parent, &c, &mut rng);
            assert!(is_monotone(&child), "{child:?}");
            assert!(child.iter().all(|&f| (1.0..=c.max_factor()).contains(&f)));
            assert!(child
                .iter()
                .all(|f| ((f / 0.01).round() * 0.01 - f).abs() < 1e-9));
            changed += usize::from(child != parent);
        }
        assert!(changed > 150, "mutation rarely changes anything: {changed}");
    }

    #[test]
    fn crossover_takes_each_factor_from_a_parent_and_refuses_disorder() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let a = vec![1.0, 2.0, 3.0];
        let b = vec![1.5, 2.5, 3.5];
        for _ in 0..50 {
            if let Some(child) = crossover(&a, &b, &mut rng) {
                assert!(is_monotone(&child));
                for (i, f) in child.iter().enumerate() {
                    assert!(*f == a[i] || *f == b[i]);
                }
            }
        }
        let crossing = vec![3.0, 3.0, 3.0];
        let low = vec![1.0, 1.0, 1.0];
        let outcomes: Vec<bool> = (0..50)
            .map(|_| crossover(&crossing, &low, &mut rng).is_some())
            .collect();
        assert!(outcomes.contains(&false), "a disordered mix was accepted");
    }

    #[test]
    fn the_search_improves_on_its_seeds_and_a_rerun_measures_nothing_twice() {
        let c = config();
        let dir = tempfile::tempdir().unwrap();
        let mut calls = 0;
        let mut open = SearchDir::open(dir.path(), &c).unwrap();
        let (best, generations) = search(
            &c,
            seeds(),
            &mut open,
            |f| {
                calls += 1;
                Ok(landscape(f))
            },
            |_| {},
        )
        .unwrap();
        let seed_best = seeds()
            .iter()
            .map(|(_, f)| landscape(f))
            .fold(f64::INFINITY, f64::min);
        assert!(
            best.perplexity < seed_best,
            "{} vs seeds {seed_best}",
            best.perplexity
        );
        assert!(generations.windows(2).all(|w| w[1].best <= w[0].best));
        assert!(calls > 0 && calls <= c.evaluations());
        assert!(dir.path().join("best.json").is_file());
        let saved =
            longctx::positions::LongRopeFactors::load(&dir.path().join("best.json")).unwrap();
        assert_eq!(saved.long_factor, best.factors);

        drop(open);
        // Kill after a few evaluations: cut the file to 5 lines plus half a line.
        let path = dir.path().join("candidates.jsonl");
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let torn = format!("{}\n{}", lines[..5].join("\n"), &lines[5][..10]);
        std::fs::write(&path, torn).unwrap();
        let mut again = 0;
        let mut open = SearchDir::open(dir.path(), &c).unwrap();
        let (best_again, _) = search(
            &c,
            seeds(),
            &mut open,
            |f| {
                again += 1;
                Ok(landscape(f))
            },
            |_| {},
        )
        .unwrap();
        assert_eq!(again, calls - 5, "the rerun measured what the file held");
        assert_eq!(best_again.factors, best.factors);
        let lines = std::fs::read_to_string(&path).unwrap().lines().count();
        assert_eq!(
            lines, calls,
            "one whole line per measurement, the torn one gone"
        );

        drop(open);
        let other = SearchConfig { seed: 8, ..c };
        let err = SearchDir::open(dir.path(), &other)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("other settings"), "{err}");
    }

    #[test]
    fn a_folder_in_use_is_refused_and_a_refused_run_leaves_nothing_that_refuses_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let held = SearchDir::open(dir.path(), &config()).unwrap();
        let err = SearchDir::open(dir.path(), &config())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("is in use by another"), "{err}");
        drop(held);

        let other = tempfile::tempdir().unwrap();
        let bad = SearchConfig {
            population: 2,
            ..config()
        };
        assert!(SearchDir::open(other.path(), &bad).is_err());
        assert!(!other.path().join("search.json").exists());
        // Settings recorded by an earlier version before any candidate give way as well.
        let first = SearchDir::open(other.path(), &config()).unwrap();
        drop(first);
        let corrected = SearchConfig {
            seed: 9,
            ..config()
        };
        assert!(SearchDir::open(other.path(), &corrected).is_ok());
    }

    #[test]
    fn settings_that_cannot_search_are_refused() {
        for (c, needle) in [
            (
                SearchConfig {
                    target: 1000,
                    ..config()
                },
                "not past the model's trained",
            ),
            (
                SearchConfig {
                    population: 2,
                    ..config()
                },
                "at least the 3 seeds",
            ),
            (
                SearchConfig {
                    mutations: 0,
                    crossovers: 0,
                    ..config()
                },
                "nothing new",
            ),
        ] {
            let err = c.check().unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
        }
    }
}
