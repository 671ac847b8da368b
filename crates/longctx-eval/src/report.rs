//! Reports of one or more result folders: `summary.json`, `report.md` with a table per task
//! (length × depth, length × method) and PNG plots (depth × length heatmaps, score and
//! perplexity against length). Several folders side by side compare methods in one table.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::plots::{self, length_label, Series};
use crate::runner::{load_records, read_config, write_atomic, Record, RunConfig, RESULTS_FILE};
use crate::{EvalError, Result};

/// RULER's effective-length threshold: Llama-2-7B's average score at 4K.
pub const RULER_THRESHOLD: f64 = 85.6;
/// Where the log-length fit is read off (epoch.ai's context-window estimate).
pub const FIT_LEVEL: f64 = 80.0;

/// The score a task must reach at its shortest length, inside the model's trained window, for
/// its longer lengths to measure the window rather than the task: a model that cannot do the task
/// where its context is not in question shows nothing about context at longer lengths. RULER
/// makes the same reading by reporting each model's 4k score beside its longer ones.
pub const CALIBRATION_LEVEL: f64 = 90.0;

/// A result folder as read back.
pub struct RunResults {
    pub dir: PathBuf,
    pub config: RunConfig,
    pub records: Vec<Record>,
}

impl RunResults {
    pub fn load(dir: &Path) -> Result<Self> {
        let config = read_config(dir)?.ok_or_else(|| {
            EvalError::Invalid(format!(
                "{} is not a result folder (it has no config.json); pass folders written by `longctx eval`",
                dir.display()
            ))
        })?;
        let records = load_records(&dir.join(RESULTS_FILE))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            records,
        })
    }

    fn is_perplexity(&self) -> bool {
        self.records.iter().any(|r| r.outcome.nll_count.is_some())
    }

    /// The score threshold for MECW: the task's own where it sets one, else RULER's.
    fn threshold(&self) -> f64 {
        self.config
            .task
            .split([':', ',', '+'])
            .find_map(|p| p.strip_prefix("threshold="))
            .and_then(|v| v.parse().ok())
            .unwrap_or(RULER_THRESHOLD)
    }
}

/// What one run measured, as written to `summary.json`.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    pub dir: String,
    pub label: String,
    pub config: RunConfig,
    pub cases: usize,
    pub wall_seconds: f64,
    /// Mean score (0–100) or perplexity per length.
    pub by_length: Vec<LengthValue>,
    /// Mean score per (depth, length), for tasks with depths.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub by_depth: Vec<DepthValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mecw: Option<Mecw>,
    /// The score at the shortest length, read as a check that the task works on this model.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub calibration: Option<Calibration>,
    pub metric: &'static str,
}

/// Whether a run's shortest length shows the task working on the model.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Calibration {
    /// The shortest measured length and its mean score.
    pub length: usize,
    pub score: f64,
    pub trained_ctx: usize,
    /// `passed`: at least [`CALIBRATION_LEVEL`] inside the trained window; `failed`: below it;
    /// `outside`: no length inside the trained window was measured, so the run cannot say.
    pub verdict: Verdict,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Passed,
    Failed,
    Outside,
}

impl Calibration {
    /// The calibration of a run from its per-length scores; None for perplexity or no scores.
    pub fn of(by_length: &[LengthValue], trained_ctx: usize) -> Option<Self> {
        let shortest = by_length.first()?;
        let verdict = if shortest.length > trained_ctx {
            Verdict::Outside
        } else if shortest.value >= CALIBRATION_LEVEL {
            Verdict::Passed
        } else {
            Verdict::Failed
        };
        Some(Self {
            length: shortest.length,
            score: shortest.value,
            trained_ctx,
            verdict,
        })
    }

    /// One line for the report and the command line.
    pub fn line(&self, label: &str) -> String {
        let at = length_label(self.length);
        match self.verdict {
            Verdict::Passed => format!(
                "{label}: calibrated, {:.0} at {at} inside the trained {}-token window (at least {CALIBRATION_LEVEL:.0} needed).",
                self.score, self.trained_ctx
            ),
            Verdict::Failed => format!(
                "{label}: NOT CALIBRATED, {:.0} at {at} inside the trained {}-token window (below {CALIBRATION_LEVEL:.0}): the model cannot do this task even where context is not in question, so its longer lengths measure the task, not the window; try another wording or task.",
                self.score, self.trained_ctx
            ),
            Verdict::Outside => format!(
                "{label}: no length inside the trained {}-token window was measured (shortest {at}), so this run cannot show that the task works on the model; read it beside the same task at a length inside the window.",
                self.trained_ctx
            ),
        }
    }

    /// A short mark for tables.
    pub fn mark(&self) -> String {
        let measured = format!("{:.0} at {}", self.score, length_label(self.length));
        match self.verdict {
            Verdict::Passed => format!("passed ({measured})"),
            Verdict::Failed => format!("**failed** ({measured})"),
            Verdict::Outside => "not measured inside the window".to_string(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct LengthValue {
    pub length: usize,
    pub value: f64,
    pub cases: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct DepthValue {
    pub length: usize,
    pub depth: f64,
    pub value: f64,
    pub cases: usize,
}

/// The maximum effective context window of a run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Mecw {
    pub threshold: f64,
    /// The largest measured length up to which every length scores at least the threshold;
    /// None when even the shortest does not.
    pub length: Option<usize>,
    /// Where a least-squares fit of score against ln(length) crosses [`FIT_LEVEL`].
    pub fit_crossing: Option<f64>,
    /// The fit: score ≈ intercept + slope · ln(length).
    pub fit_intercept: f64,
    pub fit_slope: f64,
}

/// MECW from per-length scores, sorted by length.
pub fn mecw(by_length: &[LengthValue], threshold: f64) -> Option<Mecw> {
    if by_length.is_empty() {
        return None;
    }
    let length = by_length
        .iter()
        .take_while(|p| p.value >= threshold)
        .last()
        .map(|p| p.length);
    let n = by_length.len() as f64;
    let xs: Vec<f64> = by_length.iter().map(|p| (p.length as f64).ln()).collect();
    let mean_x = xs.iter().sum::<f64>() / n;
    let mean_y = by_length.iter().map(|p| p.value).sum::<f64>() / n;
    let sxx: f64 = xs.iter().map(|x| (x - mean_x).powi(2)).sum();
    let sxy: f64 = xs
        .iter()
        .zip(by_length)
        .map(|(x, p)| (x - mean_x) * (p.value - mean_y))
        .sum();
    let slope = if sxx > 0.0 { sxy / sxx } else { 0.0 };
    let intercept = mean_y - slope * mean_x;
    // Only a falling fit crosses the level on its way down; a flat or rising one never does.
    let fit_crossing = (slope < 0.0).then(|| ((FIT_LEVEL - intercept) / slope).exp());
    Some(Mecw {
        threshold,
        length,
        fit_crossing,
        fit_intercept: intercept,
        fit_slope: slope,
    })
}

fn summarise(run: &RunResults, label: String) -> RunSummary {
    let perplexity = run.is_perplexity();
    let mut by_length: BTreeMap<usize, (f64, f64, usize)> = BTreeMap::new();
    let mut by_depth: BTreeMap<(usize, u64), (f64, usize)> = BTreeMap::new();
    for r in &run.records {
        let entry = by_length.entry(r.case.length).or_default();
        entry.2 += 1;
        if perplexity {
            entry.0 += r.outcome.nll_sum.unwrap_or(0.0);
            entry.1 += r.outcome.nll_count.unwrap_or(0) as f64;
        } else if let Some(score) = r.outcome.score {
            entry.0 += score;
            entry.1 += 1.0;
            if let Some(depth) = r.case.depth {
                let cell = by_depth
                    .entry((r.case.length, depth.to_bits()))
                    .or_default();
                cell.0 += score;
                cell.1 += 1;
            }
        }
    }
    let by_length: Vec<LengthValue> = by_length
        .into_iter()
        .filter(|(_, (_, n, _))| *n > 0.0)
        .map(|(length, (sum, n, cases))| LengthValue {
            length,
            value: if perplexity { (sum / n).exp() } else { sum / n },
            cases,
        })
        .collect();
    let by_depth = by_depth
        .into_iter()
        .map(|((length, depth), (sum, n))| DepthValue {
            length,
            depth: f64::from_bits(depth),
            value: sum / n as f64,
            cases: n,
        })
        .collect();
    RunSummary {
        dir: run.dir.display().to_string(),
        label,
        config: run.config.clone(),
        cases: run.records.len(),
        wall_seconds: run.records.iter().map(|r| r.seconds).sum(),
        mecw: if perplexity {
            None
        } else {
            mecw(&by_length, run.threshold())
        },
        calibration: if perplexity {
            None
        } else {
            Calibration::of(&by_length, run.config.model.trained_ctx)
        },
        by_length,
        by_depth,
        metric: if perplexity { "perplexity" } else { "score" },
    }
}

/// A run's calibration line, naming its task as configured, as the report states it.
pub fn calibration_line(run: &RunResults) -> Option<String> {
    let task = &run.config.task;
    summarise(run, task.clone())
        .calibration
        .map(|c| c.line(task))
}

/// Names for the runs that say how they differ: the fields that differ between them, or the
/// folder name when nothing in the configurations does.
fn labels(runs: &[RunResults]) -> Vec<String> {
    type Field = fn(&RunConfig) -> String;
    let fields: [(&str, Field); 6] = [
        ("task", |c| c.task.clone()),
        ("model", |c| c.model.file.clone()),
        ("rope", |c| c.rope.clone()),
        ("kv", |c| c.kv.clone()),
        ("query", |c| c.query.name().to_string()),
        ("chat", |c| c.chat_template.to_string()),
    ];
    let differing: Vec<&(&str, Field)> = fields
        .iter()
        .filter(|(_, get)| runs.iter().any(|r| get(&r.config) != get(&runs[0].config)))
        .collect();
    let labels: Vec<String> = runs
        .iter()
        .map(|run| {
            if runs.len() == 1 {
                return short_task(&run.config.task);
            }
            if differing.is_empty() {
                return run.dir.file_name().map_or_else(
                    || run.dir.display().to_string(),
                    |n| n.to_string_lossy().into_owned(),
                );
            }
            differing
                .iter()
                .map(|(name, get)| match *name {
                    "task" => short_task(&get(&run.config)),
                    "rope" | "kv" => get(&run.config),
                    _ => format!("{name}={}", get(&run.config)),
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    // Two runs of one task with different parameters (niah_single_1 and niah_single_2) share a
    // short label; their folder names tell them apart.
    labels
        .iter()
        .zip(runs)
        .map(|(label, run)| {
            if labels.iter().filter(|l| *l == label).count() > 1 {
                let folder = run.dir.file_name().map_or_else(
                    || run.dir.display().to_string(),
                    |n| n.to_string_lossy().into_owned(),
                );
                format!("{label} ({folder})")
            } else {
                label.clone()
            }
        })
        .collect()
}

fn short_task(spec: &str) -> String {
    spec.split(':').next().unwrap_or(spec).to_string()
}

/// A file name made from a label.
fn slug(label: &str) -> String {
    let slug: String = label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let slug = slug
        .split('-')
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("-");
    if slug.is_empty() {
        "run".to_string()
    } else {
        slug
    }
}

/// Writes `summary.json`, `report.md` and the plots for `runs` into `out`.
pub fn write_report(out: &Path, runs: &[RunResults]) -> Result<Vec<PathBuf>> {
    if runs.is_empty() {
        return Err(EvalError::Invalid("no result folders to report on".into()));
    }
    std::fs::create_dir_all(out).map_err(|source| EvalError::Write {
        path: out.to_path_buf(),
        source,
    })?;
    let labels = labels(runs);
    let summaries: Vec<RunSummary> = runs
        .iter()
        .zip(labels)
        .map(|(run, label)| summarise(run, label))
        .collect();
    let mut written = Vec::new();
    let mut md = String::new();
    md.push_str("# longctx eval report\n\n");
    configuration_table(&mut md, &summaries);
    let calibrations: Vec<String> = summaries
        .iter()
        .filter_map(|s| {
            s.calibration
                .as_ref()
                .map(|c| format!("- {}\n", c.line(&s.label)))
        })
        .collect();
    if !calibrations.is_empty() {
        md.push_str("## Calibration\n\n");
        md.push_str(&calibrations.concat());
        md.push('\n');
    }

    let scored: Vec<&RunSummary> = summaries.iter().filter(|s| s.metric == "score").collect();
    let perplexity: Vec<&RunSummary> = summaries
        .iter()
        .filter(|s| s.metric == "perplexity")
        .collect();
    if !scored.is_empty() {
        md.push_str(
            "## Score against length\n\nMean score (0–100) over all depths and samples.\n\n",
        );
        length_table(&mut md, &scored, |v| format!("{v:.1}"));
        md.push_str("\n### Maximum effective context window\n\n");
        md.push_str(&format!(
            "MECW is the largest length up to which every measured length scores at least the threshold; the fit column is where a least-squares line of score against ln(length) crosses {FIT_LEVEL}.\n\n"
        ));
        md.push_str(
            "| run | calibration | threshold | MECW | fit crosses 80 |\n|---|---|---|---|---|\n",
        );
        for s in &scored {
            if let Some(m) = &s.mecw {
                md.push_str(&format!(
                    "| {} | {} | {} | {} | {} |\n",
                    s.label,
                    s.calibration
                        .as_ref()
                        .map_or_else(String::new, Calibration::mark),
                    m.threshold,
                    m.length
                        .map_or_else(|| "below the shortest length".to_string(), length_label),
                    fit_label(m.fit_crossing, &s.by_length)
                ));
            }
        }
        let series: Vec<Series> = scored
            .iter()
            .map(|s| Series {
                name: s.label.clone(),
                points: s.by_length.iter().map(|p| (p.length, p.value)).collect(),
            })
            .collect();
        let fit = match scored.as_slice() {
            [one] => one.mecw.as_ref().map(|m| fit_series(m, &one.by_length)),
            _ => None,
        };
        let threshold = scored[0]
            .mecw
            .as_ref()
            .map_or(RULER_THRESHOLD, |m| m.threshold);
        let path = out.join("scores.png");
        let threshold_label = "MECW threshold".to_string();
        plots::curves(
            &path,
            "Score against context length",
            "score",
            &series,
            Some((0.0, 100.0)),
            Some((threshold, &threshold_label)),
            fit.as_ref(),
        )
        .map_err(|e| EvalError::Invalid(e.to_string()))?;
        md.push_str("\n![score against length](scores.png)\n\n");
        written.push(path);

        for s in scored.iter().filter(|s| !s.by_depth.is_empty()) {
            let name = format!("heatmap-{}.png", slug(&s.label));
            md.push_str(&format!("### {}: depth × length\n\n", s.label));
            depth_table(&mut md, s);
            let path = out.join(&name);
            heatmap(&path, s)?;
            md.push_str(&format!("\n![{} heatmap]({name})\n\n", s.label));
            written.push(path);
        }
    }
    if !perplexity.is_empty() {
        md.push_str("## Perplexity against length\n\n");
        length_table(&mut md, &perplexity, |v| format!("{v:.3}"));
        let series: Vec<Series> = perplexity
            .iter()
            .map(|s| Series {
                name: s.label.clone(),
                points: s.by_length.iter().map(|p| (p.length, p.value)).collect(),
            })
            .collect();
        let path = out.join("perplexity.png");
        plots::curves(
            &path,
            "Perplexity against context length",
            "perplexity",
            &series,
            None,
            None,
            None,
        )
        .map_err(|e| EvalError::Invalid(e.to_string()))?;
        md.push_str("\n![perplexity against length](perplexity.png)\n\n");
        written.push(path);
    }

    let summary_path = out.join("summary.json");
    let mut json = serde_json::to_string_pretty(&serde_json::json!({ "runs": summaries }))
        .expect("summaries serialize");
    json.push('\n');
    write_atomic(&summary_path, &json)?;
    written.push(summary_path);
    let md_path = out.join("report.md");
    write_atomic(&md_path, &md)?;
    written.push(md_path);
    Ok(written)
}

/// A crossing outside the measured lengths is a guess from the trend, and says so.
fn fit_label(crossing: Option<f64>, by_length: &[LengthValue]) -> String {
    let Some(x) = crossing else {
        return "does not fall".to_string();
    };
    let shortest = by_length.first().map_or(0.0, |p| p.length as f64);
    let longest = by_length.last().map_or(0.0, |p| p.length as f64);
    if x < shortest || x > longest {
        format!("{x:.0} tokens (extrapolated)")
    } else {
        format!("{x:.0} tokens")
    }
}

fn fit_series(m: &Mecw, by_length: &[LengthValue]) -> Series {
    let (lo, hi) = (by_length[0].length, by_length[by_length.len() - 1].length);
    let points = (0..=16)
        .map(|i| {
            let x = (lo as f64).ln() + (hi as f64 / lo as f64).ln() * i as f64 / 16.0;
            (x.exp().round() as usize, m.fit_intercept + m.fit_slope * x)
        })
        .collect();
    Series {
        name: "log-length fit".into(),
        points,
    }
}

fn heatmap(path: &Path, s: &RunSummary) -> Result<()> {
    let mut lengths: Vec<usize> = s.by_depth.iter().map(|c| c.length).collect();
    lengths.sort_unstable();
    lengths.dedup();
    let mut depths: Vec<f64> = s.by_depth.iter().map(|c| c.depth).collect();
    depths.sort_by(f64::total_cmp);
    depths.dedup();
    let scores: Vec<Vec<Option<f64>>> = depths
        .iter()
        .map(|&d| {
            lengths
                .iter()
                .map(|&l| {
                    s.by_depth
                        .iter()
                        .find(|c| c.length == l && c.depth == d)
                        .map(|c| c.value)
                })
                .collect()
        })
        .collect();
    let title = format!("{}: score by depth and length", s.label);
    plots::heatmap(path, &title, &lengths, &depths, &scores)
        .map_err(|e| EvalError::Invalid(e.to_string()))
}

fn configuration_table(md: &mut String, summaries: &[RunSummary]) {
    md.push_str("## Runs\n\n| | ");
    md.push_str(
        &summaries
            .iter()
            .map(|s| s.label.as_str())
            .collect::<Vec<_>>()
            .join(" | "),
    );
    md.push_str(" |\n|---|");
    md.push_str(&"---|".repeat(summaries.len()));
    md.push('\n');
    type Row = fn(&RunSummary) -> String;
    let rows: [(&str, Row); 14] = [
        ("folder", |s| format!("`{}`", s.dir)),
        ("task", |s| format!("`{}`", s.config.task)),
        ("model", |s| s.config.model.file.clone()),
        ("model sha256", |s| {
            format!(
                "`{}…`",
                &s.config.model.sha256[..s.config.model.sha256.len().min(16)]
            )
        }),
        ("trained context", |s| {
            s.config.model.trained_ctx.to_string()
        }),
        ("rope", |s| format!("`{}`", s.config.rope)),
        ("kv", |s| {
            format!("`{}` ({})", s.config.kv, s.config.kv_dtype)
        }),
        ("query", |s| s.config.query.name().to_string()),
        ("chat template", |s| s.config.chat_template.to_string()),
        ("seed", |s| s.config.seed.to_string()),
        ("text", |s| {
            s.config.text.as_ref().map_or_else(
                || "none (synthetic)".into(),
                |t| format!("{} ({})", t.name, t.origin),
            )
        }),
        ("calibration", |s| {
            s.calibration
                .as_ref()
                .map_or_else(|| "–".to_string(), Calibration::mark)
        }),
        ("cases", |s| s.cases.to_string()),
        ("time in cases", |s| format!("{:.0} s", s.wall_seconds)),
    ];
    for (name, get) in rows {
        md.push_str(&format!("| {name} | "));
        md.push_str(&summaries.iter().map(get).collect::<Vec<_>>().join(" | "));
        md.push_str(" |\n");
    }
    md.push_str(&format!(
        "\nlongctx {}\n\n",
        summaries[0].config.longctx_version
    ));
}

fn length_table(md: &mut String, runs: &[&RunSummary], format: impl Fn(f64) -> String) {
    let mut lengths: Vec<usize> = runs
        .iter()
        .flat_map(|s| s.by_length.iter().map(|p| p.length))
        .collect();
    lengths.sort_unstable();
    lengths.dedup();
    md.push_str("| length | ");
    md.push_str(
        &runs
            .iter()
            .map(|s| s.label.as_str())
            .collect::<Vec<_>>()
            .join(" | "),
    );
    md.push_str(" |\n|---|");
    md.push_str(&"---|".repeat(runs.len()));
    md.push('\n');
    for length in lengths {
        md.push_str(&format!("| {} | ", length_label(length)));
        let cells: Vec<String> = runs
            .iter()
            .map(|s| {
                s.by_length.iter().find(|p| p.length == length).map_or_else(
                    || "–".to_string(),
                    |p| format!("{} (n={})", format(p.value), p.cases),
                )
            })
            .collect();
        md.push_str(&cells.join(" | "));
        md.push_str(" |\n");
    }
}

fn depth_table(md: &mut String, s: &RunSummary) {
    let mut lengths: Vec<usize> = s.by_depth.iter().map(|c| c.length).collect();
    lengths.sort_unstable();
    lengths.dedup();
    let mut depths: Vec<f64> = s.by_depth.iter().map(|c| c.depth).collect();
    depths.sort_by(f64::total_cmp);
    depths.dedup();
    md.push_str("| depth \\ length | ");
    md.push_str(
        &lengths
            .iter()
            .map(|&l| length_label(l))
            .collect::<Vec<_>>()
            .join(" | "),
    );
    md.push_str(" |\n|---|");
    md.push_str(&"---|".repeat(lengths.len()));
    md.push('\n');
    for d in depths {
        md.push_str(&format!("| {d}% | "));
        let cells: Vec<String> = lengths
            .iter()
            .map(|&l| {
                s.by_depth
                    .iter()
                    .find(|c| c.length == l && c.depth == d)
                    .map_or_else(|| "–".to_string(), |c| format!("{:.0}", c.value))
            })
            .collect();
        md.push_str(&cells.join(" | "));
        md.push_str(" |\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn points(values: &[(usize, f64)]) -> Vec<LengthValue> {
        values
            .iter()
            .map(|&(length, value)| LengthValue {
                length,
                value,
                cases: 1,
            })
            .collect()
    }

    #[test]
    fn mecw_is_where_the_score_first_drops_below_the_threshold() {
        let by_length = points(&[(1024, 100.0), (2048, 90.0), (4096, 60.0), (8192, 95.0)]);
        let m = mecw(&by_length, 85.6).unwrap();
        assert_eq!(m.length, Some(2048), "a later recovery does not count");
        let m = mecw(&points(&[(1024, 50.0), (2048, 100.0)]), 85.6).unwrap();
        assert_eq!(m.length, None);
    }

    #[test]
    fn the_log_fit_crossing_is_exact_on_a_straight_line() {
        // score = 100 - 10 * log2(L / 1024): crosses 80 at 4096.
        let by_length = points(&[(1024, 100.0), (2048, 90.0), (4096, 80.0), (8192, 70.0)]);
        let m = mecw(&by_length, 85.6).unwrap();
        assert!((m.fit_crossing.unwrap() - 4096.0).abs() < 1e-6, "{m:?}");
        let flat = mecw(&points(&[(1024, 100.0), (2048, 100.0)]), 85.6).unwrap();
        assert_eq!(flat.fit_crossing, None);
    }

    #[test]
    fn a_crossing_beyond_the_measured_lengths_is_labelled_a_guess() {
        let by_length = points(&[(1024, 100.0), (2048, 100.0), (4096, 100.0), (8192, 80.0)]);
        let m = mecw(&by_length, 85.6).unwrap();
        assert_eq!(
            fit_label(m.fit_crossing, &by_length),
            "16384 tokens (extrapolated)"
        );
        assert_eq!(fit_label(Some(3000.0), &by_length), "3000 tokens");
        assert_eq!(fit_label(None, &by_length), "does not fall");
    }

    fn run(dir: &str, task: &str, rope: &str) -> RunResults {
        let mut config = crate::runner::tests::config();
        config.task = task.into();
        config.rope = rope.into();
        RunResults {
            dir: PathBuf::from(dir),
            config,
            records: Vec::new(),
        }
    }

    #[test]
    fn labels_name_what_differs_between_runs() {
        let by_rope = [
            run("a", "passkey", "none"),
            run("b", "passkey", "yarn:factor=2"),
        ];
        assert_eq!(labels(&by_rope), ["none", "yarn:factor=2"]);
        let by_task = [
            run("out/passkey", "passkey", "none"),
            run("out/niah_single_1", "niah:haystack=noise", "none"),
            run("out/niah_single_2", "niah:haystack=text", "none"),
        ];
        assert_eq!(
            labels(&by_task),
            ["passkey", "niah (niah_single_1)", "niah (niah_single_2)"]
        );
        let same = [
            run("x/first", "passkey", "none"),
            run("x/second", "passkey", "none"),
        ];
        assert_eq!(labels(&same), ["first", "second"]);
    }

    #[test]
    fn slugs_are_file_names() {
        assert_eq!(slug("yarn:factor=4 full"), "yarn-factor-4-full");
        assert_eq!(slug("::"), "run");
    }
}
