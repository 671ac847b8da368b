#!/usr/bin/env python3
"""Decode speed and memory at depth: longctx's KV policies against llama.cpp's KV cache types.

For each depth D, the cache is filled with D synthetic tokens (untimed), then M tokens are decoded
one at a time (timed). longctx runs `longctx bench --depth D --prompt-tokens 0 --gen-tokens M
--kv SPEC --json` for `full`, `snapkv:budget=1024` and `streaming` (4 sinks + 1020 recent, the
same 1024 slots); llama.cpp runs through `llama-cpp-python` on the same GGUF and thread count with
its f16 cache (flash attention off, its default on CPU) and with q8_0 and q4_0 caches (which need
flash attention, so f16 with flash attention is measured too). Every configuration runs in its own
process, so peak RSS (VmHWM) is each one's own. KV bytes: longctx reports the bytes its cache
holds; llama.cpp allocates its cache for the whole context up front, so its bytes are
n_ctx x layers x 2 x KV heads x head size x bytes per element of the type (q8_0: 34 bytes per 32,
q4_0: 18 per 32), with n_ctx = D + M rounded up to 256 as llama.cpp pads it.

    python3 bench/kv_decode.py [--depths 8192,16384] [--gen 64] [--threads 2] [--rounds 2]

Ratios are longctx / llama.cpp f16 (decode: > 1 is faster; KV bytes: < 1 is smaller). Results go
to stdout as a Markdown table and, row by row as they finish, to --out (JSON lines; a rerun skips
the rows already there).
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
POLICIES = ["full", "snapkv:budget=1024", "streaming:sinks=4,window=1020", "snapkv:budget=1024+kivi:bits=4"]
LLAMA_TYPES = [("f16", False), ("f16", True), ("q8_0", True), ("q4_0", True)]
BYTES_PER_ELEMENT = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}


def default_model():
    out = subprocess.run([LONGCTX, "fetch"], check=True, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


def peak_rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def llama_child(model, threads, depth, gen, cache_type, flash):
    """Runs in a child process: one llama.cpp configuration, printed as JSON."""
    import llama_cpp
    from llama_cpp import Llama

    ggml_type = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0, "q4_0": llama_cpp.GGML_TYPE_Q4_0}
    n_ctx = depth + gen
    llm = Llama(
        model_path=model, n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=threads,
        n_threads_batch=threads, flash_attn=flash, type_k=ggml_type[cache_type],
        type_v=ggml_type[cache_type], logits_all=False, verbose=False,
    )
    rng = random.Random(1234)
    tokens = [rng.randrange(1000, llm.n_vocab()) for _ in range(depth + gen)]
    llm.eval(tokens[:depth])
    start = time.perf_counter()
    for t in tokens[depth:]:
        llm.eval([t])
    rate = gen / (time.perf_counter() - start)
    meta = llm.metadata
    arch = meta["general.architecture"]
    layers = int(meta[f"{arch}.block_count"])
    kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", meta[f"{arch}.attention.head_count"]))
    head_dim = int(meta[f"{arch}.embedding_length"]) // int(meta[f"{arch}.attention.head_count"])
    padded = -(-llm.n_ctx() // 256) * 256
    kv_bytes = padded * layers * 2 * kv_heads * head_dim * BYTES_PER_ELEMENT[cache_type]
    print(json.dumps({"decode_tok_s": rate, "peak_rss_bytes": peak_rss(), "kv_bytes": int(kv_bytes),
                      "version": llama_cpp.__version__}))


def run_llama(model, threads, depth, gen, cache_type, flash):
    cmd = [sys.executable, __file__, "--child", model, str(threads), str(depth), str(gen), cache_type, str(int(flash))]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_longctx(model, threads, depth, gen, kv):
    cmd = [LONGCTX, "bench", "--model", model, "--threads", str(threads), "--depth", str(depth),
           "--prompt-tokens", "0", "--gen-tokens", str(gen), "--repetitions", "1", "--kv", kv, "--json"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        model, threads, depth, gen, cache_type, flash = sys.argv[2:8]
        return llama_child(model, int(threads), int(depth), int(gen), cache_type, flash == "1")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--depths", default="8192,16384")
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2, help="runs per configuration; the median is reported")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "results", "kv", "bench.jsonl"))
    ap.add_argument("--only", help="configurations to run, separated by ';' (e.g. 'full;snapkv:budget=1024;f16'); default all")
    args = ap.parse_args()
    if not os.path.exists(LONGCTX):
        sys.exit("build longctx first: cargo build --release -p longctx-cli")
    model = args.model or default_model()
    done = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            for line in f:
                row = json.loads(line)
                done[(row["depth"], row["engine"], row["config"])] = row
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    configs = [("longctx", kv) for kv in POLICIES] + [
        ("llama.cpp", f"{t}{' +FA' if fa else ''}") for t, fa in LLAMA_TYPES]
    for depth in [int(d) for d in args.depths.split(",")]:
        for engine, config in configs:
            if (depth, engine, config) in done:
                continue
            if args.only and config not in args.only.split(";"):
                continue
            runs = []
            for _ in range(args.rounds):
                if engine == "longctx":
                    r = run_longctx(model, args.threads, depth, args.gen, config)
                else:
                    cache_type = config.split()[0]
                    r = run_llama(model, args.threads, depth, args.gen, cache_type, config.endswith("+FA"))
                runs.append(r)
            row = {
                "depth": depth, "engine": engine, "config": config, "gen": args.gen, "threads": args.threads,
                "decode_tok_s": statistics.median(r["decode_tok_s"] for r in runs),
                "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs),
                "kv_bytes": runs[-1]["kv_bytes"],
            }
            done[(depth, engine, config)] = row
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"d{depth} {engine} {config}: {row['decode_tok_s']:.1f} tok/s, KV {row['kv_bytes'] / 2**20:.1f} MiB, "
                  f"peak RSS {row['peak_rss_bytes'] / 2**20:.0f} MiB", file=sys.stderr)
    print(f"model `{os.path.basename(model)}`, {args.threads} threads, decode of {args.gen} tokens after the depth, "
          f"median of {args.rounds} runs; ratios against llama.cpp's f16 cache at the same depth\n")
    print("| depth | engine | KV cache | decode tok/s | × llama.cpp f16 | KV MiB | KV ÷ llama.cpp f16 | peak RSS MiB |")
    print("|---:|---|---|---:|---:|---:|---:|---:|")
    for depth in sorted({d for d, _, _ in done}):
        base = done.get((depth, "llama.cpp", "f16"))
        for engine, config in configs:
            row = done.get((depth, engine, config))
            if not row:
                continue
            speed = f"{row['decode_tok_s'] / base['decode_tok_s']:.2f}" if base else "–"
            size = f"{row['kv_bytes'] / base['kv_bytes']:.3f}" if base else "–"
            print(f"| {depth} | {engine} | `{config}` | {row['decode_tok_s']:.1f} | {speed} | "
                  f"{row['kv_bytes'] / 2**20:.1f} | {size} | {row['peak_rss_bytes'] / 2**20:.0f} |")


if __name__ == "__main__":
    main()
