"""Compute kernels behind one API, in two backends.

A backend offers `linear`, `linear_many`, `embedding`, `moe_ffn`, `rms_norm` and `attention`,
taking activations as torch tensors and weights as `QTensor`s:

- `reference` (reference.py, attention.py): dequantize, then float32 maths in plain PyTorch,
  on any device. Exact: what the transformers oracles compute on the same weights.
- `fast` (fast.py): native CPU kernels (native/*.c via native.py) where they apply, the
  reference elsewhere. Decode quantizes activations to 8 bits, as llama.cpp does.

`backend("auto")` is `fast` when the native library loaded, else `reference`. Kernels know
nothing of models.
"""

from __future__ import annotations

import os

import torch

from turbollm.kernels import fast, native, reference
from turbollm.kernels.attention import attention
from turbollm.kernels.qtensor import QTensor
from turbollm.kernels.reference import embedding, linear, moe_ffn

BACKENDS = ("auto", "fast", "reference")

__all__ = ["BACKENDS", "QTensor", "attention", "backend", "embedding", "linear", "moe_ffn"]


class _Reference:
    name = "reference"
    linear = staticmethod(reference.linear)
    linear_many = staticmethod(reference.linear_many)
    rms_norm = staticmethod(reference.rms_norm)
    embedding = staticmethod(reference.embedding)
    moe_ffn = staticmethod(reference.moe_ffn)
    attention = staticmethod(attention)


class _Fast:
    name = "fast"
    linear = staticmethod(fast.linear)
    linear_many = staticmethod(fast.linear_many)
    rms_norm = staticmethod(fast.rms_norm)
    embedding = staticmethod(fast.embedding)
    moe_ffn = staticmethod(fast.moe_ffn)
    attention = staticmethod(fast.attention)


def backend(name: str = "auto") -> type:
    """The kernel set to compute with: "auto", "fast" or "reference"."""
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r} (choose from {', '.join(BACKENDS)})")
    if name == "reference" or (name == "auto" and not native.available()):
        return _Reference
    if name == "fast" and not native.available():
        raise ValueError(native.load_error() or "native kernels are not available")
    return _Fast


def use_threads(ops: type, n: int | None = None) -> int:
    """Give the CPU threads to the backend that computes: the native pool for `fast` (torch
    then runs single-threaded: two pools spinning on the same cores slow each other down
    several-fold), torch's own pool for `reference`. Returns the thread count in use."""
    n = n or os.cpu_count() or 1
    if ops.name == "fast":
        native.set_num_threads(n)
        torch.set_num_threads(1)
    else:
        torch.set_num_threads(n)
    return n
