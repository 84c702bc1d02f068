"""KV cache codecs: how one row of a K or V cache (one head's `head_dim` values) becomes bytes.

Names are llama.cpp's `--cache-type-k/-v` values and its TurboQuant forks':

    f32, f16, bf16                 plain floats (bf16 rounded to nearest even)
    q8_0, q4_0, q4_1, q5_0, q5_1   ggml's blocks of 32, quantized exactly as ggml's reference
                                   quantizers do (tests hold them to the `gguf` package's)
    iq4_nl                         ggml's non-linear 4-bit blocks; the encoder is ours: the
                                   largest value maps to the end of the table, then one
                                   least-squares refit of the scale and a second assignment
    turbo2, turbo3, turbo4         TurboQuant (kv/turboquant.py): per block of `block` values an
                                   fp16 norm, then `bits`-bit codebook indices packed low bit
                                   first; `block` is 128 (bits + 0.125 per value) or 32 (+ 0.5);
                                   keys store norm / |codeword| (`keep_length`), values the norm

Every codec here is the pure-PyTorch reference: `encode` [..., d] float -> [..., row_bytes]
uint8 and `decode` back. The native kernels (kernels/native/csrc/kv.c) write and read the same bytes.
A TurboQuant row can also be decoded *in the rotated basis* (`decode_rotated`): attention
rotates the query once and scores it against rotated keys, since a rotation keeps dot products.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from gguf import GGMLQuantizationType as QType

from turbollm.gguf import quants
from turbollm.kv.turboquant import TurboQuantMSE

FLOAT_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
BLOCK_QTYPES = {"q8_0": QType.Q8_0, "q4_0": QType.Q4_0, "q4_1": QType.Q4_1, "q5_0": QType.Q5_0,
                "q5_1": QType.Q5_1, "iq4_nl": QType.IQ4_NL}
TURBO_BITS = {"turbo2": 2, "turbo3": 3, "turbo4": 4}
CACHE_TYPES = (*FLOAT_DTYPES, *BLOCK_QTYPES, *TURBO_BITS)
TURBO_BLOCKS = (32, 128)
TURBO_SEED = 0  # the fixed rotation's random signs; part of the format, like a codebook
QK = 32  # values per ggml block


@dataclass(frozen=True)
class Codec:
    name: str  # one of CACHE_TYPES
    turbo_block: int = 128  # TurboQuant rotation block (ignored by other codecs)
    # TurboQuant: decoded blocks keep the input's length (kv/turboquant.py); the cache codes
    # keys so, values not. Measured on the default model (`turbollm quality`, 3,202 tokens),
    # keys only: turbo3 perplexity +15.1% -> +12.7% (KL 0.115 -> 0.104), turbo4 +3.84% ->
    # +3.00% (KL 0.0304 -> 0.0289); values too: mixed (turbo3 KL 0.106, turbo4 0.0298).
    keep_length: bool = False

    def __post_init__(self) -> None:
        if self.name not in CACHE_TYPES:
            raise ValueError(f"unknown KV cache type {self.name!r} (choose from {', '.join(CACHE_TYPES)})")
        if self.turbo_block not in TURBO_BLOCKS:
            raise ValueError(f"TurboQuant block must be one of {TURBO_BLOCKS}, not {self.turbo_block}")

    @property
    def is_turbo(self) -> bool:
        return self.name in TURBO_BITS

    @property
    def block(self) -> int:
        """Values per independently coded block: a row's length must be a multiple."""
        if self.is_turbo:
            return self.turbo_block
        return QK if self.name in BLOCK_QTYPES else 1

    @property
    def block_bytes(self) -> int:
        if self.name in FLOAT_DTYPES:
            return FLOAT_DTYPES[self.name].itemsize
        if self.is_turbo:
            return 2 + self.turbo_block * TURBO_BITS[self.name] // 8
        return quants.row_bytes(BLOCK_QTYPES[self.name], QK)

    @property
    def bits_per_value(self) -> float:
        return 8.0 * self.block_bytes / self.block

    def row_bytes(self, d: int) -> int:
        if d % self.block:
            raise ValueError(f"KV cache type {self.name} codes blocks of {self.block} values; a head of {d} does not split")
        return d // self.block * self.block_bytes

    @property
    def label(self) -> str:
        return f"{self.name}/b{self.turbo_block}" if self.is_turbo else self.name

    # ---- reference encode / decode -------------------------------------------------------

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[..., d] float -> [..., row_bytes] uint8."""
        d = x.shape[-1]
        n_bytes = self.row_bytes(d)
        x = x.to(torch.float32)
        if self.name in FLOAT_DTYPES:
            out = x.to(FLOAT_DTYPES[self.name]).contiguous().view(torch.uint8)
        elif self.is_turbo:
            out = _turbo_encode(self, x.reshape(-1, d))
        else:
            out = _BLOCK_ENCODERS[self.name](x.reshape(-1, QK))
        return out.reshape(*x.shape[:-1], n_bytes)

    def decode(self, raw: torch.Tensor, d: int) -> torch.Tensor:
        """[..., row_bytes] uint8 -> [..., d] float32."""
        lead = raw.shape[:-1]
        if raw.numel() == 0:
            return torch.zeros((*lead, d), dtype=torch.float32, device=raw.device)
        if self.name in FLOAT_DTYPES:
            return raw.contiguous().view(FLOAT_DTYPES[self.name]).to(torch.float32).reshape(*lead, d)
        if self.is_turbo:
            q = self.quantizer
            return q.unrotate(self.decode_rotated(raw, d).view(*lead, -1, q.block)).reshape(*lead, d)
        qtype = BLOCK_QTYPES[self.name]
        return quants.dequantize(raw.contiguous(), qtype, (*lead, d))

    def decode_rotated(self, raw: torch.Tensor, d: int) -> torch.Tensor:
        """TurboQuant only: the row in the rotated basis, norm * codebook[code], per block."""
        lead, block, bits = raw.shape[:-1], self.turbo_block, TURBO_BITS[self.name]
        blocks = raw.reshape(-1, self.block_bytes)
        norms = blocks[:, :2].contiguous().view(torch.float16).to(torch.float32)
        codes = unpack_bits(blocks[:, 2:], bits, block)
        values = self.quantizer.codebook[codes.long()] * norms
        return values.reshape(*lead, d)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """[..., d] -> the same vectors in the rotated basis of each block (identity for
        codecs without a rotation)."""
        if not self.is_turbo:
            return x
        q = self.quantizer
        return q.rotate(x.reshape(*x.shape[:-1], -1, q.block)).reshape(x.shape)

    def unrotate(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_turbo:
            return x
        q = self.quantizer
        return q.unrotate(x.reshape(*x.shape[:-1], -1, q.block)).reshape(x.shape)

    @property
    def quantizer(self) -> TurboQuantMSE:
        return _turbo_quantizer(TURBO_BITS[self.name], self.turbo_block)


@functools.lru_cache(maxsize=None)
def _turbo_quantizer(bits: int, block: int) -> TurboQuantMSE:
    return TurboQuantMSE(bits, block, TURBO_SEED)


def parse_cache_type(name: str, turbo_block: int = 128) -> Codec:
    return Codec(name.strip().lower(), turbo_block)


# ---- bit packing ---------------------------------------------------------------------------

def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[n, m] codes < 2**bits -> [n, m * bits / 8] bytes: code i at bit i * bits, low bit first."""
    n, m = codes.shape
    shifts = torch.arange(bits, dtype=torch.uint8)
    stream = ((codes.unsqueeze(-1) >> shifts) & 1).reshape(n, m * bits // 8, 8)
    return (stream << torch.arange(8, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, m: int) -> torch.Tensor:
    n = packed.shape[0]
    stream = ((packed.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(n, m, bits)
    return (stream << torch.arange(bits, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)


def _turbo_encode(codec: Codec, rows: torch.Tensor) -> torch.Tensor:
    q = codec.quantizer
    codes, norms = q.encode(rows, codec.keep_length)  # codes [n, d], norms [n, d / block]
    n_blocks = norms.numel()
    packed = pack_bits(codes.reshape(n_blocks, q.block), q.bits)
    norm_bytes = norms.reshape(n_blocks, 1).to(torch.float16).view(torch.uint8)
    return torch.cat([norm_bytes, packed], dim=1)


# ---- ggml block encoders (ggml-quants.c's *_ref quantizers, in the same float order) ------

def _round_away(x: torch.Tensor) -> torch.Tensor:
    """C's roundf: halves away from zero (torch.round goes to even). Not floor(|x| + 0.5): that
    sum rounds 0.49999997 up to 1."""
    a = x.abs()
    whole = torch.floor(a)
    return torch.sign(x) * (whole + torch.floor(2 * (a - whole)))


def _inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / torch.where(d == 0, torch.ones_like(d), d))


def _half_bytes(v: torch.Tensor) -> torch.Tensor:
    return v.to(torch.float16).view(torch.uint8).reshape(-1, 2)


def _signed_max(b: torch.Tensor) -> torch.Tensor:
    """The value of largest magnitude in each block (the first one on ties), sign kept."""
    return torch.gather(b, 1, b.abs().argmax(dim=1, keepdim=True))


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """[n, 32] values < 16 -> [n, 16]: element i in the low nibble of byte i, i + 16 in the high."""
    return q[:, :16] | (q[:, 16:] << 4)


def _high_bits(q: torch.Tensor) -> torch.Tensor:
    """Bit 4 of each of 32 values -> 4 bytes, value i at bit i."""
    word = (((q >> 4) & 1).to(torch.int64) << torch.arange(32)).sum(1)
    return torch.stack([(word >> s) & 0xFF for s in (0, 8, 16, 24)], dim=1).to(torch.uint8)


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    d = b.abs().amax(dim=1, keepdim=True) / 127
    q = _round_away(b * _inverse(d)).to(torch.int8).view(torch.uint8)
    return torch.cat([_half_bytes(d), q], dim=1)


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    d = _signed_max(b) / -8
    q = torch.trunc(b * _inverse(d) + 8.5).clamp(0, 15).to(torch.uint8)
    return torch.cat([_half_bytes(d), _pack_nibbles(q)], dim=1)


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    d = _signed_max(b) / -16
    q = torch.trunc(b * _inverse(d) + 16.5).clamp(0, 31).to(torch.uint8)
    return torch.cat([_half_bytes(d), _high_bits(q), _pack_nibbles(q & 0x0F)], dim=1)


def _min_max(b: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lo, hi = b.amin(dim=1, keepdim=True), b.amax(dim=1, keepdim=True)
    d = (hi - lo) / levels
    q = torch.trunc((b - lo) * _inverse(d) + 0.5).clamp(0, levels).to(torch.uint8)
    return d, lo, q


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    d, lo, q = _min_max(b, 15)
    return torch.cat([_half_bytes(d), _half_bytes(lo), _pack_nibbles(q)], dim=1)


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    d, lo, q = _min_max(b, 31)
    return torch.cat([_half_bytes(d), _half_bytes(lo), _high_bits(q), _pack_nibbles(q & 0x0F)], dim=1)


def iq4nl_values() -> torch.Tensor:
    return quants._table("kvalues", torch.device("cpu")).to(torch.float32)


def _nearest(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of the ascending `values` (the lower one on a tie)."""
    bounds = (values[1:] + values[:-1]) / 2
    return torch.bucketize(x, bounds, right=False)


def _iq4_nl(b: torch.Tensor) -> torch.Tensor:
    values = iq4nl_values()
    d0 = _signed_max(b) / values[0]  # the largest magnitude lands on the table's end (-127)
    idx = _nearest(b * _inverse(d0), values)
    v = values[idx.long()]
    num, den = (b * v).sum(1, keepdim=True), (v * v).sum(1, keepdim=True)
    d = torch.where(den > 0, num / den.clamp(min=1e-30), d0)  # least-squares scale for these indices
    idx = _nearest(b * _inverse(d), values).to(torch.uint8)
    return torch.cat([_half_bytes(d), _pack_nibbles(idx)], dim=1)


_BLOCK_ENCODERS = {"q8_0": _q8_0, "q4_0": _q4_0, "q4_1": _q4_1, "q5_0": _q5_0, "q5_1": _q5_1, "iq4_nl": _iq4_nl}


def turbo_tables(codec: Codec) -> tuple[torch.Tensor, torch.Tensor]:
    """(codebook [2**bits] float32, signs [block] float32) of a TurboQuant codec."""
    q = codec.quantizer
    return q.codebook.contiguous(), q.signs.contiguous()

