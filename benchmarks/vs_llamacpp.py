"""turbollm and llama.cpp on the same GGUF, the same threads and the same tests, side by side.

    python benchmarks/vs_llamacpp.py [-m MODEL.gguf] [-t 2] [-p 512] [-n 128] [-pg 1150,2000|none] [-r 3]
                                     [--llama-python /path/to/venv/bin/python]

llama.cpp runs through llama-cpp-python, installed only for benchmarking (never a turbollm
dependency); pass the interpreter of the environment that has it with --llama-python when
it is not this one. Every repetition starts one fresh process per engine, turbollm first,
then llama.cpp, alternating, so that both see the same machine state (page cache, clocks,
other load). Each process warms up as llama-bench does and then runs every test once:
pp (prompt of random tokens in one pass, last logits), tg (single-token steps from an empty
cache, random tokens, logits each step) and pp+tg (both, tokens/s over all tokens).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def llama_worker(model: str, threads: int, tests: list[tuple[str, int, int]]) -> dict:
    """Runs inside the llama-cpp-python environment: one pass of every test, as JSON."""
    import resource

    import numpy as np
    from llama_cpp import Llama

    start = time.perf_counter()
    n_ctx = max(p + g for _, p, g in tests)
    llm = Llama(model_path=model, n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=threads,
                n_threads_batch=threads, verbose=False)
    load_seconds = time.perf_counter() - start
    rng = np.random.default_rng(1234)
    n_vocab = llm.n_vocab()

    def run(n_prompt: int, n_gen: int) -> float:
        llm.reset()
        llm._ctx.kv_cache_clear()  # llama-bench clears the memory before every run
        prompt = rng.integers(0, n_vocab, n_prompt).tolist()
        steps = rng.integers(0, n_vocab, n_gen).tolist()
        begin = time.perf_counter()
        if n_prompt:
            llm.eval(prompt)
        for token in steps:
            llm.eval([token])
        return time.perf_counter() - begin

    results = {}
    for name, n_prompt, n_gen in tests:
        if not (n_prompt and n_gen):
            run(n_prompt, min(n_gen, 8))  # warm-up, as for turbollm
        results[name] = run(n_prompt, n_gen)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"load_seconds": load_seconds, "peak_rss": peak, "seconds": results}


def turbollm_pass(args, tests) -> dict:
    command = [sys.executable, "-m", "turbollm.cli", "bench", "-t", str(args.threads), "-r", "1", "--json",
               "-p", ",".join(str(p) for _, p, g in tests if not g) or "1",
               "-n", ",".join(str(g) for _, p, g in tests if not p) or "1",
               "-pg", ";".join(f"{p},{g}" for _, p, g in tests if p and g) or "none"]
    if args.model:
        command += ["-m", args.model]
    report = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    return {"load_seconds": report["load_seconds"], "peak_rss": report["peak_rss"], "model": report["model"],
            "description": report["description"],
            "seconds": {r["test"]: r["samples_ns"][0] / 1e9 for r in report["results"]}}


def llama_pass(args, model: str, tests) -> dict:
    command = [args.llama_python, __file__, "--worker", model, str(args.threads), json.dumps(tests)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        model, threads, tests = sys.argv[2], int(sys.argv[3]), [tuple(t) for t in json.loads(sys.argv[4])]
        print(json.dumps(llama_worker(model, threads, tests)))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", default=None, help="GGUF (default: turbollm's default model)")
    parser.add_argument("-t", "--threads", type=int, default=2)
    parser.add_argument("-p", "--n-prompt", type=int, default=512)
    parser.add_argument("-n", "--n-gen", type=int, default=128)
    parser.add_argument("-pg", "--prompt-gen", default="1150,2000", help="P,G or 'none'")
    parser.add_argument("-r", "--repetitions", type=int, default=3)
    parser.add_argument("--llama-python", default=sys.executable,
                        help="python of an environment with llama-cpp-python (default: this one)")
    args = parser.parse_args()
    tests = [(f"pp{args.n_prompt}", args.n_prompt, 0), (f"tg{args.n_gen}", 0, args.n_gen)]
    if args.prompt_gen != "none":
        p, g = (int(x) for x in args.prompt_gen.split(","))
        tests.append((f"pp{p}+tg{g}", p, g))

    runs = {"turbollm": [], "llama.cpp": []}
    for rep in range(args.repetitions):
        ours = turbollm_pass(args, tests)
        runs["turbollm"].append(ours)
        runs["llama.cpp"].append(llama_pass(args, ours["model"], tests))
        each = ", ".join(f"{name} {(p + g) / ours['seconds'][name]:.2f} / {(p + g) / runs['llama.cpp'][-1]['seconds'][name]:.2f}"
                         for name, p, g in tests)
        print(f"repetition {rep + 1}/{args.repetitions} (tok/s, turbollm / llama.cpp): {each}", file=sys.stderr, flush=True)

    first = runs["turbollm"][0]
    print(f"model: {first['model']} ({first['description']}), {args.threads} threads, "
          f"{args.repetitions} alternating runs per engine")
    print(f"| {'test':<16} | {'turbollm t/s':>18} | {'llama.cpp t/s':>18} | {'ratio':>6} |")
    print(f"| {'-' * 16} | {'-' * 18} | {'-' * 18} | {'-' * 6} |")

    def rates(engine: str, name: str, n_tokens: int) -> list[float]:
        return [n_tokens / r["seconds"][name] for r in runs[engine]]

    for name, p, g in tests:
        ours, theirs = rates("turbollm", name, p + g), rates("llama.cpp", name, p + g)
        fmt = lambda xs: f"{statistics.fmean(xs):.2f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.2f}"
        print(f"| {name:<16} | {fmt(ours):>18} | {fmt(theirs):>18} | "
              f"{statistics.fmean(ours) / statistics.fmean(theirs):>6.2f} |")
    for engine, rs in runs.items():
        print(f"{engine}: load {statistics.fmean(r['load_seconds'] for r in rs):.2f} s, "
              f"peak RSS {max(r['peak_rss'] for r in rs) / 2**20:,.0f} MiB")


if __name__ == "__main__":
    main()
