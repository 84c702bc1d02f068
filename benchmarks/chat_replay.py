"""A multi-turn chat replayed against `turbollm serve`: time to first token per turn with
prompt caching (`cache_prompt: true`, the default) and without, on the same server.

    python benchmarks/chat_replay.py [-m MODEL.gguf] [--turns 20] [--max-tokens 32] [-c 8192] [-t 2]

Each turn sends the whole conversation so far (as an IDE or chat UI does), streamed, greedy,
and records the time from sending to the first piece of text. The replay runs first with
caching (each turn can start from the previous turn's kept cache), then again with
`cache_prompt: false` (each turn prefills the whole conversation); the second replay's
answers are checked to be the first's, token for token. Loopback only.
"""

from __future__ import annotations

import argparse
import json
import time

import httpx

QUESTIONS = [
    "I am writing a small command-line tool in Python that renames photos by the date they were taken. Where do I start?",
    "How do I read the date from a JPEG file?", "What if the file has no EXIF data?", "How should I name the files?",
    "What about two photos taken in the same second?", "How do I walk a folder and its subfolders?",
    "Should the tool ask before renaming?", "How do I add a --dry-run flag?", "How do I test this?",
    "What about HEIC files from a phone?", "How do I report progress?", "What errors should I catch?",
    "How do I make it installable with pip?", "What should the README say?", "How do I log what was renamed?",
    "Can it undo a rename?", "How fast will it be on ten thousand files?", "Should I use threads?",
    "How do I handle time zones?", "Summarise the design in five bullet points.",
]


def replay(url: str, turns: int, max_tokens: int, cache: bool) -> list[dict]:
    messages, out = [{"role": "system", "content": "You are a concise programming assistant."}], []
    for question in QUESTIONS[:turns]:
        messages.append({"role": "user", "content": question})
        body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}, "cache_prompt": cache}
        sent, first, text, usage = time.perf_counter(), None, [], {}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk["choices"]:
                    piece = choice["delta"].get("content") or choice["delta"].get("reasoning_content")
                    if piece:
                        first = first or time.perf_counter()
                        text.append(piece)
        answer = "".join(text)
        messages.append({"role": "assistant", "content": answer})
        out.append({"ttft": (first or time.perf_counter()) - sent, "prompt": usage.get("prompt_tokens", 0),
                    "cached": usage.get("prompt_tokens_details", {}).get("cached_tokens", 0), "answer": answer})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", default=None)
    ap.add_argument("--turns", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("-c", "--ctx-size", type=int, default=8192)
    ap.add_argument("-t", "--threads", type=int, default=2)
    args = ap.parse_args()
    if not 1 <= args.turns <= len(QUESTIONS):
        ap.error(f"--turns must be in 1..{len(QUESTIONS)}")
    from turbollm.cli.serve import launch
    flags = ["-c", str(args.ctx_size), "-t", str(args.threads)] + (["-m", args.model] if args.model else [])
    proc, url = launch(flags, timeout=300)
    try:
        with_cache = replay(url, args.turns, args.max_tokens, cache=True)
        without = replay(url, args.turns, args.max_tokens, cache=False)
    finally:
        proc.terminate()
        proc.wait(30)
    print(f"{'turn':>4} {'prompt tok':>10} {'cached':>7} {'TTFT cached (s)':>16} {'TTFT uncached (s)':>18}")
    for i, (a, b) in enumerate(zip(with_cache, without), 1):
        print(f"{i:>4} {a['prompt']:>10} {a['cached']:>7} {a['ttft']:>16.3f} {b['ttft']:>18.3f}")
    total_a, total_b = sum(r["ttft"] for r in with_cache), sum(r["ttft"] for r in without)
    print(f"total TTFT: {total_a:.2f} s cached, {total_b:.2f} s uncached ({total_b / total_a:.1f}x)")
    same = all(a["answer"] == b["answer"] for a, b in zip(with_cache, without))
    print("answers identical with and without caching:", "yes" if same else "NO")


if __name__ == "__main__":
    main()
