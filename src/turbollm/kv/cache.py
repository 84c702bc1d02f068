"""The KV cache of one sequence: the buffers a plan (kv/plan.py) describes, and one step's
reads and writes.

One forward step of T new tokens (llama.cpp plans a batch's cache changes, then applies them
in one place; so do we):
1. `begin(T)` checks the room and makes a *tail* per storing layer: [T, n_kv, row_bytes] for
   the new tokens' coded K and V (and their f16 rows, with an exact window).
2. Each layer encodes its new K/V into its tail and attends over its slots (with their
   positions, -1 = empty) followed by the tail (positions of the new tokens). A KV-shared
   layer attends over its source's slots and tail. Nothing in the slots changes during a step,
   so a ring can take a step longer than its window: the queries still see every key they need.
3. `advance()` commits the tails into the slots (the last `window` tokens for a ring) and
   records their positions; `advance(k)` commits only the first k (accepted draft tokens).
`truncate(n)` forgets positions >= n (rejected draft tokens): it refuses when a ring has
already overwritten keys that the next token would need. The exact window's f16 ring may have
lost rows the next tokens would read at f16 then: they read the coded rows (`exact_from`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from turbollm.errors import ContextLengthError
from turbollm.kernels.attention import ExactSplit
from turbollm.kv.codecs import Codec
from turbollm.kv.conditioning import condition_keys, rotate_by_position
from turbollm.kv.plan import EXACT, KVPlan, LayerPlan


@dataclass(frozen=True)
class KVSlots:
    """What one layer reads and writes in one step (the contract of kernels.blocks.KVSlots)."""

    plan: LayerPlan
    k: torch.Tensor  # uint8 [capacity, n_kv, k_row_bytes]: the committed slots
    v: torch.Tensor
    positions: torch.Tensor  # int64 [capacity]: position held by each slot, -1 if empty
    n_keys: int  # slots worth scanning (0 .. n_keys-1 may be filled)
    tail_k: torch.Tensor  # uint8 [T, n_kv, k_row_bytes]: this step's new tokens
    tail_v: torch.Tensor
    tail_positions: torch.Tensor  # int64 [T]
    store: bool  # the layer encodes its new K/V into the tail (else it reads its source's)
    # Quantized keys are coded as (k - R_p rot_offset - offset) / scale (kv/conditioning.py),
    # fixed by the sequence's first step (k_offset_set[0] = 1); float keys as they are.
    k_offset: torch.Tensor | None = None  # float32 [n_kv, head_dim]
    k_scale: torch.Tensor | None = None
    k_offset_set: torch.Tensor | None = None  # int32 [1]
    k_rot_offset: torch.Tensor | None = None  # float32 [n_kv, head_dim]
    rope_freq: torch.Tensor | None = None  # the layer's RoPE angle per position, per pair [head_dim / 2]
    # The exact window (plan.exact_rows > 0): f16 rows [sink + recent, n_kv, exact_row_bytes] of
    # the first positions then a ring of the latest, their positions (-1: empty), the step's f16
    # rows [T, n_kv, exact_row_bytes], and the first position the ring still holds in order
    exact_k: torch.Tensor | None = None
    exact_v: torch.Tensor | None = None
    exact_positions: torch.Tensor | None = None
    tail_exact_k: torch.Tensor | None = None
    tail_exact_v: torch.Tensor | None = None
    exact_from: int = 0

    @property
    def split(self) -> ExactSplit | None:
        """Which keys attention reads from the f16 rows (those follow the coded rows in `read`)."""
        if self.exact_k is None:
            return None
        return ExactSplit(self.n_keys + self.tail_k.shape[0], self.plan.sink, self.plan.recent, self.exact_from)

    @property
    def needs_conditioning(self) -> bool:
        """A quantized-key layer whose sequence has not set its key conditioning yet."""
        return self.k_offset is not None and not int(self.k_offset_set[0])

    def write(self, k: torch.Tensor, v: torch.Tensor, encode=None, q: torch.Tensor | None = None) -> None:
        """Encode the new tokens' K/V [T, n_kv, head_dim] into the tail, with `encode(codec, x)`
        (a kernel backend's; default: the codecs' reference encoders). q [T, n_head, head_dim]:
        the step's queries (RoPE applied), which weigh the key conditioning of a first step."""
        encode = encode or _reference_encode
        if self.exact_k is not None:
            self.tail_exact_k.copy_(encode(EXACT, k))
            self.tail_exact_v.copy_(encode(EXACT, v))
        if self.k_offset is not None:
            if self.needs_conditioning:
                c = condition_keys(k, self.tail_positions, self.rope_freq, q if self.plan.k.is_turbo else None)
                self.k_rot_offset.copy_(c.rot_offset)
                self.k_offset.copy_(c.offset)
                self.k_scale.copy_(c.scale)
                self.k_offset_set[0] = 1
            k = (k - self._position_offset(self.tail_positions) - self.k_offset) / self.k_scale
        self.tail_k.copy_(encode(self.plan.k, k))
        self.tail_v.copy_(encode(self.plan.v, v))

    def _position_offset(self, positions: torch.Tensor) -> torch.Tensor:
        return rotate_by_position(self.k_rot_offset, positions, self.rope_freq)

    def read(self, decode=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, ExactSplit | None]:
        """Decoded keys and values [S, n_kv, head_dim] float32 of the slots then the tail, then
        (with an exact window) the f16 rows of the first positions, the ring and the tail, their
        positions [S], and the split that says which rows a query reads: what attention runs
        over. `decode(codec, raw, d)`: as in write."""
        decode = decode or _reference_decode
        hd, n = self.plan.head_dim, self.n_keys
        k = torch.cat([decode(self.plan.k, self.k[:n], hd), decode(self.plan.k, self.tail_k, hd)])
        positions = torch.cat([self.positions[:n], self.tail_positions])
        if self.k_offset is not None:
            k = k * self.k_scale + self.k_offset + self._position_offset(positions)
        v = torch.cat([decode(self.plan.v, self.v[:n], hd), decode(self.plan.v, self.tail_v, hd)])
        if self.exact_k is not None:
            k = torch.cat([k, decode(EXACT, self.exact_k, hd), decode(EXACT, self.tail_exact_k, hd)])
            v = torch.cat([v, decode(EXACT, self.exact_v, hd), decode(EXACT, self.tail_exact_v, hd)])
            positions = torch.cat([positions, self.exact_positions, self.tail_positions])
        return k, v, positions, self.split


def _reference_encode(codec: Codec, x: torch.Tensor) -> torch.Tensor:
    return codec.encode(x)


def _reference_decode(codec: Codec, raw: torch.Tensor, d: int) -> torch.Tensor:
    return codec.decode(raw, d)


class KVCache:
    def __init__(self, plan: KVPlan, device: torch.device | str = "cpu",
                 rope_freqs: list[torch.Tensor | None] | None = None):
        """`rope_freqs`: per layer, the RoPE angle per position of each pair of its keys (None:
        keys not rotated by position), which the key conditioning follows (kv/conditioning.py)."""
        self.plan, self.capacity, self.device = plan, plan.ctx, torch.device(device)
        self.rope_freqs = [None if f is None else f.to(self.device, torch.float64).contiguous()
                           for f in (rope_freqs or [None] * len(plan.layers))]
        if len(self.rope_freqs) != len(plan.layers):
            raise ValueError(f"{len(self.rope_freqs)} RoPE frequency sets for {len(plan.layers)} layers")
        self.n_tokens = 0  # positions 0 .. n_tokens-1 are committed in every layer

        def buffer_of(p: LayerPlan, rows: int, row_bytes: int) -> torch.Tensor:
            return torch.zeros((rows, p.n_head_kv, row_bytes), dtype=torch.uint8, device=self.device)

        def buffer(p: LayerPlan | None, row_bytes) -> torch.Tensor | None:
            return None if p is None else buffer_of(p, p.capacity, row_bytes(p))

        self.k = [buffer(p, lambda p: p.k_row_bytes) for p in plan.layers]
        self.v = [buffer(p, lambda p: p.v_row_bytes) for p in plan.layers]
        self.k_offset = [torch.zeros((p.n_head_kv, p.head_dim), dtype=torch.float32, device=self.device)
                         if p is not None and p.has_k_offset else None for p in plan.layers]
        self.k_scale = [None if t is None else torch.ones_like(t) for t in self.k_offset]
        self.k_rot_offset = [None if t is None else torch.zeros_like(t) for t in self.k_offset]
        self.k_offset_set = [torch.zeros(1, dtype=torch.int32, device=self.device) if t is not None else None
                             for t in self.k_offset]
        self.exact_k = [buffer_of(p, p.exact_rows, p.exact_row_bytes) if p is not None and p.exact_rows else None
                        for p in plan.layers]
        self.exact_v = [None if t is None else torch.zeros_like(t) for t in self.exact_k]
        # the exact window's positions per geometry (sink, recent), and the first position from
        # which its ring holds every committed position (lower after a rollback past the ring)
        self._exact: dict[tuple[int, int], _ExactRing] = {}
        for p in plan.stored:
            if p.exact_rows and (p.sink, p.recent) not in self._exact:
                self._exact[p.sink, p.recent] = _ExactRing(p.sink, p.recent, self.device)
        # one positions array per slot geometry (all rings of one window share theirs)
        self._positions: dict[int, torch.Tensor] = {}
        for p in plan.stored:
            if p.capacity not in self._positions:
                self._positions[p.capacity] = torch.full((p.capacity,), -1, dtype=torch.int64, device=self.device)
        self._tails: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(plan.layers)
        self._n_new = 0

    @property
    def nbytes(self) -> int:
        tensors = (self.k + self.v + self.k_offset + self.k_scale + self.k_rot_offset + self.k_offset_set
                   + self.exact_k + self.exact_v)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def describe(self) -> str:
        """One line for people: codecs, layout and bytes (`turbollm run --verbose`)."""
        stored = self.plan.stored
        codecs = sorted({f"K {p.k.label} / V {p.v.label}" for p in stored})
        rings = sorted({p.capacity for p in stored if p.is_ring})
        layout = f"{sum(not p.is_ring for p in stored)} full-context layers"
        if rings:
            layout += f", {sum(p.is_ring for p in stored)} sliding rings of {'/'.join(map(str, rings))}"
        shared = len(self.plan.layers) - len(stored)
        if shared:
            layout += f", {shared} layers reading another's"
        exact = sorted({(p.sink, p.recent) for p in stored if p.exact_rows})
        if exact:
            layout += ", f16 rows of the " + " / ".join(f"first {s} and latest {r}" for s, r in exact) + " positions"
        return (f"KV cache: {', '.join(codecs)}; {layout}; {self.nbytes / 2**20:.2f} MiB for {self.capacity} "
                f"positions")

    def check_room(self, n_new: int) -> None:
        if self.n_tokens + n_new > self.capacity:
            raise ContextLengthError(
                f"{self.n_tokens} tokens in the context + {n_new} new exceed the context size of {self.capacity}"
            )

    def begin(self, n_new: int) -> None:
        """Start a step of `n_new` tokens at positions n_tokens .. n_tokens + n_new - 1."""
        self.check_room(n_new)
        self._n_new = n_new
        def rows(p: LayerPlan, row_bytes: int) -> torch.Tensor:
            return torch.empty((n_new, p.n_head_kv, row_bytes), dtype=torch.uint8, device=self.device)

        for il, p in enumerate(self.plan.layers):
            self._tails[il] = None if p is None else (
                rows(p, p.k_row_bytes), rows(p, p.v_row_bytes),
                *((rows(p, p.exact_row_bytes), rows(p, p.exact_row_bytes)) if p.exact_rows else (None, None)))
        self._tail_positions = torch.arange(self.n_tokens, self.n_tokens + n_new, device=self.device)

    def slots(self, il: int, store: bool = True) -> KVSlots:
        """Layer `il`'s view for this step: its own slots (store), or those of the layer it
        shares (store=False, `il` is then the source layer)."""
        p = self.plan.layers[il]
        tail_k, tail_v, tail_exact_k, tail_exact_v = self._tails[il]
        ring = self._exact.get((p.sink, p.recent)) if p.exact_rows else None
        return KVSlots(p, self.k[il], self.v[il], self._positions[p.capacity], min(self.n_tokens, p.capacity),
                       tail_k, tail_v, self._tail_positions, store, self.k_offset[il], self.k_scale[il],
                       self.k_offset_set[il], self.k_rot_offset[il], self.rope_freqs[il], self.exact_k[il],
                       self.exact_v[il], None if ring is None else ring.positions, tail_exact_k, tail_exact_v,
                       0 if ring is None else ring.exact_from)

    def advance(self, n_keep: int | None = None) -> None:
        """Commit the first `n_keep` tokens of this step (default: all) into the slots. A
        speculative step keeps only the accepted drafts: the rest were never in the slots, so
        nothing has to be rolled back, not even in a ring."""
        n_new = self._n_new
        n_keep = n_new if n_keep is None else n_keep
        if not 0 <= n_keep <= n_new:
            raise ValueError(f"cannot keep {n_keep} of a step of {n_new} tokens")
        first = self.n_tokens
        # where the kept tokens go, once per slot geometry (not per layer: decode pays this per token)
        slot_rows = {capacity: _ring_rows(first, n_keep, capacity, self.device) for capacity in self._positions}
        exact_rows = {key: ring.rows_of(first, n_keep) for key, ring in self._exact.items()}
        for il, p in enumerate(self.plan.layers):
            if p is None:
                continue
            idx, src = slot_rows[p.capacity]
            tail_k, tail_v, tail_exact_k, tail_exact_v = self._tails[il]
            self.k[il].index_copy_(0, idx, tail_k[src])
            self.v[il].index_copy_(0, idx, tail_v[src])
            if p.exact_rows:
                rows, src = exact_rows[p.sink, p.recent]
                self.exact_k[il].index_copy_(0, rows, tail_exact_k[src])
                self.exact_v[il].index_copy_(0, rows, tail_exact_v[src])
        for key, ring in self._exact.items():
            ring.commit(first, n_keep, exact_rows[key])
        for capacity, positions in self._positions.items():
            idx, src = slot_rows[capacity]
            positions[idx] = first + torch.arange(src.start, src.stop, device=self.device)
        self.n_tokens += n_keep
        self._tails = [None] * len(self.plan.layers)
        self._n_new = 0

    def truncate(self, n_tokens: int) -> None:
        """Forget everything from position `n_tokens` on (rejected draft tokens, a new turn)."""
        if not 0 <= n_tokens <= self.n_tokens:
            raise ValueError(f"cannot truncate a cache of {self.n_tokens} tokens to {n_tokens}")
        for p in self.plan.stored:
            if not p.is_ring:
                continue
            positions = self._positions[p.capacity]
            needed = min(n_tokens, p.window - 1)  # keys the next token at n_tokens will see
            held = int(((positions >= n_tokens - needed) & (positions < n_tokens)).sum())
            if held < needed:
                raise ValueError(
                    f"cannot roll the cache back from {self.n_tokens} to {n_tokens} tokens: the sliding-window "
                    f"ring of {p.capacity} slots has overwritten keys the next token needs (use --swa-full)")
        for positions in self._positions.values():
            positions[positions >= n_tokens] = -1
        for ring in self._exact.values():
            ring.truncate(n_tokens)
        if n_tokens == 0:  # a new sequence: its first step sets new key offsets
            for flag in self.k_offset_set:
                if flag is not None:
                    flag.zero_()
        self.n_tokens = n_tokens


def _ring_rows(first: int, n_keep: int, capacity: int, device: torch.device) -> tuple[torch.Tensor, slice]:
    """(slots, the step's tail rows) of committing positions first .. first+n_keep-1 to
    `capacity` slots: a ring keeps the last `capacity` of a longer step."""
    keep = min(n_keep, capacity)
    return torch.arange(first + n_keep - keep, first + n_keep, device=device) % capacity, slice(n_keep - keep, n_keep)


class _ExactRing:
    """Where the exact window keeps the f16 rows of which positions: rows 0 .. sink-1 hold
    positions 0 .. sink-1, rows sink .. sink+recent-1 a ring of the latest later positions (one
    row per position: a query must not read a key twice)."""

    def __init__(self, sink: int, recent: int, device: torch.device):
        self.sink, self.recent, self.device = sink, recent, device
        self.positions = torch.full((sink + recent,), -1, dtype=torch.int64, device=device)
        self.exact_from = 0  # the ring holds every committed position from here on

    def rows_of(self, first: int, n_keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, indices into the step's tail) of committing positions first .. first+n_keep-1."""
        new = torch.arange(first, first + n_keep, device=self.device)
        to_sink = new < self.sink
        later = new[~to_sink][-self.recent:] if self.recent else new[:0]
        rows = torch.cat([new[to_sink], self.sink + later % max(1, self.recent)])
        return rows, torch.cat([new[to_sink], later]) - first

    def commit(self, first: int, n_keep: int, rows_of: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Record the positions the rows `rows_of(first, n_keep)` now hold."""
        rows, src = rows_of
        self.positions[rows] = first + src
        self.exact_from = max(self.exact_from, first + n_keep - self.recent)

    def truncate(self, n_tokens: int) -> None:
        self.positions[self.positions >= n_tokens] = -1
        self.exact_from = min(self.exact_from, n_tokens)
