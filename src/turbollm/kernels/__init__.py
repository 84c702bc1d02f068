"""Compute kernels behind one API, in three backends.

A backend offers `linear`, `linear_many`, `embedding`, `moe_ffn`, `rms_norm`, `attention`, and
the sub-layer blocks `attention_block` and `ffn_block` (blocks.py), taking activations as torch
tensors and weights as `QTensor`s:

- `reference` (reference.py, attention.py): dequantize, then float32 maths in plain PyTorch,
  on any device. Exact: what the transformers oracles compute on the same weights.
- `fast` (fast.py): native CPU kernels (native/csrc/*.c via native/__init__.py) where they apply, the
  reference elsewhere. Decode quantizes activations to 8 bits, as llama.cpp does.
- `triton` (triton/): Triton kernels on a CUDA or ROCm device (on CPU tensors in Triton's
  interpreter only) where they apply, the reference elsewhere.

`backend("auto", device)` is `triton` on an accelerator when Triton imports (else the
reference there), and on the CPU `fast` when the native library loaded, else `reference`.
Kernels know nothing of models.
"""

from __future__ import annotations

import os

import torch

from turbollm.kernels import blocks, fast, native, reference
from turbollm.kernels.attention import attention
from turbollm.kernels.qtensor import QTensor
from turbollm.kernels.reference import embedding, linear, moe_ffn

BACKENDS = ("auto", "fast", "reference", "triton")

__all__ = ["BACKENDS", "QTensor", "attention", "backend", "embedding", "linear", "moe_ffn"]


def backend(name: str = "auto", device: str = "cpu") -> type:
    """The kernel set to compute with on `device`: "auto", "fast", "reference" or "triton"."""
    from turbollm.kernels import triton as triton_backend
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r} (choose from {', '.join(BACKENDS)})")
    on_cpu = torch.device(device).type == "cpu"
    if name == "triton" or (name == "auto" and not on_cpu and triton_backend.available()[0]):
        ok, why = triton_backend.available()
        if not ok:
            raise ValueError(why)
        if on_cpu and not triton_backend.runs_on(torch.device("cpu")):
            raise ValueError("the triton backend runs on a CUDA/ROCm device (--device cuda:N); "
                             "on the CPU only in Triton's interpreter (TRITON_INTERPRET=1, for tests)")
        return triton_backend.Ops
    if name == "reference" or (name == "auto" and (not on_cpu or not native.available())):
        return reference.Ops
    if name == "fast" and not native.available():
        raise ValueError(native.load_error() or "native kernels are not available")
    return fast.Ops


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
