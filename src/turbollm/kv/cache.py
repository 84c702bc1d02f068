"""The KV cache of one sequence: K and V of every layer, with the position of every slot.

Each layer stores `capacity` slots of [n_head_kv, head_dim] in float32. Attention reads the
slots together with their positions (see `kernels.attention`), so this full-length layout
and the sliding-window rings that replace it for local layers share one interface.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from turbollm.errors import ContextLengthError


@dataclass(frozen=True)
class LayerKVShape:
    n_head_kv: int
    head_dim: int


@dataclass(frozen=True)
class KVSlots:
    """One layer's keys and values for one step (the contract of kernels.blocks.KVSlots)."""

    k: torch.Tensor  # [capacity, n_kv, head_dim]
    v: torch.Tensor
    store: bool  # the layer writes the new tokens' K/V at slots start .. start + n_new - 1
    start: int
    n_keys: int  # slots to attend over, the new ones included
    positions: torch.Tensor  # [capacity] position held by each slot


class KVCache:
    """`layers[il]` is the K/V shape layer `il` stores, or None for a layer that stores nothing
    (Gemma 4's KV-shared layers read another layer's slots through `view`)."""

    def __init__(self, layers: list[LayerKVShape | None], capacity: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        if capacity <= 0:
            raise ValueError(f"KV cache capacity must be positive, got {capacity}")
        self.capacity = capacity
        self.n_tokens = 0  # positions 0 .. n_tokens-1 are filled in every layer

        def slots(s: LayerKVShape | None) -> torch.Tensor | None:
            return None if s is None else torch.zeros((capacity, s.n_head_kv, s.head_dim), dtype=dtype, device=device)

        self.k = [slots(s) for s in layers]
        self.v = [slots(s) for s in layers]
        self.positions = torch.arange(capacity, dtype=torch.int64, device=device)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v if t is not None)

    def check_room(self, n_new: int) -> None:
        if self.n_tokens + n_new > self.capacity:
            raise ContextLengthError(
                f"{self.n_tokens} tokens in the context + {n_new} new exceed the context size of {self.capacity}"
            )

    def slots(self, il: int, n_new: int, store: bool = True) -> KVSlots:
        """The slots layer `il` uses this step: it writes `n_new` tokens after the filled ones
        (store), or reads what layer `il` stored this step (a KV-shared layer, store=False)."""
        return KVSlots(self.k[il], self.v[il], store, self.n_tokens, self.n_tokens + n_new, self.positions)

    def advance(self, n_new: int) -> None:
        """Commit `n_new` tokens once every layer has stored them."""
        self.n_tokens += n_new

    def truncate(self, n_tokens: int) -> None:
        """Forget everything from position `n_tokens` on (rejected draft tokens, a new turn)."""
        if not 0 <= n_tokens <= self.n_tokens:
            raise ValueError(f"cannot truncate a cache of {self.n_tokens} tokens to {n_tokens}")
        self.n_tokens = n_tokens
