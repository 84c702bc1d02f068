"""The serving engine: many requests over `n_slots` parallel slots, in one background thread.

Each iteration (`step`): drop finished and cancelled sequences (their KV caches go at once),
let the scheduler admit waiting ones, decode one token of every running sequence in one
batched forward (a sequence whose drafter proposes tokens verifies them in a forward of its
own instead: speculative decoding per slot), feed one prompt chunk, sample, and hand each new
piece of text to its request's callback. Each slot has `slot_ctx` tokens of context (llama-server: --ctx-size /
--parallel); a request that cannot fit is refused by `submit`, never truncated.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from turbollm.engine.scheduler import Scheduler, StepPlan
from turbollm.engine.sampler import SamplingParams
from turbollm.engine.sequence import Event, Sequence, SeqState
from turbollm.engine.speculative import SpecStats, Speculator
from turbollm.engine.text import OutputText
from turbollm.errors import ContextLengthError


@dataclass
class EngineCounters:
    """Totals since start, read by the server's /metrics."""

    n_prompt_tokens: int = 0
    n_generated_tokens: int = 0
    prompt_seconds: float = 0.0
    decode_seconds: float = 0.0
    n_decode_steps: int = 0  # batched decode forwards
    n_decode_rows: int = 0  # sequence-tokens decoded in them (a step of 4 sequences counts 4)
    n_requests: int = 0
    n_finished: dict[str, int] = field(default_factory=dict)  # by finish reason
    spec: SpecStats = field(default_factory=SpecStats)  # speculative decoding over all requests



class Engine:
    def __init__(self, model, n_slots: int = 1, slot_ctx: int | None = None, n_batch: int = 512):
        """`model` is a turbollm.api.Model (network, tokenizer, cache config)."""
        self.model, self.network, self.tokenizer = model, model.network, model.tokenizer
        self.slot_ctx = slot_ctx if slot_ctx is not None else model.ctx_size
        if not 0 < self.slot_ctx <= model.ctx_size:
            raise ValueError(f"slot context {self.slot_ctx} is outside 1..{model.ctx_size}")
        self.scheduler = Scheduler(n_slots, n_batch)
        self.counters = EngineCounters()
        self._inbox: list[Sequence] = []
        self._wake = threading.Condition()
        self._texts: dict[int, OutputText] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.kv_bytes_in_use = 0

    # --- any thread ---------------------------------------------------------------------------

    def submit(self, prompt_ids: list[int], params: SamplingParams, on_event: Callable[[Event], None]) -> Sequence:
        """Queue a request; `params.max_tokens` new tokens at most. Raises ContextLengthError
        (nothing queued) when the prompt and max_tokens do not fit a slot's context."""
        n_prompt = len(prompt_ids)
        if n_prompt == 0:
            raise ValueError("the prompt is empty: there is nothing to continue")
        if n_prompt >= self.slot_ctx:
            raise ContextLengthError(f"the prompt has {n_prompt} tokens but a slot's context is {self.slot_ctx} tokens: "
                                     f"shorten the prompt, or raise --ctx-size (or lower --parallel)")
        if n_prompt + params.max_tokens > self.slot_ctx:
            raise ContextLengthError(f"the prompt ({n_prompt} tokens) and max_tokens ({params.max_tokens}) exceed "
                                     f"a slot's context of {self.slot_ctx} tokens: ask for at most "
                                     f"{self.slot_ctx - n_prompt} tokens, or raise --ctx-size")
        seq = Sequence(prompt_ids, params, params.max_tokens, on_event)
        with self._wake:
            self._inbox.append(seq)
            self.counters.n_requests += 1
            self._wake.notify()
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Stop a sequence (its client went away); its slot and cache are freed at the next step."""
        if not seq.is_finished:
            seq.cancelled = True
            with self._wake:
                self._wake.notify()

    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._run, name="turbollm-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    @property
    def n_running(self) -> int:
        return self.scheduler.n_running

    @property
    def n_waiting(self) -> int:
        return self.scheduler.n_waiting + len(self._inbox)

    # --- the engine thread --------------------------------------------------------------------

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
        """One iteration (the engine thread's; tests may call it directly without start())."""
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
        except Exception as e:  # the server outlives a failed step; its requests end with the error
            traceback.print_exc()
            for seq in plan.decode + ([plan.prefill] if plan.prefill else []) + plan.admitted:
                if not seq.is_finished:
                    self._finish(seq, "error", f"{type(e).__name__}: {e}")
        self.kv_bytes_in_use = sum(s.cache.nbytes for s in self.scheduler.running if s.cache is not None)

    def _admit(self, seq: Sequence) -> None:
        if seq.max_new == 0:
            self._finish(seq, "length")
            return
        seq.cache = self.network.new_cache(seq.n_prompt + seq.max_new, self.model.cache)
        drafter = self.model.new_drafter(seq.cache)
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
            self.counters.decode_seconds += time.perf_counter() - start
            self.counters.n_decode_steps += 1
            self.counters.n_decode_rows += len(plain)
            for seq, row, h in zip(plain, logits, hidden):
                self._observe(seq, h)
                self._emit(seq, seq.sampler(row, seq.history))
        seq = plan.prefill
        if seq is not None and not seq.is_finished:
            a, b = plan.prefill_range
            start = time.perf_counter()
            hidden = self.network.forward(torch.tensor(seq.prompt_ids[a:b], dtype=torch.int64), seq.cache)
            seq.n_prefilled = b
            self.counters.n_prompt_tokens += b - a
            if b == seq.n_prompt:
                seq.state = SeqState.DECODE
                logits = self.network.logits(hidden[-1:])[0]
                self.counters.prompt_seconds += time.perf_counter() - start
                self._observe(seq, hidden[-1])
                self._emit(seq, seq.sampler(logits, seq.history))
            else:
                self.counters.prompt_seconds += time.perf_counter() - start

    def _drafts(self, seq: Sequence) -> list[int]:
        if seq.speculator is None:
            return []
        return seq.speculator.drafts(seq.history, seq.max_new - len(seq.generated), self.counters.spec)

    def _verify(self, seq: Sequence, drafts: list[int]) -> None:
        """One speculative round (engine/speculative.py), each output token emitted in turn."""
        start = time.perf_counter()
        tokens = seq.speculator.verify(self.network, seq.cache, seq.sampler, seq.history, drafts, self.counters.spec)
        self.counters.decode_seconds += time.perf_counter() - start
        self.counters.n_decode_steps += 1
        self.counters.n_decode_rows += len(tokens)
        for token in tokens:
            self._emit(seq, token)
            if seq.is_finished:
                return

    @staticmethod
    def _observe(seq: Sequence, hidden_row: torch.Tensor) -> None:
        if seq.speculator is not None:
            seq.speculator.observe(hidden_row)

    def _emit(self, seq: Sequence, token: int) -> None:
        """A sampled token: end of generation, or text out and the sequence's next input."""
        if token in self.tokenizer.eog_ids:
            self._finish(seq, "stop")
            return
        if seq.t_first_token is None:
            seq.t_first_token = time.perf_counter()
        seq.generated.append(token)
        self.counters.n_generated_tokens += 1
        text = self._texts[seq.seq_id]
        for channel, piece in text.push(token):
            seq.on_event(Event(piece, channel, token))
        if text.stopped:
            self._finish(seq, "stop")
        elif len(seq.generated) >= seq.max_new:
            self._finish(seq, "length")
        else:
            seq.next_token = token

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        text = self._texts.pop(seq.seq_id, None)
        if text is not None and reason in ("stop", "length"):
            for channel, piece in text.flush():
                seq.on_event(Event(piece, channel))
        seq.state, seq.finish_reason, seq.cache, seq.speculator = SeqState.FINISHED, reason, None, None
        seq.t_finished = time.perf_counter()
        self.counters.n_finished[reason] = self.counters.n_finished.get(reason, 0) + 1
        try:
            seq.on_event(Event(finish_reason=reason, error=error))
        except Exception:  # a callback that fails must not take the engine down
            traceback.print_exc()
