#!/usr/bin/env python3
"""Replays the passkey prompts of a `longctx eval passkey --save-prompts` folder through llama.cpp
(llama-cpp-python, same GGUF, same token ids, greedy) and reports, case by case, whether llama.cpp
scores the same as longctx and generates the same text.

    python bench/passkey_llama_cpp.py docs/results/baseline/passkey --model PATH.gguf [--threads 2]

Writes DIR/llama_cpp.jsonl (one line per case, resumable) and prints the agreement. Needs
`pip install llama-cpp-python` in the Python that runs it; CI does not.
"""
import argparse
import json
import os
import re
import sys
import time

import llama_cpp
import numpy as np


def first_number_is(output, key):
    """The landmark passkey rule, as longctx scores it: the first run of digits is the key."""
    match = re.search(r"\d+", output)
    return 100.0 if match and match.group(0) == key else 0.0


def case_key(row):
    return (row["length"], row["depth"], row["sample"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir")
    parser.add_argument("--model", required=True)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    prompts = [json.loads(l) for l in open(os.path.join(args.dir, "prompts.jsonl"))]
    ours = {case_key(r): r for r in map(json.loads, open(os.path.join(args.dir, "results.jsonl")))}
    out_path = os.path.join(args.dir, "llama_cpp.jsonl")
    done = {}
    if os.path.exists(out_path):
        for line in open(out_path):
            if line.endswith("\n"):
                row = json.loads(line)
                done[case_key(row)] = row

    longest = max(p["length"] for p in prompts)
    llm = llama_cpp.Llama(
        model_path=args.model,
        n_ctx=longest,
        n_batch=512,
        n_ubatch=512,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        verbose=False,
    )
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    n_vocab = llm.n_vocab()
    with open(out_path, "a") as out:
        for p in prompts:
            key = case_key(p)
            if key in done:
                continue
            started = time.time()
            llm.reset()
            llm.eval(p["tokens"])
            generated = []
            for _ in range(p["max_new_tokens"]):
                # Without logits_all llama-cpp-python keeps no scores; read the context's own.
                logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))
                token = int(logits.argmax())
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    break
                generated.append(token)
                llm.eval([token])
            text = llm.detokenize(generated).decode("utf-8", errors="replace")
            row = {
                "length": p["length"],
                "depth": p["depth"],
                "sample": p["sample"],
                "output": text,
                "score": first_number_is(text, p["answers"][0]),
                "seconds": time.time() - started,
            }
            out.write(json.dumps(row) + "\n")
            out.flush()
            done[key] = row
            print(f"{key}: llama.cpp {row['score']:.0f} {text!r}", file=sys.stderr)

    both = [k for k in done if k in ours]
    same_score = sum(done[k]["score"] == ours[k]["score"] for k in both)
    same_text = sum(done[k]["output"] == ours[k]["output"] for k in both)
    print(f"cases compared: {len(both)}")
    print(f"same score: {same_score}/{len(both)}")
    print(f"same generated text: {same_text}/{len(both)}")
    for k in sorted(both):
        if done[k]["output"] != ours[k]["output"]:
            print(f"  differs at {k}: longctx {ours[k]['output']!r} vs llama.cpp {done[k]['output']!r}")
    mean = lambda rows: sum(r["score"] for r in rows) / max(len(rows), 1)
    print(f"mean score: longctx {mean([ours[k] for k in both]):.1f}, llama.cpp {mean([done[k] for k in both]):.1f}")


if __name__ == "__main__":
    main()
