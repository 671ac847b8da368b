#!/bin/sh
# Runs the property tests long: the spec grammar and every scheme and policy built from it
# (crates/longctx/tests/specs.rs), the tokenizer on arbitrary text and ids and the chat-template
# renderer on arbitrary small templates (crates/longctx/tests/fuzz.rs). `cargo test` runs them
# short; here each property runs CASES cases (default 100000). The test profile already builds
# with opt-level 3, so the build `cargo test` made is reused. The tokenizer properties need the
# default model (fetched on first use).
#
# A failure prints its minimal input: fix the cause, and add the input to the test file's
# regression test so that it stays fixed.
set -e
cd "$(dirname "$0")/.."
CASES=${CASES:-100000}
export LONGCTX_FUZZ_CASES="$CASES"
for harness in specs fuzz; do
    echo "== $harness: $CASES cases per property"
    cargo test -p longctx --test "$harness" -- --test-threads=2
done
