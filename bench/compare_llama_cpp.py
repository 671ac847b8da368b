#!/usr/bin/env python3
"""Side-by-side speed of longctx and llama.cpp on the same GGUF and thread count.

Measures what llama-bench measures: prefill of N tokens (pp), decode of M tokens one at a time
(tg), and decode at a context depth D (tg @ d). llama.cpp runs through the `llama-cpp-python`
package (same GGUF file, f16 KV cache, the same thread count), with flash attention off and, with
--flash, on as well; longctx runs as `longctx bench --json`. Each configuration is repeated, the
median is reported, and the ratio longctx / llama.cpp is printed (> 1 means longctx is faster).
The KV bytes each engine holds after a case are reported beside it (llama.cpp: the size of its
sequence state, llama_state_seq_get_size; for a sliding-window model such as Gemma 3 with its
small SWA cache, swa_full=False, not the context's full-size default).

Needs: `pip install llama-cpp-python numpy` (build it with CMAKE_ARGS=-DGGML_NATIVE=ON) and a
release build: `cargo build --release -p longctx-cli`.

    python3 bench/compare_llama_cpp.py [--model PATH|NAME] [--threads 2] [--repetitions 5] [--long]
        [--prefill 32768] [--only-prefill] [--flash]

These machines are small and noisy: run it on an otherwise idle machine.
"""

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LONGCTX = os.path.join(ROOT, "target", "release", "longctx")


def fetch_model(name=None):
    """The path of a model name (or the default model), fetched by longctx if need be."""
    out = subprocess.run([LONGCTX, "fetch"] + ([name] if name else []), check=True,
                         capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


def llama_cpp_run(model, threads, prompt, gen, depth, repetitions, flash):
    import llama_cpp
    from llama_cpp import Llama

    n_ctx = depth + prompt + gen + 16
    llm = Llama(
        model_path=model,
        n_ctx=n_ctx,
        n_batch=512,
        n_ubatch=512,
        n_threads=threads,
        n_threads_batch=threads,
        flash_attn=flash,
        # The small sliding-window cache (llama.cpp's context default is the full-size one):
        # what a user running a long context with llama.cpp would choose to hold.
        swa_full=False,
        logits_all=False,
        verbose=False,
    )
    rng = random.Random(1234)
    vocab = llm.n_vocab()
    tokens = [rng.randrange(1000, vocab) for _ in range(depth + prompt + gen)]
    llm.eval(tokens[:16])  # fault the weights in, as our bench does
    pp, tg = [], []
    for _ in range(repetitions):
        llm.reset()
        if depth:
            llm.eval(tokens[:depth])
        if prompt:
            start = time.perf_counter()
            llm.eval(tokens[depth : depth + prompt])
            pp.append(prompt / (time.perf_counter() - start))
        if gen:
            start = time.perf_counter()
            for t in tokens[depth + prompt : depth + prompt + gen]:
                llm.eval([t])
            tg.append(gen / (time.perf_counter() - start))
    kv_bytes = llama_cpp.llama_state_seq_get_size(llm._ctx.ctx, 0)
    return (statistics.median(pp) if pp else None, statistics.median(tg) if tg else None, kv_bytes)


def longctx_run(model, threads, prompt, gen, depth, repetitions):
    cmd = [
        LONGCTX, "bench", "--model", model, "--threads", str(threads),
        "--prompt-tokens", str(prompt), "--gen-tokens", str(gen), "--depth", str(depth),
        "--repetitions", str(repetitions), "--json",
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return (r["prefill_tok_s"] if prompt else None, r["decode_tok_s"] if gen else None, r)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repetitions", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3, help="alternate the two engines this many times; medians over rounds")
    ap.add_argument("--long", action="store_true",
                    help="also prefill 8192 tokens from an empty cache, where attention dominates (what long evals spend their time on)")
    ap.add_argument("--prefill", type=int, action="append", default=[],
                    help="also prefill this many tokens from an empty cache, once per round (repeatable)")
    ap.add_argument("--flash", action="store_true", help="also run llama.cpp with flash attention on")
    ap.add_argument("--only-prefill", action="store_true",
                    help="run only the --prefill cases (a 32k prefill round costs minutes; give it its own --rounds)")
    args = ap.parse_args()
    if not os.path.exists(LONGCTX):
        sys.exit("build longctx first: cargo build --release -p longctx-cli")
    model = args.model if args.model and os.path.exists(args.model) else fetch_model(args.model)
    # (name, prompt tokens, generated tokens, depth, repetitions): filling 4096 tokens of depth
    # dominates the deep case, so it repeats less.
    cases = [] if args.only_prefill else [
        ("pp512", 512, 0, 0, args.repetitions),
        ("tg128", 0, 128, 0, args.repetitions),
        ("tg128 @ d4096", 0, 128, 4096, max(1, args.repetitions // 2)),
    ]
    if args.long:
        cases.append(("pp8192", 8192, 0, 0, 1))
    cases += [(f"pp{n}", n, 0, 0, 1) for n in args.prefill]
    flashes = [False, True] if args.flash else [False]
    rows = []
    for name, prompt, gen, depth, repetitions in cases:
        ours, theirs = [], {f: [] for f in flashes}
        extra, their_kv = {}, {}
        for _ in range(args.rounds):
            p, g, extra = longctx_run(model, args.threads, prompt, gen, depth, repetitions)
            ours.append(p if prompt else g)
            for flash in flashes:
                lp, lg, their_kv[flash] = llama_cpp_run(model, args.threads, prompt, gen, depth, repetitions, flash)
                theirs[flash].append(lp if prompt else lg)
        o = statistics.median(ours)
        t = {f: statistics.median(v) for f, v in theirs.items()}
        rows.append((name, o, t, extra.get("kv_bytes", 0), their_kv[False]))
        print(f"{name}: longctx {o:.1f} tok/s, " + ", ".join(
            f"llama.cpp (flash {'on' if f else 'off'}) {v:.1f} tok/s, ratio {o / v:.2f}" for f, v in t.items()),
            file=sys.stderr)
    import llama_cpp

    print(f"model `{os.path.basename(model)}`, {args.threads} threads, llama-cpp-python {llama_cpp.__version__}, "
          f"median of {args.rounds} rounds x {args.repetitions} repetitions\n")
    head = "| test | longctx tok/s |" + "".join(
        f" llama.cpp FA {'on' if f else 'off'} tok/s | ratio vs FA {'on' if f else 'off'} |" for f in flashes)
    print(head + " longctx KV MiB | llama.cpp KV MiB |")
    print("|---|---:|" + "---:|---:|" * len(flashes) + "---:|---:|")
    for name, o, t, our_kv, llama_kv in rows:
        cells = "".join(f" {t[f]:.1f} | {o / t[f]:.2f} |" for f in flashes)
        print(f"| {name} | {o:.1f} |{cells} {our_kv / 2**20:.1f} | {llama_kv / 2**20:.1f} |")


if __name__ == "__main__":
    main()
