#!/bin/sh
# Measures Gemma 3 270M (base, Q4_K_M, trained on 32k tokens; 15 of its 18 layers attend a
# 512-token sliding window) for docs/results/gemma3.md: its own window, the position schemes at
# 2x and 4x, and the KV policies at 32k. Every command resumes where it stopped if interrupted
# (finished cases are kept and skipped; a folder may be rerun with more lengths or depths), so
# rerunning the script continues the sweep. Run from the repository root after
# `cargo build --release`; `STAGE=baseline|extension|kv` runs one part, `QUICK=1` only the
# depths 0/50/100 of each part (what this machine measured first).
#
# Cost on 2 idle cores (Intel Xeon, AVX-512), measured before the 2026-12-07 kernels: a 1k case
# ~7 s, 4k ~13 s, 8k ~30 s, 16k ~70 s, 32k ~3 min; with them (32k prefill 2x faster) estimated
# 32k ~2.5 min, 64k ~6 min, 128k ~17 min (the 3 global layers' attention grows with the square).
# Anything else running on the machine multiplies these.
set -e
LONGCTX=${LONGCTX:-target/release/longctx}
MODEL=${MODEL:-gemma3}
OUT=docs/results/gemma3
STAGE=${STAGE:-all}
t() { /usr/bin/time -f "%e s wall: $*" "$@"; }
slug() { echo "$1" | tr ':=,+/' '-___-'; }
if [ -n "$QUICK" ]; then DEPTHS=0,50,100; else DEPTHS=0,25,50,75,100; fi
eval_() { t $LONGCTX eval "$@" --model "$MODEL" --threads 2; }

if [ "$STAGE" = all ] || [ "$STAGE" = baseline ]; then
    # The model's own RoPE inside its trained window: the probes at 1k-16k with five depths,
    # 32k with three, and perplexity at 4k-32k over the same first 32,768 tokens of the text.
    for task in passkey niah_single_2 niah_multikey_1 vt; do
        eval_ "$task" --lengths 1k,4k,8k,16k --depths $DEPTHS --out "$OUT/baseline/$task"
        eval_ "$task" --lengths 32k --depths 0,50,100 --out "$OUT/baseline/$task"
    done
    eval_ ppl:span=32768 --lengths 4k,8k,16k,32k --out "$OUT/baseline/ppl"
    $LONGCTX eval report "$OUT/baseline/passkey" "$OUT/baseline/niah_single_2" \
        "$OUT/baseline/niah_multikey_1" "$OUT/baseline/vt" --out "$OUT/baseline/compared"
fi

if [ "$STAGE" = all ] || [ "$STAGE" = extension ]; then
    # 2x and 4x the trained window. Schemes change the 3 global layers only; Self-Extend keeps
    # LongLM's rule W + (N - W)/G < 2/3 L (L = 32k) with a 2k neighbour window.
    X2="linear:factor=2 ntk:factor=2 dynamic:factor=2 yarn:factor=2 llama3:factor=2 self_extend:group=4,window=2048"
    X4="linear:factor=4 ntk:factor=4 dynamic:factor=4 yarn:factor=4 llama3:factor=4 self_extend:group=8,window=2048"
    for task in passkey niah_single_2; do
        eval_ "$task" --lengths 32k --depths 0,50,100 --rope string --out "$OUT/extension/$task-32k-string"
        eval_ "$task" --lengths 32k --depths 0,50,100 --rope string:attention_factor=1 \
            --out "$OUT/extension/$task-32k-string-attention_factor_1"
        for rope in none $X2; do
            eval_ "$task" --lengths 64k --depths 0,50,100 --rope "$rope" --out "$OUT/extension/$task-64k-$(slug "$rope")"
        done
        for rope in none $X4; do
            eval_ "$task" --lengths 128k --depths 0,50,100 --rope "$rope" --out "$OUT/extension/$task-128k-$(slug "$rope")"
        done
    done
    for rope in none $X2; do
        eval_ ppl:span=65536 --lengths 64k --rope "$rope" --out "$OUT/extension/ppl-64k-$(slug "$rope")"
    done
    # LongRoPE factors searched for 64k: a population this machine affords (each candidate is
    # one 64k perplexity, ~25 min).
    t $LONGCTX rope-search --model "$MODEL" --target 64k --population 3 --iterations 1 \
        --mutations 1 --crossovers 1 --parents 2 --threads 2 --out "$OUT/extension/rope-search-64k"
    # One report a task and length, every scheme beside the model's own RoPE.
    for task in passkey niah_single_2; do
        for length in 64k 128k; do
            if [ $length = 64k ]; then schemes="none $X2"; else schemes="none $X4"; fi
            $LONGCTX eval report $(for rope in $schemes; do
                echo "$OUT/extension/$task-$length-$(slug "$rope")"; done) \
                --out "$OUT/extension/compared-$task-$length"
        done
    done
fi

if [ "$STAGE" = all ] || [ "$STAGE" = kv ]; then
    # Every policy at 25% and 10% of the global layers' cache at 32k, question-aware and
    # agnostic (kvpress's protocol); local layers hold their window whatever the policy. The
    # prefill chunk holds the whole prompt, so each policy compresses once, after it, as the
    # papers and kvpress do (the SmolLM2 page's setup).
    KV="--lengths 32k --depths 0,50,100 --chunk-size 40960"
    POLICIES="streaming h2o snapkv pyramid tova windowkv scope finch knorm"
    for task in niah_single_2 niah_multikey_1 vt; do
        for query in aware agnostic; do
            eval_ "$task" $KV --query $query --out "$OUT/kv/$task-full-$query"
            for policy in $POLICIES; do
                for ratio in 0.25 0.1; do
                    eval_ "$task" $KV --kv "$policy:ratio=$ratio" \
                        --query $query --out "$OUT/kv/$task-$policy-$ratio-$query"
                done
            done
            # One report a task, protocol and budget, every policy beside the full cache.
            for ratio in 0.25 0.1; do
                $LONGCTX eval report "$OUT/kv/$task-full-$query" $(for policy in $POLICIES; do
                    echo "$OUT/kv/$task-$policy-$ratio-$query"; done) \
                    --out "$OUT/kv/compared-$task-$ratio-$query"
            done
        done
    done
fi
