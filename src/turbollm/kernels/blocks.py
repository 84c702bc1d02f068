"""Sub-layer blocks: a pre-normed QK-normed attention, a dense gated FFN and a Mixture of
Experts, as single calls.

A block bundles its weights and shape; `attention_block` / `ffn_block` here compose it from a
backend's single ops (the definition, and what the reference backend runs). The fast backend
runs decode-sized calls of the same blocks in one native call each (native/csrc/gemma_blocks.c), which
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
from typing import Callable, Protocol

import torch

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


# A named tap (llama.cpp's `cb(cur, name, il)`): called with a tensor's name, the layer and the
# tensor after each step of a block, so a debugging run can show the first one that leaves an
# oracle. Tap names are llama.cpp's graph names (src/models/gemma4.cpp), so the two line up.
Tap = Callable[[str, torch.Tensor], None]


def _no_tap(name: str, t: torch.Tensor) -> None:
    pass


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


def attend(ops, q: torch.Tensor, slots: KVSlots, positions: torch.Tensor, scale: float, window: int = 0,
           softcap: float = 0.0) -> torch.Tensor:
    """Attention of the step's queries over one layer's slots, by definition: the rows decoded
    with the backend's kv_decode, then its attention (a backend may read the rows in place)."""
    keys, values, key_positions, split = slots.read(ops.kv_decode)
    return ops.attention(q, keys, values, positions, key_positions, scale, window, softcap, split)


def attention_block(ops, x: torch.Tensor, b: AttentionBlock, rope: tuple[torch.Tensor, torch.Tensor],
                    slots: KVSlots, positions: torch.Tensor, tap: Tap = _no_tap) -> torch.Tensor:
    n_tok, hd = x.shape[0], b.head_dim
    n = ops.rms_norm(x, b.norm, b.eps)
    tap("attn_norm", n)
    if slots.store:
        q, k, *v = ops.linear_many(n, [b.wq, b.wk] + ([b.wv] if b.wv is not None else []))
        tap("Qcur", q), tap("Kcur", k)
        k = k.view(n_tok, b.n_kv, hd)
        v = v[0].view(n_tok, b.n_kv, hd) if v else k
        tap("Vcur", v)
        k = ops.rms_norm(k, b.k_norm, b.eps)
        tap("Kcur_normed", k)
        if b.v_norm:
            v = ops.rms_norm(v, None, b.eps)
            tap("Vcur_normed", v)
        k = apply_rope(k, *rope)
        tap("Kcur_pos", k)
    else:
        q = ops.linear(n, b.wq)
        tap("Qcur", q)
    q = ops.rms_norm(q.view(n_tok, b.n_head, hd), b.q_norm, b.eps)
    tap("Qcur_normed", q)
    q = apply_rope(q, *rope)
    tap("Qcur_pos", q)
    if slots.store:
        slots.write(k, v, ops.kv_encode, q)  # the queries weigh the key conditioning (kv/cache.py)
    out = ops.attend(q, slots, positions, b.scale, b.window, b.softcap)
    tap("kqv_out", out)
    out = ops.linear(out.reshape(n_tok, b.n_head * hd), b.wo)
    tap("attn_output", out)
    out = ops.rms_norm(out, b.post_norm, b.eps)
    tap("attn_post_norm", out)
    return x + out


def ffn_block(ops, h: torch.Tensor, b: FfnBlock, residual: torch.Tensor | None = None,
              tap: Tap = _no_tap) -> torch.Tensor:
    n = ops.rms_norm(h, b.norm, b.eps)
    tap("ffn_norm", n)
    gate, up = ops.linear_many(n, [b.gate, b.up])
    tap("ffn_gate", gate), tap("ffn_up", up)
    out = ops.gelu_mul(gate, up)
    tap("ffn_gelu", out)
    out = ops.linear(out, b.down)
    tap("ffn_down", out)
    out = ops.rms_norm(out, b.post_norm, b.eps)
    tap("ffn_post", out)
    return out if residual is None else residual + out


def route(ops, h: torch.Tensor, b: MoEBlock, tap: Tap = _no_tap) -> tuple[torch.Tensor, torch.Tensor]:
    """h [T, n_embd] -> (expert ids [T, k] int64, weights [T, k] float32)."""
    r = ops.rms_norm(h, None, b.eps) * b.router_scale * h.shape[-1] ** -0.5
    logits = ops.linear(r, b.router)
    tap("ffn_moe_logits", logits)
    probs = torch.softmax(logits, dim=-1)
    weights, ids = torch.topk(probs, b.n_used, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    if b.expert_scale is not None:
        weights = weights * b.expert_scale[ids]
    return ids, weights


def moe_block(ops, h: torch.Tensor, b: MoEBlock, tap: Tap = _no_tap) -> torch.Tensor:
    ids, weights = route(ops, h, b, tap)
    tap("ffn_moe_weights", weights)
    x = ops.rms_norm(h, b.pre_norm, b.eps)
    tap("ffn_norm_2", x)
    out = ops.moe_ffn(x, ids, weights, b.gate, b.up, b.down)
    tap("ffn_moe_out", out)
    return ops.rms_norm(out, b.post_norm, b.eps)
