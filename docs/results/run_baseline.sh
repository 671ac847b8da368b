#!/bin/sh
# Regenerates the committed baseline of the default model in docs/results/baseline/.
# Every command resumes where it stopped if interrupted; `time` gives the wall times quoted in
# docs/results/baseline.md. Run from the repository root after `cargo build --release`.
set -e
LONGCTX=${LONGCTX:-target/release/longctx}
OUT=docs/results/baseline
DEPTHS=0,25,50,75,100
t() { /usr/bin/time -f "%e s wall: $*" "$@"; }

# The passkey folders are made by run_probes.sh (three wordings). baseline/passkey holds the
# probe as it was before wordings existed (keys 1..50000, the pass-key phrasing), kept as the
# record the first extension results were read through; the current binary no longer makes it.
t $LONGCTX eval niah_single_1 --lengths 1k,2k,4k,8k --depths $DEPTHS --threads 2 --out $OUT/niah_single_1
t $LONGCTX eval niah_single_2 --lengths 1k,2k,4k,8k --depths $DEPTHS --threads 2 --out $OUT/niah_single_2
# Every length reads the same first 16384 tokens of the text (16k: one window, past the window).
t $LONGCTX eval ppl --lengths 1k,2k,4k,8k,16k --threads 2 --out $OUT/ppl
$LONGCTX eval report $OUT/passkey-vault $OUT/niah_single_1 $OUT/niah_single_2 --out $OUT/compared
