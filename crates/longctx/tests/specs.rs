//! Every parameter of every position scheme and KV policy, given a value that makes no sense,
//! is refused with a sentence (issue 19, item 7); and the spec grammar under proptest: parsing
//! never panics, what parses prints back to itself, and building any parsed spec never panics.
//!
//! The property tests run `LONGCTX_FUZZ_CASES` cases each (a few hundred by default, so that
//! `cargo test` stays quick); `scripts/fuzz_specs.sh` runs them long. A failure found there is
//! kept below as an explicit regression case.

use longctx::kv::{self, Shape};
use longctx::positions::{self, Base, ModelRope};
use longctx::spec::Spec;
use proptest::prelude::*;

fn base() -> Base {
    Base {
        rope: ModelRope {
            base: 100000.0,
            dims: 64,
            freq_factors: None,
            linear_factor: 1.0,
        },
        trained_ctx: 8192,
    }
}

fn shape() -> Shape {
    Shape {
        n_layer: 4,
        n_head: 4,
        n_kv_head: 2,
        head_dim: 64,
        local: Vec::new(),
    }
}

fn build_rope(spec: &Spec) -> longctx::Result<()> {
    positions::build(spec, &base(), 8192).map(drop)
}

fn build_kv(spec: &Spec) -> longctx::Result<()> {
    kv::build_policy(spec, &shape())?;
    kv::build_kivi(spec, &shape()).map(drop)
}

/// A spec each registry entry accepts, to vary one parameter of at a time.
fn valid(name: &str) -> Option<&'static str> {
    Some(match name {
        "none" => "none",
        "linear" => "linear:factor=2",
        "ntk" => "ntk:factor=2",
        "dynamic" => "dynamic:factor=2",
        "yarn" => "yarn:factor=2",
        "llama3" => "llama3:factor=2",
        "longrope" => "longrope:factors=FILE",
        "self_extend" => "self_extend:group=2,window=64",
        "string" => "string",
        "logn" => "yarn:factor=2+logn",
        "auto" => "auto:16384",
        "full" => "full",
        "streaming" => "streaming",
        "snapkv" | "h2o" | "tova" | "scope" | "knorm" | "pyramid" | "windowkv" | "finch" => {
            return Some(match name {
                "snapkv" => "snapkv:budget=64",
                "h2o" => "h2o:budget=64",
                "tova" => "tova:budget=64",
                "scope" => "scope:budget=64",
                "knorm" => "knorm:budget=64",
                "pyramid" => "pyramid:budget=64",
                "windowkv" => "windowkv:budget=64",
                _ => "finch:budget=64",
            })
        }
        "kivi" => "kivi",
        _ => return None,
    })
}

/// The parameters an entry takes, as its own error for an unknown one lists them: so a
/// parameter added later is covered without anyone remembering to list it here.
fn parameters(spec: &str, build: fn(&Spec) -> longctx::Result<()>) -> Vec<String> {
    let name = spec.rsplit('+').next().unwrap().split(':').next().unwrap();
    if name == "auto" {
        return vec![String::new()];
    }
    let sep = if spec.ends_with(name) { ":" } else { "," };
    let probe: Spec = format!("{spec}{sep}zzz=1").parse().unwrap();
    let err = build(&probe).unwrap_err().to_string();
    if err.contains("takes no parameters") {
        return Vec::new();
    }
    match err.split_once("it takes ") {
        Some((_, list)) => list
            .trim_end_matches('.')
            .split(", ")
            .map(str::to_string)
            .collect(),
        None => panic!("{spec}: cannot tell its parameters from `{err}`"),
    }
}

/// `spec` with `key` set to `value` on its last part (a positional value when `key` is empty).
fn with_param(spec: &str, key: &str, value: &str) -> Spec {
    let mut spec: Spec = spec.parse().unwrap();
    let part = spec.parts.last_mut().unwrap();
    part.params.retain(|(k, _)| k != key);
    part.params.push((key.to_string(), value.to_string()));
    spec
}

const ABSURD: &[&str] = &[
    "1e308",
    "-1",
    "NaN",
    "inf",
    "-inf",
    "1e11",
    "100000000000",
    "18446744073709551616",
    "-0.5",
];

#[test]
fn every_parameter_of_every_scheme_and_policy_refuses_absurd_values() {
    let dir = tempfile::tempdir().unwrap();
    let factors = dir.path().join("factors.json");
    positions::LongRopeFactors {
        short_factor: vec![1.0; 32],
        long_factor: vec![2.0; 32],
        original_max_position_embeddings: None,
        max_position_embeddings: None,
    }
    .save(&factors)
    .unwrap();
    let entries = positions::SCHEMES
        .iter()
        .map(|(name, _)| (*name, build_rope as fn(&Spec) -> longctx::Result<()>))
        .chain(kv::POLICIES.iter().map(|e| (e.name, build_kv as _)))
        .chain([("kivi", build_kv as _)]);
    let mut checked = 0;
    for (name, build) in entries {
        let spec = valid(name)
            .unwrap_or_else(|| panic!("add a valid `{name}` spec to this test"))
            .replace("FILE", factors.to_str().unwrap());
        build(&spec.parse().unwrap()).unwrap_or_else(|e| panic!("{spec}: {e}"));
        for key in parameters(&spec, build) {
            for value in ABSURD {
                let absurd = with_param(&spec, &key, value);
                match build(&absurd) {
                    Ok(()) => panic!("`{absurd}` was accepted"),
                    Err(e) => {
                        let e = e.to_string();
                        assert!(
                            e.contains(value) || key == "factors",
                            "`{absurd}`: the error does not show the value: {e}"
                        );
                    }
                }
                checked += 1;
            }
        }
    }
    assert!(checked > 300, "only {checked} cases");
}
