"""The native CPU kernels, loaded with ctypes and called on the data pointers of torch CPU
tensors. The C is in csrc/: portable code (public API tl.h), with the AVX2 and AVX-512 VNNI
versions in csrc/arch/x86/; setup.py builds it into _tlnative beside this file.

`available()` says whether the library loaded; `simd_level()` which code path the CPU got
(SIMD_NAMES: 0 portable C, 1 AVX2+FMA+F16C, 2 that plus AVX-512 VNNI). The functions here take the same arguments as the
reference kernels and compute the same products, except that decode-sized products
quantize the activations to 8-bit blocks first, as ggml does.

Set TURBOLLM_SIMD=N to cap the level (0: the portable path, for testing it on a SIMD machine).

At load every ctypes Structure passed to C is checked against its C struct (size, and each
field's name, offset and size, as csrc/abi.c reports them): on a mismatch, or a library that
lacks a function, nothing is loaded, `available()` is false and `load_error()` says why.
"""

from __future__ import annotations

import ctypes
import os
import sysconfig
from itertools import zip_longest
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as QType
from gguf import quants as gguf_quants

from turbollm.kernels.qtensor import QTensor

_lib: ctypes.CDLL | None = None
_load_error: str | None = None
_simd_level = 0

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_SIGNATURES = {
    "tl_init": (ctypes.c_int, [_P, _P, ctypes.c_int]),
    "tl_cpu_features": (ctypes.c_int, []),
    "tl_simd_level": (ctypes.c_int, []),
    "tl_supports": (ctypes.c_int, [ctypes.c_int]),
    "tl_set_num_threads": (None, [ctypes.c_int]),
    "tl_get_num_threads": (ctypes.c_int, []),
    "tl_rest": (None, []),
    "tl_matmul": (ctypes.c_int, [ctypes.c_int, _P, _I64, _I64, _I64, _P, _I64, _P]),
    "tl_matmul_id": (ctypes.c_int, [ctypes.c_int, _P, _I64, _I64, _I64, _I64, _P, _I64, _I64, _P, ctypes.c_int, _P]),
    "tl_matmul_multi": (ctypes.c_int, [ctypes.c_int, _P, _P, _P, _P, _I64, _P, _I64, _P]),
    "tl_moe_block": (ctypes.c_int, [ctypes.c_void_p, _P, _I64, _P]),
    "tl_dequantize": (ctypes.c_int, [ctypes.c_int, _P, _I64, _I64, _I64, _P, ctypes.c_int]),
    "tl_attention_block": (ctypes.c_int, [_P, _P, _I64, _P, _P, _P, _P, _P, _P, _P, _I64, _P, _P, _P, _I64,
                                          ctypes.c_int, _P, _P, _P, _P]),
    "tl_kv_encode": (ctypes.c_int, [_P, _P, _I64, _I64, _P]),
    "tl_attention_kv": (ctypes.c_int, [_P, _P, _I64, _I64, _I64, _I64, _P, _P, _P, _P, _P, ctypes.c_int,
                                       ctypes.c_float, _I64, ctypes.c_float, _P]),
    "tl_kv_decode": (ctypes.c_int, [_P, _P, _I64, _I64, ctypes.c_int, _P]),
    "tl_ffn_block": (ctypes.c_int, [_P, _P, _I64, _P, _P]),
    "tl_rms_norm": (None, [_P, _P, _P, _I64, _I64, ctypes.c_float]),
    "tl_gelu_mul": (None, [_P, _P, _P, _I64]),
    "tl_attention": (ctypes.c_int, [_P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, _I64,
                                    ctypes.c_float, _I64, ctypes.c_float, _P]),
    "tl_quantize_activations": (ctypes.c_int, [ctypes.c_int, _P, _I64, _I64, _P]),
    "tl_struct_size": (_I64, [ctypes.c_char_p]),
    "tl_struct_field": (ctypes.c_char_p, [ctypes.c_char_p, ctypes.c_int, ctypes.POINTER(_I64), ctypes.POINTER(_I64)]),
}

class _Weight(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("data", ctypes.c_void_p), ("row_bytes", ctypes.c_int64),
                ("n_rows", ctypes.c_int64), ("n_cols", ctypes.c_int64)]


class _AttnDesc(ctypes.Structure):
    _fields_ = [("wq", _Weight), ("wk", _Weight), ("wv", _Weight), ("wo", _Weight),
                ("norm", ctypes.c_void_p), ("q_norm", ctypes.c_void_p), ("k_norm", ctypes.c_void_p),
                ("post_norm", ctypes.c_void_p), ("n_embd", ctypes.c_int64), ("n_head", ctypes.c_int64),
                ("n_kv", ctypes.c_int64), ("head_dim", ctypes.c_int64), ("v_norm", ctypes.c_int),
                ("scale", ctypes.c_float), ("eps", ctypes.c_float), ("softcap", ctypes.c_float),
                ("window", ctypes.c_int64)]


class _FfnDesc(ctypes.Structure):
    _fields_ = [("gate", _Weight), ("up", _Weight), ("down", _Weight), ("norm", ctypes.c_void_p),
                ("post_norm", ctypes.c_void_p), ("n_embd", ctypes.c_int64), ("eps", ctypes.c_float)]


class _MoeDesc(ctypes.Structure):
    _fields_ = [("router", ctypes.c_void_p), ("router_scale", ctypes.c_void_p), ("expert_scale", ctypes.c_void_p),
                ("pre_norm", ctypes.c_void_p), ("post_norm", ctypes.c_void_p),
                ("gate", _Weight), ("up", _Weight), ("down", _Weight),
                ("gate_expert_bytes", ctypes.c_int64), ("up_expert_bytes", ctypes.c_int64),
                ("down_expert_bytes", ctypes.c_int64), ("n_embd", ctypes.c_int64), ("n_ff", ctypes.c_int64),
                ("n_expert", ctypes.c_int64), ("n_used", ctypes.c_int64), ("eps", ctypes.c_float)]


class _KVCodec(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("bits", ctypes.c_int), ("block", ctypes.c_int),
                ("codebook", ctypes.c_void_p), ("signs", ctypes.c_void_p), ("keep_length", ctypes.c_int)]


class _KeyCond(ctypes.Structure):
    _fields_ = [("offset", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("rot_offset", ctypes.c_void_p),
                ("rope_freq", ctypes.c_void_p)]


def _key_cond(slots) -> ctypes.Structure | None:
    """The C view of a layer's key conditioning (kv.cache.KVSlots; None for float keys)."""
    if slots.k_offset is None:
        return None
    if slots.rope_freq is not None and slots.rope_freq.dtype != torch.float64:
        raise ValueError("RoPE frequencies of the key conditioning must be float64")
    return ctypes.byref(_KeyCond(_ptr(slots.k_offset), _ptr(slots.k_scale), _ptr(slots.k_rot_offset),
                                 _tensor_ptr(slots.rope_freq)))


class _KVSegment(ctypes.Structure):
    _fields_ = [("k", ctypes.c_void_p), ("v", ctypes.c_void_p), ("pos", ctypes.c_void_p), ("n", ctypes.c_int64)]


class _KVExact(ctypes.Structure):
    _fields_ = [("segs", _KVSegment * 2), ("n_segs", ctypes.c_int), ("sink", ctypes.c_int64),
                ("recent", ctypes.c_int64), ("exact_from", ctypes.c_int64)]


def _kv_exact(segments: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], split,
              into: _KVExact | None = None) -> _KVExact | None:
    """The C view of an exact window: up to two segments of f16 rows (k, v, positions) and the
    split (kernels.attention.ExactSplit) that says which keys a query reads from them; written
    into `into` when given (decode reuses one per layer: building a ctypes structure costs more
    than the step's f16 rows)."""
    if split is None:
        return None
    if len(segments) > 2:
        raise ValueError(f"the exact window has at most 2 segments of f16 rows, not {len(segments)}")
    x = into if into is not None else _KVExact()
    for seg, (k, v, p) in zip(x.segs, segments):
        seg.k, seg.v, seg.pos, seg.n = k.data_ptr(), v.data_ptr(), p.data_ptr(), p.shape[0]
    x.n_segs, x.sink, x.recent, x.exact_from = len(segments), split.sink, split.recent, split.exact_from
    return x


_exact_views: dict[int, _KVExact] = {}  # one per layer's exact rows, by their address

# every Structure passed to C, by the name of its C struct (csrc/tl.h): checked at load
_STRUCTS: dict[str, type[ctypes.Structure]] = {
    "tl_weight": _Weight, "tl_attn_desc": _AttnDesc, "tl_ffn_desc": _FfnDesc, "tl_moe_desc": _MoeDesc,
    "tl_kv_codec": _KVCodec, "tl_key_cond": _KeyCond, "tl_kv_segment": _KVSegment, "tl_kv_exact": _KVExact,
}


def _c_layout(lib: ctypes.CDLL, c_name: str) -> tuple[int, list[tuple[str, int, int]]]:
    """sizeof(c_name) as compiled (-1: the library has no such struct) and its fields in order:
    (name, offset, size)."""
    name = c_name.encode()
    fields: list[tuple[str, int, int]] = []
    offset, size = _I64(), _I64()
    while (field := lib.tl_struct_field(name, len(fields), ctypes.byref(offset), ctypes.byref(size))) is not None:
        fields.append((field.decode(), offset.value, size.value))
    return lib.tl_struct_size(name), fields


def _struct_mismatch(c_name: str, cls: type[ctypes.Structure], lib: ctypes.CDLL | None = None) -> str | None:
    """None when ctypes Structure `cls` has the layout of C struct `c_name` in the library (its
    size, and every field's name, offset and size, in order); else one line saying where not."""
    c_size, c_fields = _c_layout(_lib if lib is None else lib, c_name)
    if c_size < 0:
        return f"the library has no struct {c_name} (the binding's {cls.__name__})"
    py_size = ctypes.sizeof(cls)
    if c_size != py_size:
        return f"struct {c_name} is {c_size} bytes in C but {py_size} in the binding's {cls.__name__}"
    py_fields = [(f[0], getattr(cls, f[0]).offset, getattr(cls, f[0]).size) for f in cls._fields_]

    def describe(f: tuple[str, int, int] | None) -> str:
        return "nothing" if f is None else f"{f[0]} at offset {f[1]} ({f[2]} bytes)"

    for i, (c, p) in enumerate(zip_longest(c_fields, py_fields)):
        if c != p:
            return (f"struct {c_name} field {i}: C has {describe(c)}, the binding's {cls.__name__} "
                    f"has {describe(p)}")
    return None


def _check_structs(lib: ctypes.CDLL, structs: dict[str, type[ctypes.Structure]] | None = None) -> str | None:
    """The first mismatch between the binding's Structures (_STRUCTS) and the library's structs."""
    for c_name, cls in (_STRUCTS if structs is None else structs).items():
        if (mismatch := _struct_mismatch(c_name, cls, lib)) is not None:
            return mismatch
    return None


# KV cache codec names (turbollm.kv.codecs) -> the library's type ids; TurboQuant is 100
_KV_TYPES = {"f32": 0, "f16": 1, "bf16": 30, "q8_0": 8, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "iq4_nl": 20,
             "turbo2": 100, "turbo3": 100, "turbo4": 100}
_kv_codecs: dict = {}


def kv_codec(codec) -> _KVCodec:
    """The C view of a kv.codecs.Codec (built once per codec; its tables stay referenced)."""
    desc = _kv_codecs.get(codec)
    if desc is None:
        if codec.is_turbo:
            q = codec.quantizer
            tables = (q.codebook.contiguous(), q.signs.contiguous())
            desc = _KVCodec(100, q.bits, q.block, tables[0].data_ptr(), tables[1].data_ptr(), int(codec.keep_length))
            desc._tables = tables
        else:
            desc = _KVCodec(_KV_TYPES[codec.name], 0, 0, None, None, 0)
        _kv_codecs[codec] = desc
    return desc


def kv_encode(codec, x: torch.Tensor) -> torch.Tensor:
    """As codec.encode: [..., d] float32 -> [..., row_bytes] uint8."""
    d = x.shape[-1]
    x = x.to(torch.float32).contiguous()
    out = torch.empty((*x.shape[:-1], codec.row_bytes(d)), dtype=torch.uint8)
    if _lib.tl_kv_encode(ctypes.byref(kv_codec(codec)), _ptr(x), x.numel() // d, d, _ptr(out)) != 0:
        raise RuntimeError(f"native KV encode failed for {codec.name} rows of {d}")
    return out


def kv_decode(codec, raw: torch.Tensor, d: int, rotated: bool = False) -> torch.Tensor:
    """As codec.decode (or codec.decode_rotated): [..., row_bytes] uint8 -> [..., d] float32."""
    raw = raw.contiguous()
    out = torch.empty((*raw.shape[:-1], d), dtype=torch.float32)
    n_rows = raw.numel() // max(1, raw.shape[-1]) if raw.numel() else 0
    if _lib.tl_kv_decode(ctypes.byref(kv_codec(codec)), _ptr(raw), n_rows, d, int(rotated), _ptr(out)) != 0:
        raise RuntimeError(f"native KV decode failed for {codec.name} rows of {d}")
    return out


def attention_coded(q: torch.Tensor, q_pos: torch.Tensor, k_codec, v_codec, n_kv: int,
                    segments: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], scale: float, window: int = 0,
                    softcap: float = 0.0, conditioning=None,
                    exact: tuple[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], object] | None = None
                    ) -> torch.Tensor:
    """Attention of q [T, H, d] over coded K/V rows: segments of (k uint8 [S, n_kv, k_row_bytes],
    v, positions int64 [S]), read in order (the cache's slots, then a step's tail). Keys coded
    with the key conditioning of `conditioning` (a kv.cache.KVSlots) when given. `exact`:
    (segments of f16 rows, kernels.attention.ExactSplit), an exact window's rows and rule."""
    n_tok, n_head, d = q.shape
    q, q_pos = q.contiguous(), q_pos.contiguous()
    segs = (_KVSegment * len(segments))(*(_KVSegment(_ptr(k), _ptr(v), _ptr(p), p.shape[0]) for k, v, p in segments))
    out = torch.empty((n_tok, n_head, d), dtype=torch.float32)
    rc = _lib.tl_attention_kv(_ptr(q), _ptr(q_pos), n_tok, n_head, n_kv, d, ctypes.byref(kv_codec(k_codec)),
                              ctypes.byref(kv_codec(v_codec)), None if conditioning is None else _key_cond(conditioning),
                              None if exact is None else ctypes.byref(_kv_exact(*exact)), segs,
                              len(segments), scale, window, softcap, _ptr(out))
    if rc != 0:
        raise RuntimeError(f"native coded attention failed ({rc}): {n_head} heads over {n_kv} KV heads of {d}")
    return out


# Keep the tables alive: the library copies them, but only at tl_init.
_TABLES: dict[str, np.ndarray] = {}


def _tables() -> tuple[np.ndarray, np.ndarray]:
    if not _TABLES:
        gguf_quants.IQ3_S.init_grid()
        _TABLES["iq3s"] = np.ascontiguousarray(gguf_quants.IQ3_S.grid.reshape(512, 4).astype(np.uint8))
        _TABLES["iq4nl"] = np.array(gguf_quants.IQ4_NL.kvalues, dtype=np.int8)
    return _TABLES["iq3s"], _TABLES["iq4nl"]


def _load() -> None:
    global _lib, _load_error
    path = Path(__file__).with_name("_tlnative" + (sysconfig.get_config_var("EXT_SUFFIX") or ".so"))
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        _load_error = f"native kernels not loaded ({path.name}: {e}); using the PyTorch reference kernels"
        return
    for name, (restype, argtypes) in _SIGNATURES.items():
        try:
            fn = getattr(lib, name)
        except AttributeError:
            _load_error = (f"native kernels not loaded ({path.name} has no {name}: built from other sources, "
                           "rebuild with `pip install -e .`); using the PyTorch reference kernels")
            return
        fn.restype, fn.argtypes = restype, argtypes
    if (mismatch := _check_structs(lib)) is not None:
        _load_error = (f"native kernels not loaded ({path.name}: {mismatch}; the binding and csrc/tl.h disagree); "
                       "using the PyTorch reference kernels")
        return
    _lib = lib
    set_simd(int(os.environ.get("TURBOLLM_SIMD", len(SIMD_NAMES) - 1)))
    lib.tl_set_num_threads(torch.get_num_threads())


SIMD_NAMES = ("portable C", "AVX2", "AVX2 + AVX-512 VNNI")


def set_simd(max_level: int) -> int:
    """(Re)initialise with the best code path the CPU has up to `max_level` (an index into
    SIMD_NAMES; 0 forces the portable path); returns the level in use."""
    global _simd_level
    grid, kvalues = _tables()
    _simd_level = _lib.tl_init(grid.ctypes.data, kvalues.ctypes.data, int(max_level))
    return _simd_level


def available() -> bool:
    return _lib is not None


def load_error() -> str | None:
    return _load_error


def simd_level() -> int:
    return _simd_level


def cpu_features() -> dict[str, bool]:
    bits = _lib.tl_cpu_features() if _lib else 0
    names = ["avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vnni", "avx512vl", "avx512bf16", "amx_bf16"]
    return {name: bool(bits >> i & 1) for i, name in enumerate(names)}


def set_num_threads(n: int) -> None:
    if _lib is not None:
        _lib.tl_set_num_threads(int(n))


def num_threads() -> int:
    return _lib.tl_get_num_threads() if _lib is not None else 1


def rest() -> None:
    """Let the kernel threads sleep now (before torch runs a large multithreaded op)."""
    if _lib is not None:
        _lib.tl_rest()


def supports(qtype: QType) -> bool:
    return _lib is not None and bool(_lib.tl_supports(int(qtype)))


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def _check(rc: int, what: str, w: QTensor) -> None:
    if rc != 0:
        reason = {-1: "type not supported", -2: "bad shape", -3: "out of memory"}.get(rc, f"error {rc}")
        raise RuntimeError(f"native {what} failed for '{w.name}' ({w.qtype.name} {w.shape}): {reason}")


def matmul(x: torch.Tensor, w: QTensor) -> torch.Tensor:
    """x [T, n_in] float32 contiguous -> x @ w.T [T, n_out], activations quantized to 8 bits."""
    n_out, n_in = w.shape
    y = torch.empty((x.shape[0], n_out), dtype=torch.float32)
    rc = _lib.tl_matmul(int(w.qtype), _ptr(w.data), w.data.shape[-1], n_out, n_in, _ptr(x), x.shape[0], _ptr(y))
    _check(rc, "matmul", w)
    return y


def matmul_many(x: torch.Tensor, ws: list[QTensor]) -> list[torch.Tensor]:
    """[x @ w.T for w in ws] in one call: x quantized once per activation format, one parallel section."""
    n = len(ws)
    n_tok, n_in = x.shape
    ys = [torch.empty((n_tok, w.shape[0]), dtype=torch.float32) for w in ws]
    types = (ctypes.c_int * n)(*[int(w.qtype) for w in ws])
    ptrs = (ctypes.c_void_p * n)(*[w.data.data_ptr() for w in ws])
    row_bytes = (ctypes.c_int64 * n)(*[w.data.shape[-1] for w in ws])
    rows = (ctypes.c_int64 * n)(*[w.shape[0] for w in ws])
    outs = (ctypes.c_void_p * n)(*[y.data_ptr() for y in ys])
    rc = _lib.tl_matmul_multi(n, types, ptrs, row_bytes, rows, n_in, _ptr(x), n_tok, outs)
    _check(rc, "matmul", ws[0])
    return ys


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Over the last dimension; x float32 contiguous."""
    y = torch.empty_like(x)
    dim = x.shape[-1]
    _lib.tl_rms_norm(_ptr(x), _ptr(weight) if weight is not None else None, _ptr(y), x.numel() // dim, dim, eps)
    return y


def gelu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """gelu(g) * u as the fused FFN and MoE blocks compute it: ggml's fp16-table GELU (csrc/ops.c);
    float32 contiguous, same shape."""
    out = torch.empty_like(g)
    _lib.tl_gelu_mul(_ptr(g), _ptr(u), _ptr(out), g.numel())
    return out


def gelu_table() -> np.ndarray:
    """The GELU table as fp16 bits [65536] uint16 (entry i: gelu of the fp16 value with bits i)."""
    table = np.ctypeslib.as_array((ctypes.c_float * 65536).in_dll(_lib, "tl_gelu_table"))
    return table.astype(np.float16).view(np.uint16)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
              scale: float, window: int, softcap: float) -> torch.Tensor:
    """As kernels.attention.attention; all float32/int64 CPU tensors, contiguous."""
    n_tok, n_head, d = q.shape
    n_keys, n_kv, dv = v.shape
    out = torch.empty((n_tok, n_head, dv), dtype=torch.float32)
    rc = _lib.tl_attention(_ptr(q), _ptr(k), _ptr(v), _ptr(q_pos), _ptr(k_pos), n_tok, n_head, n_kv, d, dv,
                           n_keys, scale, window, softcap, _ptr(out))
    if rc != 0:
        raise RuntimeError(f"native attention failed ({rc}): {n_head} heads over {n_kv} KV heads")
    return out


def matmul_id(x: torch.Tensor, w: QTensor, ids: torch.Tensor, x_per_slot: bool) -> torch.Tensor:
    """Stacked experts w (E, n_out, n_in); ids [T, k] int32. Returns [T, k, n_out]: for every
    (token, slot), expert ids[t, slot] applied to x[t] (or to x[t, slot] when x_per_slot)."""
    n_expert, n_out, n_in = w.shape
    n_tok, n_slot = ids.shape
    y = torch.empty((n_tok, n_slot, n_out), dtype=torch.float32)
    expert_bytes = w.data[0].numel()
    rc = _lib.tl_matmul_id(int(w.qtype), _ptr(w.data), expert_bytes, w.data.shape[-1], n_out, n_in,
                           _ptr(ids), n_tok, n_slot, _ptr(x), int(x_per_slot), _ptr(y))
    _check(rc, "expert matmul", w)
    return y


def _weight(w: QTensor | None) -> _Weight:
    if w is None:
        return _Weight(0, None, 0, 0, 0)
    return _Weight(int(w.qtype), w.data.data_ptr(), w.data.shape[-1], w.shape[0], w.shape[-1])


def _tensor_ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def attention_desc(b) -> _AttnDesc:
    """The C descriptor of a kernels.blocks.AttentionBlock (weights are referenced, not copied)."""
    return _AttnDesc(_weight(b.wq), _weight(b.wk), _weight(b.wv), _weight(b.wo), _tensor_ptr(b.norm),
                     _tensor_ptr(b.q_norm), _tensor_ptr(b.k_norm), _tensor_ptr(b.post_norm), b.norm.shape[0],
                     b.n_head, b.n_kv, b.head_dim, int(b.v_norm), b.scale, b.eps, b.softcap, b.window)


def ffn_desc(b) -> _FfnDesc:
    return _FfnDesc(_weight(b.gate), _weight(b.up), _weight(b.down), _tensor_ptr(b.norm), _tensor_ptr(b.post_norm),
                    b.norm.shape[0], b.eps)


def moe_desc(b) -> _MoeDesc:
    """The C view of a kernels.blocks.MoEBlock (the tensors stay owned by the block)."""
    def expert_bytes(w: QTensor | None) -> int:
        return 0 if w is None else w.data.stride(0)

    def one_expert(w: QTensor | None) -> _Weight:
        return _weight(None if w is None else w.select(0))

    n_expert, n_embd, n_ff = b.down.shape
    return _MoeDesc(_ptr(b.router.data), _tensor_ptr(b.router_scale), _tensor_ptr(b.expert_scale),
                    _tensor_ptr(b.pre_norm), _tensor_ptr(b.post_norm), one_expert(b.gate), one_expert(b.up),
                    one_expert(b.down), expert_bytes(b.gate), expert_bytes(b.up), expert_bytes(b.down),
                    n_embd, n_ff, n_expert, b.n_used, b.eps)


def moe_block(desc: _MoeDesc, h: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(h)
    rc = _lib.tl_moe_block(ctypes.byref(desc), _ptr(h), h.shape[0], _ptr(out))
    if rc != 0:
        raise RuntimeError(f"native MoE block failed ({rc})")
    return out


def attention_block(desc: _AttnDesc, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots,
                    positions: torch.Tensor) -> torch.Tensor:
    """One decode-sized step of an attention sub-layer over a coded KV cache (kv.cache.KVSlots):
    the new K/V are encoded into the slots' tail (when the layer stores), attention reads the
    committed slots and the tail (and the f16 rows of an exact window, kv/plan.py)."""
    out = torch.empty_like(x)
    plan = slots.plan
    exact = None
    if slots.exact_k is not None:
        view = _exact_views.get(slots.exact_k.data_ptr())
        if view is None:
            if len(_exact_views) > 4096:  # caches come and go; a stale view is only rewritten
                _exact_views.clear()
            view = _exact_views[slots.exact_k.data_ptr()] = _KVExact()
        exact = ctypes.byref(_kv_exact([(slots.exact_k, slots.exact_v, slots.exact_positions),
                                        (slots.tail_exact_k, slots.tail_exact_v, slots.tail_positions)],
                                       slots.split, view))
    rc = _lib.tl_attention_block(ctypes.byref(desc), _ptr(x), x.shape[0], _ptr(cos), _ptr(sin),
                                 ctypes.byref(kv_codec(plan.k)), ctypes.byref(kv_codec(plan.v)), _ptr(slots.k),
                                 _ptr(slots.v), _ptr(slots.positions), slots.n_keys, _ptr(slots.tail_k),
                                 _ptr(slots.tail_v), _ptr(slots.tail_positions), slots.tail_k.shape[0], int(slots.store),
                                 _key_cond(slots), exact, _ptr(positions), _ptr(out))
    if rc != 0:
        raise RuntimeError(f"native attention block failed ({rc})")
    return out


def ffn_block(desc: _FfnDesc, h: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    out = torch.empty_like(h)
    rc = _lib.tl_ffn_block(ctypes.byref(desc), _ptr(h), h.shape[0], _tensor_ptr(residual), _ptr(out))
    if rc != 0:
        raise RuntimeError(f"native FFN block failed ({rc})")
    return out


def dequantize(w: QTensor, rows: slice | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows of a 2-D weight as float32 (bit-exact with the reference dequantizer) or bfloat16
    (that, rounded to nearest even as `.to(torch.bfloat16)` rounds)."""
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"native dequantize writes float32 or bfloat16, not {dtype}")
    data = w.data if rows is None else w.data[rows]
    n_rows, n_in = data.shape[0], w.shape[-1]
    y = torch.empty((n_rows, n_in), dtype=dtype)
    rc = _lib.tl_dequantize(int(w.qtype), _ptr(data), data.shape[-1], n_rows, n_in, _ptr(y), int(dtype == torch.bfloat16))
    _check(rc, "dequantize", w)
    return y


_load()
