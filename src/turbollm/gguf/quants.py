"""GGML block formats and their reference dequantizers, in plain PyTorch (any device).

Each format stores `block_size` values in `type_size` bytes. A dequantizer maps
[n_blocks, type_size] uint8 -> [n_blocks, block_size] float32 and is bit-exact with the
`gguf` package's numpy reference (`gguf.quants.dequantize`): the float operations happen in
the same order, and torch does not fuse them. Layouts are ggml's (`ggml-common.h`); the
byte offsets of each block's fields are given beside each function. The lookup tables of the
i-quants (grids, sign patterns, the non-linear 4-bit values) are data, read once from the
`gguf` package and cached per device.

What it leaves out: quantizing (the KV cache codecs have their own), and fast kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QType
from gguf import quants as gguf_quants

QK_K = 256  # super-block size of the K-quants and most i-quants


# ---- helpers -------------------------------------------------------------------------------

def _view(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bytes reinterpreted as `dtype`, without a copy where the strides allow it (a column
    slice of a block row usually does): dequantizing is memory-bound, and each copy is a pass."""
    try:
        return b.view(dtype)
    except RuntimeError:
        return b.contiguous().view(dtype)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """[..., 2k] bytes -> [..., k] float32, little-endian halves."""
    return _view(b, torch.float16).to(torch.float32)


def _i32(b: torch.Tensor) -> torch.Tensor:
    """[..., 4k] bytes -> [..., k] int32 (read as uint32 bit patterns; mask after shifting)."""
    return _view(b, torch.int32)


def _i16(b: torch.Tensor) -> torch.Tensor:
    """[..., 2k] bytes -> [..., k] int32 holding the uint16 values."""
    return _view(b, torch.int16).to(torch.int32) & 0xFFFF


def _shifts(values: list[int], device: torch.device, dtype=torch.uint8) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device)


def _nibbles(qs: torch.Tensor, group: int) -> torch.Tensor:
    """Bytes [..., m*group] -> 4-bit values [..., m, 2, group]: low nibbles of each group of
    `group` bytes first, then their high nibbles (ggml's order)."""
    q = qs.reshape(*qs.shape[:-1], -1, 1, group)
    return (q >> _shifts([0, 4], qs.device).view(2, 1)) & 0x0F


def _bits(b: torch.Tensor, n_bits: int, width: int, dtype=torch.uint8) -> torch.Tensor:
    """[..., m] integers -> [..., m, 8 // width * ...]: fields of `width` bits, lowest first."""
    shifts = _shifts(list(range(0, n_bits, width)), b.device, dtype)
    return (b.unsqueeze(-1) >> shifts) & ((1 << width) - 1)


_tables: dict[tuple[str, torch.device], torch.Tensor] = {}


def _table(name: str, device: torch.device) -> torch.Tensor:
    """Lookup tables of the i-quants, from the gguf package, cached per device."""
    key = (name, device)
    if key not in _tables:
        if name == "ksigns":
            array = np.frombuffer(gguf_quants.IQ2_XXS.ksigns, dtype=np.uint8)
        elif name == "kvalues":
            array = np.array(gguf_quants.IQ4_NL.kvalues, dtype=np.float32)
        else:  # a grid: [n_entries, entry_len] float32
            cls = getattr(gguf_quants, name)
            cls.init_grid()
            array = cls.grid.reshape(cls.grid_shape)
        _tables[key] = torch.from_numpy(np.array(array)).to(device)
    return _tables[key]


def _sign_bits(bits: torch.Tensor) -> torch.Tensor:
    """0/1 sign bits -> +1/-1 float32."""
    return torch.where(bits == 0, 1.0, -1.0).to(torch.float32)


def _ksigns(index: torch.Tensor) -> torch.Tensor:
    """7-bit sign indices -> [..., 8] +1/-1 (the 8th sign makes the parity even)."""
    signs = _table("ksigns", index.device)[index.long()]
    return _sign_bits(_bits(signs, 8, 1))


# ---- 32-element block formats --------------------------------------------------------------

def _q4_0(b: torch.Tensor) -> torch.Tensor:
    # d f16 [0:2] | 16 bytes of nibbles [2:18]
    d = _f16(b[:, :2])
    q = _nibbles(b[:, 2:], 16).reshape(-1, 32).to(torch.int8) - 8
    return d * q  # int8 * float32: converted exactly, multiplied in float32, in one pass


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    # d f16 [0:2] | m f16 [2:4] | nibbles [4:20]
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    q = _nibbles(b[:, 4:], 16).reshape(-1, 32).to(torch.float32)
    return d * q + m


def _fifth_bits(qh: torch.Tensor) -> torch.Tensor:
    """uint32 [n, 1] of high bits -> [n, 32] uint8 bit i of element i."""
    bits = (qh >> torch.arange(32, dtype=torch.int32, device=qh.device)) & 1
    return bits.to(torch.uint8)


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    # d f16 [0:2] | qh u32 [2:6] (5th bits) | nibbles [6:22]
    d = _f16(b[:, :2])
    high = _fifth_bits(_i32(b[:, 2:6]))
    low = _nibbles(b[:, 6:], 16).reshape(-1, 32)
    q = (low | (high << 4)).to(torch.int8) - 16
    return d * q


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    # d f16 [0:2] | m f16 [2:4] | qh u32 [4:8] | nibbles [8:24]
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    high = _fifth_bits(_i32(b[:, 4:8]))
    low = _nibbles(b[:, 8:], 16).reshape(-1, 32)
    q = (low | (high << 4)).to(torch.float32)
    return d * q + m


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    # d f16 [0:2] | 32 int8 [2:34]
    return b[:, 2:].view(torch.int8) * _f16(b[:, :2])  # int8 * float32 in one pass, exact as a conversion first


def _iq4_nl(b: torch.Tensor) -> torch.Tensor:
    # d f16 [0:2] | nibbles [2:18] indexing the non-linear table kvalues
    d = _f16(b[:, :2])
    q = _nibbles(b[:, 2:], 16).reshape(-1, 32)
    return d * _table("kvalues", b.device)[q.long()]


# ---- K-quants (256-element super-blocks) -------------------------------------------------

def _q2_k(b: torch.Tensor) -> torch.Tensor:
    # scales [0:16] (low nibble scale, high nibble min) | qs [16:80] 2-bit | d f16 [80:82] | dmin f16 [82:84]
    n = b.shape[0]
    scales = b[:, :16]
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (scales & 0x0F).to(torch.float32)).view(n, 16, 1)
    ml = (dmin * (scales >> 4).to(torch.float32)).view(n, 16, 1)
    q = (b[:, 16:80].reshape(n, 2, 1, 32) >> _shifts([0, 2, 4, 6], b.device).view(4, 1)) & 3
    q = q.reshape(n, 16, 16).to(torch.float32)
    return (dl * q - ml).reshape(n, QK_K)


def _q3_k(b: torch.Tensor) -> torch.Tensor:
    # hmask [0:32] | qs [32:96] 2-bit | scales [96:108] (16 x 6-bit) | d f16 [108:110]
    n = b.shape[0]
    d = _f16(b[:, 108:110])
    raw = b[:, 96:108]
    low = (raw[:, :8].reshape(n, 1, 8) >> _shifts([0, 4], b.device).view(2, 1)).reshape(n, 16)
    high = (raw[:, 8:].reshape(n, 1, 4) >> _shifts([0, 2, 4, 6], b.device).view(4, 1)).reshape(n, 16)
    scales = ((low & 0x0F) | ((high & 0x03) << 4)).to(torch.int8) - 32
    dl = (d * scales.to(torch.float32)).view(n, 16, 1)
    ql = (b[:, 32:96].reshape(n, 2, 1, 32) >> _shifts([0, 2, 4, 6], b.device).view(4, 1)).reshape(n, 16, 16) & 3
    qh = (b[:, :32].reshape(n, 1, 1, 32) >> _shifts(list(range(8)), b.device).view(8, 1)).reshape(n, 16, 16) & 1
    qh = qh ^ 1  # a set mask bit means "no -4 offset"
    q = (ql.to(torch.int8) - (qh << 2).to(torch.int8)).to(torch.float32)
    return (dl * q).reshape(n, QK_K)


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """12 bytes -> eight 6-bit scales and eight 6-bit mins (Q4_K, Q5_K)."""
    n = scales.shape[0]
    s = scales.reshape(n, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    # d f16 [0:2] | dmin f16 [2:4] | scales [4:16] | 128 bytes of nibbles [16:144]
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _k_scale_min(b[:, 4:16])
    d = (d * sc.to(torch.float32)).view(n, 8, 1)
    dm = (dmin * mn.to(torch.float32)).view(n, 8, 1)
    q = _nibbles(b[:, 16:], 32).reshape(n, 8, 32)
    return (d * q - dm).reshape(n, QK_K)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    # d f16 [0:2] | dmin f16 [2:4] | scales [4:16] | qh [16:48] | nibbles [48:176]
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _k_scale_min(b[:, 4:16])
    d = (d * sc.to(torch.float32)).view(n, 8, 1)
    dm = (dmin * mn.to(torch.float32)).view(n, 8, 1)
    low = _nibbles(b[:, 48:], 32).reshape(n, 8, 32)
    high = ((b[:, 16:48].reshape(n, 1, 32) >> _shifts(list(range(8)), b.device).view(8, 1)) & 1).reshape(n, 8, 32)
    q = (low | (high << 4)).to(torch.float32)
    return (d * q - dm).reshape(n, QK_K)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    # ql [0:128] low nibbles | qh [128:192] 2 high bits | scales int8 [192:208] | d f16 [208:210]
    n = b.shape[0]
    scales = b[:, 192:208].view(torch.int8).to(torch.float32)
    d = (_f16(b[:, 208:210]) * scales).view(n, 16, 1)
    low = _nibbles(b[:, :128], 64).reshape(n, 8, 32)
    high = ((b[:, 128:192].reshape(n, 2, 1, 32) >> _shifts([0, 2, 4, 6], b.device).view(4, 1)) & 3).reshape(n, 8, 32)
    q = (low | (high << 4)).to(torch.int8) - 32
    return (d * q.reshape(n, 16, 16)).reshape(n, QK_K)


# ---- i-quants ------------------------------------------------------------------------------

def _iq4_xs(b: torch.Tensor) -> torch.Tensor:
    # d f16 [0:2] | scales_h u16 [2:4] (8 x 2 bits) | scales_l [4:8] (8 x 4 bits) | nibbles [8:136]
    n = b.shape[0]
    d = _f16(b[:, :2])
    low = b[:, 4:8].reshape(n, 4, 1) >> _shifts([0, 4], b.device).view(1, 2)
    low = low.reshape(n, 8) & 0x0F  # byte j holds scales 2j (low nibble) and 2j+1
    high = (_i16(b[:, 2:4]) >> torch.arange(0, 16, 2, dtype=torch.int32, device=b.device)) & 3
    scales = (low | (high.to(torch.uint8) << 4)).to(torch.int8) - 32
    dl = (d * scales.to(torch.float32)).view(n, 8, 1)
    q = _nibbles(b[:, 8:], 16).reshape(n, 8, 32)
    return (dl * _table("kvalues", b.device)[q.long()]).reshape(n, QK_K)


def _iq2_xxs(b: torch.Tensor) -> torch.Tensor:
    # d f16 [0:2] | 8 x (u32 grid indices (4 bytes), u32 signs+scale) [2:66]
    n = b.shape[0]
    d = _f16(b[:, :2])
    words = _i32(b[:, 2:]).view(n, 8, 2)
    aux = words[..., 1]
    db = d * (0.5 + ((aux >> 28) & 0xF).to(torch.float32)) * 0.25
    signs = _ksigns((aux.unsqueeze(-1) >> _shifts([0, 7, 14, 21], b.device, torch.int32)) & 0x7F)  # [n, 8, 4, 8]
    grid_idx = b[:, 2:].reshape(n, 8, 8)[..., :4]
    grid = _table("IQ2_XXS", b.device)[grid_idx.long()]  # [n, 8, 4, 8]
    return (db.view(n, 8, 1, 1) * grid * signs).reshape(n, QK_K)


def _iq2_xs(b: torch.Tensor) -> torch.Tensor:
    # d f16 [0:2] | qs u16 [2:66] (9-bit grid index, 7-bit sign index) | scales [66:74] (4 bits each)
    n = b.shape[0]
    d = _f16(b[:, :2])
    qs = _i16(b[:, 2:66])  # [n, 32]
    scales = (b[:, 66:74].reshape(n, 8, 1) >> _shifts([0, 4], b.device)).reshape(n, 16) & 0x0F
    db = (d * (0.5 + scales.to(torch.float32)) * 0.25).view(n, 16, 1, 1)
    signs = _ksigns(qs >> 9).view(n, 16, 2, 8)
    grid = _table("IQ2_XS", b.device)[(qs & 511).long()].view(n, 16, 2, 8)
    return (db * grid * signs).reshape(n, QK_K)


def _iq2_s(b: torch.Tensor) -> torch.Tensor:
    # d f16 [0:2] | qs [2:34] | signs [34:66] | qh [66:74] (2 high index bits each) | scales [74:82]
    n = b.shape[0]
    d = _f16(b[:, :2])
    scales = (b[:, 74:82].reshape(n, 8, 1) >> _shifts([0, 4], b.device)).reshape(n, 16) & 0x0F
    db = (d * (0.5 + scales.to(torch.float32)) * 0.25).view(n, 16, 1, 1)
    signs = _sign_bits(_bits(b[:, 34:66], 8, 1)).view(n, 16, 2, 8)
    qh = ((b[:, 66:74].reshape(n, 8, 1) >> _shifts([0, 2, 4, 6], b.device)) & 3).reshape(n, 32)
    index = b[:, 2:34].to(torch.int64) | (qh.to(torch.int64) << 8)
    grid = _table("IQ2_S", b.device)[index].view(n, 16, 2, 8)
    return (db * grid * signs).reshape(n, QK_K)


def _iq3_xxs(b: torch.Tensor) -> torch.Tensor:
    # d f16 [0:2] | qs [2:66] grid indices | 8 x u32 signs+scale [66:98]
    n = b.shape[0]
    d = _f16(b[:, :2])
    aux = _i32(b[:, 66:98])  # [n, 8]
    db = (d * (0.5 + ((aux >> 28) & 0xF).to(torch.float32)) * 0.5).view(n, 8, 1, 1)
    signs = _ksigns((aux.unsqueeze(-1) >> _shifts([0, 7, 14, 21], b.device, torch.int32)) & 0x7F)  # [n, 8, 4, 8]
    grid = _table("IQ3_XXS", b.device)[b[:, 2:66].long()].view(n, 8, 4, 8)
    return (db * grid * signs).reshape(n, QK_K)


def _iq3_s(b: torch.Tensor) -> torch.Tensor:
    # d f16 [0:2] | qs [2:66] | qh [66:74] (9th index bit) | signs [74:106] | scales [106:110] (4 bits)
    n = b.shape[0]
    d = _f16(b[:, :2])
    scales = (b[:, 106:110].reshape(n, 4, 1) >> _shifts([0, 4], b.device)).reshape(n, 8) & 0x0F
    db = (d * (1 + 2 * scales.to(torch.int32)).to(torch.float32)).view(n, 8, 1, 1)
    signs = _sign_bits(_bits(b[:, 74:106], 8, 1)).view(n, 8, 4, 8)
    qh = _bits(b[:, 66:74], 8, 1).reshape(n, 64)
    index = b[:, 2:66].to(torch.int64) | (qh.to(torch.int64) << 8)
    grid = _table("IQ3_S", b.device)[index].view(n, 8, 4, 8)
    return (db * grid * signs).reshape(n, QK_K)


IQ1_DELTA = float(gguf_quants.IQ1_S.delta)  # grid values are shifted by +-delta


def _iq1_s(b: torch.Tensor) -> torch.Tensor:
    # d f16 [0:2] | qs [2:34] | qh u16 [34:50]: 4 x 3 high index bits, 3-bit scale, delta sign
    n = b.shape[0]
    d = _f16(b[:, :2])
    qh = _i16(b[:, 34:50])  # [n, 8]
    dl = (d * (2 * ((qh >> 12) & 7) + 1).to(torch.float32)).view(n, 8, 1, 1)
    delta = torch.where((qh & 0x8000) == 0, IQ1_DELTA, -IQ1_DELTA).to(torch.float32).view(n, 8, 1, 1)
    high = ((qh.unsqueeze(-1) >> torch.tensor([0, 3, 6, 9], dtype=torch.int32, device=b.device)) & 7).reshape(n, 32)
    index = b[:, 2:34].to(torch.int64) | (high.to(torch.int64) << 8)
    grid = _table("IQ1_S", b.device)[index].view(n, 8, 4, 8)
    return (dl * (grid + delta)).reshape(n, QK_K)


def _iq1_m(b: torch.Tensor) -> torch.Tensor:
    # qs [0:32] | qh [32:48] (two 3-bit high parts + delta signs per byte) | scales u16 [48:56]:
    # 3-bit sub-block scales, and the f16 super-block scale split over the top 4 bits of each
    n = b.shape[0]
    sc = _i16(b[:, 48:56])  # [n, 4]
    d_bits = (sc & 0xF000) >> torch.tensor([12, 8, 4, 0], dtype=torch.int32, device=b.device)
    d_bits = d_bits[:, 0] | d_bits[:, 1] | d_bits[:, 2] | d_bits[:, 3]
    d = d_bits.to(torch.int16).view(torch.float16).to(torch.float32).view(n, 1)
    scales = ((sc.unsqueeze(-1) >> torch.tensor([0, 3, 6, 9], dtype=torch.int32, device=b.device)) & 7).reshape(n, 16)
    dl = (d * (2 * scales + 1).to(torch.float32)).view(n, 8, 2, 1, 1)
    qh = b[:, 32:48].reshape(n, 16, 1) >> _shifts([0, 4], b.device)  # [n, 16, 2]
    index = b[:, :32].to(torch.int64) | ((qh & 7).reshape(n, 32).to(torch.int64) << 8)
    delta = torch.where((qh & 8) == 0, IQ1_DELTA, -IQ1_DELTA).to(torch.float32).view(n, 8, 2, 2, 1)
    grid = _table("IQ1_S", b.device)[index].view(n, 8, 2, 2, 8)
    return (dl * (grid + delta)).reshape(n, QK_K)


# ---- float formats -------------------------------------------------------------------------

def _f32(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float32)


def _f16_values(b: torch.Tensor) -> torch.Tensor:
    return _f16(b)


def _bf16(b: torch.Tensor) -> torch.Tensor:
    # bfloat16 is the top half of a float32: widen by shifting into the high 16 bits
    return (_i16(b) << 16).view(torch.float32)


# ---- registry ------------------------------------------------------------------------------

@dataclass(frozen=True)
class BlockFormat:
    qtype: QType
    block_size: int  # elements per block
    type_size: int  # bytes per block
    dequantize_blocks: Callable[[torch.Tensor], torch.Tensor]  # [n, type_size] u8 -> [n, block_size] f32


def _format(qtype: QType, fn: Callable[[torch.Tensor], torch.Tensor]) -> BlockFormat:
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    return BlockFormat(qtype, block_size, type_size, fn)


FORMATS: dict[QType, BlockFormat] = {f.qtype: f for f in (
    _format(QType.F32, _f32), _format(QType.F16, _f16_values), _format(QType.BF16, _bf16),
    _format(QType.Q4_0, _q4_0), _format(QType.Q4_1, _q4_1), _format(QType.Q5_0, _q5_0),
    _format(QType.Q5_1, _q5_1), _format(QType.Q8_0, _q8_0),
    _format(QType.Q2_K, _q2_k), _format(QType.Q3_K, _q3_k), _format(QType.Q4_K, _q4_k),
    _format(QType.Q5_K, _q5_k), _format(QType.Q6_K, _q6_k),
    _format(QType.IQ4_NL, _iq4_nl), _format(QType.IQ4_XS, _iq4_xs), _format(QType.IQ3_S, _iq3_s),
    _format(QType.IQ3_XXS, _iq3_xxs), _format(QType.IQ2_XXS, _iq2_xxs), _format(QType.IQ2_XS, _iq2_xs),
    _format(QType.IQ2_S, _iq2_s), _format(QType.IQ1_S, _iq1_s), _format(QType.IQ1_M, _iq1_m),
)}


def is_supported(qtype: QType) -> bool:
    return qtype in FORMATS


def _get(qtype: QType) -> BlockFormat:
    fmt = FORMATS.get(qtype)
    if fmt is None:
        name = getattr(qtype, "name", str(qtype))
        raise ValueError(f"quantization type {name} is not supported (supported: {', '.join(q.name for q in FORMATS)})")
    return fmt


def row_bytes(qtype: QType, n_cols: int) -> int:
    """Bytes of one row of `n_cols` values."""
    fmt = _get(qtype)
    if n_cols % fmt.block_size:
        raise ValueError(f"a row of {n_cols} values is not a whole number of {qtype.name} blocks of {fmt.block_size}")
    return n_cols // fmt.block_size * fmt.type_size


def dequantize(data: torch.Tensor, qtype: QType, shape: tuple[int, ...]) -> torch.Tensor:
    """Raw bytes (uint8, any leading shape) of a tensor of logical `shape` -> float32 `shape`."""
    fmt = _get(qtype)
    n_rows = int(np.prod(shape[:-1], dtype=np.int64))
    expected = n_rows * row_bytes(qtype, shape[-1])
    if data.dtype != torch.uint8 or data.numel() != expected:
        raise ValueError(f"{qtype.name} tensor of shape {tuple(shape)} needs {expected} bytes, got {data.numel()} ({data.dtype})")
    blocks = data.reshape(-1, fmt.type_size)
    return fmt.dequantize_blocks(blocks).reshape(shape)
