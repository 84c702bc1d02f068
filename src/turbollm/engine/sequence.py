"""One request inside the serving engine: its tokens, sampler, KV cache and state.

A sequence moves WAITING -> PREFILL (its prompt goes through the model in fixed chunks) ->
DECODE (one token per step) -> FINISHED. The text it produces goes out as `Event`s through
the callback it was created with; the engine calls that from its own thread.
"""

from __future__ import annotations

import enum
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass

from turbollm.engine.sampler import Sampler, SamplingParams

_ids = itertools.count()


class SeqState(enum.Enum):
    WAITING = "waiting"
    PREFILL = "prefill"
    DECODE = "decode"
    FINISHED = "finished"


@dataclass(frozen=True)
class Event:
    """A piece of a sequence's output. `channel` is "content", or "reasoning" for a thinking
    model's thought text. The last event of a sequence has `finish_reason` set ("stop",
    "length", "cancelled" or "error", with `error` saying what failed)."""

    text: str = ""
    channel: str = "content"
    token_id: int | None = None
    finish_reason: str | None = None
    error: str | None = None


class Sequence:
    def __init__(self, prompt_ids: list[int], params: SamplingParams, max_new: int,
                 on_event: Callable[[Event], None]):
        self.seq_id = next(_ids)
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.max_new = max_new  # tokens it may generate: max_tokens, within its slot's context
        self.on_event = on_event
        self.sampler = Sampler(params)
        self.state = SeqState.WAITING
        self.cache = None  # a KVCache, from admission until it finishes
        self.speculator = None  # its speculative decoding (speculative.Speculator), when on
        self.n_prefilled = 0
        self.generated: list[int] = []
        self.next_token: int | None = None  # sampled, not yet fed to the model
        self.finish_reason: str | None = None
        self.cancelled = False  # set from any thread; the engine frees the slot at its next step
        self.t_arrival = time.perf_counter()
        self.t_first_token: float | None = None
        self.t_finished: float | None = None

    @property
    def n_prompt(self) -> int:
        return len(self.prompt_ids)

    @property
    def history(self) -> list[int]:
        return self.prompt_ids + self.generated

    @property
    def is_finished(self) -> bool:
        return self.state is SeqState.FINISHED

    def __repr__(self) -> str:
        return f"Sequence({self.seq_id}, {self.state.value}, prompt {self.n_prompt}, generated {len(self.generated)})"
