"""Reference kernels in plain PyTorch: dequantize, then compute in float32.

These define what every fast kernel must compute, and they run on any torch device. They are
exact float math on the dequantized weights, which is what transformers computes on a GGUF's
dequantized tensors (the `hf*` oracles in tests/data).

Big weights are dequantized in row chunks so that no full-precision copy of a large tensor
(a 262,144-row embedding is 670 MB in float32) is ever held at once.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from turbollm.kernels import blocks
from turbollm.kernels.attention import attention
from turbollm.kernels.qtensor import QTensor

# Dequantize at most this many weight elements at a time: 4 MB of float32 stays in cache and
# under malloc's mmap threshold (measured on the 262,144 x 640 LM head: 0.08 s vs 0.59 s at 64 MB).
_CHUNK_ELEMENTS = 1024 * 1024


def gelu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """gelu(g) * u, GELU in its tanh form (Gemma's gelu_pytorch_tanh), exact in float32: the
    gated half of Gemma's MLP (and of PLE's gate)."""
    return F.gelu(g, approximate="tanh") * u


def linear(x: torch.Tensor, w: QTensor) -> torch.Tensor:
    """x [..., n_in] @ w.T -> [..., n_out], w of shape (n_out, n_in)."""
    n_out, n_in = w.shape
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // n_in)
    if n_out <= rows_per_chunk:
        return F.linear(x, w.dequantize())
    out = torch.empty((*x.shape[:-1], n_out), dtype=torch.float32, device=x.device)
    for start in range(0, n_out, rows_per_chunk):
        stop = min(n_out, start + rows_per_chunk)
        chunk = QTensor(w.data[start:stop], w.qtype, (stop - start, n_in), w.name)
        out[..., start:stop] = F.linear(x, chunk.dequantize())
    return out


def linear_many(x: torch.Tensor, ws: list[QTensor]) -> list[torch.Tensor]:
    """[linear(x, w) for w in ws]: projections that share an input (q/k/v, gate/up)."""
    return [linear(x, w) for w in ws]


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last dimension (no weight: plain RMS),
    written as transformers writes it."""
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y if weight is None else y * weight


def embedding(ids: torch.Tensor, w: QTensor) -> torch.Tensor:
    """Rows `ids` of w (n_rows, n_cols) as float32 [*ids.shape, n_cols]."""
    flat = ids.reshape(-1)
    return w.dequantize_rows(flat).view(*ids.shape, w.shape[-1])


def moe_ffn(
    x: torch.Tensor,  # [T, n_embd]
    expert_ids: torch.Tensor,  # [T, k] int64: the experts chosen for each token
    expert_weights: torch.Tensor,  # [T, k] float32: their weights
    gate: QTensor,  # (n_expert, n_ff, n_embd), or gate and up fused as (n_expert, 2 * n_ff, n_embd)
    up: QTensor | None,  # (n_expert, n_ff, n_embd), None when `gate` is fused
    down: QTensor,  # (n_expert, n_embd, n_ff)
    linear_fn=None,  # the product x @ W.T to use (default: this module's linear)
) -> torch.Tensor:  # [T, n_embd]
    """Sum over k of weight * down(gelu_tanh(gate x) * up x), for the chosen experts only.

    Tokens are grouped by expert, so each chosen expert's weights are dequantized once per
    call and applied to all its tokens in one matmul; experts nobody chose are never read.
    Experts are visited in ascending order and their outputs accumulated with index_add,
    as transformers does.
    """
    linear_ = linear if linear_fn is None else linear_fn
    out = torch.zeros_like(x)
    n_ff = down.shape[-1]
    for expert in torch.unique(expert_ids).tolist():
        token_idx, slot = torch.nonzero(expert_ids == expert, as_tuple=True)
        xe = x[token_idx]
        if up is None:
            h = linear_(xe, gate.select(expert))
            g, u = h[:, :n_ff], h[:, n_ff:]
        else:
            g, u = linear_(xe, gate.select(expert)), linear_(xe, up.select(expert))
        h = linear_(gelu_mul(g, u), down.select(expert)) * expert_weights[token_idx, slot, None]
        out.index_add_(0, token_idx, h)
    return out


def kv_encode(codec, x: torch.Tensor) -> torch.Tensor:
    """KV cache rows [..., d] -> bytes, by the codec's PyTorch reference (turbollm.kv.codecs)."""
    return codec.encode(x)


def kv_decode(codec, raw: torch.Tensor, d: int) -> torch.Tensor:
    return codec.decode(raw, d)


class ReferenceBackend:
    """The reference backend (see turbollm.kernels.backend): exact float32, any device."""

    name = "reference"

    def __init__(self):
        self.threads = torch.get_num_threads()

    def set_threads(self, n: int | None = None) -> int:
        """torch's own pool computes everything here."""
        self.threads = n or os.cpu_count() or 1
        torch.set_num_threads(self.threads)
        return self.threads

    linear = staticmethod(linear)
    linear_many = staticmethod(linear_many)
    rms_norm = staticmethod(rms_norm)
    embedding = staticmethod(embedding)
    moe_ffn = staticmethod(moe_ffn)
    gelu_mul = staticmethod(gelu_mul)
    attention = staticmethod(attention)
    kv_encode = staticmethod(kv_encode)
    kv_decode = staticmethod(kv_decode)

    def attend(self, q, slots, positions, scale, window=0, softcap=0.0):
        return blocks.attend(self, q, slots, positions, scale, window, softcap)

    def attention_block(self, x, b, rope, slots, positions):
        return blocks.attention_block(self, x, b, rope, slots, positions)

    def ffn_block(self, h, b, residual=None):
        return blocks.ffn_block(self, h, b, residual)

    def moe_block(self, h, b):
        return blocks.moe_block(self, h, b)
