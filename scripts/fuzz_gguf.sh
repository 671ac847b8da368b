#!/bin/sh
# A long run of the GGUF reader's property tests (crates/longctx/tests/gguf.rs): random damage to
# the headers of the fixture models and of the default model (when it is downloaded), each file
# loaded or refused with an error, never a panic nor an allocation sized by a damaged length.
# `cargo test` runs 256 cases; this runs CASES (default 100000), about 7 minutes on 2 cores.
#
# The test profile already builds with opt-level 3 (Cargo.toml), so this reuses the build that
# `cargo test` made instead of a separate release build of every dependency.
#
# proptest shrinks a failure and saves it in crates/longctx/tests/gguf.proptest-regressions, which
# it replays first on every later run: commit that file with the fix, and add the case as an
# explicit test in tests/gguf.rs.
set -e
cd "$(dirname "$0")/.."
LONGCTX_FUZZ_CASES=${CASES:-100000} exec cargo test -p longctx --test gguf fuzz -- --nocapture
