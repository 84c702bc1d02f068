"""Gemma 4's Mixture-of-Experts block (transformers `Gemma4TextRouter` / `Gemma4TextExperts`).

It runs beside the dense MLP on the same input h (the residual after attention):

    r      = rms_norm(h) * router_scale / sqrt(n_embd)          # no learned norm weight
    p      = softmax(W_router r) over all experts                  # float32
    top-k of p, renormalised to sum 1, times per_expert_scale[expert]
    out    = post_norm( sum_k w_k * expert_k( pre_norm(h) ) )      # expert = down(gelu(gate) * up)

GGUF stores the experts of a layer as stacked 3-D tensors: `ffn_gate_up_exps` (gate and up
fused, gate first) or `ffn_gate_exps` + `ffn_up_exps`, and `ffn_down_exps`; the router is
`ffn_gate_inp.weight` with `ffn_gate_inp.scale`, the per-expert scale `ffn_down_exps.scale`.
This module loads them into a kernels.blocks.MoEBlock, which defines the computation.
"""

from __future__ import annotations

from turbollm.config import ModelConfig
from turbollm.kernels.blocks import MoEBlock
from turbollm.models.weights import TensorLoader


def load_moe_block(t: TensorLoader, prefix: str, cfg: ModelConfig) -> MoEBlock:
    d, n_exp, n_ff = cfg.n_embd, cfg.n_expert, cfg.n_ff_expert
    t.check_leading_dim(prefix + "ffn_down_exps.weight", n_exp, f"{cfg.arch}.expert_count")
    fused = prefix + "ffn_gate_up_exps.weight"
    # the whole block (router, norms, scales) computes where the experts are (--n-cpu-moe)
    dev = t.device_of(fused if t.has(fused) else prefix + "ffn_gate_exps.weight")
    if t.has(fused) or not t.has(prefix + "ffn_gate_exps.weight"):
        gate, up = t.quantized(fused, (n_exp, 2 * n_ff, d), dev), None
    else:
        gate = t.quantized(prefix + "ffn_gate_exps.weight", (n_exp, n_ff, d), dev)
        up = t.quantized(prefix + "ffn_up_exps.weight", (n_exp, n_ff, d), dev)
    return MoEBlock(
        router=t.quantized(prefix + "ffn_gate_inp.weight", (n_exp, d), dev),
        router_scale=t.dense(prefix + "ffn_gate_inp.scale", (d,), dev),
        expert_scale=t.optional_dense(prefix + "ffn_down_exps.scale", (n_exp,), dev),
        pre_norm=t.dense(prefix + "pre_ffw_norm_2.weight", (d,), dev),
        post_norm=t.dense(prefix + "post_ffw_norm_2.weight", (d,), dev),
        gate=gate, up=up,
        down=t.quantized(prefix + "ffn_down_exps.weight", (n_exp, d, n_ff), dev),
        n_used=cfg.n_expert_used, eps=cfg.rms_eps,
    )
