#!/bin/sh
# Measures the KV policies on the default model for docs/results/kv.md. Every command resumes
# where it stopped (finished cases are kept and skipped), so rerunning the script continues the
# sweep; the cheap and telling measurements come first. Run from the repository root after
# `cargo build --release -p longctx-cli`.
#
# CHUNK is the prefill chunk: 8192 (the default here) compresses a 4k or 8k prompt once, after
# the whole prompt, as kvpress and the papers do; 512 compresses after every chunk, which bounds
# the cache by budget + chunk at some cost in quality (both are reported).
#
# Cost on 2 cores: a 4k case is about 35 s, an 8k case about 2 minutes; the whole grid (every
# policy x 3 budgets x 2 query modes x 5 tasks x 2 lengths) is about two days there.
set -e
LONGCTX=${LONGCTX:-target/release/longctx}
OUT=${OUT:-docs/results/kv}
LENGTHS=${LENGTHS:-4k}
CHUNK=${CHUNK:-8192}
POLICIES=${POLICIES:-"snapkv h2o tova pyramid streaming knorm finch windowkv scope"}
t() { /usr/bin/time -f "%e s wall: $*" "$@"; }
slug() { echo "$1" | tr ':=,+' '-___'; }
depths() { case "$1" in niah_single*) echo 10,50,90 ;; *) echo 50 ;; esac; }
spec() { # policy ratio
    case "$1" in
        streaming) echo "streaming:budget=$(awk "BEGIN { print int(4096 * $2) }")" ;;
        *) echo "$1:ratio=$2" ;;
    esac
}
run() { # task kv-spec query-mode
    t $LONGCTX eval "$1" --lengths "$LENGTHS" --depths "$(depths "$1")" --threads 2 \
        --chunk-size "$CHUNK" --kv "$2" --query "$3" --out "$OUT/$1-$3-$(slug "$2")-c$CHUNK"
}

for tasks in "niah_single_2 niah_multikey_1 niah_multivalue" "vt cwe"; do
    for task in $tasks; do
        # The full cache once: both query modes see the same cache when nothing is evicted.
        run "$task" full aware
        for mode in aware agnostic; do
            for policy in $POLICIES; do run "$task" "$(spec "$policy" 0.25)" "$mode"; done
        done
    done
done
for task in niah_single_2 niah_multikey_1 niah_multivalue vt cwe; do
    for mode in aware agnostic; do
        for ratio in 0.5 0.1; do
            for policy in $POLICIES; do run "$task" "$(spec "$policy" "$ratio")" "$mode"; done
        done
    done
done
# Chunked prefill (the cache bounded by budget + 512 while the prompt goes in) and KIVI.
CHUNK=512
for task in niah_single_2 niah_multikey_1 niah_multivalue vt cwe; do
    for policy in $POLICIES; do run "$task" "$(spec "$policy" 0.25)" aware; done
done
CHUNK=8192
for task in niah_single_2 niah_multikey_1 niah_multivalue vt cwe; do
    for bits in 8 4 2; do run "$task" "kivi:bits=$bits" aware; done
    run "$task" "snapkv:ratio=0.25+kivi:bits=4" aware
done
