"""The generation loop: requests over `n_slots` parallel slots, one `step()` at a time.

Every caller steps this one loop: the server from a background thread (`start()`), and
`Model.generate` / `Model.stream` in the caller's own thread (`run()`), so context limits,
stop strings, structured output, speculative decoding and statistics are handled in one place.

Each iteration (`step`): drop finished and cancelled sequences (their KV caches go at once),
let the scheduler admit waiting ones, decode one token of every running sequence in one
batched forward (a sequence whose drafter proposes tokens verifies them in a forward of its
own instead: speculative decoding per slot), feed one prompt chunk, sample, and hand each new
piece of text to its request's callback. Each slot has `slot_ctx` tokens of context
(llama-server: --ctx-size / --parallel); a prompt that does not fit is refused by `submit`,
never truncated.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Protocol

import torch

from turbollm.engine.grammar import Grammar, Vocabulary
from turbollm.engine.prompt_cache import PromptCache
from turbollm.engine.scheduler import Scheduler, StepPlan
from turbollm.engine.sampler import SamplingParams
from turbollm.engine.sequence import Event, GenerationStats, Sequence, SeqState
from turbollm.engine.speculative import Drafter, SpecConfig, SpecStats, Speculator
from turbollm.text.output import OutputText
from turbollm.errors import ContextLengthError
from turbollm.kv.cache import KVCache
from turbollm.kv.plan import CacheConfig


class Network(Protocol):
    """What the engine needs of a model's network (models/gemma.py Gemma)."""

    def new_cache(self, capacity: int, config: CacheConfig = CacheConfig()) -> KVCache: ...
    def forward(self, ids: torch.Tensor, cache: KVCache, commit: bool = True) -> torch.Tensor: ...
    def forward_batch(self, ids: list[torch.Tensor], caches: list[KVCache], commit: bool = True) -> torch.Tensor: ...
    def logits(self, hidden: torch.Tensor) -> torch.Tensor: ...


class LoadedModel(Protocol):
    """What the engine needs of a loaded model (turbollm.api.Model)."""

    network: Network
    tokenizer: object  # turbollm.text.tokenizer.Tokenizer: n_vocab, eog_ids, token_bytes, token_id, decode
    slot_ctx: int  # tokens of context per sequence
    cache: CacheConfig
    spec: SpecConfig

    def new_drafter(self, cache: KVCache) -> Drafter | None: ...


class Engine:
    def __init__(self, model: LoadedModel, n_slots: int = 1, slot_ctx: int | None = None, n_batch: int = 512,
                 stop_at_context_end: bool = False, prompt_cache: bool = False):
        """`slot_ctx`: tokens of context per slot (default: the model's). `stop_at_context_end`:
        what `max_tokens` beyond the room left in a slot means. False (the OpenAI API): the
        request is refused. True (llama-cli, `Model.generate`): generation ends where the
        context does, with finish reason "length". `prompt_cache`: keep finished sequences'
        caches and start new ones from the longest common prefix (engine/prompt_cache.py; the
        server's default, as llama-server's)."""
        self.model, self.network, self.tokenizer = model, model.network, model.tokenizer
        self.slot_ctx = slot_ctx if slot_ctx is not None else model.slot_ctx
        if not 0 < self.slot_ctx <= model.slot_ctx:
            raise ValueError(f"slot context {self.slot_ctx} is outside 1..{model.slot_ctx}")
        self.stop_at_context_end = stop_at_context_end
        self.scheduler = Scheduler(n_slots, n_batch)
        self.totals = GenerationStats()  # over all requests since start (the server's /metrics)
        self.n_requests = 0
        self.n_finished: dict[str, int] = {}  # by finish reason
        self._spec_finished = SpecStats()  # speculative decoding of the requests that have finished
        self._inbox: list[Sequence] = []
        self._wake = threading.Condition()
        self._texts: dict[int, OutputText] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.kv_bytes_in_use = 0
        self.prompt_cache = PromptCache(n_slots, lambda: self.network.new_cache(self.slot_ctx, model.cache)) if prompt_cache else None

    # --- any thread ---------------------------------------------------------------------------

    def room(self, n_prompt: int) -> int:
        """Tokens a request with an `n_prompt`-token prompt may generate in a slot; raises
        ContextLengthError when the prompt leaves no room (the one place that checks)."""
        if n_prompt == 0:
            raise ValueError("the prompt is empty: there is nothing to continue")
        if n_prompt >= self.slot_ctx:
            raise ContextLengthError(f"the prompt has {n_prompt} tokens but {self._context_name} is {self.slot_ctx} tokens: "
                                     f"shorten the prompt, or raise --ctx-size{self._parallel_hint}", what="prompt")
        return self.slot_ctx - n_prompt

    def submit(self, prompt_ids: list[int], params: SamplingParams, on_event: Callable[[Event], None],
               stats: GenerationStats | None = None, reuse_prompt: bool = True) -> Sequence:
        """Queue a request; `params.max_tokens` new tokens at most (see `stop_at_context_end`).
        Raises ContextLengthError, with nothing queued, when it does not fit a slot. `stats`
        (filled as it runs) is the record to keep; by default the sequence makes its own.
        `reuse_prompt` (with the engine's prompt cache): may start from a kept prefix."""
        room = self.room(len(prompt_ids))
        n_vocab = self.tokenizer.n_vocab
        bad = [t for t in prompt_ids if not 0 <= t < n_vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{n_vocab - 1})")
        if params.max_tokens > room and not self.stop_at_context_end:
            raise ContextLengthError(f"max_tokens {params.max_tokens} is more than the {room} tokens left in "
                                     f"{self._context_name} of {self.slot_ctx} after the {len(prompt_ids)}-token prompt: "
                                     f"ask for at most {room} tokens, or raise --ctx-size{self._parallel_hint}",
                                     what="max_tokens")
        # a constraint's matcher, per sequence (a ValueError if this vocabulary cannot take it)
        grammar = Grammar(params.constraint, Vocabulary.of(self.tokenizer)) if params.constraint is not None else None
        seq = Sequence(prompt_ids, params, min(params.max_tokens, room), on_event, stats, reuse_prompt, grammar)
        with self._wake:
            self._inbox.append(seq)
            self.n_requests += 1
            self._wake.notify()
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Stop a sequence (its client went away); its slot and cache are freed at the next step."""
        if not seq.is_finished:
            seq.cancelled = True
            with self._wake:
                self._wake.notify()

    def start(self) -> "Engine":
        """Step in a background thread until `stop()` (the server)."""
        self._thread = threading.Thread(target=self._run, name="turbollm-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    def run(self, prompt_ids: list[int], params: SamplingParams, stats: GenerationStats | None = None,
            generated: list[int] | None = None) -> Iterator[Event]:
        """Submit one request and step the engine in the calling thread, yielding its events as
        they come (the last has `finish_reason`); `generated` receives the token ids as they
        are sampled. A failed step raises its exception here; closing the iterator early
        cancels the request."""
        if self._thread is not None:
            raise RuntimeError("this engine is stepped by its own thread: submit() to it instead")
        events: list[Event] = []
        seq = self.submit(prompt_ids, params, events.append, stats)
        n_before = len(generated) if generated is not None else 0
        try:
            while events or not seq.is_finished:
                if not events:
                    self.step()
                if generated is not None:
                    generated.extend(seq.generated[len(generated) - n_before:])
                while events:
                    yield events.pop(0)
            if seq.error is not None:
                raise seq.error
        finally:
            if not seq.is_finished:
                self.cancel(seq)
                self.step()

    @property
    def n_running(self) -> int:
        return self.scheduler.n_running

    @property
    def n_waiting(self) -> int:
        return self.scheduler.n_waiting + len(self._inbox)

    def spec_totals(self) -> SpecStats:
        """Speculative decoding over all requests, finished and running."""
        total = SpecStats()
        total.add(self._spec_finished)
        for seq in list(self.scheduler.running):
            if not seq.is_finished:  # a finished one is in _spec_finished already
                total.add(seq.stats.spec)
        return total

    @property
    def _context_name(self) -> str:
        return "the context size" if self.scheduler.n_slots == 1 else "a slot's context"

    @property
    def _parallel_hint(self) -> str:
        return "" if self.scheduler.n_slots == 1 else " (or lower --parallel)"

    # --- the stepping thread ------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self._inbox and not self.scheduler.running and not self.scheduler.waiting:
                    self._wake.wait()
                if self._stopping:
                    break
            self.step()
        for seq in self.scheduler.running + list(self.scheduler.waiting):
            self._finish(seq, "cancelled")

    def step(self) -> None:
        """One iteration: admit, decode, prefill one chunk, emit."""
        with self._wake:
            for seq in self._inbox:
                self.scheduler.add(seq)
            self._inbox.clear()
        for seq in self.scheduler.remove_finished():
            if not seq.is_finished:
                self._finish(seq, "cancelled")
        plan = self.scheduler.schedule()
        try:
            for seq in plan.admitted:
                self._admit(seq)
            self._forward(plan)
        except Exception as e:  # the engine outlives a failed step; its requests end with the error
            if self._thread is not None:  # a server: the log is where it can be read
                traceback.print_exc()
            for seq in plan.decode + ([plan.prefill] if plan.prefill else []) + plan.admitted:
                if not seq.is_finished:
                    seq.error = e
                    self._finish(seq, "error", f"{type(e).__name__}: {e}")
        self.kv_bytes_in_use = sum(s.cache.nbytes for s in self.scheduler.running if s.cache is not None)
        if self.prompt_cache is not None:
            self.kv_bytes_in_use += self.prompt_cache.nbytes

    def _admit(self, seq: Sequence) -> None:
        if seq.max_new == 0:
            self._finish(seq, "length")
            return
        if self.prompt_cache is not None:
            holding = sum(s.cache is not None for s in self.scheduler.running)
            seq.cache, seq.n_prefilled = self.prompt_cache.take(seq.prompt_ids, holding, seq.reuse_prompt)
            seq.stats.n_cached = seq.n_prefilled
            if seq.n_prefilled:
                self.totals.n_prompt += seq.n_prefilled  # the totals count every prompt token, as a request does
                self.totals.n_cached += seq.n_prefilled
                self.totals.n_cache_hits += 1
        else:
            seq.cache = self.network.new_cache(seq.n_prompt + seq.max_new, self.model.cache)
        seq.stats.kv_summary = seq.cache.describe()
        # a constrained sequence decodes without drafts: accept() would have to advance its
        # grammar per draft and roll it back at a rejection
        drafter = self.model.new_drafter(seq.cache) if seq.sampler.grammar is None else None
        seq.speculator = Speculator(drafter, self.model.spec) if drafter is not None else None
        self._texts[seq.seq_id] = OutputText(self.tokenizer, seq.params.stop)

    def _forward(self, plan: StepPlan) -> None:
        decode = [s for s in plan.decode if not s.is_finished]
        plain = []
        for seq in decode:  # a sequence with drafts worth checking verifies them on its own
            drafts = self._drafts(seq)
            if drafts:
                self._verify(seq, drafts)
            else:
                plain.append(seq)
        if plain:
            start = time.perf_counter()
            ids = [torch.tensor([s.next_token], dtype=torch.int64) for s in plain]
            hidden = self.network.forward_batch(ids, [s.cache for s in plain])
            logits = self.network.logits(hidden)
            self._count_decode(plain, time.perf_counter() - start, [1] * len(plain))
            for seq, row, h in zip(plain, logits, hidden):
                self._observe(seq, h)
                self._emit(seq, seq.sampler(row, seq.history), row)
        seq = plan.prefill
        if seq is not None and not seq.is_finished:
            a, b = plan.prefill_range
            start = time.perf_counter()
            hidden = self.network.forward(torch.tensor(seq.prompt_ids[a:b], dtype=torch.int64), seq.cache)
            seq.n_prefilled = b
            self.totals.n_prompt += b - a
            logits = None
            if b == seq.n_prompt:
                seq.state = SeqState.DECODE
                logits = self.network.logits(hidden[-1:])[0]
            seconds = time.perf_counter() - start
            seq.stats.prompt_seconds += seconds
            self.totals.prompt_seconds += seconds
            if logits is not None:
                self._observe(seq, hidden[-1])
                self._emit(seq, seq.sampler(logits, seq.history), logits)

    def _count_decode(self, seqs: list[Sequence], seconds: float, n_tokens: list[int]) -> None:
        """One decode forward: each sequence in it waited `seconds` for its `n_tokens`."""
        for seq, n in zip(seqs, n_tokens):
            seq.stats.decode_seconds += seconds
            seq.stats.n_decode_steps += 1
            seq.stats.n_decode_tokens += n
        self.totals.decode_seconds += seconds
        self.totals.n_decode_steps += 1
        self.totals.n_decode_tokens += sum(n_tokens)

    def _drafts(self, seq: Sequence) -> list[int]:
        if seq.speculator is None:
            return []
        return seq.speculator.drafts(seq.history, seq.max_new - len(seq.generated), seq.stats.spec)

    def _verify(self, seq: Sequence, drafts: list[int]) -> None:
        """One speculative round (engine/speculative.py), each output token emitted in turn."""
        start = time.perf_counter()
        tokens, rows = seq.speculator.verify(self.network, seq.cache, seq.sampler, seq.history, drafts, seq.stats.spec)
        self._count_decode([seq], time.perf_counter() - start, [len(tokens)])
        for token, row in zip(tokens, rows):
            self._emit(seq, token, row)
            if seq.is_finished:
                return

    @staticmethod
    def _observe(seq: Sequence, hidden_row: torch.Tensor) -> None:
        if seq.speculator is not None:
            seq.speculator.observe(hidden_row)

    def _emit(self, seq: Sequence, token: int, logits: torch.Tensor) -> None:
        """A sampled token (drawn from `logits`): end of generation, or text out and the
        sequence's next input."""
        if token in self.tokenizer.eog_ids:
            self._finish(seq, "stop")
            return
        if seq.t_first_token is None:
            seq.t_first_token = time.perf_counter()
        if seq.params.logprobs is not None:
            seq.pending_logprobs.append(seq.sampler.logprob(logits, seq.history, token))
        seq.generated.append(token)
        seq.stats.n_generated += 1
        self.totals.n_generated += 1
        grammar = seq.sampler.grammar
        if grammar is not None:
            grammar.advance(token)
        text = self._texts[seq.seq_id]
        for channel, piece in text.push(token):
            seq.on_event(Event(piece, channel, token, logprobs=self._take_logprobs(seq)))
        if text.stopped:
            seq.pending_logprobs.clear()  # their text made the stop string, which is not returned
        if text.stopped or (grammar is not None and grammar.is_complete):  # a complete match ends it
            self._finish(seq, "stop")
        elif len(seq.generated) >= seq.max_new:
            self._finish(seq, "length")
        else:
            seq.next_token = token

    @staticmethod
    def _take_logprobs(seq: Sequence) -> tuple:
        taken = tuple(seq.pending_logprobs)
        seq.pending_logprobs.clear()
        return taken

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        text = self._texts.pop(seq.seq_id, None)
        if text is not None and reason in ("stop", "length"):
            for channel, piece in text.flush():
                seq.on_event(Event(piece, channel, logprobs=self._take_logprobs(seq)))
        if self.prompt_cache is not None and seq.cache is not None and reason in ("stop", "length"):
            self.prompt_cache.keep(seq.history, seq.cache)
        seq.state, seq.finish_reason, seq.cache, seq.speculator = SeqState.FINISHED, reason, None, None
        seq.stats.finish_reason = reason
        self._spec_finished.add(seq.stats.spec)
        seq.t_finished = time.perf_counter()
        self.n_finished[reason] = self.n_finished.get(reason, 0) + 1
        try:
            seq.on_event(Event(finish_reason=reason, error=error, logprobs=self._take_logprobs(seq)))
        except Exception:  # a callback that fails must not take the engine down
            traceback.print_exc()
