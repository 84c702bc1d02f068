"""Reference attention over a KV cache, in float32, for any torch device.

Causality and the sliding window come from token positions, not from array indices, so the
same function serves a full cache, a ring buffer whose slots hold positions out of order, and
a speculative step that verifies several tokens at once.

A quantized cache also keeps some positions at f16 (kv/plan.py's exact window): the first
`sink` and each query's `recent` latest. Both copies of such a key reach attention, the coded
row and the f16 row; `ExactSplit` says which one a query reads, so each key counts once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExactSplit:
    """Keys [0, n_coded) are coded rows, the rest f16 rows of some of the same positions. A query
    at p reads key position kp from its f16 row when kp < sink, or when p - kp < recent and
    kp >= exact_from (the f16 rows of older positions were lost by a rollback), else from
    its coded row."""

    n_coded: int
    sink: int
    recent: int
    exact_from: int = 0

    def reads_exact(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """[T, S] bool: query q_pos[t] reads position k_pos[s] from its f16 row."""
        kp = k_pos[None, :]
        return (kp < self.sink) | ((kp >= self.exact_from) & (q_pos[:, None] - kp < self.recent))

    def mask(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """[T, S] bool: the rows each query reads (the f16 row or the coded row of a position)."""
        is_exact_row = torch.arange(k_pos.shape[0], device=k_pos.device) >= self.n_coded
        return self.reads_exact(q_pos, k_pos) == is_exact_row[None, :]

# Queries per chunk: bounds the [heads, queries, keys] score matrix for long prompts.
_QUERY_CHUNK = 512


def attention(
    q: torch.Tensor,  # [T, n_head, d]
    k: torch.Tensor,  # [S, n_head_kv, d]
    v: torch.Tensor,  # [S, n_head_kv, d_v]
    q_pos: torch.Tensor,  # [T] int64 positions of the queries
    k_pos: torch.Tensor,  # [S] int64 positions of the keys; -1 marks an empty slot
    scale: float,
    window: int = 0,  # > 0: a query at p sees keys p-window+1 .. p
    softcap: float = 0.0,  # > 0: scores = softcap * tanh(scores / softcap)
    split: ExactSplit | None = None,  # coded rows, then f16 rows of the exact window
) -> torch.Tensor:  # [T, n_head, d_v]
    n_tok, n_head, d = q.shape
    n_kv = k.shape[1]
    group = n_head // n_kv
    # Grouped-query attention without copying K/V: query heads of one KV head form a group.
    qg = q.permute(1, 0, 2).reshape(n_kv, group, n_tok, d)
    kt = k.permute(1, 2, 0).unsqueeze(1)  # [n_kv, 1, d, S]
    vg = v.permute(1, 0, 2).unsqueeze(1)  # [n_kv, 1, S, d_v]
    out = torch.empty((n_kv, group, n_tok, v.shape[-1]), dtype=torch.float32, device=q.device)
    for start in range(0, n_tok, _QUERY_CHUNK):
        stop = min(n_tok, start + _QUERY_CHUNK)
        scores = torch.matmul(qg[:, :, start:stop], kt) * scale  # [n_kv, group, t, S]
        if softcap > 0:
            scores = torch.tanh(scores / softcap) * softcap
        qp = q_pos[start:stop, None]
        visible = (k_pos[None, :] <= qp) & (k_pos[None, :] >= 0)
        if window > 0:
            visible &= qp - k_pos[None, :] < window
        if split is not None:
            visible &= split.mask(q_pos[start:stop], k_pos)
        scores = scores.masked_fill(~visible, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[:, :, start:stop] = torch.matmul(probs, vg)
    return out.reshape(n_head, n_tok, -1).permute(1, 0, 2)
