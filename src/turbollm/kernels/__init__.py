"""Compute kernels behind one contract (`Backend`), in three backends, used as instances.

A backend offers `linear`, `linear_many`, `embedding`, `moe_ffn`, `rms_norm`, `attention` (over
rows), `attend` (over a layer's KV slots, kernels/blocks.py), and
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

from typing import Protocol

import torch

from turbollm.kernels import fast, native, reference
from turbollm.kernels.attention import attention
from turbollm.kernels.qtensor import QTensor
from turbollm.kernels.reference import embedding, linear, moe_ffn

BACKENDS = ("auto", "fast", "reference", "triton")

__all__ = ["BACKENDS", "Backend", "QTensor", "attention", "backend", "embedding", "linear", "moe_ffn"]


class Backend(Protocol):
    """The contract every backend instance keeps (reference.ReferenceBackend,
    fast.FastBackend, triton.TritonBackend). Activations are torch tensors, weights QTensors;
    the blocks are kernels/blocks.py's, which define what each computes."""

    name: str
    threads: int

    def set_threads(self, n: int | None = None) -> int: ...
    def linear(self, x: torch.Tensor, w: QTensor) -> torch.Tensor: ...
    def linear_many(self, x: torch.Tensor, ws: list[QTensor]) -> list[torch.Tensor]: ...
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor: ...
    def embedding(self, ids: torch.Tensor, w: QTensor) -> torch.Tensor: ...
    def gelu_mul(self, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor: ...
    def moe_ffn(self, x, expert_ids, expert_weights, gate, up, down) -> torch.Tensor: ...
    def attention(self, q, k, v, q_pos, k_pos, scale, window=0, softcap=0.0, split=None) -> torch.Tensor: ...
    def attend(self, q, slots, positions, scale, window=0, softcap=0.0) -> torch.Tensor: ...
    def kv_encode(self, codec, x: torch.Tensor) -> torch.Tensor: ...
    def kv_decode(self, codec, raw: torch.Tensor, d: int) -> torch.Tensor: ...
    def attention_block(self, x, b, rope, slots, positions) -> torch.Tensor: ...
    def ffn_block(self, h, b, residual=None) -> torch.Tensor: ...
    def moe_block(self, h, b) -> torch.Tensor: ...


def backend(name: str = "auto", device: str = "cpu", *, prefill: str = "auto", threads: int | None = None) -> Backend:
    """A backend instance to compute with on `device`: "auto", "fast", "reference" or "triton",
    with its settings: the fast backend's prefill precision, and the threads it computes on."""
    from turbollm.kernels import triton as triton_backend
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r} (choose from {', '.join(BACKENDS)})")
    if threads is not None and threads <= 0:
        raise ValueError(f"--threads must be positive, got {threads}")
    on_cpu = torch.device(device).type == "cpu"
    if name == "triton" or (name == "auto" and not on_cpu and triton_backend.available()[0]):
        ok, why = triton_backend.available()
        if not ok:
            raise ValueError(why)
        if on_cpu and not triton_backend.runs_on(torch.device("cpu")):
            raise ValueError("the triton backend runs on a CUDA/ROCm device (--device cuda:N); "
                             "on the CPU only in Triton's interpreter (TRITON_INTERPRET=1, for tests)")
        ops: Backend = triton_backend.TritonBackend(device=device)
    elif name == "reference" or (name == "auto" and (not on_cpu or not native.available())):
        ops = reference.ReferenceBackend()
    elif not native.available():
        raise ValueError(native.load_error() or "native kernels are not available")
    else:
        ops = fast.FastBackend(prefill)
    ops.set_threads(threads)
    return ops
