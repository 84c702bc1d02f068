"""The Triton backend: GPU kernels (kernels/triton/*.py) where they apply, the reference elsewhere.

What runs in Triton today: the quantized linear (quantized_linear.py), for every projection, expert
and the LM head whose type it reads (quantized_linear.SUPPORTED), weights left in their GGUF blocks.
Everything else (attention over the cache, norms, GELU, the MoE routing, other weight types)
is still the reference's PyTorch, on the same device. Triton compiles for CUDA and ROCm; on
CPU tensors it runs only in its interpreter (TRITON_INTERPRET=1), which is how CI tests it.

`precision`: "ieee" multiplies in float32 (the reference's maths, what the tests hold), "tf32"
lets a GPU's tensor cores round the inputs to TF32 (kernels/triton/quantized_linear.py).
"""

from __future__ import annotations

import os

import torch

from turbollm.kernels import blocks, reference
from turbollm.kernels.qtensor import QTensor

_precision = "ieee"


def available() -> tuple[bool, str]:
    """Whether Triton imports, and if not, why (one line)."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return False, f"the triton backend needs Triton: pip install 'turbollm[gpu]' ({e})"
    return True, ""


def runs_on(device: torch.device) -> bool:
    """Triton compiles for CUDA/ROCm devices; CPU tensors only under its interpreter."""
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def linear(x: torch.Tensor, w: QTensor) -> torch.Tensor:
    from turbollm.kernels.triton import quantized_linear as triton_linear
    if runs_on(x.device) and x.device == w.device and triton_linear.supports(w):
        return triton_linear.linear(x, w, _precision)
    return reference.linear(x, w)


def linear_many(x: torch.Tensor, ws: list[QTensor]) -> list[torch.Tensor]:
    return [linear(x, w) for w in ws]


def moe_ffn(x, expert_ids, expert_weights, gate, up, down):
    """The reference's expert grouping, with each expert's products in Triton."""
    return reference.moe_ffn(x, expert_ids, expert_weights, gate, up, down, linear_fn=linear)


class Ops:
    """The triton backend (see turbollm.kernels.backend)."""

    name = "triton"
    linear = staticmethod(linear)
    linear_many = staticmethod(linear_many)
    rms_norm = staticmethod(reference.rms_norm)
    embedding = staticmethod(reference.embedding)
    moe_ffn = staticmethod(moe_ffn)
    gelu_mul = staticmethod(reference.gelu_mul)
    attention = staticmethod(reference.attention)
    kv_encode = staticmethod(reference.kv_encode)
    kv_decode = staticmethod(reference.kv_decode)

    @staticmethod
    def attention_block(x, b, rope, slots, positions):
        return blocks.attention_block(Ops, x, b, rope, slots, positions)

    @staticmethod
    def ffn_block(h, b, residual=None):
        return blocks.ffn_block(Ops, h, b, residual)

    @staticmethod
    def moe_block(h, b):
        return blocks.moe_block(Ops, h, b)
