//! Running a sweep so that no finished work is ever lost.
//!
//! A result folder holds `config.json` (everything that determines a case's result) and
//! `results.jsonl` (one line per finished case, appended and synced the moment the case ends).
//! A rerun with the same configuration skips the cases already there; a kill at any moment loses
//! at most the case in flight, and a line half-written by that kill is dropped on the next start.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::task::{Case, Engine, Outcome, QueryMode, Task, TaskContext};
use crate::text::TextSource;
use crate::{EvalError, Result};

pub const CONFIG_FILE: &str = "config.json";
pub const RESULTS_FILE: &str = "results.jsonl";
/// Locked by the run writing the folder; it holds that run's process id, for the refusal.
pub const LOCK_FILE: &str = ".lock";

/// Everything that decides what a case scores. Two runs may share a folder only when these are
/// equal; the sweep itself (lengths, depths, samples) and the thread count may differ, so a
/// folder can be extended with more lengths later.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunConfig {
    /// The task with every parameter resolved.
    pub task: String,
    pub model: ModelInfo,
    /// Position scheme, as given to `--rope`.
    pub rope: String,
    /// KV-cache policy, with every parameter resolved.
    pub kv: String,
    /// Whether the policy saw the question while compressing (`aware`) or compressed the
    /// context alone (`agnostic`); folders written before query modes existed were aware.
    #[serde(default)]
    pub query: QueryMode,
    pub kv_dtype: String,
    /// Tokens per prefill chunk as chosen, not as a session clamps it to its context: the clamp
    /// follows the longest length, which a folder may grow later.
    pub chunk_size: usize,
    /// Whether prompts were wrapped in the model's chat template.
    pub chat_template: bool,
    pub seed: u64,
    /// The natural text, for tasks that read one.
    pub text: Option<TextSource>,
    pub longctx_version: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    pub file: String,
    pub sha256: String,
    pub architecture: String,
    pub trained_ctx: usize,
}

/// One line of `results.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    #[serde(flatten)]
    pub case: Case,
    #[serde(flatten)]
    pub outcome: Outcome,
    pub seconds: f64,
}

/// A result folder held by one run, so that two runs never both run its cases. The lock is the
/// operating system's advisory lock on [`LOCK_FILE`]: it goes with its holder, so a killed run
/// leaves no stale lock behind.
pub struct RunLock {
    dir: PathBuf,
    _file: File,
}

impl RunLock {
    /// Takes `dir` (creating it if needed), or refuses at once if another run holds it.
    pub fn acquire(dir: &Path) -> Result<Self> {
        let write_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| EvalError::Write { path, source }
        };
        fs::create_dir_all(dir).map_err(write_err(dir))?;
        let path = dir.join(LOCK_FILE);
        // Not truncated on open: until the lock is ours, the holder's pid in it is not ours to erase.
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(write_err(&path))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                // The holder may not have written its pid yet; the refusal stands without it.
                let holder = fs::read_to_string(&path)
                    .ok()
                    .and_then(|text| text.trim().parse::<u32>().ok())
                    .map_or_else(String::new, |pid| format!(" (pid {pid})"));
                return Err(EvalError::Invalid(format!(
                    "{} is in use by another evaluation{holder}, and two runs in one folder would run its cases twice; wait for it or choose another --out",
                    dir.display()
                )));
            }
            Err(TryLockError::Error(source)) => return Err(write_err(&path)(source)),
        }
        file.set_len(0).map_err(write_err(&path))?;
        writeln!(file, "{}", std::process::id()).map_err(write_err(&path))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            _file: file,
        })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }
}

/// A result folder, open for appending.
pub struct RunDir {
    lock: RunLock,
    pub config: RunConfig,
    config_written: bool,
    records: Vec<Record>,
    results: File,
}

impl RunDir {
    /// Opens `dir` for `config`, creating it if needed; see [`RunDir::open_locked`].
    pub fn open(dir: &Path, config: &RunConfig) -> Result<Self> {
        Self::open_locked(RunLock::acquire(dir)?, config)
    }

    /// Opens the folder `lock` holds for `config`, keeping the lock as long as it is open. A
    /// folder holding results of a different configuration is refused, naming the first
    /// difference. `config.json` is written with the first result, so a run refused before it
    /// finishes a case leaves no configuration to refuse the corrected run; one without results,
    /// left by such a run of an earlier version, gives way.
    pub fn open_locked(lock: RunLock, config: &RunConfig) -> Result<Self> {
        let dir = lock.path();
        let results_path = dir.join(RESULTS_FILE);
        let records = load_records(&results_path)?;
        let existing = read_config(dir)?;
        if let Some(existing) = existing.as_ref().filter(|_| !records.is_empty()) {
            let existing = as_chosen(existing, config.chunk_size, &records);
            if let Some(field) = first_difference(&existing, config) {
                return Err(EvalError::Invalid(format!(
                    "{} holds results of a different configuration ({field}); use another --out folder, or rerun with the same settings to resume",
                    dir.display()
                )));
            }
        }
        let results = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&results_path)
            .map_err(|source| EvalError::Write {
                path: results_path.clone(),
                source,
            })?;
        Ok(Self {
            config_written: existing.as_ref() == Some(config),
            lock,
            config: config.clone(),
            records,
            results,
        })
    }

    pub fn path(&self) -> &Path {
        self.lock.path()
    }

    pub fn records(&self) -> &[Record] {
        &self.records
    }

    pub fn is_done(&self, case: &Case) -> bool {
        self.records.iter().any(|r| r.case == *case)
    }

    /// Appends a finished case and makes it durable before returning.
    pub fn append(&mut self, record: Record) -> Result<()> {
        if !self.config_written {
            write_atomic(&self.path().join(CONFIG_FILE), &to_pretty(&self.config))?;
            self.config_written = true;
        }
        let mut line = serde_json::to_string(&record).expect("records serialize");
        line.push('\n');
        let path = self.path().join(RESULTS_FILE);
        let err = |source| EvalError::Write {
            path: path.clone(),
            source,
        };
        self.results.write_all(line.as_bytes()).map_err(err)?;
        self.results.sync_data().map_err(err)?;
        self.records.push(record);
        Ok(())
    }
}

/// The configuration a folder was written with, if any.
pub fn read_config(dir: &Path) -> Result<Option<RunConfig>> {
    let path = dir.join(CONFIG_FILE);
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(longctx::Error::Io { path, source }.into()),
    };
    serde_json::from_str(&text).map(Some).map_err(|e| {
        EvalError::Invalid(format!(
            "{} is not a longctx run configuration ({e}); is this a result folder?",
            path.display()
        ))
    })
}

/// Reads `results.jsonl`. A last line without its newline was cut by a kill and is dropped (and
/// cut from the file, so the next append starts on a clean line); a bad line elsewhere means
/// the file was damaged, which is reported rather than silently skipped. A case recorded more
/// than once (two runs shared the folder before folders were locked) counts once, as its first
/// line; the later lines stay in the file, unread.
pub fn load_records(path: &Path) -> Result<Vec<Record>> {
    let mut seen = HashSet::new();
    let mut records = load_jsonl::<Record>(path)?;
    records.retain(|r| seen.insert(r.case.id()));
    Ok(records)
}

/// Reads a JSON-lines file written one durable line at a time, as [`load_records`] describes.
pub fn load_jsonl<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(longctx::Error::Io {
                path: path.to_path_buf(),
                source,
            }
            .into())
        }
    };
    let complete = text.rfind('\n').map_or(0, |i| i + 1);
    if complete < text.len() {
        let file = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|source| EvalError::Write {
                path: path.to_path_buf(),
                source,
            })?;
        file.set_len(complete as u64)
            .map_err(|source| EvalError::Write {
                path: path.to_path_buf(),
                source,
            })?;
    }
    let mut records = Vec::new();
    for (i, line) in text[..complete].lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let record: T = serde_json::from_str(line).map_err(|e| {
            EvalError::Invalid(format!(
                "line {} of {} is damaged ({e}); remove that line to resume",
                i + 1,
                path.display()
            ))
        })?;
        records.push(record);
    }
    Ok(records)
}

/// Cases of a sweep, shortest first so that early results come early.
pub fn plan(task: &dyn Task, lengths: &[usize], depths: &[f64], samples: u32) -> Result<Vec<Case>> {
    let mut cases = Vec::new();
    for &length in lengths {
        let samples = task.samples_at(length, samples)?;
        let depths: Vec<Option<f64>> = if task.uses_depth() {
            depths.iter().map(|&d| Some(d)).collect()
        } else {
            vec![None]
        };
        for depth in depths {
            for sample in 0..samples {
                cases.push(Case {
                    length,
                    depth,
                    sample,
                });
            }
        }
    }
    Ok(cases)
}

/// What the runner tells its caller as it goes.
pub enum Event<'a> {
    /// Before the first case: how many cases the sweep has, how many are already done, and the
    /// token lengths of the ones still to run (for a time estimate weighted by cost).
    Start {
        total: usize,
        done: usize,
        pending_tokens: &'a [usize],
    },
    /// A case finished and was recorded.
    Finished(&'a Record),
}

/// Runs every case of `cases` that `dir` does not hold yet.
pub fn run(
    task: &dyn Task,
    ctx: &TaskContext,
    engine: &mut Engine,
    dir: &mut RunDir,
    cases: &[Case],
    on_event: &mut dyn FnMut(Event),
) -> Result<()> {
    let pending: Vec<&Case> = cases.iter().filter(|c| !dir.is_done(c)).collect();
    let pending_tokens: Vec<usize> = pending.iter().map(|c| c.length).collect();
    on_event(Event::Start {
        total: cases.len(),
        done: cases.len() - pending.len(),
        pending_tokens: &pending_tokens,
    });
    for case in pending {
        let started = Instant::now();
        let outcome = task.run(case, ctx, engine)?;
        let record = Record {
            case: *case,
            outcome,
            seconds: started.elapsed().as_secs_f64(),
        };
        dir.append(record)?;
        on_event(Event::Finished(dir.records.last().expect("just appended")));
    }
    Ok(())
}

/// `existing` with the chunk size `chosen` where the two run every recorded case alike: a case
/// no longer than both is prefilled as one chunk under either. Folders written before the chosen
/// chunk size was recorded hold it clamped to their longest length, which this accepts.
fn as_chosen(existing: &RunConfig, chosen: usize, records: &[Record]) -> RunConfig {
    let fits_both = existing.chunk_size.min(chosen);
    let alike = records.iter().all(|r| r.case.length <= fits_both);
    RunConfig {
        chunk_size: if alike { chosen } else { existing.chunk_size },
        ..existing.clone()
    }
}

fn first_difference(a: &RunConfig, b: &RunConfig) -> Option<String> {
    let (a, b) = (
        serde_json::to_value(a).expect("config serializes"),
        serde_json::to_value(b).expect("config serializes"),
    );
    let (serde_json::Value::Object(a), serde_json::Value::Object(b)) = (a, b) else {
        return None;
    };
    a.iter()
        .find(|(key, value)| b.get(*key) != Some(value))
        .map(|(key, value)| {
            let new = b.get(key).cloned().unwrap_or(serde_json::Value::Null);
            format!("{key} was {value}, now {new}")
        })
}

fn to_pretty<T: Serialize>(value: &T) -> String {
    let mut text = serde_json::to_string_pretty(value).expect("values serialize");
    text.push('\n');
    text
}

/// Writes `path` through a temporary file and a rename, so a reader never sees half a file.
pub fn write_atomic(path: &Path, contents: &str) -> Result<()> {
    let tmp = path.with_extension("partial");
    let err = |source| EvalError::Write {
        path: path.to_path_buf(),
        source,
    };
    fs::write(&tmp, contents).map_err(err)?;
    fs::rename(&tmp, path).map_err(err)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn config() -> RunConfig {
        RunConfig {
            task: "passkey".into(),
            model: ModelInfo {
                file: "m.gguf".into(),
                sha256: "ab".into(),
                architecture: "llama".into(),
                trained_ctx: 512,
            },
            rope: "none".into(),
            kv: "full".into(),
            query: QueryMode::Aware,
            kv_dtype: "f16".into(),
            chunk_size: 512,
            chat_template: true,
            seed: 42,
            text: None,
            longctx_version: "0.1.0".into(),
        }
    }

    fn record(length: usize, sample: u32) -> Record {
        Record {
            case: Case {
                length,
                depth: Some(50.0),
                sample,
            },
            outcome: Outcome {
                score: Some(100.0),
                output: Some(" 123".into()),
                expected: vec!["123".into()],
                prompt_tokens: length - 16,
                ..Outcome::default()
            },
            seconds: 0.5,
        }
    }

    #[test]
    fn records_survive_reopening_and_a_torn_last_line_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let mut run = RunDir::open(dir.path(), &config()).unwrap();
        run.append(record(1024, 0)).unwrap();
        run.append(record(1024, 1)).unwrap();
        drop(run);
        // A kill in the middle of the third write leaves half a line.
        let path = dir.path().join(RESULTS_FILE);
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(b"{\"length\":2048,\"dep").unwrap();
        drop(file);

        let mut run = RunDir::open(dir.path(), &config()).unwrap();
        assert_eq!(run.records(), [record(1024, 0), record(1024, 1)]);
        run.append(record(2048, 0)).unwrap();
        let reopened = load_records(&path).unwrap();
        assert_eq!(
            reopened.len(),
            3,
            "the torn line is gone and the new one is whole"
        );
        assert_eq!(reopened[2], record(2048, 0));
    }

    #[test]
    fn a_folder_of_another_configuration_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut run = RunDir::open(dir.path(), &config()).unwrap();
        run.append(record(1024, 0)).unwrap();
        drop(run);
        let other = RunConfig {
            rope: "yarn:factor=4".into(),
            ..config()
        };
        let err = RunDir::open(dir.path(), &other).err().unwrap().to_string();
        assert!(
            err.contains("different configuration") && err.contains("rope"),
            "{err}"
        );
        assert!(err.contains("yarn:factor=4"), "{err}");
    }

    #[test]
    fn a_folder_in_use_is_refused_until_its_run_ends() {
        let dir = tempfile::tempdir().unwrap();
        let first = RunDir::open(dir.path(), &config()).unwrap();
        let err = RunDir::open(dir.path(), &config())
            .err()
            .expect("a second runner on the same folder is refused")
            .to_string();
        let pid = std::process::id();
        assert!(
            err.contains(&format!("is in use by another evaluation (pid {pid})"))
                && err.contains("wait for it or choose another --out"),
            "{err}"
        );
        // The OS frees the lock with its holder, so an ended (or killed) run leaves none.
        drop(first);
        RunDir::open(dir.path(), &config()).unwrap();
    }

    #[test]
    fn a_run_refused_before_its_first_case_leaves_no_configuration() {
        let dir = tempfile::tempdir().unwrap();
        drop(RunDir::open(dir.path(), &config()).unwrap());
        assert!(!dir.path().join(CONFIG_FILE).exists());
        let corrected = RunConfig {
            task: "passkey:digits=7".into(),
            ..config()
        };
        let mut run = RunDir::open(dir.path(), &corrected).unwrap();
        run.append(record(1024, 0)).unwrap();
        assert_eq!(read_config(dir.path()).unwrap(), Some(corrected));
    }

    #[test]
    fn a_configuration_without_results_gives_way_to_the_corrected_one() {
        // What a refused run of an earlier version left: config.json and no results.
        let dir = tempfile::tempdir().unwrap();
        write_atomic(&dir.path().join(CONFIG_FILE), &to_pretty(&config())).unwrap();
        let corrected = RunConfig {
            seed: 7,
            ..config()
        };
        let mut run = RunDir::open(dir.path(), &corrected).unwrap();
        run.append(record(1024, 0)).unwrap();
        assert_eq!(read_config(dir.path()).unwrap(), Some(corrected));
    }

    #[test]
    fn a_chunk_size_recorded_clamped_to_the_lengths_is_the_same_run() {
        // Before the chosen chunk size was recorded, `--lengths 256` recorded the default 512
        // clamped to 256; every case ran in one chunk, as it does under 512.
        let dir = tempfile::tempdir().unwrap();
        let clamped = RunConfig {
            chunk_size: 256,
            ..config()
        };
        let mut run = RunDir::open(dir.path(), &clamped).unwrap();
        run.append(record(256, 0)).unwrap();
        drop(run);
        let mut run = RunDir::open(dir.path(), &config()).unwrap();
        assert_eq!(run.records(), [record(256, 0)]);
        run.append(record(256, 1)).unwrap();
        assert_eq!(read_config(dir.path()).unwrap(), Some(config()));
        drop(run);
        // And the other way: 256 chosen on a folder of 512 whose cases all fit 256.
        let mut run = RunDir::open(dir.path(), &clamped).unwrap();
        run.append(record(256, 2)).unwrap();
        drop(run);
        let mut run = RunDir::open(dir.path(), &config()).unwrap();
        run.append(record(1024, 0)).unwrap();
        assert_eq!(run.records().len(), 4);
        drop(run);

        // A folder whose cases ran in more than one chunk under either size is another run.
        let dir = tempfile::tempdir().unwrap();
        let small = RunConfig {
            chunk_size: 128,
            ..config()
        };
        let mut run = RunDir::open(dir.path(), &small).unwrap();
        run.append(record(256, 0)).unwrap();
        drop(run);
        let err = RunDir::open(dir.path(), &config())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("chunk_size was 128, now 512"), "{err}");
    }

    #[test]
    fn a_case_recorded_twice_counts_once() {
        // What two runs in one folder wrote before folders were locked: every case twice.
        let dir = tempfile::tempdir().unwrap();
        let mut run = RunDir::open(dir.path(), &config()).unwrap();
        let first = [record(1024, 0), record(1024, 1), record(2048, 0)];
        for r in &first {
            run.append(r.clone()).unwrap();
        }
        let mut later = first.clone();
        for r in &mut later {
            r.seconds = 9.0;
            run.append(r.clone()).unwrap();
        }
        drop(run);
        let path = dir.path().join(RESULTS_FILE);
        assert_eq!(fs::read_to_string(&path).unwrap().lines().count(), 6);

        let run = RunDir::open(dir.path(), &config()).unwrap();
        assert_eq!(run.records(), first, "the first line of each case is kept");
        drop(run);
        let results = crate::report::RunResults::load(dir.path()).unwrap();
        crate::report::write_report(dir.path(), &[results]).unwrap();
        let summary: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(dir.path().join("summary.json")).unwrap())
                .unwrap();
        assert_eq!(summary["runs"][0]["cases"], 3);
        assert_eq!(summary["runs"][0]["wall_seconds"], 1.5);
    }

    #[test]
    fn a_damaged_line_in_the_middle_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(RESULTS_FILE);
        let good = serde_json::to_string(&record(1024, 0)).unwrap();
        fs::write(&path, format!("{good}\nnot json\n{good}\n")).unwrap();
        let err = load_records(&path).unwrap_err().to_string();
        assert!(err.contains("line 2"), "{err}");
    }
}

/// The runner end to end on the tiny fixture model: a kill halfway loses nothing and repeats
/// nothing on resume, and the report is built from what was recorded.
#[cfg(test)]
mod resume_tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::report::{write_report, RunResults};
    use crate::task::testing::context;
    use crate::tasks::passkey::Passkey;

    /// Passkey, but the process "dies" when case number `die_at` starts.
    struct Dying {
        calls: AtomicUsize,
        die_at: usize,
    }

    impl Task for Dying {
        fn spec(&self) -> String {
            "passkey".into()
        }

        fn run(&self, case: &Case, ctx: &TaskContext, engine: &mut Engine) -> Result<Outcome> {
            if self.calls.fetch_add(1, Ordering::SeqCst) + 1 == self.die_at {
                return Err(EvalError::Invalid("killed".into()));
            }
            Passkey::default().run(case, ctx, engine)
        }
    }

    #[test]
    fn a_killed_run_resumes_without_losing_or_repeating_cases() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = context(None);
        let mut session = crate::task::testing::session(&ctx, 640);
        let mut engine = Engine {
            session: &mut session,
            query: QueryMode::Aware,
        };
        let dying = Dying {
            calls: AtomicUsize::new(0),
            die_at: 4,
        };
        let cases = plan(&dying, &[512, 640], &[0.0, 100.0], 2).unwrap();
        assert_eq!(cases.len(), 8);
        let config = super::tests::config();

        let mut run_dir = RunDir::open(dir.path(), &config).unwrap();
        let err = run(&dying, &ctx, &mut engine, &mut run_dir, &cases, &mut |_| {});
        assert!(err.is_err());
        assert_eq!(
            run_dir.records().len(),
            3,
            "the three finished cases are on disk"
        );
        drop(run_dir);

        let resumed = Dying {
            calls: AtomicUsize::new(0),
            die_at: usize::MAX,
        };
        let mut run_dir = RunDir::open(dir.path(), &config).unwrap();
        let mut started_with = 0;
        run(
            &resumed,
            &ctx,
            &mut engine,
            &mut run_dir,
            &cases,
            &mut |event| {
                if let Event::Start { done, .. } = event {
                    started_with = done;
                }
            },
        )
        .unwrap();
        assert_eq!(started_with, 3);
        assert_eq!(
            resumed.calls.load(Ordering::SeqCst),
            5,
            "only the missing cases ran"
        );
        let records = load_records(&dir.path().join(RESULTS_FILE)).unwrap();
        let mut seen: Vec<Case> = records.iter().map(|r| r.case).collect();
        seen.sort_by_key(Case::id);
        let mut expected = cases.clone();
        expected.sort_by_key(Case::id);
        assert_eq!(seen, expected, "every case exactly once");

        // The report reads the folder back and draws the heatmap.
        let files = write_report(dir.path(), &[RunResults::load(dir.path()).unwrap()]).unwrap();
        for name in [
            "report.md",
            "summary.json",
            "scores.png",
            "heatmap-passkey.png",
        ] {
            assert!(
                files.iter().any(|f| f.ends_with(name)),
                "{name} missing: {files:?}"
            );
        }
        let md = std::fs::read_to_string(dir.path().join("report.md")).unwrap();
        assert!(md.contains("| depth \\ length |"), "{md}");
    }
}

/// Calibration end to end: a run whose engine fails the task at its shortest length, inside the
/// trained window, is flagged in report.md and summary.json; one that passes there is not.
#[cfg(test)]
mod calibration_tests {
    use super::*;
    use crate::report::{calibration_line, write_report, RunResults};
    use crate::task::testing::context;

    /// An engine stand-in that "retrieves" only at lengths of at least `works_from` tokens.
    struct WorksFrom(usize);

    impl Task for WorksFrom {
        fn spec(&self) -> String {
            format!("works-from:{}", self.0)
        }

        fn run(&self, case: &Case, _: &TaskContext, _: &mut Engine) -> Result<Outcome> {
            Ok(Outcome {
                score: Some(if case.length >= self.0 { 100.0 } else { 0.0 }),
                prompt_tokens: case.length,
                ..Outcome::default()
            })
        }
    }

    fn report_of(task: &WorksFrom, lengths: &[usize], trained: usize) -> (String, String, String) {
        let dir = tempfile::tempdir().unwrap();
        let ctx = context(None);
        let mut session = crate::task::testing::session(&ctx, 512);
        let mut engine = Engine {
            session: &mut session,
            query: QueryMode::Aware,
        };
        let mut config = super::tests::config();
        config.task = task.spec();
        config.model.trained_ctx = trained;
        let mut run_dir = RunDir::open(dir.path(), &config).unwrap();
        let cases = plan(task, lengths, &[0.0, 100.0], 1).unwrap();
        run(task, &ctx, &mut engine, &mut run_dir, &cases, &mut |_| {}).unwrap();
        let results = RunResults::load(dir.path()).unwrap();
        write_report(dir.path(), &[results]).unwrap();
        let results = RunResults::load(dir.path()).unwrap();
        (
            std::fs::read_to_string(dir.path().join("report.md")).unwrap(),
            std::fs::read_to_string(dir.path().join("summary.json")).unwrap(),
            calibration_line(&results).unwrap(),
        )
    }

    #[test]
    fn a_task_the_model_fails_inside_its_window_is_flagged() {
        let (md, json, line) = report_of(&WorksFrom(2048), &[1024, 2048, 4096], 8192);
        assert!(
            line.contains("NOT CALIBRATED") && line.contains("0 at 1k"),
            "{line}"
        );
        assert!(
            md.contains("## Calibration") && md.contains("NOT CALIBRATED, 0 at 1k"),
            "{md}"
        );
        assert!(
            md.contains("| calibration | **failed** (0 at 1k) |"),
            "{md}"
        );
        let summary: serde_json::Value = serde_json::from_str(&json).unwrap();
        let calibration = &summary["runs"][0]["calibration"];
        assert_eq!(calibration["verdict"], "failed");
        assert_eq!(calibration["length"], 1024);
    }

    #[test]
    fn a_task_the_model_does_inside_its_window_passes() {
        let (md, json, line) = report_of(&WorksFrom(0), &[1024, 2048], 8192);
        assert!(line.contains("calibrated, 100 at 1k"), "{line}");
        assert!(!md.contains("NOT CALIBRATED"), "{md}");
        let summary: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(summary["runs"][0]["calibration"]["verdict"], "passed");
    }

    #[test]
    fn a_run_past_the_window_only_cannot_be_calibrated_and_says_so() {
        let (_, json, line) = report_of(&WorksFrom(0), &[16384], 8192);
        assert!(
            line.contains("no length inside the trained 8192-token window"),
            "{line}"
        );
        let summary: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(summary["runs"][0]["calibration"]["verdict"], "outside");
    }
}
