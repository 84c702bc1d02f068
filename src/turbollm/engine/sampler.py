"""Turning a row of logits into the next token.

The chain follows llama.cpp's default order: repetition penalty, then top-k, top-p and min-p
on the untempered distribution, then temperature, then a draw from a seeded generator.
Temperature <= 0 means greedy (argmax; ties go to the lowest token id). A structured-output
constraint (engine/grammar.py) comes before all of them: the tokens its grammar does not allow
next are at -inf, so greedy takes the best allowed token and nothing else can be drawn.

Log probabilities (when a request asks for them) are of the model's whole distribution at the
position, after the repetition penalty and before truncation and temperature: what OpenAI,
vLLM (by default) and llama-server report. `post_sampling` reports instead the distribution
the draw was made from (after every step; greedy: the argmax with probability 1), as
llama-server's `post_sampling_probs`. Under a constraint both are of the allowed tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from turbollm.engine.grammar import Constraint, Grammar


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log probability, and the `top` most likely tokens at its position
    as (token id, log probability), most likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40  # 0: off
    top_p: float = 0.95  # 1.0: off
    min_p: float = 0.05  # 0.0: off
    repeat_penalty: float = 1.0  # 1.0: off
    repeat_last_n: int = 64  # how many recent tokens the penalty looks at
    seed: int | None = None  # None: a fresh random seed
    max_tokens: int = 256
    stop: tuple[str, ...] = ()  # stop strings (the stop string itself is not returned)
    logprobs: int | None = None  # None: off; k: each token's log probability and the k most likely
    post_sampling: bool = False  # logprobs of the sampler's final distribution instead of the model's
    constraint: Constraint | None = None  # structured output: what the text must match (engine/grammar.py)

    def __post_init__(self) -> None:
        checks = [
            (self.temperature >= 0, f"temperature must be >= 0 (0 = greedy), got {self.temperature}"),
            (self.top_k >= 0, f"top_k must be >= 0 (0 = off), got {self.top_k}"),
            (0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}"),
            (0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.repeat_penalty > 0, f"repeat_penalty must be > 0 (1.0 = off), got {self.repeat_penalty}"),
            (self.repeat_last_n >= 0, f"repeat_last_n must be >= 0, got {self.repeat_last_n}"),
            (self.max_tokens >= 0, f"max_tokens must be >= 0, got {self.max_tokens}"),
            (self.logprobs is None or self.logprobs >= 0, f"logprobs must be >= 0 (None = off), got {self.logprobs}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


class Sampler:
    def __init__(self, params: SamplingParams, grammar: Grammar | None = None):
        """`grammar`: params.constraint's matcher for this sequence (the engine advances it)."""
        self.params = params
        self.grammar = grammar
        self.generator = torch.Generator()
        if params.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(params.seed)

    def __call__(self, logits: torch.Tensor, history: list[int]) -> int:
        """logits [n_vocab] of the next position; history = every token so far (prompt included)."""
        ids, probs = self.distribution(logits, history)
        if self.params.greedy:
            return int(ids[0])
        choice = torch.multinomial(probs, 1, generator=self.generator)
        return int(ids[choice])

    def logprob(self, logits: torch.Tensor, history: list[int], token: int) -> TokenLogprob:
        """`token`'s entry for the row it was drawn from (`logits`, `history` as in __call__)."""
        k = self.params.logprobs or 0
        if self.params.post_sampling:
            ids, probs = self.distribution(logits, history)
            logs = torch.log(probs)
            hit = (ids == token).nonzero()
            own = float(logs[hit[0, 0]]) if hit.numel() else float("-inf")
            return TokenLogprob(token, own, tuple(zip(ids[:k].tolist(), logs[:k].tolist())))
        logs = torch.log_softmax(self._penalised(logits, history), dim=-1)
        top = torch.topk(logs, min(k, logs.numel())) if k else None
        pairs = tuple(zip(top.indices.tolist(), top.values.tolist())) if top is not None else ()
        return TokenLogprob(token, float(logs[token]), pairs)

    def distribution(self, logits: torch.Tensor, history: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The distribution the next token is drawn from: candidate ids [K] and their
        probabilities [K] (summing to 1). Greedy: the argmax alone, probability 1.
        Speculative decoding accepts drafts against it (engine/speculative.py)."""
        p = self.params
        logits = self._penalised(logits, history)
        if p.greedy:
            return torch.argmax(logits).view(1), torch.ones(1)
        if p.top_k > 0 and p.top_k < logits.numel():
            values, ids = torch.topk(logits, p.top_k)
        else:
            values, ids = torch.sort(logits, descending=True)
        probs = torch.softmax(values, dim=-1)
        keep = probs.numel()
        if p.top_p < 1.0:
            # Smallest prefix whose mass reaches top_p (at least one token).
            keep = min(keep, int(torch.searchsorted(torch.cumsum(probs, 0), torch.tensor([p.top_p]))[0]) + 1)
        if p.min_p > 0.0:
            keep = min(keep, max(1, int((probs[:keep] >= p.min_p * probs[0]).sum())))
        values, ids = values[:keep], ids[:keep]
        # relative to the best (values are sorted, so <= 0), over a temperature float32 can hold:
        # a tiny temperature then gives the best token(s) all the mass instead of inf - inf = NaN
        return ids, torch.softmax((values - values[0]) / max(p.temperature, _TINY), dim=-1)

    def _penalised(self, logits: torch.Tensor, history: list[int]) -> torch.Tensor:
        """The grammar's mask, then the repetition penalty (on a CPU float32 copy)."""
        p = self.params
        logits = logits.detach().to("cpu", torch.float32)
        if self.grammar is not None:
            logits = self.grammar.mask_logits(logits)
        if p.repeat_penalty != 1.0 and p.repeat_last_n > 0 and history:
            logits = _apply_repeat_penalty(logits, history[-p.repeat_last_n:], p.repeat_penalty)
        return logits

    def uniform(self) -> float:
        """A draw in [0, 1) from this sampler's seeded generator."""
        return float(torch.rand(1, generator=self.generator))


_TINY = torch.finfo(torch.float32).tiny
_HUGE = torch.finfo(torch.float32).max


def _apply_repeat_penalty(logits: torch.Tensor, recent: list[int], penalty: float) -> torch.Tensor:
    # llama.cpp / CTRL rule: positive logits are divided by the penalty, negative ones multiplied;
    # kept finite (a penalty of 1e-300 would make them inf, and the softmax NaN)
    ids = torch.tensor(sorted(set(recent)), dtype=torch.int64)
    logits = logits.clone()
    chosen = logits[ids]
    logits[ids] = torch.where(chosen > 0, chosen / penalty, chosen * penalty).clamp(-_HUGE, _HUGE)
    return logits
