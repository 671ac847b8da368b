#!/bin/sh
# Measures the position schemes on the default model (trained on 8k tokens) for
# docs/results/extension.md. Every command resumes where it stopped if interrupted; `time` gives
# the wall times quoted there. Run from the repository root after `cargo build --release`.
#
# The passkey sweeps at 16k and 32k cost about 7 and 30 minutes per case on 2 cores (prefill is
# quadratic in attention), so the script runs the cheap measurements first: perplexity at 16k
# for every scheme, then passkey at 16k, then 32k.
set -e
LONGCTX=${LONGCTX:-target/release/longctx}
OUT=docs/results/extension
t() { /usr/bin/time -f "%e s wall: $*" "$@"; }
slug() { echo "$1" | tr ':=,+' '-___'; }

# Recommended parameters for a 2× stretch (16k on an 8k model); self_extend follows LongLM's
# rule W + (N − W)/G < 2/3 · L.
SCHEMES="linear:factor=2 ntk:factor=2 dynamic:factor=2 yarn:factor=2 llama3:factor=2 self_extend:group=4,window=1024 yarn:factor=2+logn"

for rope in $SCHEMES; do
    t $LONGCTX eval ppl --lengths 16k --rope "$rope" --threads 2 --out "$OUT/ppl-$(slug "$rope")"
done
for rope in $SCHEMES; do
    t $LONGCTX eval passkey --lengths 16k --depths 0,50,100 --rope "$rope" --threads 2 --out "$OUT/passkey16k-$(slug "$rope")"
done
# 4× the trained window.
for rope in linear:factor=4 ntk:factor=4 dynamic:factor=4 yarn:factor=4 llama3:factor=4 self_extend:group=8,window=1024; do
    t $LONGCTX eval passkey --lengths 32k --depths 0,50,100 --rope "$rope" --threads 2 --out "$OUT/passkey32k-$(slug "$rope")"
done
