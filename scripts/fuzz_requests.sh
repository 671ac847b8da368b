#!/bin/sh
# A long run of the request-body property test (crates/longctx-server/tests/adversarial.rs):
# generated malformed and hostile bodies sent to every endpoint of a real server on a real socket;
# each must get a well-formed 2xx/4xx answer, and the server must stay up. `cargo test` runs 300
# cases; this runs CASES (default 5000, about 5 minutes on 2 cores). A failure prints its body:
# fix the cause and add the body to the hostile cases in the same file.
set -e
cd "$(dirname "$0")/.."
LONGCTX_FUZZ_CASES=${CASES:-5000} exec cargo test -p longctx-server --test adversarial -- --nocapture
