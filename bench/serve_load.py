#!/usr/bin/env python3
r"""Load test of `longctx serve` against llama.cpp's servers, side by side.

Three servers, all on the same GGUF, the same machine, the same thread count and the same context
window (--ctx, 8192 by default):
  - longctx: `longctx serve --max-concurrent C`, so all C clients are decoded together in one batch;
  - llama-server: llama.cpp's own C++ server, the strongest peer: `-np C` gives it C parallel
    slots with continuous batching, and `--kv-unified` makes the slots share one KV cache of --ctx
    tokens (instead of --ctx tokens each), so its memory stays comparable with the others. Every
    request of this load uses fewer than 200 tokens (prompt + max_tokens 64), so even 16 slots
    fill well under 8192 and the shared cache never limits it; each row records the largest request
    (`max_request_tokens`, from the usage chunk) and the table note checks C x that against --ctx.
    It runs with --no-webui and --offline (nothing would download anyway: the model is a local
    file and the build below has no curl), other settings at llama-server's defaults;
  - llama-cpp-python: its Python server (`python -m llama_cpp.server`), one request at a time.
For each server and each client count C the script starts the server itself on a free loopback
port, waits until it answers (`GET /health` for longctx and llama-server, which answers 503 while
the model loads and 200 once it is ready; `GET /v1/models` for llama-cpp-python), runs the load,
reads the server's memory, and stops it (SIGINT, then kill). Every (server, clients, round) runs in
a fresh server process, so rounds do not share a warm cache and the peak RSS is that run's own.

The load: C client threads, started together, each sending --requests requests one after
another to `POST /v1/chat/completions` with "stream": true, "max_tokens": --max-tokens,
"temperature": 0 and "stream_options": {"include_usage": true}. Prompts are 16 short, distinct
questions, picked round-robin by client and request index, each with a unique tag at its end, so
no two requests are identical and a prefix cache cannot answer one from another. Before the
measured part every client sends one warm-up request (not counted).

Reported per run (one JSON line per server x clients x round in --out, appended and flushed as
each run ends; a rerun skips the runs already there, so an interrupted sweep resumes, and a server
added later runs alone while the table is made from all the rows):
  - requests/s and output tok/s: finished requests and the sum of their completion tokens over
    the wall time from the start of the load to the end of the last request;
  - latency p50/p99: request sent -> last byte of its stream;
  - TTFT p50/p99: request sent -> first chunk with non-empty content (percentiles interpolate
    between ranks, so with few requests, e.g. 1 client x 4, p99 is close to the slowest one);
  - errors: HTTP errors, error events in the stream, streams cut short, timeouts (the table's
    count includes the warm-up's; failed requests are left out of the other numbers);
  - memory: the server's peak RSS (VmHWM from /proc/PID/status, read at the end), its RSS
    sampled every 0.5 s during the load, and the RSS growth from after the warm-up to the end
    (flagged when above 10%: a sign of a leak or an unbounded cache).
The table gives the median over --rounds of each number (peak RSS and growth: the largest), and
the ratios longctx / peer of req/s and tok/s at each client count for each peer that ran
(> 1: longctx is faster).

Completion tokens come from the final usage chunk, which longctx and llama-server send. The
llama-cpp-python server sends none (it ignores stream_options), so for it a stream that ended with
finish_reason "length" counts max_tokens and one that stopped earlier counts its content chunks
(one per token, except where it joins the pieces of a multi-byte character or holds text back
while it might start a stop string); the `tokens_from` field of each JSON line says which was
used. No request sets ignore_eos (not part of the OpenAI API), so answers may end at EOS and
lengths may differ between servers: the "tok/req" column shows the mean, and out tok/s counts
what was really generated.

llama-cpp-python's server handles one request at a time: a lock around its single llama context,
no continuous batching. With C clients its requests wait their turn, so its latency and TTFT grow
with C while its req/s stays flat. That is its real behaviour, not a fault of this benchmark. It
is started with --interrupt_requests false: by default it ends a running stream early whenever
another request is waiting, which would cut answers short under load.

    python3 bench/serve_load.py --clients 1,4,16 --rounds 3
    python3 bench/serve_load.py --servers longctx,llama-server --clients 1,4 --requests 2 --markdown serve.md
    python3 bench/serve_load.py --longctx-args="--kv snapkv:budget=1024 --prefix-cache-mib 0"
    python3 bench/serve_load.py --llama-server-args="--cache-ram 0"

Needs a release build (`cargo build --release -p longctx-cli`). The peers are optional: each is
skipped with a note when missing.
  - llama-server (--llama-server-bin, default $LLAMA_SERVER, else the path below), built from the
    llama.cpp source vendored in llama-cpp-python's sdist, so that both peers run the same
    llama.cpp:
        pip download --no-deps --no-binary llama-cpp-python llama-cpp-python==0.3.36
        tar xzf llama_cpp_python-0.3.36.tar.gz && cd llama_cpp_python-0.3.36/vendor/llama.cpp
        cmake -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DGGML_AVX2=ON \
              -DGGML_FMA=ON -DGGML_F16C=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=ON
        cmake --build build --target llama-server     # -> build/bin/llama-server
    GGML_NATIVE=OFF with explicit instruction sets, because a native build (-march=native) can
    emit instructions (e.g. AVX-512) that a sandbox or VM faults on with SIGILL.
  - llama-cpp-python: `pip install 'llama-cpp-python[server]'` in the python given by
    --peer-python (default /opt/peer/venv/bin/python).
The client is Python's standard library only (threads, http.client, SSE parsed by hand), so it
runs anywhere; it runs on the same machine as the server and costs every server alike. These
machines are small (2 cores) and noisy: run on an otherwise idle machine and read the medians.
"""

import argparse
import http.client
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LONGCTX = os.path.join(ROOT, "target", "release", "longctx")
DEFAULT_MODEL = os.path.expanduser("~/.cache/longctx/models/SmolLM2-135M-Instruct.Q4_1.gguf")
PEER_PYTHON = "/opt/peer/venv/bin/python"
LLAMA_SERVER = "/tmp/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin/llama-server"
SERVERS = ["longctx", "llama-server", "llama-cpp-python"]
PEERS = SERVERS[1:]  # the table gives longctx / each of these
READY_PATH = {"longctx": "/health", "llama-server": "/health", "llama-cpp-python": "/v1/models"}
PEER_NOTE = ("llama-cpp-python's server handles one request at a time (one llama context behind a "
             "lock, no continuous batching): with C clients its requests queue, which is its real "
             "behaviour, not a fault of the benchmark.")
LLAMA_SERVER_NOTE = ("llama-server runs with -np C (C parallel slots, continuous batching) and "
                     "--kv-unified (the slots share one KV cache of {ctx} tokens instead of having "
                     "{ctx} each, so its memory stays comparable)")
GROWTH_FLAG = 0.10  # RSS growth after warm-up above this fraction is flagged

# Short questions of different kinds, so that answers differ; picked round-robin per request.
QUESTIONS = [
    "Why does ice float on water?",
    "Give three tips for keeping a houseplant alive.",
    "What is the difference between a list and a tuple in Python?",
    "Explain in two sentences how a bicycle stays upright.",
    "Write a haiku about an old lighthouse.",
    "How do vaccines train the immune system?",
    "What makes a good password?",
    "Summarise the water cycle for a ten-year-old.",
    "Name four planets and one fact about each.",
    "Why is the sky darker at night in the countryside than in a city?",
    "How should I prepare for a job interview?",
    "What does a compiler do?",
    "Suggest a name for a bakery and explain the choice.",
    "Why do leaves change colour in autumn?",
    "Describe how to boil an egg so the yolk stays soft.",
    "What is the purpose of a budget, in plain words?",
]


def default_model():
    if os.path.exists(DEFAULT_MODEL):
        return DEFAULT_MODEL
    if not os.path.exists(LONGCTX):
        sys.exit(f"no model at {DEFAULT_MODEL}: pass --model PATH.gguf, or build longctx "
                 "(cargo build --release -p longctx-cli) so that `longctx fetch` can download it")
    out = subprocess.run([LONGCTX, "fetch"], check=True, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# /proc readings of the server process

def proc_status_kib(pid, field):
    """A `field:  N kB` line of /proc/PID/status, in KiB; None where unreadable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def mib(kib):
    return None if kib is None else kib / 1024


def proc_cpu_seconds(pid):
    """User + system CPU time of the process so far; None where unreadable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


class RssSampler(threading.Thread):
    """Samples VmRSS of a process every `interval` seconds until stopped."""

    def __init__(self, pid, interval=0.5):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.samples = []  # (seconds since start, MiB)
        self.halt = threading.Event()

    def run(self):
        start = time.perf_counter()
        while True:
            rss = proc_status_kib(self.pid, "VmRSS")
            if rss is not None:
                self.samples.append((round(time.perf_counter() - start, 2), round(rss / 1024, 1)))
            if self.halt.wait(self.interval):
                return

    def stop(self):
        self.halt.set()
        self.join()


# ---------------------------------------------------------------------------------------------
# Server processes

class Server:
    """One server subprocess on a loopback port; output goes to a log file."""

    def __init__(self, name, cmd, port, ready_path):
        self.name, self.cmd, self.port, self.ready_path = name, cmd, port, ready_path
        fd, self.log_path = tempfile.mkstemp(prefix=f"serve_load-{name}-", suffix=".log")
        self.log = os.fdopen(fd, "wb")
        self.proc = None

    def start(self, timeout):
        """Starts the server and waits until it answers; returns the seconds it took."""
        t0 = time.perf_counter()
        try:
            self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=self.log,
                                         stderr=subprocess.STDOUT, cwd=ROOT)
        except OSError as e:
            sys.exit(f"{self.name}: cannot start {self.cmd[0]}: {e}")
        try:
            while time.perf_counter() - t0 < timeout:
                if self.proc.poll() is not None:
                    self.fail(f"{exit_words(self.proc.returncode)} before it answered")
                try:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                    conn.request("GET", self.ready_path)
                    resp = conn.getresponse()
                    resp.read()
                    conn.close()
                    if resp.status == 200:
                        return time.perf_counter() - t0
                except (OSError, http.client.HTTPException):
                    pass
                time.sleep(0.25)
        except BaseException:  # Ctrl-C while waiting: do not leave the server behind
            self.stop()
            raise
        self.stop()
        self.fail(f"did not answer GET {self.ready_path} within {timeout:.0f} s "
                  "(a slow machine? raise --start-timeout)")

    def tail(self, lines=30):
        if not self.log.closed:
            self.log.flush()
        with open(self.log_path, "rb") as f:
            text = f.read().decode("utf-8", "replace")
        return "\n".join(text.rstrip().splitlines()[-lines:])

    def fail(self, why):
        sys.exit(f"{self.name}: the server {why}.\ncommand: {shlex.join(self.cmd)}\n"
                 f"last lines of its output ({self.log_path}):\n{self.tail()}")

    def stop(self):
        """SIGINT, then kill after 15 s; the log is removed unless it was needed."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def remove_log(self):
        try:
            os.unlink(self.log_path)
        except OSError:
            pass


def exit_words(code):
    """How a process ended, in words; a signal by name, with the likely cause of SIGILL."""
    if code >= 0:
        return f"exited with status {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    words = f"was killed by {name}"
    if -code == signal.SIGILL:
        words += (" (illegal instruction: the binary or library was built for a CPU with instructions "
                  "this one lacks, e.g. AVX-512; rebuild it on this machine)")
    return words


def server_command(name, args, model, port, clients):
    if name == "longctx":
        return [args.longctx_bin, "serve", "--model", model, "--host", "127.0.0.1", "--port", str(port),
                "--threads", str(args.threads), "--ctx", str(args.ctx),
                "--max-concurrent", str(clients)] + shlex.split(args.longctx_args)
    if name == "llama-server":
        # -np C: C slots decoded together (continuous batching); --kv-unified: one KV cache of
        # --ctx tokens shared by the slots, not --ctx per slot. --no-webui: API only;
        # --offline: never touch the network.
        return [args.llama_server_bin, "-m", model, "--host", "127.0.0.1", "--port", str(port),
                "-t", str(args.threads), "-tb", str(args.threads), "-np", str(clients),
                "-c", str(args.ctx), "--kv-unified", "--no-webui", "--offline"] + shlex.split(args.llama_server_args)
    return [args.peer_python, "-m", "llama_cpp.server", "--model", model, "--host", "127.0.0.1",
            "--port", str(port), "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads),
            "--n_ctx", str(args.ctx), "--interrupt_requests", "false"] + shlex.split(args.peer_args)


def check_servers(args):
    """The servers that can run; exits with the fix where longctx cannot, skips a missing peer."""
    names = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = [s for s in names if s not in SERVERS]
    if unknown:
        sys.exit(f"unknown server(s) {', '.join(unknown)}; choose from {', '.join(SERVERS)}")
    usable = []
    for name in names:
        if name == "longctx":
            if not os.path.exists(args.longctx_bin):
                sys.exit(f"no longctx binary at {args.longctx_bin}: build it with "
                         "`cargo build --release -p longctx-cli`")
            probe = subprocess.run([args.longctx_bin, "serve", "--help"], capture_output=True, text=True)
            if probe.returncode != 0:
                sys.exit(f"{args.longctx_bin} has no `serve` command (an older build?): rebuild it with "
                         f"`cargo build --release -p longctx-cli`\n{probe.stderr.strip()}")
        elif name == "llama-server":
            version = llama_server_version(args.llama_server_bin)
            if version is None:
                continue
            args.llama_server_version = version
        else:
            if not os.path.exists(args.peer_python):
                print(f"note: skipping llama-cpp-python: no python at {args.peer_python} "
                      "(pip install 'llama-cpp-python[server]' there, or pass --peer-python)", file=sys.stderr)
                continue
            probe = subprocess.run([args.peer_python, "-c", "import llama_cpp.server"],
                                   capture_output=True, text=True)
            if probe.returncode != 0:
                last = (probe.stderr.strip().splitlines() or ["?"])[-1]
                print(f"note: skipping llama-cpp-python: {args.peer_python} cannot import "
                      f"llama_cpp.server ({last}); pip install 'llama-cpp-python[server]'", file=sys.stderr)
                continue
        usable.append(name)
    return usable


def llama_server_version(path):
    """The first line of `llama-server --version` ("version: N (commit)"); None, with a note
    saying why, where the binary is missing or does not run."""
    how = ("build it as the top of this file says, or pass "
           "--llama-server-bin or set $LLAMA_SERVER")
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        print(f"note: skipping llama-server: no executable at {path} ({how})", file=sys.stderr)
        return None
    try:
        probe = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        print(f"note: skipping llama-server: {path} --version failed ({e})", file=sys.stderr)
        return None
    text = (probe.stdout + probe.stderr).strip()
    if probe.returncode != 0:
        print(f"note: skipping llama-server: `{path} --version` {exit_words(probe.returncode)}\n{text[-2000:]}",
              file=sys.stderr)
        return None
    lines = [l for l in text.splitlines() if l.startswith("version:")] or text.splitlines() or ["?"]
    return lines[0].strip()


# ---------------------------------------------------------------------------------------------
# The client

def prompt_for(client, index, clients, tag):
    question = QUESTIONS[(client + index * clients) % len(QUESTIONS)]
    return f"{question} (request {tag})"


def stream_request(port, body, timeout):
    """One streaming chat request. Returns a dict: ok, error, latency, ttft, tokens, tokens_from."""
    r = {"ok": False, "error": None, "latency": None, "ttft": None, "tokens": 0, "tokens_from": None,
         "cached_tokens": None, "prompt_tokens": None, "finish_reason": None}
    payload = json.dumps(body).encode()
    content_chunks = 0
    usage = None
    done = False
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v1/chat/completions", body=payload,
                     headers={"Content-Type": "application/json", "Accept": "text/event-stream"})
        resp = conn.getresponse()
        if resp.status != 200:
            text = resp.read().decode("utf-8", "replace")
            r["error"] = f"HTTP {resp.status}: {text[:300]}"
            return r
        data_lines = []

        def dispatch(data):
            """Handles one SSE event's data; returns False at the end of the stream."""
            nonlocal content_chunks, usage, done
            if data == "[DONE]":
                done = True
                return False
            try:
                obj = json.loads(data)
            except json.JSONDecodeError:
                r["error"] = f"not JSON in the stream: {data[:200]}"
                return False
            if not isinstance(obj, dict):
                return True
            if obj.get("error"):
                r["error"] = f"error event: {json.dumps(obj['error'])[:300]}"
                return False
            for choice in obj.get("choices") or []:
                content = (choice.get("delta") or {}).get("content")
                if content:
                    content_chunks += 1
                    if r["ttft"] is None:
                        r["ttft"] = time.perf_counter() - t0
                if choice.get("finish_reason"):
                    r["finish_reason"] = choice["finish_reason"]
            if obj.get("usage"):
                usage = obj["usage"]
            return True

        going = True
        while going:
            line = resp.readline()
            if not line:  # end of the body
                if data_lines:
                    dispatch("\n".join(data_lines))
                break
            line = line.decode("utf-8", "replace").rstrip("\r\n")
            if not line:  # a blank line ends an event
                if data_lines:
                    going = dispatch("\n".join(data_lines))
                    data_lines = []
            elif line.startswith(":"):  # comment (keep-alive ping)
                continue
            else:
                field, _, value = line.partition(":")
                if field == "data":
                    data_lines.append(value[1:] if value.startswith(" ") else value)
        r["latency"] = time.perf_counter() - t0
    except (OSError, http.client.HTTPException) as e:
        r["error"] = f"{type(e).__name__}: {e}"
        return r
    finally:
        conn.close()
    if r["error"]:
        return r
    if not done and not r["finish_reason"]:
        r["error"] = "the stream ended without a finish_reason or [DONE]"
        return r
    if usage and usage.get("completion_tokens") is not None:
        r["tokens"], r["tokens_from"] = int(usage["completion_tokens"]), "usage"
        r["cached_tokens"] = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        if usage.get("prompt_tokens") is not None:
            r["prompt_tokens"] = int(usage["prompt_tokens"])
    elif r["finish_reason"] == "length":
        r["tokens"], r["tokens_from"] = body["max_tokens"], "length"
    else:
        r["tokens"], r["tokens_from"] = content_chunks, "chunks"
    r["ok"] = True
    return r


def request_body(model_id, prompt, max_tokens):
    return {
        "model": model_id,
        "messages": [{"role": "user", "content": prompt}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": max_tokens,
        "temperature": 0,
    }


def run_clients(port, clients, per_client, make_body, timeout):
    """`clients` threads started together, each sending `per_client` requests in turn.
    Returns (wall seconds, list of request results)."""
    results = [[] for _ in range(clients)]
    barrier = threading.Barrier(clients + 1)

    def client(c):
        barrier.wait()
        for i in range(per_client):
            results[c].append(stream_request(port, make_body(c, i), timeout))

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - start, [r for rs in results for r in rs]


def percentile(values, q):
    """Linear interpolation between closest ranks (numpy's default); None for no values."""
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def one_run(name, args, model, clients, round_no):
    port = free_port()
    server = Server(name, server_command(name, args, model, port, clients), port, READY_PATH[name])
    startup = server.start(args.start_timeout)
    pid = server.proc.pid
    model_id = os.path.splitext(os.path.basename(model))[0]
    try:
        # Warm-up: one request per client, together; not counted.
        _, warm = run_clients(port, clients, 1, lambda c, i: request_body(
            model_id, prompt_for(c, i, clients, f"warm-up {c}"), args.max_tokens), args.timeout)
        warm_errors = [w["error"] for w in warm if not w["ok"]]
        rss_after_warmup = mib(proc_status_kib(pid, "VmRSS"))
        cpu0 = proc_cpu_seconds(pid)
        sampler = RssSampler(pid)
        sampler.start()
        wall, reqs = run_clients(port, clients, args.requests, lambda c, i: request_body(
            model_id, prompt_for(c, i, clients, f"{round_no}.{c}.{i}"), args.max_tokens), args.timeout)
        sampler.stop()
        cpu1 = proc_cpu_seconds(pid)
        rss_end = mib(proc_status_kib(pid, "VmRSS"))
        peak = mib(proc_status_kib(pid, "VmHWM"))
        alive = server.proc.poll() is None
    finally:
        server.stop()
    ok = [r for r in reqs if r["ok"]]
    errors = [r["error"] for r in reqs if not r["ok"]]
    if not alive:
        print(f"warning: {name} {exit_words(server.proc.returncode)} during the run; its output:\n"
              f"{server.tail()}", file=sys.stderr)
    elif errors or warm_errors:
        print(f"warning: {name} c{clients} r{round_no}: {len(errors)} errors (+{len(warm_errors)} in the "
              f"warm-up), e.g. {(errors or warm_errors)[0]}\nserver log: {server.log_path}", file=sys.stderr)
    else:
        server.remove_log()
    tokens = sum(r["tokens"] for r in ok)
    lat = [r["latency"] for r in ok]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    growth = None if rss_end is None or rss_after_warmup is None else rss_end - rss_after_warmup
    cached = [r["cached_tokens"] for r in ok if r["cached_tokens"] is not None]
    # The largest request, prompt + completion (where the usage chunk gives the prompt's size),
    # warm-up included: C x this must fit in --ctx for a shared (unified) KV cache not to limit C.
    sizes = [r["prompt_tokens"] + r["tokens"] for r in ok + [w for w in warm if w["ok"]]
             if r["prompt_tokens"] is not None]
    return {
        "requests_done": len(ok),
        "errors": len(errors),
        "warmup_errors": len(warm_errors),
        "error_samples": sorted(set(errors + warm_errors))[:3],
        "wall_s": round(wall, 4),
        "req_s": len(ok) / wall,
        "out_tok_s": tokens / wall,
        "completion_tokens": tokens,
        "tokens_per_request": tokens / len(ok) if ok else None,
        "tokens_from": sorted({r["tokens_from"] for r in ok}),
        "finish_reasons": {f: sum(r["finish_reason"] == f for r in ok) for f in sorted({str(r["finish_reason"]) for r in ok})},
        "cached_prompt_tokens": sum(cached) if cached else None,
        "max_request_tokens": max(sizes) if sizes else None,
        "latency_p50_s": percentile(lat, 50),
        "latency_p99_s": percentile(lat, 99),
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p99_s": percentile(ttft, 99),
        "startup_s": round(startup, 2),
        "server_cpu_s": None if cpu0 is None or cpu1 is None else round(cpu1 - cpu0, 2),
        "peak_rss_mib": peak,
        "rss_after_warmup_mib": rss_after_warmup,
        "rss_end_mib": rss_end,
        "rss_growth_mib": growth,
        "rss_growth_flag": bool(growth is not None and rss_after_warmup and growth > GROWTH_FLAG * rss_after_warmup),
        "rss_samples_mib": sampler.samples,
        "server_alive_at_end": alive,
    }


# ---------------------------------------------------------------------------------------------
# Results

def settings(args, model, name):
    """What makes runs comparable; a row is reused only when all of these match."""
    return {"model": os.path.basename(model), "threads": args.threads, "ctx": args.ctx,
            "requests": args.requests, "max_tokens": args.max_tokens,
            "server_args": {"longctx": args.longctx_args, "llama-server": args.llama_server_args,
                            "llama-cpp-python": args.peer_args}[name]}


def load_rows(path):
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            for n, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    print(f"note: {path}:{n} is not JSON (an interrupted write?); ignored", file=sys.stderr)
    return rows


def summarise(rows, names, clients_list, rounds):
    """(server, clients) -> medians over its rounds (peak RSS and growth: the largest)."""
    out = {}
    for name in names:
        for c in clients_list:
            runs = [r for r in rows if r["server"] == name and r["clients"] == c and r["round"] < rounds]
            if not runs:
                continue

            def med(key):
                vals = [r[key] for r in runs if r.get(key) is not None]
                return statistics.median(vals) if vals else None

            def top(key):
                vals = [r[key] for r in runs if r.get(key) is not None]
                return max(vals) if vals else None

            out[(name, c)] = {
                "rounds": len(runs), "req_s": med("req_s"), "out_tok_s": med("out_tok_s"),
                "tokens_per_request": med("tokens_per_request"),
                "latency_p50_s": med("latency_p50_s"), "latency_p99_s": med("latency_p99_s"),
                "ttft_p50_s": med("ttft_p50_s"), "ttft_p99_s": med("ttft_p99_s"),
                "peak_rss_mib": top("peak_rss_mib"), "rss_growth_mib": top("rss_growth_mib"),
                "rss_growth_flag": any(r.get("rss_growth_flag") for r in runs),
                "errors": sum(r["errors"] + r.get("warmup_errors", 0) for r in runs),
                "max_request_tokens": top("max_request_tokens"),
                "server_version": next((r["server_version"] for r in runs if r.get("server_version")), None),
            }
    return out


def fmt(v, digits):
    return "–" if v is None else f"{v:.{digits}f}"


def markdown(summary, names, clients_list, args, model):
    ran = [p for p in PEERS if any(n == p for n, _ in summary)]
    against = (f"llama.cpp's server{'s' if len(ran) > 1 else ''} ({', '.join(ran)})" if ran
               else "llama.cpp's servers (none ran)")
    lines = [
        f"`longctx serve` against {against}: model `{os.path.basename(model)}`, {args.threads} threads, "
        f"context {args.ctx}, each client sends {args.requests} streaming chat requests in turn "
        f"(max_tokens {args.max_tokens}, temperature 0) after one warm-up request. Median of up to "
        f"{args.rounds} rounds, each in a fresh server; peak RSS and RSS growth are the largest over the "
        "rounds (growth: from after the warm-up to the end; ⚠ above 10%).",
        "",
        "| server | clients | req/s | out tok/s | tok/req | p50 latency s | p99 latency s | p50 TTFT s | "
        "p99 TTFT s | peak RSS MiB | RSS growth after warm-up MiB | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        for c in clients_list:
            s = summary.get((name, c))
            if not s:
                continue
            growth = fmt(s["rss_growth_mib"], 1) + (" ⚠" if s["rss_growth_flag"] else "")
            lines.append(
                f"| {name} | {c} | {fmt(s['req_s'], 2)} | {fmt(s['out_tok_s'], 1)} | {fmt(s['tokens_per_request'], 1)} | "
                f"{fmt(s['latency_p50_s'], 2)} | {fmt(s['latency_p99_s'], 2)} | {fmt(s['ttft_p50_s'], 3)} | "
                f"{fmt(s['ttft_p99_s'], 3)} | {fmt(s['peak_rss_mib'], 0)} | {growth} | {s['errors']} |")
    peers = [p for p in PEERS if p in names and any(summary.get(("longctx", c)) and summary.get((p, c))
                                                    for c in clients_list)]
    if peers:
        def ratio(a, b, key):
            return a[key] / b[key] if a and b and a[key] and b[key] else None

        lines += ["", f"longctx / {' and longctx / '.join(peers)} (> 1: longctx is faster):", "",
                  "| clients | " + " | ".join(f"req/s vs {p} | out tok/s vs {p}" for p in peers) + " |",
                  "|---:|" + "---:|---:|" * len(peers)]
        for c in clients_list:
            a = summary.get(("longctx", c))
            if not a or not any(summary.get((p, c)) for p in peers):
                continue
            cells = []
            for p in peers:
                b = summary.get((p, c))
                cells += [fmt(ratio(a, b, "req_s"), 2), fmt(ratio(a, b, "out_tok_s"), 2)]
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
    notes = []
    if any(n == "llama-server" for n, _ in summary):
        ls = [(c, s) for (n, c), s in summary.items() if n == "llama-server"]
        version = next((s["server_version"] for _, s in ls if s.get("server_version")), None)
        sizes = [(c, s["max_request_tokens"]) for c, s in ls if s.get("max_request_tokens")]
        fit = ""
        if sizes:
            c_max = max(c for c, _ in sizes)
            n_max = max(n for _, n in sizes)
            need = c_max * n_max
            fit = (f"; the largest request used {n_max} tokens (prompt + completion), so at most "
                   f"{c_max} x {n_max} = {need} tokens are in the cache at once, "
                   + ("well within" if need <= args.ctx else "MORE than")
                   + f" the {args.ctx}-token shared cache"
                   + (", which therefore never limits it" if need <= args.ctx else ": the shared cache limited it"))
        notes.append(f"Note: {LLAMA_SERVER_NOTE.format(ctx=args.ctx)}{fit}. It sends a usage chunk, so its token counts come "
                     "from it, as longctx's do. Other settings are llama-server's defaults, "
                     "web UI off" + (f"; {version}" if version else "") + ". Its RSS grows by about "
                     "the KV of each finished request because by default it keeps finished prompts in a "
                     "RAM prompt cache (--cache-ram, up to 8192 MiB): that growth is the cache, not a leak "
                     "(--llama-server-args=\"--cache-ram 0\" turns it off). Its build uses OpenMP, whose "
                     "threads spin while waiting: it slows down sharply when another process competes for "
                     "the cores, so measure it on an idle machine.")
    if any(n == "llama-cpp-python" for n, _ in summary):
        notes.append(f"Note: {PEER_NOTE} It runs with --interrupt_requests false, so queued requests "
                     "do not cut the running stream short; it sends no usage chunk, so its token counts "
                     "come from finish_reason \"length\" (= max_tokens) or the count of content chunks.")
    for note in notes:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help=f"GGUF file (default: {DEFAULT_MODEL}, else `longctx fetch`)")
    ap.add_argument("--servers", default=",".join(SERVERS), help="comma-separated, from: " + ",".join(SERVERS))
    ap.add_argument("--clients", default="1,4,16", help="client counts to sweep, comma-separated")
    ap.add_argument("--requests", type=int, default=4, help="requests per client, one after another")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="runs per configuration; the median is reported")
    ap.add_argument("--threads", type=int, default=2, help="compute threads of every server")
    ap.add_argument("--ctx", type=int, default=8192, help="context window of every server (llama-server: "
                    "one KV cache of this size shared by its slots)")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "results", "serve", "load.jsonl"),
                    help="JSON lines, one per server x clients x round; a rerun skips the rows already there")
    ap.add_argument("--markdown", help="also write the Markdown table to this file")
    ap.add_argument("--longctx-bin", default=LONGCTX)
    ap.add_argument("--longctx-args", default="", help="extra flags for `longctx serve`, given with =: --longctx-args=\"--kv snapkv:budget=1024\"")
    ap.add_argument("--llama-server-bin", default=os.environ.get("LLAMA_SERVER") or LLAMA_SERVER,
                    help=f"llama.cpp's llama-server binary (default: $LLAMA_SERVER, else {LLAMA_SERVER}); "
                    "skipped with a note when missing")
    ap.add_argument("--llama-server-args", default="", help="extra flags for llama-server, given with =: --llama-server-args=\"--cache-ram 0\"")
    ap.add_argument("--peer-python", default=PEER_PYTHON, help="python with llama-cpp-python[server] installed "
                    "(the llama-cpp-python server)")
    ap.add_argument("--peer-args", default="", help="extra flags for `python -m llama_cpp.server`, given with =: --peer-args=\"--n_batch 256\"")
    ap.add_argument("--start-timeout", type=float, default=180, help="seconds a server may take to answer")
    ap.add_argument("--timeout", type=float, default=600, help="seconds one request may go without a byte")
    args = ap.parse_args()
    # Stop the server we started on Ctrl-C and on SIGTERM too (the `finally` in one_run does it).
    # A shell without job control starts a background job with SIGINT ignored, and the servers
    # would inherit that and ignore our SIGINT; a handler set here resets to default at exec.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    clients_list = [int(c) for c in args.clients.split(",") if c.strip()]
    if not clients_list or min(clients_list) < 1 or args.requests < 1 or args.rounds < 1 or args.max_tokens < 1:
        sys.exit("--clients, --requests, --rounds and --max-tokens must be at least 1")
    names = check_servers(args)
    if not names:
        sys.exit("no server to run")
    model = args.model or default_model()
    if not os.path.exists(model):
        sys.exit(f"no model at {model}")
    if "llama-cpp-python" in names:
        print(f"note: {PEER_NOTE}", file=sys.stderr)

    rows = load_rows(args.out)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    mine = []
    for c in clients_list:
        for name in names:
            want = settings(args, model, name)
            for rnd in range(args.rounds):
                old = [r for r in rows if r.get("server") == name and r.get("clients") == c
                       and r.get("round") == rnd and r.get("settings") == want]
                if old:
                    mine.append(old[-1])
                    continue
                print(f"{name}, {c} client(s), round {rnd + 1}/{args.rounds} ...", file=sys.stderr, flush=True)
                row = {"server": name, "clients": c, "round": rnd, "settings": want,
                       "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
                if name == "llama-server":
                    row["server_version"] = args.llama_server_version
                row.update(one_run(name, args, model, c, rnd))
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
                    f.flush()
                rows.append(row)
                mine.append(row)
                print(f"  {row['req_s']:.2f} req/s, {row['out_tok_s']:.1f} tok/s "
                      f"({fmt(row['tokens_per_request'], 1)} tok/req), latency p50 {fmt(row['latency_p50_s'], 2)} s, "
                      f"TTFT p50 {fmt(row['ttft_p50_s'], 3)} s, {row['errors']} errors, "
                      f"peak RSS {fmt(row['peak_rss_mib'], 0)} MiB, growth {fmt(row['rss_growth_mib'], 1)} MiB",
                      file=sys.stderr, flush=True)
    table = markdown(summarise(mine, names, clients_list, args.rounds), names, clients_list, args, model)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted; the finished runs are kept in --out, and a rerun resumes after them")
