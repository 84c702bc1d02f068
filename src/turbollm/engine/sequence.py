"""One request inside the engine: its tokens, sampler, KV cache, state and statistics.

A sequence moves WAITING -> PREFILL (its prompt goes through the model in fixed chunks) ->
DECODE (one token per step) -> FINISHED. The text it produces goes out as `Event`s through
the callback it was created with, called from the thread that steps the engine.
"""

from __future__ import annotations

import enum
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from turbollm.engine.grammar import Grammar
from turbollm.engine.sampler import Sampler, SamplingParams, TokenLogprob
from turbollm.engine.speculative import SpecStats

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
    "length", "cancelled" or "error", with `error` saying what failed). When the request asks
    for log probabilities, `logprobs` holds those of the tokens whose text this event is the
    first to carry (a token's text can be held back: half a character, a possible stop string)."""

    text: str = ""
    channel: str = "content"
    token_id: int | None = None
    finish_reason: str | None = None
    error: str | None = None
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass
class GenerationStats:
    """What one request cost; the engine keeps the same record summed over all requests
    (there `n_decode_steps` counts batched forwards and `n_decode_tokens` the rows in them)."""

    n_prompt: int = 0
    n_cached: int = 0  # prompt tokens whose KV came from a kept sequence (not prefilled)
    n_cache_hits: int = 0  # requests that reused some (in the engine's totals)
    n_generated: int = 0
    prompt_seconds: float = 0.0  # prefill, up to the logits of the first new token
    n_decode_steps: int = 0  # forward passes after the prompt (one token each, or a speculative round)
    n_decode_tokens: int = 0  # tokens those passes produced (more than the passes when drafts are accepted)
    decode_seconds: float = 0.0
    finish_reason: str = ""  # "stop" (end-of-generation token or stop string), "length", "cancelled", "error"
    kv_summary: str = ""  # what the request's KV cache is and costs (KVCache.describe)
    spec: SpecStats = field(default_factory=SpecStats)  # speculative decoding, when on

    @property
    def prompt_tokens_per_second(self) -> float:
        """Prompt tokens prefilled per second (those taken from a kept cache cost nothing)."""
        return (self.n_prompt - self.n_cached) / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        return self.n_decode_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0


class Sequence:
    def __init__(self, prompt_ids: list[int], params: SamplingParams, max_new: int,
                 on_event: Callable[[Event], None], stats: GenerationStats | None = None, reuse_prompt: bool = True,
                 grammar: Grammar | None = None):
        self.seq_id = next(_ids)
        self.reuse_prompt = reuse_prompt  # may start from a kept sequence's cache (engine.PromptCache)
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.max_new = max_new  # tokens it may generate: max_tokens, within its slot's context
        self.on_event = on_event
        self.sampler = Sampler(params, grammar)  # grammar: params.constraint's matcher, when set
        self.state = SeqState.WAITING
        self.slot: int | None = None  # the slot number (0 .. n_slots-1) it took when admitted
        self.request_id: str | None = None  # the server's id of the request it answers (for /slots)
        self.cache = None  # a KVCache, from admission until it finishes
        self.speculator = None  # its speculative decoding (speculative.Speculator), when on
        self.n_prefilled = 0
        self.generated: list[int] = []
        self.next_token: int | None = None  # sampled, not yet fed to the model
        self.pending_logprobs: list[TokenLogprob] = []  # of tokens whose text has not gone out yet
        self.finish_reason: str | None = None
        self.error: Exception | None = None  # what ended it, when a step failed
        self.stats = stats if stats is not None else GenerationStats()
        self.stats.n_prompt = len(self.prompt_ids)
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
