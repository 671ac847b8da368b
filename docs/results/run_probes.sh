#!/bin/sh
# Calibrates the probes on the default model for docs/results/baseline.md: each passkey wording
# at 1k–8k (5 depths), the calibrated wording past the window at 16k, and every other retrieval
# task at 1k and 2k (inside the trained 8k window), so a reader knows which tasks this model can
# do at all before reading what a method does to them at longer lengths. Every command resumes
# where it stopped if interrupted. Run from the repository root after `cargo build --release`.
set -e
LONGCTX=${LONGCTX:-target/release/longctx}
OUT=docs/results/baseline
DEPTHS=0,25,50,75,100
t() { /usr/bin/time -f "%e s wall: $*" "$@"; }

# The wording sweep: 1k and 2k pick the wording (what `passkey:wording=auto` does), 4k and 8k
# show how each holds up to the trained window.
for wording in vault magic passkey; do
    t $LONGCTX eval "passkey:wording=$wording" --lengths 1k,2k,4k,8k --depths $DEPTHS --threads 2 --save-prompts --out "$OUT/passkey-$wording"
done
# The calibrated wording past the trained window with the model's own RoPE.
t $LONGCTX eval passkey:wording=vault --lengths 16k --depths 0,50,100 --threads 2 --out "$OUT/passkey-vault"

# Which tasks the model can do inside its window (niah_single_1 and _2 are in their own folders).
for task in niah_single_3 niah_multikey_1 niah_multikey_2 niah_multivalue niah_multiquery vt cwe fwe threads; do
    t $LONGCTX eval "$task" --lengths 1k,2k --depths 0,50,100 --threads 2 --out "$OUT/calibration/$task"
done
# A haystack of UUID needles is too coarse (about 40 tokens a needle) to fill 1k to the token.
t $LONGCTX eval niah_multikey_3 --lengths 2k --depths 0,50,100 --threads 2 --out "$OUT/calibration/niah_multikey_3"

$LONGCTX eval report "$OUT/passkey-vault" "$OUT/passkey-magic" "$OUT/passkey-passkey" --out "$OUT/wordings"
