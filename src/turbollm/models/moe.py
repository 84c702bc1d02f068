"""Gemma 4's Mixture-of-Experts block (transformers `Gemma4TextRouter` / `Gemma4TextExperts`).

It runs beside the dense MLP on the same input h (the residual after attention):

    r      = rms_norm(h) * router_scale / sqrt(n_embd)          # no learned norm weight
    p      = softmax(W_router r) over all experts                  # float32
    top-k of p, renormalised to sum 1, times per_expert_scale[expert]
    out    = post_norm( sum_k w_k * expert_k( pre_norm(h) ) )      # expert = down(gelu(gate) * up)

GGUF stores the experts of a layer as stacked 3-D tensors: `ffn_gate_up_exps` (gate and up
fused, gate first) or `ffn_gate_exps` + `ffn_up_exps`, and `ffn_down_exps`; the router is
`ffn_gate_inp.weight` with `ffn_gate_inp.scale`, the per-expert scale `ffn_down_exps.scale`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from turbollm.config import ModelConfig
from turbollm.kernels import QTensor
from turbollm.models.weights import TensorLoader


@dataclass(frozen=True)
class MoEWeights:
    router: QTensor  # (n_expert, n_embd)
    router_scale: torch.Tensor  # (n_embd,)
    expert_scale: torch.Tensor | None  # (n_expert,)
    pre_norm: torch.Tensor  # (n_embd,)
    post_norm: torch.Tensor  # (n_embd,)
    gate: QTensor  # (n_expert, 2 * n_ff, n_embd) fused with up, or (n_expert, n_ff, n_embd)
    up: QTensor | None  # (n_expert, n_ff, n_embd) when not fused
    down: QTensor  # (n_expert, n_embd, n_ff)

    @classmethod
    def load(cls, t: TensorLoader, prefix: str, cfg: ModelConfig) -> "MoEWeights":
        d, n_exp, n_ff = cfg.n_embd, cfg.n_expert, cfg.n_ff_expert
        t.check_leading_dim(prefix + "ffn_down_exps.weight", n_exp, f"{cfg.arch}.expert_count")
        fused = prefix + "ffn_gate_up_exps.weight"
        if t.has(fused) or not t.has(prefix + "ffn_gate_exps.weight"):
            gate, up = t.quantized(fused, (n_exp, 2 * n_ff, d)), None
        else:
            gate = t.quantized(prefix + "ffn_gate_exps.weight", (n_exp, n_ff, d))
            up = t.quantized(prefix + "ffn_up_exps.weight", (n_exp, n_ff, d))
        return cls(
            router=t.quantized(prefix + "ffn_gate_inp.weight", (n_exp, d)),
            router_scale=t.dense(prefix + "ffn_gate_inp.scale", (d,)),
            expert_scale=t.optional_dense(prefix + "ffn_down_exps.scale", (n_exp,)),
            pre_norm=t.dense(prefix + "pre_ffw_norm_2.weight", (d,)),
            post_norm=t.dense(prefix + "post_ffw_norm_2.weight", (d,)),
            gate=gate, up=up,
            down=t.quantized(prefix + "ffn_down_exps.weight", (n_exp, d, n_ff)),
        )


def route(h: torch.Tensor, w: MoEWeights, cfg: ModelConfig, ops) -> tuple[torch.Tensor, torch.Tensor]:
    """h [T, n_embd] -> (expert ids [T, k] int64, weights [T, k] float32)."""
    r = ops.rms_norm(h, None, cfg.rms_eps) * w.router_scale * cfg.n_embd ** -0.5
    probs = torch.softmax(ops.linear(r, w.router), dim=-1)
    weights, ids = torch.topk(probs, cfg.n_expert_used, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    if w.expert_scale is not None:
        weights = weights * w.expert_scale[ids]
    return ids, weights


def moe_block(h: torch.Tensor, w: MoEWeights, cfg: ModelConfig, ops) -> torch.Tensor:
    """`ops` is the kernel backend (turbollm.kernels.backend)."""
    ids, weights = route(h, w, cfg, ops)
    x = ops.rms_norm(h, w.pre_norm, cfg.rms_eps)
    return ops.rms_norm(ops.moe_ffn(x, ids, weights, w.gate, w.up, w.down), w.post_norm, cfg.rms_eps)
