//! The maximum effective context window of a task: the task run across lengths, reported as the
//! largest length whose score stays at or above a threshold, and where a fit of score against
//! log-length crosses 80.
//!
//! After Paulsen, "Context Is What You Need: The Maximum Effective Context Window for Real World
//! Limits of LLMs" (arXiv 2509.21361), with RULER's effective-length threshold of 85.6 (Hsieh et
//! al., COLM 2024) as default, and the log-length interpolation of epoch.ai's context-window
//! analysis. The cases are the inner task's; the window is computed in the report
//! (`report::mecw`), so `longctx eval report` recomputes it from any result folder.

use longctx::spec::{Params, Spec, SpecPart};

use crate::report::RULER_THRESHOLD;
use crate::task::{task_from_spec, Case, Engine, Outcome, Synthetic, Task, TaskContext, TaskEntry};
use crate::{EvalError, Result};

pub const ENTRY: TaskEntry = TaskEntry {
    name: "mecw",
    about: "maximum effective context window of task=NAME (default passkey) at threshold=85.6",
    build,
};

pub struct MaxEffectiveWindow {
    inner: Box<dyn Task>,
    threshold: f64,
}

fn build(part: &SpecPart) -> Result<Box<dyn Task>> {
    let mut params = Params::new(part);
    let inner = params.raw("task").unwrap_or("passkey");
    let threshold: f64 = params.get("threshold", RULER_THRESHOLD)?;
    params.finish(&["task", "threshold"])?;
    if !(0.0..=100.0).contains(&threshold) {
        return Err(EvalError::Invalid(format!(
            "mecw: threshold {threshold} is outside 0–100"
        )));
    }
    let spec: Spec = inner.parse()?;
    if spec
        .parts
        .iter()
        .any(|p| p.name == "mecw" || p.name == "ppl")
    {
        return Err(EvalError::Invalid(format!(
            "mecw: task={inner} has no score to threshold; use a retrieval task such as passkey or niah_single_1"
        )));
    }
    Ok(Box::new(MaxEffectiveWindow {
        inner: task_from_spec(&spec)?,
        threshold,
    }))
}

impl Task for MaxEffectiveWindow {
    fn spec(&self) -> String {
        format!("mecw:threshold={}+{}", self.threshold, self.inner.spec())
    }

    fn uses_depth(&self) -> bool {
        self.inner.uses_depth()
    }

    fn needs_text(&self) -> bool {
        self.inner.needs_text()
    }

    fn samples_at(&self, length: usize, requested: u32) -> Result<u32> {
        self.inner.samples_at(length, requested)
    }

    fn run(&self, case: &Case, ctx: &TaskContext, engine: &mut Engine) -> Result<Outcome> {
        self.inner.run(case, ctx, engine)
    }

    fn as_synthetic(&self) -> Option<&dyn Synthetic> {
        self.inner.as_synthetic()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wraps_the_named_task_and_records_the_threshold() {
        let spec: Spec = "mecw:task=niah_single_1,threshold=90".parse().unwrap();
        let task = task_from_spec(&spec).unwrap();
        assert_eq!(
            task.spec(),
            "mecw:threshold=90+niah:haystack=noise,key=words,value=numbers,keys=1,values=1,queries=1"
        );
        let default = task_from_spec(&"mecw".parse().unwrap()).unwrap();
        assert_eq!(
            default.spec(),
            "mecw:threshold=85.6+passkey:wording=vault,digits=5"
        );
        for bad in ["mecw:task=ppl", "mecw:threshold=120", "mecw:task=nope"] {
            assert!(task_from_spec(&bad.parse().unwrap()).is_err(), "{bad}");
        }
    }
}
