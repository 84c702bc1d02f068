"""Row-wise and element-wise ops in one launch each: RMS norm and the GELU gate.

On a GPU a decode step is many small ops, and PyTorch's RMS norm is five launches (square,
mean, add, rsqrt, two products) where this is one; the GELU gate two where this is one. The
maths is the reference's (kernels/reference.py): x * rsqrt(mean(x^2) + eps) [* weight], and
gelu_tanh(g) * u with tanh written from exp (Triton has no tanh on every target), which
rounds differently by ~1e-7.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from turbollm.kernels.triton import interpreted


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, n_rows, n, eps, HAS_WEIGHT: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK)
    mask = (r < n_rows)[:, None] & (c < n)[None, :]
    at = r.to(tl.int64)[:, None] * n + c[None, :]
    x = tl.load(x_ptr + at, mask=mask, other=0.0)
    y = x * (1.0 / tl.sqrt(tl.sum(x * x, axis=1) / n + eps))[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(w_ptr + c, mask=c < n, other=0.0)[None, :]
    tl.store(out_ptr + at, y, mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x [..., n] float32 -> the same shape, normed over the last dimension."""
    n = x.shape[-1]
    x2 = x.reshape(-1, n).contiguous()
    out = torch.empty_like(x2)
    rows = x2.shape[0]
    if rows:
        block = triton.next_power_of_2(n)
        block_r = max(1, min(triton.next_power_of_2(rows), (1 << 16 if interpreted() else 4096) // block))
        _rms_norm_kernel[(triton.cdiv(rows, block_r),)](
            x2, x2 if weight is None else weight.contiguous(), out, rows, n, eps,
            HAS_WEIGHT=weight is not None, BLOCK_R=block_r, BLOCK=block)
    return out.view(x.shape)


@triton.jit
def _gelu_mul_kernel(g_ptr, u_ptr, out_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    g = tl.load(g_ptr + i, mask=mask, other=0.0)
    u = tl.load(u_ptr + i, mask=mask, other=0.0)
    inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)  # sqrt(2 / pi) (g + 0.044715 g^3)
    inner = tl.minimum(tl.maximum(inner, -15.0), 15.0)  # tanh is +-1 in float32 beyond: no exp overflow
    tanh = 1.0 - 2.0 / (tl.exp(2.0 * inner) + 1.0)
    tl.store(out_ptr + i, 0.5 * g * (1.0 + tanh) * u, mask=mask)


def gelu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(g) * u for float32 tensors of one shape (u may broadcast: it is expanded)."""
    g2 = g.contiguous()
    u2 = u.expand_as(g).contiguous()
    out = torch.empty_like(g2)
    n = g2.numel()
    if n:
        block = min(1 << 16 if interpreted() else 1024, triton.next_power_of_2(n))
        _gelu_mul_kernel[(triton.cdiv(n, block),)](g2, u2, out, n, BLOCK=block)
    return out
