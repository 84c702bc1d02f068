"""The Triton backend: GPU kernels (kernels/triton/*.py) where they apply, the reference elsewhere.

What runs in Triton today: the quantized linear (quantized_linear.py), for every projection, expert
and the LM head whose type it reads (quantized_linear.SUPPORTED), weights left in their GGUF blocks;
attention over the KV cache, reading every cache type where it is stored (attention.py); the MoE
experts, one launch per projection for all of a step's experts (moe_ffn).
RMS norms and the GELU gate in one launch each (elementwise.py). Everything else (RoPE, the MoE router, the KV rows' encoding, other weight types)
is still the reference's PyTorch, on the same device. Triton compiles for CUDA and ROCm; on
CPU tensors it runs only in its interpreter (TRITON_INTERPRET=1), which is how CI tests it.

The backend's `precision`: "ieee" multiplies in float32 (the reference's maths, what the tests
hold), "tf32" lets a GPU's tensor cores round the inputs to TF32 (kernels/triton/quantized_linear.py).
"""

from __future__ import annotations

import importlib
import os

import torch

from turbollm.kernels import reference
from turbollm.kernels.qtensor import QTensor

def available() -> tuple[bool, str]:
    """Whether Triton imports, and if not, why (one line)."""
    try:
        importlib.import_module("triton")
    except ImportError as e:
        return False, f"the triton backend needs Triton: pip install 'turbollm[gpu]' ({e})"
    return True, ""


def interpreted() -> bool:
    """Whether Triton runs in its interpreter (TRITON_INTERPRET=1: CPU tensors, numpy per program)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def runs_on(device: torch.device) -> bool:
    """Triton compiles for CUDA/ROCm devices; CPU tensors only under its interpreter."""
    return device.type == "cuda" or (device.type == "cpu" and interpreted())


def linear(x: torch.Tensor, w: QTensor, precision: str = "ieee") -> torch.Tensor:
    """Triton where the device and the weight's type allow it, else the reference."""
    from turbollm.kernels.triton import quantized_linear as triton_linear
    if runs_on(x.device) and x.device == w.device and triton_linear.supports(w):
        return triton_linear.linear(x, w, precision)
    return reference.linear(x, w)


def _elementwise_ok(*ts: torch.Tensor) -> bool:
    return all(runs_on(t.device) and t.dtype == torch.float32 for t in ts)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """One launch (triton/elementwise.py) where Triton runs, else the reference."""
    from turbollm.kernels.triton import elementwise
    if _elementwise_ok(x, *([] if weight is None else [weight])):
        return elementwise.rms_norm(x, weight, eps)
    return reference.rms_norm(x, weight, eps)


def gelu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    from turbollm.kernels.triton import elementwise
    if _elementwise_ok(g, u) and g.device == u.device and torch.broadcast_shapes(g.shape, u.shape) == g.shape:
        return elementwise.gelu_mul(g, u)
    return reference.gelu_mul(g, u)


def _host_backend():
    from turbollm.kernels import fast, native
    return fast.FastBackend() if native.available() else reference.ReferenceBackend()


def moe_ffn(x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor, gate: QTensor,
            up: QTensor | None, down: QTensor, precision: str = "ieee") -> torch.Tensor:
    """reference.moe_ffn's sum over the chosen experts, in one launch per projection for all
    experts (quantized_linear.expert_linear over the pairs sorted by expert, as vLLM's
    fused_moe): gate(+up), GELU-gate, down, then each token's slots weighed and summed."""
    from turbollm.kernels.triton import quantized_linear as triton_linear
    weights = [gate, down] + ([] if up is None else [up])
    if not (runs_on(x.device) and all(w.device == x.device and triton_linear.supports_experts(w) for w in weights)):
        return reference.moe_ffn(x, expert_ids, expert_weights, gate, up, down,
                                 linear_fn=lambda a, w: linear(a, w, precision))
    n_tok, n_slot = expert_ids.shape
    rows = triton_linear.ExpertRows(expert_ids, gate.shape[0])
    n_ff = down.shape[-1]
    h = triton_linear.expert_linear(x, gate, rows, False, precision)
    if up is None:
        g, u = h[:, :n_ff], h[:, n_ff:]
    else:
        g, u = h, triton_linear.expert_linear(x, up, rows, False, precision)
    y = triton_linear.expert_linear(gelu_mul(g, u), down, rows, True, precision)
    return (y.view(n_tok, n_slot, -1) * expert_weights.to(torch.float32)[..., None]).sum(1)


class TritonBackend(reference.ReferenceBackend):
    """The triton backend (see turbollm.kernels.backend): the reference's ops, with the
    quantized products, attention and experts in Triton. `precision`: "ieee" (float32
    products) or "tf32". `device`: the accelerator it runs on; a MoE block whose experts the
    planner kept in CPU memory (--n-cpu-moe, -ot ...=cpu) runs on `host`, the native CPU
    backend (the reference where it is not built), as llama.cpp computes such experts on the
    CPU: only the block's input and output cross the bus (models/gemma.py moves them)."""

    name = "triton"

    def __init__(self, precision: str = "ieee", device: torch.device | str = "cuda", host: reference.ReferenceBackend | None = None):
        super().__init__()
        if precision not in ("ieee", "tf32"):
            raise ValueError(f"triton precision must be ieee or tf32, got {precision!r}")
        self.precision = precision
        self.device = torch.device(device)
        self.host = host if host is not None else _host_backend()

    def set_threads(self, n: int | None = None) -> int:
        """The host backend's threads (the CPU experts); the device needs none."""
        self.threads = self.host.set_threads(n)
        return self.threads

    def _on_host(self, t: torch.Tensor) -> bool:
        """A tensor in CPU memory on a run whose device is not the CPU (interpreted tests are)."""
        return t.device.type == "cpu" and self.device.type != "cpu"

    def moe_block(self, h, b):
        if self._on_host(b.down.data):
            return self.host.moe_block(h, b)
        return super().moe_block(h, b)

    def linear(self, x, w):
        return linear(x, w, self.precision)

    rms_norm = staticmethod(rms_norm)
    gelu_mul = staticmethod(gelu_mul)

    def linear_many(self, x, ws):
        return [self.linear(x, w) for w in ws]

    def attend(self, q, slots, positions, scale, window=0, softcap=0.0):
        """Over the rows where they are stored (triton/attention.py) when it reads their codecs."""
        from turbollm.kernels.triton import attention as triton_attention
        plan = slots.plan
        cache = [t for t in (slots.k, slots.tail_k, slots.exact_k) if t is not None]
        if (runs_on(q.device) and all(t.device == q.device for t in cache)
                and triton_attention.supports(plan.k, plan.head_dim) and triton_attention.supports(plan.v, plan.head_dim)):
            return triton_attention.attend(q, slots, positions, scale, window, softcap, self.precision)
        return super().attend(q, slots, positions, scale, window, softcap)

    def moe_ffn(self, x, expert_ids, expert_weights, gate, up, down):
        return moe_ffn(x, expert_ids, expert_weights, gate, up, down, self.precision)
