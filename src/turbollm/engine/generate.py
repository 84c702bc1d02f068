"""The generation loop for one sequence: prefill the prompt in chunks, then decode token by token.

It works on token ids only: text, stop strings and chat templates are the caller's. It owns
the KV cache for the request, sized to what the request can use (prompt + max_tokens, at most
the context size), and reports the timings that `turbollm run --verbose` prints.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from turbollm.engine.sampler import Sampler, SamplingParams
from turbollm.engine.speculative import Drafter, SpecConfig, SpecStats, Speculator
from turbollm.errors import ContextLengthError
from turbollm.kv.cache import KVCache
from turbollm.kv.plan import CacheConfig


class CausalLM(Protocol):
    def new_cache(self, capacity: int, config: CacheConfig = CacheConfig()) -> KVCache: ...
    def forward(self, ids: torch.Tensor, cache: KVCache, commit: bool = True) -> torch.Tensor: ...
    def logits(self, hidden: torch.Tensor) -> torch.Tensor: ...


@dataclass
class GenerationStats:
    n_prompt: int = 0
    n_generated: int = 0
    prompt_seconds: float = 0.0  # prefill, up to the logits of the first new token
    n_decode_steps: int = 0  # forward passes after the prompt (one token each, or a speculative round)
    n_decode_tokens: int = 0  # tokens those passes produced (more than the passes when drafts are accepted)
    decode_seconds: float = 0.0
    finish_reason: str = ""  # "stop" (end-of-generation token or stop string) or "length"
    kv_summary: str = ""  # what the request's KV cache is and costs (KVCache.describe)
    spec: SpecStats = field(default_factory=SpecStats)  # speculative decoding, when on

    @property
    def prompt_tokens_per_second(self) -> float:
        return self.n_prompt / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        return self.n_decode_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0


def generate_tokens(
    model: CausalLM,
    prompt_ids: list[int],
    params: SamplingParams,
    *,
    eog_ids: frozenset[int],
    ctx_size: int,
    stats: GenerationStats | None = None,
    n_batch: int = 512,
    cache_config: CacheConfig = CacheConfig(),
    spec: SpecConfig = SpecConfig(),
    make_drafter: Callable[[KVCache], Drafter] | None = None,
) -> Iterator[int]:
    """Yield generated token ids until an end-of-generation token (not yielded), `max_tokens`,
    or the end of the context. `stats.finish_reason` says which. With `make_drafter` (given
    the request's cache, it returns the drafter: engine/speculative.py), decode verifies up to
    `spec.draft_max` drafted tokens per forward; the tokens are the same as without it (greedy)
    or distributed the same (sampling)."""
    stats = stats if stats is not None else GenerationStats()
    n_prompt = len(prompt_ids)
    if n_prompt == 0:
        raise ValueError("the prompt is empty: there is nothing to continue")
    if n_prompt >= ctx_size:
        raise ContextLengthError(
            f"the prompt has {n_prompt} tokens but the context size is {ctx_size}: "
            f"use a shorter prompt or a larger --ctx-size (at most the model's training context)"
        )
    max_new = min(params.max_tokens, ctx_size - n_prompt)
    stats.n_prompt = n_prompt
    stats.finish_reason = "length"
    if max_new == 0:
        return
    cache = model.new_cache(n_prompt + max_new, cache_config)
    stats.kv_summary = cache.describe()
    sampler = Sampler(params)
    history = list(prompt_ids)

    start = time.perf_counter()
    for chunk_start in range(0, n_prompt, n_batch):
        chunk = torch.tensor(prompt_ids[chunk_start:chunk_start + n_batch], dtype=torch.int64)
        hidden = model.forward(chunk, cache)
    logits = model.logits(hidden[-1:])[0]
    stats.prompt_seconds = time.perf_counter() - start
    speculator = Speculator(make_drafter(cache), spec) if make_drafter is not None else None
    if speculator is not None:
        speculator.observe(hidden[-1])

    pending = [sampler(logits, history)]  # sampled tokens not yet yielded; the last is not in the cache
    while True:
        for token in pending:
            if token in eog_ids:
                stats.finish_reason = "stop"
                return
            stats.n_generated += 1
            history.append(token)
            yield token
            if stats.n_generated >= max_new:
                return
        start = time.perf_counter()
        drafts = speculator.drafts(history, max_new - stats.n_generated, stats.spec) if speculator is not None else []
        if drafts:
            pending = speculator.verify(model, cache, sampler, history, drafts, stats.spec)
        else:
            hidden = model.forward(torch.tensor([history[-1]], dtype=torch.int64), cache)
            pending = [sampler(model.logits(hidden)[0], history)]
            if speculator is not None:
                speculator.observe(hidden[-1])
        stats.decode_seconds += time.perf_counter() - start
        stats.n_decode_steps += 1
        stats.n_decode_tokens += len(pending)
