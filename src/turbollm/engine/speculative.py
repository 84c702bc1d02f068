"""Speculative decoding: a drafter proposes tokens, the target checks them all in one forward.

One round, for a sequence whose last sampled token `t` is not yet in the cache (gpt-fast's
`speculative_decode`, llama.cpp `common/speculative.cpp`):
1. the drafter proposes d_1..d_k (prompt lookup: an n-gram match in the text so far; MTP: an
   assistant head, models/assistant.py);
2. the target runs [t, d_1..d_k] in one step without committing it: row i's logits give the
   target's distribution p_i for the token after input i;
3. draft d_{i+1} is accepted with probability p_i(d_{i+1}) (the rejection-sampling rule for a
   drafter that proposes one token with certainty: min(1, p/q) with q = 1); at the first
   rejection the token is drawn from p_i with d_{i+1} removed and renormalised (the residual
   max(0, p - q)), and if all k are accepted a bonus token is drawn from p_k. Each output
   token is then distributed exactly as p_i: the output distribution is unchanged. Greedy
   sampling is the special case p_i = one-hot(argmax): accept while the drafts equal the
   argmax, then take the argmax, so the tokens equal plain greedy decoding;
4. the cache keeps t and the accepted drafts (`KVCache.advance(1 + accepted)`): rejected
   positions never reach the slots, so rings and quantized caches need no rollback.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import torch

from turbollm.engine.sampler import Sampler


class Drafter(Protocol):
    def propose(self, history: list[int], n_max: int) -> list[int]:
        """Up to n_max tokens that might follow `history` (every token so far, the last one
        sampled but not yet in the cache); [] when it has nothing worth checking."""
        ...


@dataclass(frozen=True)
class SpecConfig:
    """What the user chose (`--spec-type`, `--draft-max`, `--draft-min`, `--spec-ngram-*`)."""

    kind: str = "none"  # "none", "ngram", "mtp"
    draft_max: int = 8  # tokens proposed per round at most
    draft_min: int = 1  # fewer proposed tokens than this: decode plainly this step
    ngram_min: int = 2  # prompt lookup: shortest n-gram that counts as a match
    ngram_max: int = 4
    draft_p_min: float = 0.0  # MTP: stop drafting when the head's probability of its token is below this

    def __post_init__(self) -> None:
        if self.kind not in ("none", "ngram", "mtp"):
            raise ValueError(f"--spec-type must be ngram or mtp (draft-mtp), got {self.kind!r}")
        if self.draft_max < 1 or not 1 <= self.draft_min <= self.draft_max:
            raise ValueError(f"need 1 <= --draft-min ({self.draft_min}) <= --draft-max ({self.draft_max})")
        if not 0.0 <= self.draft_p_min < 1.0:
            raise ValueError(f"--draft-p-min must be in [0, 1), got {self.draft_p_min}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(f"need 1 <= ngram min ({self.ngram_min}) <= ngram max ({self.ngram_max})")

    @property
    def enabled(self) -> bool:
        return self.kind != "none"


@dataclass
class SpecStats:
    n_rounds: int = 0  # verify forwards with at least one draft
    n_drafted: int = 0
    n_accepted: int = 0
    draft_seconds: float = 0.0  # in the drafter
    n_draft_calls: int = 0

    @property
    def acceptance(self) -> float:
        return self.n_accepted / self.n_drafted if self.n_drafted else 0.0

    def add(self, other: "SpecStats") -> None:
        self.n_rounds += other.n_rounds
        self.n_drafted += other.n_drafted
        self.n_accepted += other.n_accepted
        self.draft_seconds += other.draft_seconds
        self.n_draft_calls += other.n_draft_calls

    def summary(self) -> str:
        """The line the llama.cpp forks print."""
        per_call = 1e3 * self.draft_seconds / self.n_draft_calls if self.n_draft_calls else 0.0
        return (f"draft acceptance rate = {self.acceptance:.2f} ({self.n_accepted} accepted / {self.n_drafted} generated), "
                f"{self.n_rounds} verify rounds, {per_call:.3f} ms per draft call")


class NgramDrafter:
    """Prompt lookup: find the most recent earlier occurrence of the text's last n tokens
    (longest n first, ngram_max down to ngram_min) and propose what followed it. An index of
    every n-gram's latest start is kept up to date as the text grows, so a proposal costs
    O(n) however long the text."""

    def __init__(self, ngram_min: int = 2, ngram_max: int = 4):
        self.ngram_min, self.ngram_max = ngram_min, ngram_max
        self._index: dict[tuple[int, ...], int] = {}  # n-gram -> start of its latest occurrence
        self._indexed = 0  # n-grams ending before this position are in the index
        self._text: list[int] = []

    def propose(self, history: list[int], n_max: int) -> list[int]:
        if history[:len(self._text)] != self._text:  # a different sequence: start over
            self._index, self._indexed, self._text = {}, 0, []
        self._text = list(history)
        end = len(history)
        # index n-grams that end before the last one (a match must leave tokens to propose)
        for stop in range(max(self._indexed, 1), end):
            for n in range(self.ngram_min, self.ngram_max + 1):
                if stop - n >= 0:
                    self._index[tuple(history[stop - n:stop])] = stop - n
        self._indexed = max(self._indexed, end)
        for n in range(min(self.ngram_max, end - 1), self.ngram_min - 1, -1):
            start = self._index.get(tuple(history[end - n:]))
            if start is not None and start + n < end:
                return history[start + n:start + n + n_max]
        return []


class DraftLength:
    """How many tokens to draft next, per sequence: transformers' "heuristic" schedule (+2 after
    a round whose drafts were all accepted, -1 otherwise, within [draft_min, draft_max]), and
    a pause after a round that accepted nothing: the next 1, 2, 4 .. 8 steps decode plainly
    (doubling while rounds keep failing, reset by any accepted draft). A verify of 1 + 1 tokens
    costs 1.5x a plain step on the default model, so a drafter that keeps missing must stop
    costing (a counting prompt, prompt lookup: 0.83x of plain decode without the pause)."""

    MAX_PAUSE = 8

    def __init__(self, spec: SpecConfig):
        self.spec = spec
        self.n = spec.draft_max
        self._pause, self._skip = 0, 0  # the current pause length, and steps of it left

    @property
    def drafting(self) -> bool:
        """Whether this step drafts (False: one plain step of a pause is used up)."""
        if self._skip > 0:
            self._skip -= 1
            return False
        return True

    def update(self, n_drafted: int, n_accepted: int) -> None:
        step = 2 if n_accepted == n_drafted else -1
        self.n = max(self.spec.draft_min, min(self.spec.draft_max, self.n + step))
        if n_accepted == 0:
            self._pause = min(self.MAX_PAUSE, max(1, 2 * self._pause))
            self._skip = self._pause
        else:
            self._pause = 0


def accept(sampler: Sampler, logits: torch.Tensor, history: list[int], drafts: list[int]) -> tuple[list[int], int]:
    """The target's tokens for one round: logits [k+1, V] of inputs [t, d_1..d_k]; history
    ends with t. Returns (tokens y_0..y_a, a): the accepted drafts then the corrected or bonus
    token, and how many drafts were accepted."""
    out: list[int] = []
    for i in range(len(drafts) + 1):
        ids, probs = sampler.distribution(logits[i], history + out)
        if i == len(drafts):  # every draft accepted: the bonus token
            out.append(int(ids[0]) if sampler.params.greedy else int(ids[torch.multinomial(probs, 1, generator=sampler.generator)]))
            return out, len(drafts)
        draft = drafts[i]
        hit = (ids == draft).nonzero()
        p_draft = float(probs[hit[0, 0]]) if hit.numel() else 0.0
        if sampler.params.greedy:
            accepted = p_draft == 1.0
        else:
            accepted = p_draft > 0.0 and sampler.uniform() < p_draft
        if accepted:
            out.append(draft)
            continue
        if sampler.params.greedy or not hit.numel():
            residual = probs
        else:  # p with the draft removed, renormalised
            residual = probs.clone()
            residual[hit[0, 0]] = 0.0
            residual = residual / residual.sum()
        choice = 0 if sampler.params.greedy else int(torch.multinomial(residual, 1, generator=sampler.generator))
        out.append(int(ids[choice]))
        return out, i
    raise AssertionError("unreachable")


class Speculator:
    """One sequence's speculative decoding: its drafter and draft length, a round's drafts and
    their verification (steps 1-4 of the module docstring), driven by the engine
    (engine/engine.py) per sequence."""

    def __init__(self, drafter: Drafter, spec: SpecConfig):
        self.drafter, self.spec, self.length = drafter, spec, DraftLength(spec)

    def observe(self, hidden_row: torch.Tensor) -> None:
        """Tell a drafter that wants it the target's final-normed hidden row of the last
        committed position (the row that produced the pending token): the MTP head's input."""
        observe = getattr(self.drafter, "observe", None)
        if observe is not None:
            observe(hidden_row)

    def drafts(self, history: list[int], n_left: int, stats: SpecStats) -> list[int]:
        """This step's drafts, [] to decode plainly. A round emits at most drafts + 1 tokens, so
        it never drafts past the `n_left` tokens the sequence may still generate (nor its cache)."""
        n_max = min(self.length.n, n_left - 1)
        if n_max < self.spec.draft_min or not self.length.drafting:
            return []
        start = time.perf_counter()
        drafts = self.drafter.propose(history, n_max)
        stats.draft_seconds += time.perf_counter() - start
        stats.n_draft_calls += 1
        return drafts if len(drafts) >= self.spec.draft_min else []

    def verify(self, model, cache, sampler: Sampler, history: list[int], drafts: list[int],
               stats: SpecStats) -> tuple[list[int], torch.Tensor]:
        """The pending token (history[-1]) and the drafts in one forward; keeps t and the
        accepted drafts in the cache and returns the output tokens (accepted drafts, then the
        corrected or bonus token) and the logits rows they were drawn from [n_tokens, V]."""
        hidden = model.forward(torch.tensor([history[-1]] + drafts, dtype=torch.int64), cache, commit=False)
        logits = model.logits(hidden)
        tokens, n_accepted = accept(sampler, logits, history, drafts)
        cache.advance(1 + n_accepted)
        stats.n_rounds += 1
        stats.n_drafted += len(drafts)
        stats.n_accepted += n_accepted
        self.length.update(len(drafts), n_accepted)
        self.observe(hidden[n_accepted])
        return tokens, logits[:len(tokens)]
