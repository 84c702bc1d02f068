"""Prompt caching across requests: the KV caches of finished sequences, kept for the next.

llama-server keeps each slot's cache when its request ends and starts a new request from the
slot whose tokens share the longest prefix with its prompt (`cache_prompt`). So does this:
a finished sequence's cache is kept with the tokens it holds; a new sequence takes the kept
cache of the longest common prefix, rolls it back to that prefix (KVCache.truncate) and
prefills only the rest. An IDE chat's next turn then prefills the last answer and the new
message, not the whole conversation.

Exact under sliding windows: a ring can roll back only while it still holds the keys the next
token needs; where it does not (the new prompt leaves the old one more than a window before
its end), truncate refuses and the prompt is prefilled from the start on the same buffers.
Never wrong keys. At least one prompt token is always prefilled (its logits choose the
first new token).

Memory: caches here and caches of running sequences together never exceed the slots (kept
caches are allocated at a whole slot's context, as the planner counts them), so reuse costs
no memory beyond the plan: a new sequence without a match takes the least recently used
kept cache's buffers.

What a reused position holds is what the earlier request computed there: a token that was
decoded has the K/V of the decode path (8-bit activation products on the fast backend)
rather than of a prefill, as with llama.cpp's reuse; on the reference backend both are the
same float32 maths.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from turbollm.kv.cache import KVCache


@dataclass
class Kept:
    tokens: list[int]  # what the cache holds, positions 0 .. len - 1
    cache: KVCache


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class PromptCache:
    def __init__(self, n_slots: int, new_cache: Callable[[], KVCache]):
        self.n_slots, self.new_cache = n_slots, new_cache
        self.kept: list[Kept] = []  # least recently used first

    @property
    def nbytes(self) -> int:
        return sum(k.cache.nbytes for k in self.kept)

    def take(self, prompt: list[int], n_running: int, reuse: bool = True) -> tuple[KVCache, int]:
        """A cache for a sequence with this prompt, and how many of its tokens it already holds.
        `n_running`: sequences holding a cache now (not counting this one)."""
        best, n_best = None, 0
        if reuse:
            for kept in self.kept:
                n = min(common_prefix(kept.tokens, prompt), len(prompt) - 1)
                if n > n_best:
                    best, n_best = kept, n
        if best is None:
            if len(self.kept) + n_running < self.n_slots:
                return self.new_cache(), 0
            best = self.kept[0]  # the least recently used: its buffers, none of its tokens
        self.kept.remove(best)
        try:
            best.cache.truncate(n_best)
        except ValueError:  # a sliding-window ring no longer holds what the prefix needs
            n_best = 0
            best.cache.truncate(0)
        return best.cache, n_best

    def keep(self, tokens: list[int], cache: KVCache) -> None:
        """A finished sequence's cache and the tokens it holds (its first cache.n_tokens)."""
        self.kept.append(Kept(list(tokens[:cache.n_tokens]), cache))
        while len(self.kept) > self.n_slots:
            self.kept.pop(0)

    def clear(self) -> None:
        self.kept.clear()
