"""Load on `turbollm serve`: requests/s, time to first token and inter-token latency
percentiles, and aggregate generation tok/s, at several slot counts.

    python benchmarks/serve_load.py [-m MODEL.gguf] [--slots 1,2,4] [--requests 16] [--max-tokens 64]
                                    [--clients N] [-t 2] [--time-limit 600]

For each slot count it starts a server on a free loopback port (`-np S`, `-c S*2048`), warms
it up with one request, then sends `--requests` streaming completions from `--clients`
concurrent clients (default: as many as slots), seeded sampling at temperature 0.8 from a
fixed set of prompts. Bounded: a fixed number of requests, and it stops at --time-limit
seconds whatever happens. Loopback only; nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import sys
import time

import httpx

PROMPTS = ["Once upon a time", "The history of the printing press", "def quicksort(items):", "A recipe for bread:",
           "The planets of the solar system are", "Dear friend,", "In the beginning", "Ten facts about whales:"]


def start(args, slots: int):
    from turbollm.cli.serve import launch
    flags = ["-np", str(slots), "-c", str(slots * 2048), "-t", str(args.threads)] + (["-m", args.model] if args.model else [])
    return launch(flags, timeout=120)


def one_request(url: str, i: int, max_tokens: int, deadline: float) -> dict:
    body = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0.8, "seed": i,
            "stream": True, "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    arrivals, tokens = [], 0
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=max(1.0, deadline - time.time())) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["text"]:
                arrivals.append(time.perf_counter())
    return {"sent": sent, "arrivals": arrivals, "tokens": tokens, "done": time.perf_counter()}


def percentiles(values: list[float]) -> str:
    if len(values) < 2:
        return "n/a"
    q = statistics.quantiles(values, n=100, method="inclusive")
    return f"{q[49] * 1e3:7.1f} {q[89] * 1e3:7.1f} {q[98] * 1e3:7.1f}"


def measure(args, slots: int, deadline: float) -> dict:
    proc, url = start(args, slots)
    try:
        one_request(url, 0, 8, deadline)  # warm-up
        clients = args.clients or slots
        begin = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(lambda i: one_request(url, i, args.max_tokens, deadline), range(args.requests)))
        wall = time.perf_counter() - begin
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    ttft = [r["arrivals"][0] - r["sent"] for r in results if r["arrivals"]]
    itl = [b - a for r in results for a, b in zip(r["arrivals"], r["arrivals"][1:])]
    n_tokens = sum(r["tokens"] for r in results)
    return {"slots": slots, "clients": clients, "requests": len(results), "wall_s": wall,
            "requests_per_s": len(results) / wall, "tokens": n_tokens, "tok_per_s": n_tokens / wall,
            "ttft": ttft, "itl": itl}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-m", "--model", default=None, help="GGUF (default: the default model)")
    parser.add_argument("--slots", default="1,2,4", help="slot counts to measure (default 1,2,4)")
    parser.add_argument("--requests", type=int, default=16, help="requests per slot count (default 16)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per request (default 64)")
    parser.add_argument("--clients", type=int, default=0, help="concurrent clients (default: the slot count)")
    parser.add_argument("-t", "--threads", type=int, default=min(2, os.cpu_count() or 1), help="server threads")
    parser.add_argument("--time-limit", type=float, default=600, help="seconds for the whole run at most (default 600)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = parser.parse_args()
    deadline = time.time() + args.time_limit
    rows = []
    for slots in (int(s) for s in args.slots.split(",")):
        if time.time() > deadline:
            print(f"time limit reached before {slots} slots", file=sys.stderr)
            break
        rows.append(measure(args, slots, deadline))
    if args.json:
        print(json.dumps([{k: v for k, v in r.items() if k not in ("ttft", "itl")} for r in rows], indent=1))
        return
    print(f"{'slots':>5} {'clients':>7} {'req':>4} {'req/s':>6} {'tok/s':>7}   {'TTFT ms p50 p90 p99':>23}   {'ITL ms p50 p90 p99':>23}")
    for r in rows:
        print(f"{r['slots']:>5} {r['clients']:>7} {r['requests']:>4} {r['requests_per_s']:>6.2f} {r['tok_per_s']:>7.1f}"
              f"   {percentiles(r['ttft']):>23}   {percentiles(r['itl']):>23}")


if __name__ == "__main__":
    main()
