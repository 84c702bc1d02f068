"""Reference kernels in plain PyTorch: dequantize, then compute in float32.

These define what every fast kernel must compute, and they run on any torch device. They are
exact float math on the dequantized weights, which is what transformers computes on a GGUF's
dequantized tensors (the `hf*` oracles in ../shared/reference).

Big weights are dequantized in row chunks so that no full-precision copy of a large tensor
(a 262,144-row embedding is 670 MB in float32) is ever held at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from turbollm.kernels.qtensor import QTensor

# Dequantize at most this many weight elements at a time: 4 MB of float32 stays in cache and
# under malloc's mmap threshold (measured on the 262,144 x 640 LM head: 0.08 s vs 0.59 s at 64 MB).
_CHUNK_ELEMENTS = 1024 * 1024


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


def embedding(ids: torch.Tensor, w: QTensor) -> torch.Tensor:
    """Rows `ids` of w (n_rows, n_cols) as float32 [*ids.shape, n_cols]."""
    flat = ids.reshape(-1)
    return w.dequantize_rows(flat).view(*ids.shape, w.shape[-1])
