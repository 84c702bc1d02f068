"""Sub-layer blocks: a pre-normed QK-normed attention, a dense gated FFN and a Mixture of
Experts, as single calls.

A block bundles its weights and shape; `attention_block` / `ffn_block` here compose it from a
backend's single ops (the definition, and what the reference backend runs). The fast backend
runs decode-sized calls of the same blocks in one native call each (native/blocks.c), which
removes most of the Python between kernels.

    attention: out = x + post_norm(Wo . attn(rope(q_norm(Wq n)), rope(k_norm(Wk n)), v_norm(Wv n))),
               n = norm(x); K/V of the new tokens are stored into the cache slots first;
               no Wv: V is the raw K projection; no Wk: the layer reads slots another layer stored
    ffn:       out = [residual +] post_norm(Wdown . (gelu_tanh(Wgate n) * (Wup n))), n = norm(h)
    moe:       out = post_norm(sum_k w_k expert_k(pre_norm(h))), expert = down(gelu_tanh(gate) * up);
               the k experts and w_k: softmax(W_router (rms(h) * router_scale / sqrt(n_embd))),
               top k, renormalised to sum 1, times the expert's own scale (Gemma 4's router)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from turbollm.kernels.attention import ExactSplit
from turbollm.kernels.qtensor import QTensor


@dataclass(frozen=True, eq=False)
class AttentionBlock:
    norm: torch.Tensor
    wq: QTensor
    wk: QTensor | None  # None: K/V come from another layer's cache slots
    wv: QTensor | None  # None: V is the raw K projection (Gemma 4 global layers)
    wo: QTensor
    q_norm: torch.Tensor
    k_norm: torch.Tensor | None
    post_norm: torch.Tensor
    n_head: int
    n_kv: int
    head_dim: int
    v_norm: bool  # RMS-norm V without a weight (Gemma 4)
    scale: float
    window: int  # > 0: sliding window
    eps: float
    softcap: float = 0.0


@dataclass(frozen=True, eq=False)
class FfnBlock:
    norm: torch.Tensor
    gate: QTensor
    up: QTensor
    down: QTensor
    post_norm: torch.Tensor
    eps: float


@dataclass(frozen=True, eq=False)
class MoEBlock:
    router: QTensor  # (n_expert, n_embd)
    router_scale: torch.Tensor  # (n_embd,)
    expert_scale: torch.Tensor | None  # (n_expert,)
    pre_norm: torch.Tensor  # (n_embd,)
    post_norm: torch.Tensor  # (n_embd,)
    gate: QTensor  # (n_expert, 2 * n_ff, n_embd) fused with up, or (n_expert, n_ff, n_embd)
    up: QTensor | None  # (n_expert, n_ff, n_embd) when not fused
    down: QTensor  # (n_expert, n_embd, n_ff)
    n_used: int  # experts per token
    eps: float


class KVSlots(Protocol):
    """Where one layer's keys and values live for one step (turbollm.kv.cache.KVSlots): coded
    slots plus a tail for the step's new tokens."""

    store: bool  # whether this layer writes the new tokens' K/V (else it reads another layer's)

    def write(self, k: torch.Tensor, v: torch.Tensor, encode=None, q: torch.Tensor | None = None) -> None:
        """Store the new tokens' K/V [T, n_kv, head_dim], coding rows with encode(codec, x);
        q [T, n_head, head_dim] are the step's queries."""

    def read(self, decode=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, ExactSplit | None]:
        """Keys, values [S, n_kv, head_dim] float32 (rows decoded with decode(codec, raw, d)),
        their positions [S] (-1: empty), and which rows each query reads when some positions
        come twice, coded and at f16 (kernels.attention.ExactSplit; None: each once)."""


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NeoX rotation of x [T, n_head, d] by cos/sin [T, 1, d] (the two halves are the pairs)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def attention_block(ops, x: torch.Tensor, b: AttentionBlock, rope: tuple[torch.Tensor, torch.Tensor],
                    slots: KVSlots, positions: torch.Tensor) -> torch.Tensor:
    n_tok, hd = x.shape[0], b.head_dim
    n = ops.rms_norm(x, b.norm, b.eps)
    if slots.store:
        q, k, *v = ops.linear_many(n, [b.wq, b.wk] + ([b.wv] if b.wv is not None else []))
        k = k.view(n_tok, b.n_kv, hd)
        v = v[0].view(n_tok, b.n_kv, hd) if v else k
        k = apply_rope(ops.rms_norm(k, b.k_norm, b.eps), *rope)
        if b.v_norm:
            v = ops.rms_norm(v, None, b.eps)
    else:
        q = ops.linear(n, b.wq)
    q = apply_rope(ops.rms_norm(q.view(n_tok, b.n_head, hd), b.q_norm, b.eps), *rope)
    if slots.store:
        slots.write(k, v, ops.kv_encode, q)  # the queries weigh the key conditioning (kv/cache.py)
    keys, values, key_positions, split = slots.read(ops.kv_decode)
    out = ops.attention(q, keys, values, positions, key_positions, b.scale, b.window, b.softcap, split)
    return x + ops.rms_norm(ops.linear(out.reshape(n_tok, b.n_head * hd), b.wo), b.post_norm, b.eps)


def ffn_block(ops, h: torch.Tensor, b: FfnBlock, residual: torch.Tensor | None = None) -> torch.Tensor:
    gate, up = ops.linear_many(ops.rms_norm(h, b.norm, b.eps), [b.gate, b.up])
    out = ops.rms_norm(ops.linear(F.gelu(gate, approximate="tanh") * up, b.down), b.post_norm, b.eps)
    return out if residual is None else residual + out


def route(ops, h: torch.Tensor, b: MoEBlock) -> tuple[torch.Tensor, torch.Tensor]:
    """h [T, n_embd] -> (expert ids [T, k] int64, weights [T, k] float32)."""
    r = ops.rms_norm(h, None, b.eps) * b.router_scale * h.shape[-1] ** -0.5
    probs = torch.softmax(ops.linear(r, b.router), dim=-1)
    weights, ids = torch.topk(probs, b.n_used, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    if b.expert_scale is not None:
        weights = weights * b.expert_scale[ids]
    return ids, weights


def moe_block(ops, h: torch.Tensor, b: MoEBlock) -> torch.Tensor:
    ids, weights = route(ops, h, b)
    x = ops.rms_norm(h, b.pre_norm, b.eps)
    return ops.rms_norm(ops.moe_ffn(x, ids, weights, b.gate, b.up, b.down), b.post_norm, b.eps)
