#!/bin/sh
# Measures the position schemes on the default model (trained on 8k tokens) for
# docs/results/extension.md. Every command resumes where it stopped if interrupted (finished
# cases are kept and skipped), so rerunning the script continues the sweep; `time` gives the
# wall times. Run from the repository root after `cargo build --release`.
#
# Cost on 2 cores (since blockwise prefill attention): a 16k passkey case 3–4 minutes, a 32k one
# about three times that; the script runs the cheap and telling measurements first.
set -e
LONGCTX=${LONGCTX:-target/release/longctx}
OUT=docs/results/extension
t() { /usr/bin/time -f "%e s wall: $*" "$@"; }
slug() { echo "$1" | tr ':=,+' '-___'; }

# Recommended parameters for a 2× stretch (16k on an 8k model); self_extend follows LongLM's
# rule W + (N − W)/G < 2/3 · L.
SCHEMES="linear:factor=2 ntk:factor=2 dynamic:factor=2 yarn:factor=2 llama3:factor=2 self_extend:group=4,window=1024 yarn:factor=2+logn"

# Perplexity at 16k (one window) and at 8k (two windows of the same 16,384 tokens).
for rope in $SCHEMES; do
    t $LONGCTX eval ppl --lengths 16k --rope "$rope" --threads 2 --out "$OUT/ppl-$(slug "$rope")"
done
for rope in $SCHEMES; do
    [ "$rope" = dynamic:factor=2 ] && continue # the model's own RoPE up to the trained length
    t $LONGCTX eval ppl:span=16384 --lengths 8k --rope "$rope" --threads 2 --out "$OUT/ppl8k-$(slug "$rope")"
done

# LongRoPE factors searched for 16k (a small population; each candidate is one 16k perplexity).
t $LONGCTX rope-search --target 16k --population 3 --iterations 1 --mutations 1 --crossovers 1 --parents 2 --threads 2 --out "$OUT/rope-search-16k"

# The calibrated passkey probe (the vault wording, 100% at 1k–8k with the model's own RoPE:
# docs/results/baseline.md) at 16k, 2x the trained window. The folders passkey16k-* beside them
# hold the old pass-key wording, which this model fails inside its window; the model's own RoPE
# at 16k is in docs/results/baseline/passkey-vault (run_probes.sh).
PROBE=passkey:wording=vault
for rope in yarn:factor=2 self_extend:group=4,window=1024 dynamic:factor=2 ntk:factor=2 llama3:factor=2 linear:factor=2 self_extend:group=4,window=1024,mode=block yarn:factor=2+logn "longrope:factors=$OUT/rope-search-16k/best.json"; do
    t $LONGCTX eval $PROBE --lengths 16k --depths 0,50,100 --rope "$rope" --threads 2 --out "$OUT/vault16k-$(slug "$(echo "$rope" | sed 's|factors=.*/|factors=|')")"
done

# A retrieval task the model passes inside its window (niah_single_2: 100% up to 4k).
for rope in yarn:factor=2 self_extend:group=4,window=1024 dynamic:factor=2; do
    t $LONGCTX eval niah_single_2 --lengths 16k --depths 0,50,100 --rope "$rope" --threads 2 --out "$OUT/niah16k-$(slug "$rope")"
done

# 4x the trained window: factor-4 settings (Self-Extend group 8 keeps LongLM's rule at 32k).
for rope in yarn:factor=4 self_extend:group=8,window=1024 dynamic:factor=4 ntk:factor=4 llama3:factor=4 linear:factor=4; do
    t $LONGCTX eval $PROBE --lengths 32k --depths 0,50,100 --rope "$rope" --threads 2 --out "$OUT/vault32k-$(slug "$rope")"
done
