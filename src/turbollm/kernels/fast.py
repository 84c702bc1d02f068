"""The fast CPU backend: native kernels where they apply, the reference elsewhere.

Decode-sized products (at most DECODE_MAX_TOKENS rows) use the integer kernels: activations
quantized to 8-bit blocks, dot products against the weight blocks in place, as ggml does.
Larger products (prefill) dequantize a tile of weight rows natively (bit-exact with the
reference, or rounded to bfloat16: see resolve_prefill_precision) and use torch's GEMM, which wins there (measured: q6_K 2048 -> 640 at 512
tokens, 10.6 ms against 22.9 ms for the integer kernel; the integer kernel wins below ~64).
Anything not on the CPU, or of a type without a native kernel, goes to the reference.

Threads: the native pool owns the cores and torch runs single-threaded (two pools spinning on
the same cores slow each other several-fold). Around torch's big prefill ops the native pool
rests and torch gets the threads (`_torch_threads`): pp512 on the default model 287 -> 370 tok/s.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
import torch.nn.functional as F

import weakref

from turbollm.kernels import blocks, native, reference
from turbollm.kernels import attention as reference_attention
from turbollm.kernels.qtensor import QTensor, QType

DECODE_MAX_TOKENS = 32
_TILE_ELEMENTS = 1024 * 1024  # dequantized weight tile for prefill: 4 MB of float32
PREFILL_PRECISIONS = ("auto", "fp32", "bf16")


def resolve_prefill_precision(name: str = "auto") -> str:
    """The float type of the prefill GEMMs: "fp32" (bit-exact tiles, the reference's maths),
    "bf16" (tiles and activations rounded to bfloat16, float32 accumulation: 3x the GEMM
    throughput where the CPU has AVX512-BF16 or AMX, measured 134 -> 394 GFLOP/s here), or
    "auto" (bf16 on such CPUs, fp32 elsewhere, where bf16 GEMMs are emulated and slow)."""
    if name not in PREFILL_PRECISIONS:
        raise ValueError(f"unknown prefill precision {name!r} (choose from {', '.join(PREFILL_PRECISIONS)})")
    if name == "auto":
        features = native.cpu_features()
        name = "bf16" if features.get("avx512bf16") or features.get("amx_bf16") else "fp32"
    return name


embedding = reference.embedding
__all__ = ["attention", "attention_block", "embedding", "ffn_block", "linear", "linear_many", "moe_block", "moe_ffn",
           "rms_norm"]


@contextmanager
def _torch_threads():
    """Lend the cores to torch for one large op, then take them back."""
    native.rest()
    torch.set_num_threads(native.num_threads())
    try:
        yield
    finally:
        torch.set_num_threads(1)


def _native_ok(x: torch.Tensor, w: QTensor) -> bool:
    return x.device.type == "cpu" and w.device.type == "cpu" and native.supports(w.qtype)


def linear(x: torch.Tensor, w: QTensor, prefill_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x [..., n_in] @ w.T -> [..., n_out]; prefill tiles in `prefill_dtype`."""
    if not _native_ok(x, w):
        return reference.linear(x, w)
    n_out, n_in = w.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, n_in).to(torch.float32).contiguous()
    if x2.shape[0] <= DECODE_MAX_TOKENS:
        return native.matmul(x2, w).view(*lead, n_out)
    out = torch.empty((x2.shape[0], n_out), dtype=torch.float32)
    rows = max(1, _TILE_ELEMENTS // n_in)
    xp = x2.to(prefill_dtype)
    for start in range(0, n_out, rows):
        stop = min(n_out, start + rows)
        tile = native.dequantize(w, slice(start, stop), prefill_dtype)
        with _torch_threads():
            out[:, start:stop] = F.linear(xp, tile)
    return out.view(*lead, n_out)


def linear_many(x: torch.Tensor, ws: list[QTensor], prefill_dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """Projections that share an input, in one native call at decode size."""
    if x.reshape(-1, x.shape[-1]).shape[0] > DECODE_MAX_TOKENS or not all(_native_ok(x, w) for w in ws):
        return [linear(x, w, prefill_dtype) for w in ws]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).to(torch.float32).contiguous()
    return [y.view(*lead, y.shape[-1]) for y in native.matmul_many(x2, ws)]


def gelu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """gelu(g) * u [T, n]. At decode size as llama.cpp's CPU backend computes it (ggml's fp16
    table: native/csrc/ops.c), so that the decode path, which also quantizes activations as ggml
    does, gives llama.cpp's logits rather than drifting off by the table's rounding. Prefill
    rows (more than DECODE_MAX_TOKENS) take the exact function, as the prefill GEMMs are exact
    maths (fp32 tiles: within 1e-3 of transformers)."""
    rows = g.reshape(-1, g.shape[-1]).shape[0] if g.dim() else 1
    if g.device.type != "cpu" or g.dtype != torch.float32 or rows > DECODE_MAX_TOKENS:
        return reference.gelu_mul(g, u)
    g = g.contiguous()
    return native.gelu_mul(g, u.to(torch.float32).expand_as(g).contiguous())


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return reference.rms_norm(x, weight, eps)
    return native.rms_norm(x.contiguous(), weight, eps)


def attention(q, k, v, q_pos, k_pos, scale: float, window: int = 0, softcap: float = 0.0,
              split: reference_attention.ExactSplit | None = None) -> torch.Tensor:
    if q.device.type != "cpu":
        return reference_attention.attention(q, k, v, q_pos, k_pos, scale, window, softcap, split)
    # prefill: torch's batched matmuls on all cores; an exact window's split too (decode steps
    # over a quantized cache take the native block, which reads the coded rows themselves)
    if q.shape[0] > DECODE_MAX_TOKENS or split is not None:
        with _torch_threads():
            return reference_attention.attention(q, k, v, q_pos, k_pos, scale, window, softcap, split)
    return native.attention(q.contiguous(), k.contiguous(), v.contiguous(), q_pos.contiguous(), k_pos.contiguous(),
                            scale, window, softcap)


def moe_ffn(x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor,
            gate: QTensor, up: QTensor | None, down: QTensor, prefill_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """As reference.moe_ffn: every (token, slot) pair through its expert, grouped by expert in
    the kernel, so only the chosen experts' weights are read. In prefill each expert's tokens
    go through `linear` together (a dequantized tile + GEMM once an expert has more than
    DECODE_MAX_TOKENS of them, else the integer kernels four tokens at a time): synthetic
    26B-A4B pp512 16 -> 22 tok/s with bf16 prefill."""
    if not (_native_ok(x, gate) and native.supports(down.qtype) and (up is None or native.supports(up.qtype))):
        return reference.moe_ffn(x, expert_ids, expert_weights, gate, up, down)
    if x.shape[0] > DECODE_MAX_TOKENS:
        return reference.moe_ffn(x, expert_ids, expert_weights, gate, up, down,  # exact GELU
                                 linear_fn=lambda a, w: linear(a, w, prefill_dtype))
    n_tok, n_slot = expert_ids.shape
    n_ff = down.shape[-1]
    ids = expert_ids.to(torch.int32).contiguous()
    x2 = x.to(torch.float32).contiguous()
    if up is None:
        h = native.matmul_id(x2, gate, ids, x_per_slot=False)  # [T, k, 2 * n_ff]
        g, u = h[..., :n_ff], h[..., n_ff:]
    else:
        g, u = native.matmul_id(x2, gate, ids, False), native.matmul_id(x2, up, ids, False)
    h = native.gelu_mul(g.contiguous(), u.contiguous()).reshape(n_tok * n_slot, n_ff)  # decode size: the table
    out = native.matmul_id(h, down, ids, x_per_slot=True)  # [T, k, n_embd]
    return torch.einsum("tkd,tk->td", out, expert_weights.to(torch.float32))


def kv_encode(codec, x: torch.Tensor) -> torch.Tensor:
    """KV cache rows -> bytes: the native encoders (the reference's bytes, see kv.c)."""
    return native.kv_encode(codec, x) if x.device.type == "cpu" else reference.kv_encode(codec, x)


def kv_decode(codec, raw: torch.Tensor, d: int) -> torch.Tensor:
    """Bytes -> rows: the native decoders, in prefill (pp512 with a turbo3 cache: see bench)."""
    return native.kv_decode(codec, raw, d) if raw.device.type == "cpu" else reference.kv_decode(codec, raw, d)


# C descriptors of the blocks, built on first use and dropped with the block
_descs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _block_native_ok(x: torch.Tensor, weights: list[QTensor | None]) -> bool:
    return (x.shape[0] <= DECODE_MAX_TOKENS and x.device.type == "cpu" and x.dtype == torch.float32
            and all(w is None or _native_ok(x, w) for w in weights))


def attention_block(ops, x: torch.Tensor, b: blocks.AttentionBlock, rope: tuple[torch.Tensor, torch.Tensor],
                    slots: blocks.KVSlots, positions: torch.Tensor) -> torch.Tensor:
    """kernels.blocks.attention_block in one native call at decode size (else composed from `ops`)."""
    rows = (slots.k, slots.v, slots.tail_k, slots.tail_v, slots.exact_k, slots.exact_v, slots.tail_exact_k,
            slots.tail_exact_v)
    cache_ok = all(t.device.type == "cpu" and t.is_contiguous() for t in rows if t is not None)
    # a sequence's first step sets its key conditioning, in PyTorch (kv/conditioning.py)
    first = slots.store and slots.needs_conditioning
    if first or not (cache_ok and _block_native_ok(x, [b.wq, b.wk, b.wv, b.wo])):
        return blocks.attention_block(ops, x, b, rope, slots, positions)
    desc = _descs.get(b)
    if desc is None:
        desc = _descs[b] = native.attention_desc(b)
    cos, sin = rope
    return native.attention_block(desc, x.contiguous(), cos.contiguous(), sin.contiguous(), slots, positions.contiguous())


def ffn_block(ops, h: torch.Tensor, b: blocks.FfnBlock, residual: torch.Tensor | None = None) -> torch.Tensor:
    """kernels.blocks.ffn_block in one native call at decode size."""
    if not _block_native_ok(h, [b.gate, b.up, b.down]):
        return blocks.ffn_block(ops, h, b, residual)
    desc = _descs.get(b)
    if desc is None:
        desc = _descs[b] = native.ffn_desc(b)
    return native.ffn_block(desc, h.contiguous(), None if residual is None else residual.contiguous())



def moe_block(ops, h: torch.Tensor, b: blocks.MoEBlock) -> torch.Tensor:
    """kernels.blocks.moe_block in one native call at decode size (router, expert choice and
    the experts' products: 26B-A4B decode spent ~0.3 ms per layer between kernels in Python)."""
    experts = [b.gate, b.down] + ([] if b.up is None else [b.up])
    if not (_block_native_ok(h, experts) and b.router.qtype == QType.F32 and b.router.device.type == "cpu"):
        return blocks.moe_block(ops, h, b)
    desc = _descs.get(b)
    if desc is None:
        desc = _descs[b] = native.moe_desc(b)
    return native.moe_block(desc, h.contiguous())


class FastBackend:
    """The fast backend (see turbollm.kernels.backend). Its settings are its own: the prefill
    precision, and the threads (`set_threads`: the native pool, which is one per process)."""

    name = "fast"

    def __init__(self, prefill: str = "auto"):
        self.prefill = resolve_prefill_precision(prefill)  # "fp32" or "bf16"
        self.prefill_dtype = torch.bfloat16 if self.prefill == "bf16" else torch.float32
        self.threads = native.num_threads()

    def set_threads(self, n: int | None = None) -> int:
        """The native pool gets the cores; torch runs single-threaded beside it (two pools
        spinning on the same cores slow each other several-fold) except around its big ops."""
        self.threads = n or os.cpu_count() or 1
        native.set_num_threads(self.threads)
        torch.set_num_threads(1)
        return self.threads

    def linear(self, x, w):
        return linear(x, w, self.prefill_dtype)

    def linear_many(self, x, ws):
        return linear_many(x, ws, self.prefill_dtype)

    def moe_ffn(self, x, expert_ids, expert_weights, gate, up, down):
        return moe_ffn(x, expert_ids, expert_weights, gate, up, down, self.prefill_dtype)

    def attend(self, q, slots, positions, scale, window=0, softcap=0.0):
        return blocks.attend(self, q, slots, positions, scale, window, softcap)

    def attention_block(self, x, b, rope, slots, positions):
        return attention_block(self, x, b, rope, slots, positions)

    def ffn_block(self, h, b, residual=None):
        return ffn_block(self, h, b, residual)

    def moe_block(self, h, b):
        return moe_block(self, h, b)

    rms_norm = staticmethod(rms_norm)
    embedding = staticmethod(embedding)
    gelu_mul = staticmethod(gelu_mul)
    attention = staticmethod(attention)
    kv_encode = staticmethod(kv_encode)
    kv_decode = staticmethod(kv_decode)
