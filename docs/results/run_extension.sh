#!/bin/sh
# Measures the position schemes on the default model (trained on 8k tokens) for
# docs/results/extension.md. Every command resumes where it stopped if interrupted (finished
# cases are kept and skipped), so rerunning the script continues the sweep; `time` gives the
# wall times. Run from the repository root after `cargo build --release`.
#
# Cost on 2 cores: a 16k case 6–9 minutes, a 32k case about four times that; the script runs the
# cheap and telling measurements first.
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

# Passkey at 16k.
for rope in yarn:factor=2 self_extend:group=4,window=1024 dynamic:factor=2 ntk:factor=2 llama3:factor=2 linear:factor=2 self_extend:group=4,window=1024,mode=block "longrope:factors=$OUT/rope-search-16k/best.json"; do
    t $LONGCTX eval passkey --lengths 16k --depths 0,50,100 --rope "$rope" --threads 2 --out "$OUT/passkey16k-$(slug "$(echo "$rope" | sed 's|factors=.*/|factors=|')")"
done

# A retrieval task the model passes inside its window (niah_single_2: 100% up to 4k).
for rope in yarn:factor=2 self_extend:group=4,window=1024 dynamic:factor=2; do
    t $LONGCTX eval niah_single_2 --lengths 16k --depths 0,50,100 --rope "$rope" --threads 2 --out "$OUT/niah16k-$(slug "$rope")"
done

# 4× the trained window.
for rope in yarn:factor=4 self_extend:group=8,window=1024 dynamic:factor=4 ntk:factor=4 llama3:factor=4 linear:factor=4; do
    t $LONGCTX eval passkey --lengths 32k --depths 0,50,100 --rope "$rope" --threads 2 --out "$OUT/passkey32k-$(slug "$rope")"
done
