#!/usr/bin/env python3
r"""Soak test of `longctx serve`: many clients for a long time, with bad clients among them.

Starts the server itself (release binary, default model, on a free loopback port, with an API key
and a short --timeout so the bad clients are dealt with often), then for --duration seconds runs:
  - --clients well-behaved clients, each sending one request after another: chat (whole and
    streamed), legacy completions and /tokenize, with prompts of varied length, some sharing a
    long prefix (the prefix cache fills and evicts), each with a unique tag;
  - a slow client that sends a request body one byte per second: the server must answer 408
    once --timeout passes, every time;
  - a half-open client that keeps up to 16 connections open with half a request header and
    never another byte: the server must close each within --timeout (plus a margin);
  - a slow reader that streams an answer but reads it a few bytes per second.
Every 10 s it samples the server's RSS and its open file descriptors, and writes each sample to
samples.jsonl as it goes (a killed soak keeps what it measured).

It passes when no well-behaved request failed, every slow and half-open client was cut off as
it should be, the server is still alive and answering, and the RSS after warm-up (--warmup s)
grew by no more than 10% to the end. Writes summary.json, summary.md and rss.svg / rss.png (RSS
and descriptors over time) into --out, and exits 1 if it did not pass.

    python3 bench/soak.py --binary target/release/longctx --duration 1800 --out docs/results/serve/soak
"""

import argparse
import http.client
import json
import os
import random
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
import zlib

from serve_load import percentile, proc_status_kib

KEY = "soak-test-key"
TOPICS = ["the tides", "a copper kettle", "orbiting moons", "a garden in winter", "river stones",
          "seven lanterns", "the night train", "a quiet library", "mountain weather", "old maps"]
SHARED = ("A ferry crosses a wide grey bay twice a day. The captain keeps a log of the wind, the "
          "passengers and the gulls that follow the wake. ") * 6


def proc_kib(pid, field):
    return proc_status_kib(pid, field) or 0


def open_fds(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def start_server(args):
    env = dict(os.environ, LONGCTX_API_KEY=KEY)
    cmd = [args.binary, "serve", "--port", "0", "--ctx", str(args.ctx), "--threads", str(args.threads),
           "--max-concurrent", "8", "--max-queue", "256", "--timeout", str(args.timeout),
           "--prefix-cache-mib", "64"]
    if args.model:
        cmd += ["--model", args.model]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    port = None
    deadline = time.time() + 300
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        print("[server]", line.rstrip(), flush=True)
        if "serving on http://" in line:
            port = int(line.split("serving on http://")[1].split()[0].rsplit(":", 1)[1].rstrip("/"))
            break
    if port is None:
        proc.kill()
        sys.exit("the server did not start")
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
    return proc, port


def post(port, path, body, timeout=300):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body=json.dumps(body),
                     headers={"content-type": "application/json", "authorization": f"Bearer {KEY}"})
        r = conn.getresponse()
        data = r.read()
        return r.status, data
    finally:
        conn.close()


def request_for(client, n):
    rng = random.Random(client * 100003 + n)
    tag = f"[{client}-{n}]"
    topic = rng.choice(TOPICS)
    kind = rng.choices(["chat", "stream", "completion", "tokenize"], [55, 25, 12, 8])[0]
    prefix = SHARED if rng.random() < 0.4 else ""
    question = f"{prefix}Write two sentences about {topic}. {tag}" + " Add detail." * rng.randint(0, 10)
    max_tokens = rng.randint(8, 48)
    if kind == "tokenize":
        return kind, "/tokenize", {"content": question * rng.randint(1, 50)}
    if kind == "completion":
        return kind, "/v1/completions", {"model": "smollm2", "prompt": question, "max_tokens": max_tokens,
                                         "temperature": 0.7, "seed": n}
    body = {"model": "smollm2", "messages": [{"role": "user", "content": question}],
            "max_tokens": max_tokens, "temperature": rng.choice([0, 0.8]),
            "frequency_penalty": rng.choice([0, 0.5])}
    if kind == "stream":
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return kind, "/v1/chat/completions", body


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.latency = {}
        self.errors = []
        self.events = {"slow_body_408": 0, "slow_body_other": 0, "half_open_closed": 0,
                       "half_open_held": 0, "slow_reader_done": 0, "slow_reader_cut": 0}

    def ok(self, kind, seconds):
        with self.lock:
            self.latency.setdefault(kind, []).append(seconds)

    def error(self, what):
        with self.lock:
            if len(self.errors) < 50:
                self.errors.append(what)
            self.events.setdefault("errors", 0)
            self.events["errors"] += 1

    def count(self, event):
        with self.lock:
            self.events[event] += 1


def good_client(port, client, stop, tally):
    n = 0
    while not stop.is_set():
        kind, path, body = request_for(client, n)
        n += 1
        started = time.time()
        try:
            status, data = post(port, path, body)
        except Exception as e:  # noqa: BLE001 - every failure is a finding to report
            tally.error(f"{kind}: {type(e).__name__}: {e}")
            continue
        if status != 200:
            tally.error(f"{kind}: HTTP {status}: {data[:200]!r}")
        elif kind == "stream" and b"data: [DONE]" not in data:
            tally.error(f"{kind}: stream ended without [DONE]")
        else:
            tally.ok(kind, time.time() - started)


def slow_body_client(port, stop, tally, timeout):
    body = json.dumps({"content": "a body sent one byte at a time"}).encode()
    while not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=timeout + 30) as s:
                s.sendall(b"POST /tokenize HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
                          + f"authorization: Bearer {KEY}\r\ncontent-length: {len(body)}\r\n\r\n".encode())
                answer = b""
                for byte in body:
                    s.sendall(bytes([byte]))
                    s.settimeout(1.0)
                    try:
                        answer = s.recv(4096)
                    except socket.timeout:
                        continue
                    finally:
                        s.settimeout(timeout + 30)
                    if answer:
                        break
                tally.count("slow_body_408" if answer.startswith(b"HTTP/1.1 408") else "slow_body_other")
        except OSError:
            tally.count("slow_body_other")


def half_open_client(port, stop, tally, timeout):
    while not stop.is_set():
        sockets = []
        for _ in range(16):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")
            sockets.append(s)
        deadline = time.time() + timeout + 10
        for s in sockets:
            s.settimeout(max(0.1, deadline - time.time()))
            # Closed, with or without a last word (an answer and then EOF): anything but silence.
            try:
                s.recv(4096)
                closed = True
            except socket.timeout:
                closed = False
            except OSError:
                closed = True
            tally.count("half_open_closed" if closed else "half_open_held")
            s.close()


def slow_reader(port, stop, tally):
    while not stop.is_set():
        body = json.dumps({"model": "smollm2", "stream": True, "max_tokens": 48, "temperature": 0,
                           "messages": [{"role": "user", "content": "Tell a long story about a lighthouse."}]})
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
                s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
                          + f"authorization: Bearer {KEY}\r\nconnection: close\r\ncontent-length: {len(body)}\r\n\r\n".encode()
                          + body.encode())
                got = b""
                while True:
                    chunk = s.recv(64)
                    if not chunk:
                        break
                    got += chunk
                    time.sleep(0.5)
                tally.count("slow_reader_done" if b"[DONE]" in got else "slow_reader_cut")
        except OSError:
            tally.count("slow_reader_cut")


def write_svg(path, samples, warmup):
    w, h, pad = 720, 300, 50
    t_max = max(s["t"] for s in samples) or 1
    rss_max = max(s["rss_mib"] for s in samples) * 1.15 or 1
    fd_max = max(max(s["fds"] for s in samples) * 1.15, 1)
    def pts(key, top):
        return " ".join(f"{pad + (w - 2 * pad) * s['t'] / t_max:.1f},{h - pad - (h - 2 * pad) * s[key] / top:.1f}"
                        for s in samples)
    wx = pad + (w - 2 * pad) * min(warmup, t_max) / t_max
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="black"/>',
           f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="black"/>',
           f'<line x1="{wx:.1f}" y1="{pad}" x2="{wx:.1f}" y2="{h - pad}" stroke="#999" stroke-dasharray="4"/>',
           f'<text x="{wx + 4:.1f}" y="{pad + 12}" fill="#666">end of warm-up</text>',
           f'<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="{pts("rss_mib", rss_max)}"/>',
           f'<polyline fill="none" stroke="#ff7f0e" stroke-width="1.5" points="{pts("fds", fd_max)}"/>',
           f'<text x="{pad}" y="{pad - 20}" font-size="14">longctx serve soak: RSS (blue, 0–{rss_max:.0f} MiB) '
           f'and open descriptors (orange, 0–{fd_max:.0f})</text>',
           f'<text x="{w / 2 - 40}" y="{h - 15}">time, 0–{t_max / 60:.0f} min</text>',
           "</svg>"]
    with open(path, "w") as f:
        f.write("\n".join(svg))


def write_png(path, samples, warmup):
    """The same lines as the SVG, drawn into pixels (standard library only: zlib and struct)."""
    w, h, pad = 720, 300, 40
    img = [[(255, 255, 255)] * w for _ in range(h)]
    t_max = max(s["t"] for s in samples) or 1
    def plot(key, top, colour, thick):
        prev = None
        for s in samples:
            x = int(pad + (w - 2 * pad) * s["t"] / t_max)
            y = int(h - pad - (h - 2 * pad) * s[key] / top)
            if prev:
                steps = max(abs(x - prev[0]), abs(y - prev[1]), 1)
                for i in range(steps + 1):
                    px = prev[0] + (x - prev[0]) * i // steps
                    py = prev[1] + (y - prev[1]) * i // steps
                    for d in range(thick):
                        if 0 <= py + d < h and 0 <= px < w:
                            img[py + d][px] = colour
            prev = (x, y)
    for x in range(pad, w - pad):
        img[h - pad][x] = (0, 0, 0)
    for y in range(pad, h - pad):
        img[y][pad] = (0, 0, 0)
        wx = int(pad + (w - 2 * pad) * min(warmup, t_max) / t_max)
        if y % 8 < 4:
            img[y][wx] = (150, 150, 150)
    plot("rss_mib", max(s["rss_mib"] for s in samples) * 1.15 or 1, (31, 119, 180), 2)
    plot("fds", max(max(s["fds"] for s in samples) * 1.15, 1), (255, 127, 14), 1)
    raw = b"".join(b"\x00" + bytes(c for px in row for c in px) for row in img)
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) \
        + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    with open(path, "wb") as f:
        f.write(png)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--binary", default="target/release/longctx")
    p.add_argument("--model", help="a .gguf file or model name (default: the server's default)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--duration", type=float, default=1800, help="seconds of load")
    p.add_argument("--warmup", type=float, default=180, help="seconds before the RSS baseline")
    p.add_argument("--timeout", type=int, default=5, help="the server's --timeout, seconds")
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--out", default="docs/results/serve/soak")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")

    proc, port = start_server(args)
    stop = threading.Event()
    tally = Tally()
    threads = [threading.Thread(target=good_client, args=(port, c, stop, tally)) for c in range(args.clients)]
    threads += [threading.Thread(target=slow_body_client, args=(port, stop, tally, args.timeout)),
                threading.Thread(target=half_open_client, args=(port, stop, tally, args.timeout)),
                threading.Thread(target=slow_reader, args=(port, stop, tally))]
    for t in threads:
        t.daemon = True
        t.start()
    samples = []
    started = time.time()
    with open(os.path.join(args.out, "samples.jsonl"), "w") as log:
        while time.time() - started < args.duration and proc.poll() is None:
            time.sleep(10)
            done = sum(len(v) for v in tally.latency.values())
            s = {"t": round(time.time() - started, 1), "rss_mib": round(proc_kib(proc.pid, "VmRSS") / 1024, 1),
                 "fds": open_fds(proc.pid), "requests": done, "errors": tally.events.get("errors", 0)}
            samples.append(s)
            log.write(json.dumps(s) + "\n")
            log.flush()
            left = args.duration - s["t"]
            print(f"{s['t']:7.0f} s  RSS {s['rss_mib']:6.1f} MiB  fds {s['fds']:4d}  requests {done:6d}  "
                  f"errors {s['errors']}  ETA {max(left, 0) / 60:.1f} min", flush=True)
    # The clients finish what they have in flight before the server stops, so that a request
    # cut by the shutdown is not counted against it.
    stop.set()
    for t in threads:
        t.join(timeout=300)
    alive = proc.poll() is None
    health = None
    if alive:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("GET", "/health")
            health = conn.getresponse().status
        except OSError as e:
            health = str(e)
    peak = proc_kib(proc.pid, "VmHWM") / 1024
    proc.send_signal(2)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()

    after = [s for s in samples if s["t"] >= args.warmup]
    base = after[0]["rss_mib"] if after else 0
    end = statistics.median(s["rss_mib"] for s in samples[-3:]) if samples else 0
    growth = (end - base) / base if base else 0
    ev = tally.events
    passed = (alive and health == 200 and ev.get("errors", 0) == 0 and growth <= 0.10
              and ev["slow_body_other"] == 0 and ev["half_open_held"] == 0 and ev["slow_body_408"] > 0)
    summary = {"cpu": cpu, "duration_s": args.duration, "clients": args.clients, "server_timeout_s": args.timeout,
               "alive": alive, "health": health, "rss_after_warmup_mib": base, "rss_end_mib": end,
               "rss_growth": round(growth, 4), "peak_rss_mib": round(peak, 1),
               "max_fds": max((s["fds"] for s in samples), default=0), "events": ev,
               "first_errors": tally.errors[:10], "passed": passed,
               "requests": {k: {"n": len(v), "p50_s": round(percentile(v, 50), 3), "p95_s": round(percentile(v, 95), 3),
                                "p99_s": round(percentile(v, 99), 3)} for k, v in sorted(tally.latency.items())}}
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    lines = [f"Soak of `longctx serve`: {args.clients} clients for {args.duration / 60:.0f} min, server --timeout "
             f"{args.timeout} s, --ctx {args.ctx}, {args.threads} threads, on {cpu}.", "",
             "| requests | count | p50 s | p95 s | p99 s |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {v['n']} | {v['p50_s']} | {v['p95_s']} | {v['p99_s']} |" for k, v in summary["requests"].items()]
    lines += ["", "| check | value |", "|---|---|",
              f"| failed well-behaved requests | {ev.get('errors', 0)} |",
              f"| RSS after warm-up ({args.warmup:.0f} s) → end, MiB | {base} → {end} ({growth:+.1%}) |",
              f"| peak RSS MiB | {peak:.1f} |",
              f"| open descriptors, most seen | {summary['max_fds']} |",
              f"| slow bodies answered 408 / otherwise | {ev['slow_body_408']} / {ev['slow_body_other']} |",
              f"| half-open connections closed by the server / held | {ev['half_open_closed']} / {ev['half_open_held']} |",
              f"| slow readers served to the end / cut | {ev['slow_reader_done']} / {ev['slow_reader_cut']} |",
              f"| server alive, /health | {alive}, {health} |",
              f"| **passed** | **{passed}** |"]
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    if samples:
        write_svg(os.path.join(args.out, "rss.svg"), samples, args.warmup)
        write_png(os.path.join(args.out, "rss.png"), samples, args.warmup)
    print("\n".join(lines))
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
