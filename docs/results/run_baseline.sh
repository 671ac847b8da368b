#!/bin/sh
# Regenerates the committed baseline of the default model in docs/results/baseline/.
# Every command resumes where it stopped if interrupted; `time` gives the wall times quoted in
# docs/results/baseline.md. Run from the repository root after `cargo build --release`.
set -e
LONGCTX=${LONGCTX:-target/release/longctx}
OUT=docs/results/baseline
DEPTHS=0,25,50,75,100
t() { /usr/bin/time -f "%e s wall: $*" "$@"; }

t $LONGCTX eval passkey --lengths 1k,2k,4k,8k --depths $DEPTHS --threads 2 --save-prompts --out $OUT/passkey
t $LONGCTX eval niah_single_1 --lengths 1k,2k,4k,8k --depths $DEPTHS --threads 2 --out $OUT/niah_single_1
t $LONGCTX eval niah_single_2 --lengths 1k,2k,4k,8k --depths $DEPTHS --threads 2 --out $OUT/niah_single_2
# Past the trained 8k window, with the model's own RoPE: one length more in the same folder.
# Fewer depths here: a 16k case costs about 7 minutes on 2 cores.
t $LONGCTX eval passkey --lengths 16k --depths 0,50,100 --threads 2 --out $OUT/passkey
# Every length reads the same first 16384 tokens of the text (16k: one window, past the window).
t $LONGCTX eval ppl --lengths 1k,2k,4k,8k,16k --threads 2 --out $OUT/ppl
$LONGCTX eval report $OUT/passkey $OUT/niah_single_1 $OUT/niah_single_2 --out $OUT/compared
