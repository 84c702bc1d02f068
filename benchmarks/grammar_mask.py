"""How much a grammar engine costs per generated token on turbollm's vocabulary.

Structured output computes, before every sampled token, the set of tokens the grammar allows
next (a bitmask over the whole vocabulary: 262,144 tokens on Gemma), then advances the grammar
by the sampled token. This script measures that for llguidance and xgrammar, each built from
turbollm's own tokenizer (token bytes, control tokens marked special, end-of-generation ids),
walking a JSON document token by token as the model would produce it: the time to compute each
position's mask (median and p99, in µs), to advance by the token, to set the disallowed logits
to -inf, the compile + first mask time of the grammar, and what the grammar adds to the whole
document (compile, first mask, every mask and advance). Cases: "any JSON object" (json_object)
and a JSON schema with nested objects, arrays and enums. llguidance runs through turbollm's
own wrapper (engine/grammar.py: its vocabulary adapter, JSON whitespace rule and mask).

    python benchmarks/grammar_mask.py [--model FILE.gguf] [--repeat 3] [--engine llguidance,xgrammar]

xgrammar needs `transformers` at import (not a turbollm dependency); an engine that does not
import is reported as missing, the rest still measured.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import time

import numpy as np
import torch

from turbollm.api import default_model_path
from turbollm.engine.grammar import Constraint, Grammar, Vocabulary, apply_mask
from turbollm.gguf.reader import GGUFFile
from turbollm.text.tokenizer import Tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string"}, "city": {"type": "string"},
                           "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["street", "city", "zip"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 8},
        "projects": {
            "type": "array",
            "items": {"type": "object",
                      "properties": {"title": {"type": "string"}, "done": {"type": "boolean"},
                                     "priority": {"enum": ["low", "medium", "high"]}},
                      "required": ["title", "done", "priority"], "additionalProperties": False},
        },
    },
    "required": ["name", "age", "role", "address", "tags", "projects"],
    "additionalProperties": False,
}

DOCUMENT = {
    "name": "Ada Lovelace", "age": 36, "role": "editor",
    "address": {"street": "12 St James's Square", "city": "London", "zip": "10001"},
    "tags": ["mathematics", "analytical engine", "notes"],
    "projects": [{"title": "Note G: Bernoulli numbers", "done": True, "priority": "high"},
                 {"title": "Translation of Menabrea", "done": True, "priority": "medium"},
                 {"title": "A calculus of the nervous system", "done": False, "priority": "low"}],
}

CASES = {"json_object": {"type": "object"}, "json_schema": SCHEMA}


class Llguidance:
    """turbollm's own path (engine/grammar.py): its vocabulary adapter, JSON options and mask."""
    name = "llguidance"

    def __init__(self, tok: Tokenizer):
        self.vocab = Vocabulary(tok)

    def matcher(self, schema: dict) -> Grammar:
        constraint = Constraint.json_object() if schema == {"type": "object"} else Constraint.json_schema(schema)
        return Grammar(constraint, self.vocab)

    def fill(self, m: Grammar) -> torch.Tensor:
        m._matcher.unsafe_compute_mask_ptr(m._mask.data_ptr(), m._mask.numel() * 4)
        return m._mask

    def advance(self, m: Grammar, token: int) -> bool:
        m.advance(token)
        return True

    def done(self, m: Grammar) -> bool:
        return m.accepts_end


class Xgrammar:
    name = "xgrammar"

    def __init__(self, tok: Tokenizer):
        import xgrammar
        self.xgr = xgrammar
        # RAW vocabulary: the bytes as they are; a token that decodes to nothing (control,
        # unknown) is special to xgrammar
        vocab = [tok.token_bytes(i) for i in range(tok.n_vocab)]
        info = xgrammar.TokenizerInfo(vocab, xgrammar.VocabType.RAW, vocab_size=tok.n_vocab,
                                      stop_token_ids=sorted(tok.eog_ids))
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=os.cpu_count() or 1, cache_enabled=False)
        self.mask = xgrammar.allocate_token_bitmask(1, tok.n_vocab)

    def matcher(self, schema: dict):
        # json_object as the schema {"type": "object"}, as for llguidance: xgrammar's builtin JSON
        # grammar (compile_builtin_json_grammar) masks out this document's last token, "}]}",
        # while it allows "}" there and accepts the whole text as a string
        return self.xgr.GrammarMatcher(self.compiler.compile_json_schema(json.dumps(schema)))

    def fill(self, m) -> torch.Tensor:
        m.fill_next_token_bitmask(self.mask)
        return self.mask[0]

    def advance(self, m, token: int) -> bool:
        return m.accept_token(token)

    def done(self, m) -> bool:
        return m.is_completed() or m.accept_token(m.stop_token_ids[0])


def allowed(mask: torch.Tensor, n_vocab: int) -> np.ndarray:
    """The bitmask (int32 words, bit j of word w is token 32w + j) as [n_vocab] booleans."""
    return np.unpackbits(mask.numpy().view(np.uint8), bitorder="little")[:n_vocab].astype(bool)




def walk(engine, schema: dict, tokens: list[int], n_vocab: int) -> dict:
    """One pass over the document: compile, then mask + advance per token."""
    t0 = time.perf_counter()
    m = engine.matcher(schema)
    t_compile = time.perf_counter() - t0
    engine.fill(m)
    t_first = time.perf_counter() - t0
    if not allowed(engine.fill(m), n_vocab)[tokens[0]]:
        raise RuntimeError(f"{engine.name}: the document's first token is not allowed")
    mask_us, advance_us, apply_us = [], [], []
    logits = torch.randn(n_vocab)
    for i, token in enumerate(tokens):
        t = time.perf_counter()
        mask = engine.fill(m)
        mask_us.append(1e6 * (time.perf_counter() - t))
        if not allowed(mask, n_vocab)[token]:
            raise RuntimeError(f"{engine.name}: token {i} ({token}) of the document is masked out")
        t = time.perf_counter()
        apply_mask(logits.clone(), mask)  # what the sampler does with it
        apply_us.append(1e6 * (time.perf_counter() - t))
        t = time.perf_counter()
        ok = engine.advance(m, token)
        advance_us.append(1e6 * (time.perf_counter() - t))
        if not ok:
            raise RuntimeError(f"{engine.name}: token {i} ({token}) refused")
    if not engine.done(m):
        raise RuntimeError(f"{engine.name}: the grammar is not complete at the document's end")
    return {"compile_ms": 1e3 * t_compile, "first_mask_ms": 1e3 * t_first, "mask": mask_us,
            "advance": advance_us, "apply": apply_us}


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="GGUF whose tokenizer to use (default: the default model)")
    ap.add_argument("--repeat", type=int, default=3, help="passes over the document per case (the first warms up)")
    ap.add_argument("--engine", default="llguidance,xgrammar")
    args = ap.parse_args()
    torch.set_num_threads(1)

    tok = Tokenizer.from_metadata(GGUFFile(args.model or default_model_path()).metadata)
    text = json.dumps(DOCUMENT)
    tokens = tok.encode(text, add_special=False, parse_special=False)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    print(f"vocabulary {tok.n_vocab} tokens; document {len(text)} bytes = {len(tokens)} tokens; "
          f"CPU {cpu} ({os.cpu_count()} cores); torch {torch.__version__}")

    engines = []
    for name in args.engine.split(","):
        cls = {"llguidance": Llguidance, "xgrammar": Xgrammar}[name]
        try:
            t0 = time.perf_counter()
            engine = cls(tok)
            version = importlib.metadata.version(name)
            print(f"{name} {version}: tokenizer built in {time.perf_counter() - t0:.2f} s")
            engines.append(engine)
        except ImportError as e:
            print(f"{name}: not importable ({e}); skipped")

    print(f"\n{'engine':<11} {'case':<12} {'compile ms':>10} {'1st mask ms':>11} {'mask med µs':>11} "
          f"{'mask p99 µs':>11} {'mask mean':>9} {'advance med':>11} {'-inf med µs':>11} {'doc total ms':>12}")
    for engine in engines:
        for case, schema in CASES.items():
            runs = [walk(engine, schema, tokens, tok.n_vocab) for _ in range(max(1, args.repeat))]
            timed = runs[1:] or runs  # the first pass warms caches up
            mask = [v for r in timed for v in r["mask"]]
            advance = [v for r in timed for v in r["advance"]]
            apply = [v for r in timed for v in r["apply"]]
            compile_ms = statistics.median(r["compile_ms"] for r in runs)
            first_ms = statistics.median(r["first_mask_ms"] for r in runs)
            print(f"{engine.name:<11} {case:<12} {compile_ms:>10.1f} {first_ms:>11.1f} "
                  f"{statistics.median(mask):>11.1f} {percentile(mask, 99):>11.1f} "
                  f"{statistics.mean(mask):>9.1f} {statistics.median(advance):>11.1f} "
                  f"{statistics.median(apply):>11.1f} {first_ms + 1e-3 * (sum(mask) + sum(advance)) / len(timed):>12.1f}")


if __name__ == "__main__":
    main()
