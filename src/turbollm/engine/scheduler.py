"""Which sequences run in the next step: continuous batching over `n_slots` slots.

Shaped like llama-server's `update_slots`: every step first decodes one token of each running
sequence (all of them in one batched forward), then feeds one prompt chunk of the oldest
sequence still prefilling, so a long prompt is spread over steps instead of stalling the
streams. New requests take a free slot between steps (the lowest free slot number, kept in
`Sequence.slot` while it runs: what the server's /slots reports). Prompt chunks start at
multiples of `n_batch` past the reused prefix (engine/prompt_cache.py; none without one)
whatever else is running, so a sequence computes the same numbers under load as alone (greedy
output is identical). This module decides; it never touches tensors.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from turbollm.engine.sequence import Sequence, SeqState


@dataclass
class StepPlan:
    admitted: list[Sequence] = field(default_factory=list)  # took a slot this step: need a cache
    decode: list[Sequence] = field(default_factory=list)  # one token each, batched
    prefill: Sequence | None = None  # one chunk of its prompt
    n_batch: int = 512

    @property
    def prefill_range(self) -> tuple[int, int]:
        """[start, stop) of the prompt chunk, read when the step runs: admission may have
        started the sequence past a reused prefix (engine/prompt_cache.py)."""
        seq = self.prefill
        if seq is None:
            return (0, 0)
        return (seq.n_prefilled, min(seq.n_prompt, seq.n_prefilled + self.n_batch))

    @property
    def empty(self) -> bool:
        return not self.decode and self.prefill is None


class Scheduler:
    def __init__(self, n_slots: int, n_batch: int):
        if n_slots <= 0 or n_batch <= 0:
            raise ValueError(f"slots and batch size must be positive, got {n_slots} and {n_batch}")
        self.n_slots, self.n_batch = n_slots, n_batch
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove_finished(self) -> list[Sequence]:
        """Drop finished and cancelled sequences from the queue and the slots; return them."""
        gone = [s for s in self.running if s.is_finished or s.cancelled]
        gone += [s for s in self.waiting if s.cancelled]
        self.running = [s for s in self.running if s not in gone]
        self.waiting = deque(s for s in self.waiting if s not in gone)
        return gone

    def schedule(self) -> StepPlan:
        plan = StepPlan(n_batch=self.n_batch)
        while self.waiting and len(self.running) < self.n_slots:
            seq = self.waiting.popleft()
            seq.state = SeqState.PREFILL
            taken = {s.slot for s in self.running}
            seq.slot = next(i for i in range(self.n_slots) if i not in taken)
            self.running.append(seq)
            plan.admitted.append(seq)
        plan.decode = [s for s in self.running if s.state is SeqState.DECODE]
        prefilling = [s for s in self.running if s.state is SeqState.PREFILL]
        if prefilling:
            plan.prefill = prefilling[0]
        return plan

    @property
    def n_running(self) -> int:
        return len(self.running)

    @property
    def n_waiting(self) -> int:
        return len(self.waiting)
