"""Quantized linear in Triton: out = x @ W.T with W left in its GGUF blocks on the device.

One program computes a [BLOCK_M, BLOCK_N] tile of the output. It walks K in steps of 32
values: each step loads the 32-value slice of BLOCK_N weight rows as bytes, dequantizes it in
registers (the block layouts of gguf/quants.py, the same float operations in the same order)
and multiplies it with the matching activation slice. With 16 rows or more the product is a
`tl.dot` (tensor cores on a GPU; `precision` picks fp32 "ieee" for the reference's maths or
"tf32"); with fewer (decode) it is a broadcast multiply and a row sum, so one token does not
pay for 16. Nothing here allocates a dequantized weight.

The 256-value super-block types (the K-quants, IQ4_XS, IQ3_S) are read 32 values at a time
too: a step is one of a super-block's sub-blocks, with that sub-block's scale (and min)
decoded from the packed scale bytes. The i-quants map their indices through a lookup table
(IQ4_NL's and IQ4_XS's 16 non-linear values, IQ3_S's 512 x 4 grid): Triton cannot index a
Python list, so the table is a small float32 tensor on the weight's device (quants._table,
built once per device) passed as `table_ptr`, which the other types ignore.
Types: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL, Q4_K, Q5_K, Q6_K, IQ4_XS, IQ3_S (SUPPORTED):
those of Gemma 4's Q4_K_M and IQ3_M files. Others stay with the reference path
(kernels/triton/__init__.py decides).

Tested on CPU tensors in Triton's interpreter (TRITON_INTERPRET=1) against the reference;
only a GPU run says how fast it is.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from turbollm.gguf import quants
from turbollm.kernels.qtensor import QTensor, QType
from turbollm.kernels.triton import interpreted

SUPPORTED = {QType.Q4_0: 18, QType.Q4_1: 20, QType.Q5_0: 22, QType.Q5_1: 24, QType.Q8_0: 34,
             QType.IQ4_NL: 18, QType.Q4_K: 144, QType.Q5_K: 176, QType.Q6_K: 210,
             QType.IQ4_XS: 136, QType.IQ3_S: 110}  # type -> bytes per block (32 values, or 256 for SUPER_BLOCK)
SUPER_BLOCK = {QType.Q4_K, QType.Q5_K, QType.Q6_K, QType.IQ4_XS, QType.IQ3_S}  # 256-value blocks
TABLES = {QType.IQ4_NL: "kvalues", QType.IQ4_XS: "kvalues", QType.IQ3_S: "IQ3_S"}  # type -> quants._table name


# The helpers are written out inline (no nested jit calls): the interpreter pays for every
# call of a jit function, and compiled code inlines them anyway.

@triton.jit
def _dequant32(w_ptr, table_ptr, row_off, step, k, mask, QTYPE: tl.constexpr, BLOCK_BYTES: tl.constexpr):
    """Values step*32 .. step*32+31 of the rows at byte offsets `row_off` [BN] -> [BN, 32].
    A half at byte o is (byte o) | (byte o+1) << 8, bit-cast to float16. `table_ptr`: the
    float32 lookup table of the i-quants (TABLES); unused by the others."""
    m2 = mask[:, None]
    if QTYPE == 12 or QTYPE == 13 or QTYPE == 14 or QTYPE == 21 or QTYPE == 23:  # sub-block `sub` of super-block `sb`
        sb = step // 8
        sub = step % 8
        base = row_off + sb * BLOCK_BYTES  # [BN]
        if QTYPE == 12 or QTYPE == 13:
            # Q4_K: d f16 [0:2] | dmin f16 [2:4] | scales [4:16] | qs [16:144]
            # Q5_K: the same, then qh [16:48] (the 5th bits) moves qs to [48:176]
            b0 = tl.load(w_ptr + base, mask=mask, other=0).to(tl.uint16)
            b1 = tl.load(w_ptr + base + 1, mask=mask, other=0).to(tl.uint16)
            b2 = tl.load(w_ptr + base + 2, mask=mask, other=0).to(tl.uint16)
            b3 = tl.load(w_ptr + base + 3, mask=mask, other=0).to(tl.uint16)
            d = (b0 | (b1 << 8)).to(tl.float16, bitcast=True).to(tl.float32)
            dmin = (b2 | (b3 << 8)).to(tl.float16, bitcast=True).to(tl.float32)
            if sub < 4:
                sc = tl.load(w_ptr + base + 4 + sub, mask=mask, other=0).to(tl.int32) & 63
                mn = tl.load(w_ptr + base + 8 + sub, mask=mask, other=0).to(tl.int32) & 63
            else:
                md = tl.load(w_ptr + base + 8 + sub, mask=mask, other=0).to(tl.int32)
                dj = tl.load(w_ptr + base + sub, mask=mask, other=0).to(tl.int32)
                mj = tl.load(w_ptr + base + 4 + sub, mask=mask, other=0).to(tl.int32)
                sc = (md & 0x0F) | ((dj >> 2) & 0x30)
                mn = (md >> 4) | ((mj >> 2) & 0x30)
            qs_at = 16 if QTYPE == 12 else 48
            byte = tl.load(w_ptr + base[:, None] + qs_at + (sub // 2) * 32 + k[None, :], mask=m2, other=0).to(tl.int32)
            q = (byte >> ((sub % 2) * 4)) & 0x0F
            if QTYPE == 13:  # bit `sub` of qh byte k is value k's 5th bit in sub-block `sub`
                qh = tl.load(w_ptr + base[:, None] + 16 + k[None, :], mask=m2, other=0).to(tl.int32)
                q = q | (((qh >> sub) & 1) << 4)
            scale = (d * sc.to(tl.float32))[:, None]
            offset = (dmin * mn.to(tl.float32))[:, None]
            return scale * q.to(tl.float32) - offset
        elif QTYPE == 14:  # Q6_K: ql [0:128] | qh [128:192] | scales int8 [192:208] | d f16 [208:210]
            d_lo = tl.load(w_ptr + base + 208, mask=mask, other=0).to(tl.uint16)
            d_hi = tl.load(w_ptr + base + 209, mask=mask, other=0).to(tl.uint16)
            d = (d_lo | (d_hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)
            g = sub // 4
            r = sub % 4
            low = tl.load(w_ptr + base[:, None] + g * 64 + (r % 2) * 32 + k[None, :], mask=m2, other=0).to(tl.int32)
            low = (low >> ((r // 2) * 4)) & 0x0F
            high = tl.load(w_ptr + base[:, None] + 128 + g * 32 + k[None, :], mask=m2, other=0).to(tl.int32)
            high = (high >> (2 * r)) & 3
            q = (low | (high << 4)) - 32
            s_idx = 2 * sub + k // 16  # [32]: the 16-value scales
            sv = tl.load(w_ptr + base[:, None] + 192 + s_idx[None, :], mask=m2, other=0).to(tl.int8, bitcast=True)
            scale = d[:, None] * sv.to(tl.float32)
            return scale * q.to(tl.float32)
        else:
            d_lo = tl.load(w_ptr + base, mask=mask, other=0).to(tl.uint16)
            d_hi = tl.load(w_ptr + base + 1, mask=mask, other=0).to(tl.uint16)
            d = (d_lo | (d_hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)
            if QTYPE == 23:  # IQ4_XS: d | scales_h u16 [2:4] (2 bits each) | scales_l [4:8] (4 bits) | qs [8:136]
                s_lo = tl.load(w_ptr + base + 4 + sub // 2, mask=mask, other=0).to(tl.int32)
                s_lo = (s_lo >> ((sub % 2) * 4)) & 0x0F
                h_lo = tl.load(w_ptr + base + 2, mask=mask, other=0).to(tl.int32)
                h_hi = tl.load(w_ptr + base + 3, mask=mask, other=0).to(tl.int32)
                s_hi = ((h_lo | (h_hi << 8)) >> (2 * sub)) & 3
                dl = (d * ((s_lo | (s_hi << 4)) - 32).to(tl.float32))[:, None]
                byte = tl.load(w_ptr + base[:, None] + 8 + sub * 16 + (k % 16)[None, :], mask=m2, other=0).to(tl.int32)
                q = (byte >> ((k // 16) * 4)[None, :]) & 0x0F
                return dl * tl.load(table_ptr + q)
            else:  # IQ3_S: d | qs [2:66] | qh [66:74] (9th index bits) | signs [74:106] | scales [106:110]
                s = tl.load(w_ptr + base + 106 + sub // 2, mask=mask, other=0).to(tl.int32)
                s = (s >> ((sub % 2) * 4)) & 0x0F
                db = (d * (1 + 2 * s).to(tl.float32))[:, None]
                # a sub-block is 8 grid entries of 4 values: value k is entry k // 4, lane k % 4
                idx = tl.load(w_ptr + base[:, None] + 2 + sub * 8 + (k // 4)[None, :], mask=m2, other=0).to(tl.int32)
                qh = tl.load(w_ptr + base + 66 + sub, mask=mask, other=0).to(tl.int32)
                idx = idx | (((qh[:, None] >> (k // 4)[None, :]) & 1) << 8)
                grid = tl.load(table_ptr + idx * 4 + (k % 4)[None, :])
                sbit = tl.load(w_ptr + base[:, None] + 74 + sub * 4 + (k // 8)[None, :], mask=m2, other=0).to(tl.int32)
                sign = tl.where(((sbit >> (k % 8)[None, :]) & 1) == 0, 1.0, -1.0)
                return db * grid * sign
    else:
        base = row_off + step * BLOCK_BYTES  # [BN]
        d_lo = tl.load(w_ptr + base, mask=mask, other=0).to(tl.uint16)
        d_hi = tl.load(w_ptr + base + 1, mask=mask, other=0).to(tl.uint16)
        d = (d_lo | (d_hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)[:, None]
        if QTYPE == 8:  # Q8_0: d | int8[32]
            q8 = tl.load(w_ptr + base[:, None] + 2 + k[None, :], mask=m2, other=0).to(tl.int8, bitcast=True)
            return q8.to(tl.float32) * d
        else:
            if QTYPE == 2 or QTYPE == 6 or QTYPE == 20:
                qs_at = 6 if QTYPE == 6 else 2
            else:
                qs_at = 4 if QTYPE == 3 else 8
            byte = tl.load(w_ptr + base[:, None] + qs_at + (k % 16)[None, :], mask=m2, other=0).to(tl.int32)
            q = (byte >> ((k // 16) * 4)[None, :]) & 0x0F
            if QTYPE == 6 or QTYPE == 7:  # the 5th bits: a little-endian u32 at byte 2 (Q5_0) or 4 (Q5_1)
                qh_at = 2 if QTYPE == 6 else 4
                qh = tl.load(w_ptr + base[:, None] + qh_at + (k // 8)[None, :], mask=m2, other=0).to(tl.int32)
                q = q | (((qh >> (k % 8)[None, :]) & 1) << 4)
            if QTYPE == 2:
                return d * (q - 8).to(tl.float32)
            elif QTYPE == 20:  # IQ4_NL: the nibble indexes the 16 non-linear values
                return d * tl.load(table_ptr + q)
            elif QTYPE == 6:
                return d * (q - 16).to(tl.float32)
            else:  # Q4_1, Q5_1: d * q + m
                m_lo = tl.load(w_ptr + base + 2, mask=mask, other=0).to(tl.uint16)
                m_hi = tl.load(w_ptr + base + 3, mask=mask, other=0).to(tl.uint16)
                m = (m_lo | (m_hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)[:, None]
                return d * q.to(tl.float32) + m


@triton.jit
def _linear_kernel(x_ptr, w_ptr, table_ptr, out_ptr, rows_ptr, experts_ptr, M, N, K, row_bytes, expert_bytes, x_div,
                   QTYPE: tl.constexpr, BLOCK_BYTES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   USE_DOT: tl.constexpr, PRECISION: tl.constexpr, GROUPED: tl.constexpr):
    """GROUPED (experts): the M rows are (token, slot) pairs sorted by expert, padded so that a
    tile of BLOCK_M rows holds one expert's: rows_ptr gives each row's pair (-1: padding),
    experts_ptr each tile's expert (-1: an unused tile), x row = pair // x_div, out row = pair."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.arange(0, 32)
    mask_n = rn < N
    row_off = rn.to(tl.int64) * row_bytes
    if GROUPED:
        expert = tl.load(experts_ptr + pid_m)
        pair = tl.load(rows_ptr + rm, mask=rm < M, other=-1)
        mask_m = (pair >= 0) & ((tl.zeros((BLOCK_M,), tl.int32) + expert) >= 0)
        mask_n = mask_n & ((tl.zeros((BLOCK_N,), tl.int32) + expert) >= 0)
        row_off += tl.maximum(expert, 0).to(tl.int64) * expert_bytes
        x_row = tl.maximum(pair, 0) // x_div
        out_row = tl.maximum(pair, 0)
    else:
        mask_m = rm < M
        x_row = rm
        out_row = rm
    n_steps = K // 32
    if GROUPED:
        n_steps = tl.where(expert >= 0, n_steps, 0)  # an unused tile reads nothing
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(0, n_steps):
        x = tl.load(x_ptr + x_row[:, None].to(tl.int64) * K + step * 32 + k[None, :], mask=mask_m[:, None], other=0.0)
        w = _dequant32(w_ptr, table_ptr, row_off, step, k, mask_n, QTYPE, BLOCK_BYTES)  # [BLOCK_N, 32]
        if USE_DOT:
            acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)
        else:
            acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    out = out_ptr + out_row[:, None].to(tl.int64) * N + rn[None, :]
    tl.store(out, acc, mask=mask_m[:, None] & mask_n[None, :])


def supports(w: QTensor) -> bool:
    return w.qtype in SUPPORTED and len(w.shape) == 2 and w.shape[-1] % (256 if w.qtype in SUPER_BLOCK else 32) == 0


def supports_experts(w: QTensor) -> bool:
    """A stacked expert tensor (n_expert, n_out, n_in) of a SUPPORTED type."""
    return len(w.shape) == 3 and w.data.is_contiguous() and supports(w.select(0))


def _tiles(rows: int) -> tuple[int, bool]:
    """(BLOCK_M, tensor cores) for `rows` activation rows: tl.dot from 16 rows (it needs 16),
    a broadcast row sum below, so that decode does not pay for 16 rows."""
    if rows >= 16:
        return 16, True
    return min(8, triton.next_power_of_2(rows)), False


def _block_n(n_out: int, use_dot: bool) -> int:
    # the interpreter runs each program as numpy calls: few wide programs are much faster there
    return min(1024, triton.next_power_of_2(n_out)) if interpreted() else (64 if use_dot else 32)


def _table_of(w: QTensor) -> torch.Tensor:
    # a type without a table still needs a pointer there: the weight's own, never read
    return quants._table(TABLES[w.qtype], w.data.device) if w.qtype in TABLES else w.data


def linear(x: torch.Tensor, w: QTensor, precision: str = "ieee") -> torch.Tensor:
    """x [..., K] float32 @ w.T -> [..., N] float32 for a 2-D weight of a SUPPORTED type."""
    n_out, k = w.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).to(torch.float32).contiguous()
    m = x2.shape[0]
    out = torch.empty((m, n_out), dtype=torch.float32, device=x.device)
    if m == 0:
        return out.reshape(*lead, n_out)
    block_m, use_dot = _tiles(m)
    block_n = _block_n(n_out, use_dot)
    grid = (triton.cdiv(n_out, block_n), triton.cdiv(m, block_m))
    _linear_kernel[grid](x2, w.data, _table_of(w), out, out, out, m, n_out, k,
                         w.data.stride(0) if w.data.dim() == 2 else w.data.shape[-1], 0, 1,
                         QTYPE=int(w.qtype), BLOCK_BYTES=SUPPORTED[w.qtype], BLOCK_M=block_m, BLOCK_N=block_n,
                         USE_DOT=use_dot, PRECISION=precision, GROUPED=False)
    return out.reshape(*lead, n_out)


class ExpertRows:
    """The (token, slot) pairs of a MoE step sorted by expert, in tiles of one expert each
    (vLLM's moe_align_block_size): computed once per step, used by every expert product.
    Sizes come from the pair count only and no step reads the routing back to the host (no
    bincount, no repeat_interleave by counts), so the launch shapes stay fixed for a given
    batch size, as a CUDA graph needs."""

    def __init__(self, expert_ids: torch.Tensor, n_expert: int):
        n_tok, self.n_slot = expert_ids.shape
        self.n_pairs = n_tok * self.n_slot
        # tiles sized to the pairs an expert gets on average: decode's one pair per expert takes
        # one-row programs, not 16-row tiles of padding
        self.block_m, self.use_dot = _tiles(triton.cdiv(self.n_pairs, min(self.n_pairs, n_expert)))
        flat = expert_ids.reshape(-1).to(torch.int64)
        dev = flat.device
        counts = torch.zeros(n_expert, dtype=torch.int64, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
        tiles = (counts + self.block_m - 1) // self.block_m  # per expert
        first_tile = torch.cumsum(tiles, 0) - tiles
        order = torch.argsort(flat, stable=True)
        sorted_e = flat[order]
        first_of_e = torch.cumsum(counts, 0) - counts
        rank = torch.arange(self.n_pairs, device=dev) - first_of_e[sorted_e]
        # at most one partly filled tile per chosen expert: an upper bound known without a sync
        self.n_tiles = triton.cdiv(self.n_pairs, self.block_m) + min(self.n_pairs, n_expert)
        self.rows = torch.full((self.n_tiles * self.block_m,), -1, dtype=torch.int32, device=dev)
        self.rows[first_tile[sorted_e] * self.block_m + rank] = order.to(torch.int32)
        # tile t belongs to the first expert whose tiles end after t; tiles past the last: -1
        expert_of_tile = torch.searchsorted(torch.cumsum(tiles, 0), torch.arange(self.n_tiles, device=dev), right=True)
        self.experts = torch.where(expert_of_tile < n_expert, expert_of_tile, -1).to(torch.int32)


def expert_linear(x: torch.Tensor, w: QTensor, rows: ExpertRows, per_pair: bool, precision: str = "ieee") -> torch.Tensor:
    """Each (token, slot) pair through its expert's slice of the stacked w (n_expert, N, K):
    x [T, K] (the token's row for each of its slots) or [T * slots, K] (per_pair) -> [T * slots, N],
    one launch for all experts."""
    n_expert, n_out, k = w.shape
    x2 = x.to(torch.float32).contiguous()
    out = torch.empty((rows.n_pairs, n_out), dtype=torch.float32, device=x.device)
    block_n = _block_n(n_out, rows.use_dot)
    grid = (triton.cdiv(n_out, block_n), rows.n_tiles)
    _linear_kernel[grid](x2, w.data, _table_of(w), out, rows.rows, rows.experts, rows.rows.shape[0], n_out, k,
                         w.data.shape[-1], w.data.stride(0), 1 if per_pair else rows.n_slot,
                         QTYPE=int(w.qtype), BLOCK_BYTES=SUPPORTED[w.qtype], BLOCK_M=rows.block_m, BLOCK_N=block_n,
                         USE_DOT=rows.use_dot, PRECISION=precision, GROUPED=True)
    return out
