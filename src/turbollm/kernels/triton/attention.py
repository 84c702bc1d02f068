"""Attention over the KV cache in Triton, reading each row where and as it is stored.

One launch covers one *segment* of a layer's keys: the committed slots, this step's tail, or
(with an exact window) the f16 rows of either. A program takes BLOCK_R query rows (a row is one
(token, query head) of one KV head: grouped-query attention reads each key once for its whole
group) and one split of the segment's keys, decodes BLOCK_S key and value rows at a time in
registers (f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, iq4_nl, turbo2/3/4: the bytes of
kv/codecs.py), and keeps an online softmax: it writes its running max, sum and weighted value
sum. `attend` merges the partials of every split and segment (flash-decoding: a decode step
splits the keys across programs so that one query still fills the device). Nothing writes a
decoded copy of the cache.

Which keys a query row sees comes from positions, as in kernels/attention.py: causal, the
sliding window, empty slots (-1), and the exact window's split (a coded segment skips the keys
the query reads at f16, an f16 segment keeps only those).

Quantized keys are coded relative to the sequence's key conditioning (kv/conditioning.py):
k = code * s + c + R_p mu. Scores are computed as (q * s) . code + q . c + q . R_p mu: the
first term is the kernel's product with a query prepared once per step (times s, and for
TurboQuant rotated into the codes' basis, which keeps dot products), the second a number per
query row, the third, per pair i of channels (i, i + d/2), A_i cos(p f_i) + B_i sin(p f_i)
with A = q_lo mu_lo + q_hi mu_hi and B = q_hi mu_lo - q_lo mu_hi, the angles taken in float64
(p f_i is large at long contexts) and reduced to a turn before the float32 cosine. TurboQuant
values are summed in their basis too and rotated back once per segment.

Tested in Triton's interpreter against the reference (kv/cache.py's read + kernels.attention).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from turbollm.gguf import quants
from turbollm.kernels.triton import interpreted
from turbollm.kv.codecs import TURBO_BITS, Codec, turbo_tables
from turbollm.kv.plan import EXACT


# codec -> (kernel code, bytes per block of 32 values); floats are read as typed elements
_FLOAT_CODES = {"f32": 0, "f16": 1, "bf16": 2}
_BLOCK_CODES = {"q8_0": (3, 34), "q4_0": (4, 18), "q4_1": (5, 20), "q5_0": (6, 22), "q5_1": (7, 24), "iq4_nl": (8, 18)}
_TURBO = 9
_FLOAT_VIEWS = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def supports(codec: Codec, head_dim: int) -> bool:
    """Codecs and head sizes the kernel reads (a power-of-two head of at least 16)."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0 and codec.name in (*_FLOAT_CODES, *_BLOCK_CODES, *TURBO_BITS)


@triton.jit
def _half(ptr, off, mask):
    lo = tl.load(ptr + off, mask=mask, other=0).to(tl.uint16)
    hi = tl.load(ptr + off + 1, mask=mask, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _rows(ptr, row, j, mask, book_ptr, CODE: tl.constexpr, ROW: tl.constexpr, BB: tl.constexpr,
          TB: tl.constexpr, BITS: tl.constexpr):
    """Rows `row` [BS] of a cache segment, values j [D] -> [BS, D] float32 (masked rows: 0).
    ROW: a row's stride (elements for floats, bytes otherwise); BB bytes per block; TB values
    per TurboQuant block."""
    m2 = mask[:, None]
    base_row = row.to(tl.int64)[:, None] * ROW
    if CODE <= 2:
        return tl.load(ptr + base_row + j[None, :], mask=m2, other=0.0).to(tl.float32)
    elif CODE == 9:  # TurboQuant: norm f16 | codes of BITS bits, low bit first, per block of TB
        base = base_row + (j // TB)[None, :] * BB
        d = _half(ptr, base, m2)
        bit = (j % TB) * BITS
        byte = base + 2 + (bit // 8)[None, :]
        word = tl.load(ptr + byte, mask=m2, other=0).to(tl.int32)
        if BITS == 3:  # a code may run into the next byte (never past its block's end)
            spill = ((bit % 8) > 5)[None, :]
            word = word | (tl.load(ptr + byte + 1, mask=m2 & spill, other=0).to(tl.int32) << 8)
        code = (word >> (bit % 8)[None, :]) & ((1 << BITS) - 1)
        return tl.load(book_ptr + code) * d
    else:
        base = base_row + (j // 32)[None, :] * BB
        i = (j % 32)[None, :]
        d = _half(ptr, base, m2)
        if CODE == 3:  # q8_0: d | int8[32]
            return tl.load(ptr + base + 2 + i, mask=m2, other=0).to(tl.int8, bitcast=True).to(tl.float32) * d
        if CODE == 4 or CODE == 8:
            qs_at = 2
        elif CODE == 6:
            qs_at = 6
        elif CODE == 5:
            qs_at = 4
        else:
            qs_at = 8
        q = (tl.load(ptr + base + qs_at + i % 16, mask=m2, other=0).to(tl.int32) >> ((i // 16) * 4)) & 0x0F
        if CODE == 8:  # iq4_nl: d * kvalues[nibble]
            return d * tl.load(book_ptr + q)
        if CODE == 6 or CODE == 7:  # the fifth bits: a little-endian u32 at byte 2 (q5_0) or 4 (q5_1)
            qh_at = 2 if CODE == 6 else 4
            qh = tl.load(ptr + base + qh_at + i // 8, mask=m2, other=0).to(tl.int32)
            q = q | (((qh >> (i % 8)) & 1) << 4)
        if CODE == 4:
            return d * (q - 8).to(tl.float32)
        if CODE == 6:
            return d * (q - 16).to(tl.float32)
        m = _half(ptr, base + 2, m2)  # q4_1, q5_1: d * q + m
        return d * q.to(tl.float32) + m


@triton.jit
def _product(a, b, USE_DOT: tl.constexpr, PRECISION: tl.constexpr):
    """a [R, K] . b [S, K]^T -> [R, S]; a broadcast row sum below 16 rows (decode)."""
    if USE_DOT:
        return tl.dot(a, tl.trans(b), input_precision=PRECISION)
    return tl.sum(a[:, None, :] * b[None, :, :], axis=2)


@triton.jit
def _attend_kernel(q_ptr, qpos_ptr, k_ptr, v_ptr, kpos_ptr, kbook_ptr, vbook_ptr,
                   c_ptr, a_ptr, b_ptr, freq_ptr, m_ptr, l_ptr, acc_ptr,
                   n_rows, n_keys, n_kv, keys_per_split, scale, window, softcap, sink, recent, exact_from,
                   G: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
                   K_CODE: tl.constexpr, K_ROW: tl.constexpr, K_BB: tl.constexpr, K_TB: tl.constexpr, K_BITS: tl.constexpr,
                   V_CODE: tl.constexpr, V_ROW: tl.constexpr, V_BB: tl.constexpr, V_TB: tl.constexpr, V_BITS: tl.constexpr,
                   HAS_OFFSET: tl.constexpr, HAS_TURN: tl.constexpr, SPLIT: tl.constexpr, SOFTCAP: tl.constexpr,
                   USE_DOT: tl.constexpr, PRECISION: tl.constexpr):
    pid_r, hk, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < n_rows
    t = r // G
    head = hk * G + r % G
    q_row = t.to(tl.int64) * (n_kv * G) + head  # [T, n_head] flattened
    j = tl.arange(0, D)
    q = tl.load(q_ptr + q_row[:, None] * D + j[None, :], mask=r_ok[:, None], other=0.0)
    qp = tl.load(qpos_ptr + t, mask=r_ok, other=0)
    if HAS_OFFSET:
        c = tl.load(c_ptr + q_row, mask=r_ok, other=0.0)
    if HAS_TURN:
        i = tl.arange(0, HALF)
        a = tl.load(a_ptr + q_row[:, None] * HALF + i[None, :], mask=r_ok[:, None], other=0.0)
        b = tl.load(b_ptr + q_row[:, None] * HALF + i[None, :], mask=r_ok[:, None], other=0.0)
        freq = tl.load(freq_ptr + i)  # float64
    m_run = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    l_run = tl.zeros((BLOCK_R,), tl.float32)
    acc = tl.zeros((BLOCK_R, D), tl.float32)
    s_begin = split * keys_per_split
    s_end = tl.minimum(s_begin + keys_per_split, n_keys)
    for s0 in range(s_begin, s_end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        s_ok = s < s_end
        kp = tl.load(kpos_ptr + s, mask=s_ok, other=-1)
        rows = s.to(tl.int64) * n_kv + hk
        k = _rows(k_ptr, rows, j, s_ok, kbook_ptr, K_CODE, K_ROW, K_BB, K_TB, K_BITS)
        score = _product(q, k, USE_DOT, PRECISION)
        if HAS_OFFSET:
            score += c[:, None]
        if HAS_TURN:
            turns = kp.to(tl.float64)[:, None] * freq[None, :] * 0.15915494309189535  # 1 / (2 pi)
            angle = ((turns - tl.floor(turns)) * 6.283185307179586).to(tl.float32)
            score += _product(a, tl.cos(angle), USE_DOT, PRECISION) + _product(b, tl.sin(angle), USE_DOT, PRECISION)
        score = score * scale
        if SOFTCAP:  # softcap * tanh(score / softcap), tanh from exp
            score = softcap * (1.0 - 2.0 / (tl.exp(2.0 * score / softcap) + 1.0))
        kp2 = kp[None, :]
        qp2 = qp[:, None]
        seen = (kp2 >= 0) & (kp2 <= qp2) & s_ok[None, :] & r_ok[:, None]
        seen = seen & ((window == 0) | (qp2 - kp2 < window))
        if SPLIT != 0:  # the exact window: keys a query reads from their f16 rows
            exact = (kp2 < sink) | ((kp2 >= exact_from) & (qp2 - kp2 < recent))
            if SPLIT == 1:
                seen = seen & (exact == 0)
            else:
                seen = seen & exact
        score = tl.where(seen, score, float("-inf"))
        m_new = tl.maximum(m_run, tl.max(score, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(score - m_safe[:, None])
        alpha = tl.exp(m_run - m_safe)
        v = _rows(v_ptr, rows, j, s_ok, vbook_ptr, V_CODE, V_ROW, V_BB, V_TB, V_BITS)
        if USE_DOT:
            pv = tl.dot(p, v, input_precision=PRECISION)
        else:
            pv = tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        acc = acc * alpha[:, None] + pv
        l_run = l_run * alpha + tl.sum(p, axis=1)
        m_run = m_new
    out = (split * n_kv + hk).to(tl.int64) * n_rows + r
    tl.store(m_ptr + out, m_run, mask=r_ok)
    tl.store(l_ptr + out, l_run, mask=r_ok)
    tl.store(acc_ptr + out[:, None] * D + j[None, :], acc, mask=r_ok[:, None])


def _codec_args(codec: Codec, raw: torch.Tensor, d: int):
    """(tensor the kernel reads, its lookup table, kernel code, row stride, block bytes,
    TurboQuant block, bits) of a segment's rows [S, n_kv, row_bytes]. A codec without a table
    still needs a pointer there: the rows' own, never read."""
    if codec.name in _FLOAT_CODES:
        return raw.view(_FLOAT_VIEWS[codec.name]), raw, _FLOAT_CODES[codec.name], d, 0, 1, 1
    row_bytes = codec.row_bytes(d)
    if codec.is_turbo:
        return (raw, _turbo_book(codec, raw.device), _TURBO, row_bytes, codec.block_bytes, codec.turbo_block,
                TURBO_BITS[codec.name])
    code, block_bytes = _BLOCK_CODES[codec.name]
    book = quants._table("kvalues", raw.device) if codec.name == "iq4_nl" else raw
    return raw, book, code, row_bytes, block_bytes, 1, 1


_turbo_books: dict[tuple[str, torch.device], torch.Tensor] = {}


def _turbo_book(codec: Codec, device: torch.device) -> torch.Tensor:
    """A TurboQuant codebook on the device, copied there once (not once per segment and step)."""
    key = (codec.name, device)
    if key not in _turbo_books:
        _turbo_books[key] = turbo_tables(codec)[0].to(device)
    return _turbo_books[key]


def _segment(q, q_pos, k_raw, v_raw, k_pos, k_codec, v_codec, n_kv, scale, window, softcap, split_mode, split,
             offset_terms, precision):
    """Partials (m [P, n_kv, R], l [P, n_kv, R], acc [P, n_kv, R, d]) of one segment over its splits P, for the
    prepared queries q [T, n_head, d]; rows r = (token, head of the group) per KV head."""
    n_tok, n_head, d = q.shape
    group = n_head // n_kv
    n_keys = k_raw.shape[0]
    n_rows = n_tok * group
    block_r = min(64 if d <= 256 else 32, triton.next_power_of_2(n_rows))
    use_dot = block_r >= 16
    if interpreted():  # the interpreter runs a program as numpy calls: few wide ones are fastest
        block_s, n_split = min(256, triton.next_power_of_2(max(n_keys, 16))), 1
    else:
        block_s = 64 if d <= 256 else 32
        programs = n_kv * triton.cdiv(n_rows, block_r)
        n_split = max(1, min(triton.cdiv(n_keys, block_s), 256 // programs))  # flash-decoding
    keys_per_split = triton.cdiv(triton.cdiv(n_keys, n_split), block_s) * block_s
    n_split = triton.cdiv(n_keys, keys_per_split)
    dev = q.device
    m = torch.empty((n_split, n_kv, n_rows), dtype=torch.float32, device=dev)
    l = torch.empty_like(m)
    acc = torch.empty((n_split, n_kv, n_rows, d), dtype=torch.float32, device=dev)
    kt, kbook, k_code, k_row, k_bb, k_tb, k_bits = _codec_args(k_codec, k_raw.contiguous(), d)
    vt, vbook, v_code, v_row, v_bb, v_tb, v_bits = _codec_args(v_codec, v_raw.contiguous(), d)
    c, a, b, freq = offset_terms or (None, None, None, None)
    dummy = m
    sink, recent, exact_from = (split.sink, split.recent, split.exact_from) if split is not None else (0, 0, 0)
    grid = (triton.cdiv(n_rows, block_r), n_kv, n_split)
    _attend_kernel[grid](
        q, q_pos, kt, vt, k_pos.contiguous(), kbook, vbook,
        dummy if c is None else c, dummy if a is None else a, dummy if b is None else b,
        dummy if freq is None else freq, m, l, acc,
        n_rows, n_keys, n_kv, keys_per_split, scale, window, softcap, sink, recent, exact_from,
        G=group, D=d, HALF=d // 2, BLOCK_R=block_r, BLOCK_S=block_s,
        K_CODE=k_code, K_ROW=k_row, K_BB=k_bb, K_TB=k_tb, K_BITS=k_bits,
        V_CODE=v_code, V_ROW=v_row, V_BB=v_bb, V_TB=v_tb, V_BITS=v_bits,
        HAS_OFFSET=c is not None, HAS_TURN=a is not None, SPLIT=split_mode, SOFTCAP=softcap > 0,
        USE_DOT=use_dot, PRECISION=precision)
    if v_codec.is_turbo:  # values were summed in their codes' basis
        acc = v_codec.unrotate(acc)
    return m, l, acc


def _prepared_queries(q: torch.Tensor, slots) -> tuple[torch.Tensor, tuple | None]:
    """The queries the coded keys are scored with, and the conditioning's terms (c [T, H],
    A [T, H, d/2], B [T, H, d/2], freq [d/2] float64; None where they vanish)."""
    if slots.k_offset is None:
        return slots.plan.k.rotate(q), None
    group = q.shape[1] // slots.plan.n_head_kv
    def per_head(x):
        return x.repeat_interleave(group, dim=0)[None]  # [1, n_head, d]
    scaled = slots.plan.k.rotate(q * per_head(slots.k_scale)).contiguous()
    c = (q * per_head(slots.k_offset)).sum(-1).contiguous()
    if slots.rope_freq is None:  # no turning offset: R_p mu is mu, a constant like c
        return scaled, ((q * per_head(slots.k_rot_offset)).sum(-1) + c, None, None, None)
    half = q.shape[-1] // 2
    mu = per_head(slots.k_rot_offset)
    q_lo, q_hi, mu_lo, mu_hi = q[..., :half], q[..., half:], mu[..., :half], mu[..., half:]
    a = (q_lo * mu_lo + q_hi * mu_hi).contiguous()
    b = (q_hi * mu_lo - q_lo * mu_hi).contiguous()
    return scaled, (c, a, b, slots.rope_freq.to(torch.float64).contiguous())


def attend(q: torch.Tensor, slots, positions: torch.Tensor, scale: float, window: int = 0, softcap: float = 0.0,
           precision: str = "ieee") -> torch.Tensor:
    """Attention of the step's queries q [T, n_head, d] (RoPE applied) at `positions` [T] over
    one layer's KV slots (kv/cache.py's KVSlots: the committed slots, the step's tail, the
    exact window's f16 rows) -> [T, n_head, d], what kernels.attention.attention computes
    over slots.read()."""
    plan = slots.plan
    n_tok, n_head, d = q.shape
    q = q.to(torch.float32).contiguous()
    positions = positions.contiguous()
    split = slots.split
    coded_mode = 0 if split is None else 1
    qk, terms = _prepared_queries(q, slots)
    segments = [(slots.k[:slots.n_keys], slots.v[:slots.n_keys], slots.positions[:slots.n_keys]),
                (slots.tail_k, slots.tail_v, slots.tail_positions)]
    parts = [_segment(qk, positions, k, v, kp, plan.k, plan.v, plan.n_head_kv, scale, window, softcap, coded_mode,
                      split, terms, precision) for k, v, kp in segments if k.shape[0]]
    if split is not None:
        exact = [(slots.exact_k, slots.exact_v, slots.exact_positions),
                 (slots.tail_exact_k, slots.tail_exact_v, slots.tail_positions)]
        parts += [_segment(q, positions, k, v, kp, EXACT, EXACT, plan.n_head_kv, scale, window, softcap, 2, split,
                           None, precision) for k, v, kp in exact if k.shape[0]]
    m = torch.cat([p[0] for p in parts])
    l = torch.cat([p[1] for p in parts])
    acc = torch.cat([p[2] for p in parts])
    top = m.max(dim=0).values  # every query sees at least its own key: finite
    w = torch.exp(m - top)
    out = (w[..., None] * acc).sum(0) / (w * l).sum(0)[..., None]  # [n_kv, T * group, d]
    group = n_head // plan.n_head_kv
    return out.view(plan.n_head_kv, n_tok, group, d).permute(1, 0, 2, 3).reshape(n_tok, n_head, d)
