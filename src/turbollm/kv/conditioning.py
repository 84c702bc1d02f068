"""How a sequence's quantized keys are conditioned before coding, and restored after.

Gemma's keys (post k_norm) carry channels that hardly change from token to token yet are up
to ~40x the median channel. Left in, they take most of each block's range (ggml blocks) or
norm (TurboQuant). So a quantized key k at position p is coded as

    (k - R_p mu - c) / s            per (KV head, channel), fixed from the sequence's first step

- mu: the mean key of the first step *before RoPE* (each key rotated back by its position),
  carried to every position by the same rotation R_p: a channel that is constant before RoPE
  turns with the position after it, which no fixed offset removes. Only the half of the pairs
  with the most energy in mu keep theirs (the rest are zero, folded into c), since each turning
  pair costs attention work per key: turbo3 keys, 1,600 tokens, KL 0.0343 with half of them,
  0.0323 with all, 0.0361 with three eighths;
- c: the mean of what is left (the channels RoPE does not turn, and the rest of the mean);
- s: the square root of the channel's standard deviation around that offset, over the
  root-mean-square of the step's queries in the channel for TurboQuant keys (see below).

Reading multiplies and adds them back; native attention computes the scores as
(q * s) . code + q . c + q . R_p mu, the last term with the rotation's angles stepped from key
to key (kernels/native/csrc/kv.c), so nothing is decoded in the original basis.

R_p is a NeoX rotation (pairs i and i + d/2) by angles p * freq_i, computed here in float64
from the model's RoPE frequencies (`rope_freq`, d/2 values; none: R_p = identity). It need not
be the model's own RoPE to the last bit: whatever is subtracted is added back exactly.

Why these scales: TurboQuant's error is isotropic after its rotation, of energy proportional
to the coded vector's; an error e_i in channel i costs q_i * s_i * e_i in a score, and
s_i = sqrt(sd_i / rms(q_i)) minimises the expected squared sum (Cauchy-Schwarz on
sum(q^2 s^2) * sum(sd^2 / s^2)). ggml's blocks err by the block's largest value instead, and
measured better without the queries' term (q4_0 K and V, 3,202 tokens: KL 0.0557 without,
0.0619 with), so they keep sqrt(sd) (s = sd was worse still: q4_0 K, 1,600 tokens, KL 0.066
against 0.039). Measured on the default model, turbo3 keys and f16 values, 1,600 tokens:
perplexity +71.8% (raw keys) -> +5.3% (post-RoPE offset, sqrt(sd); 800 tokens) -> +7.1%
(KL 0.068, with the queries' term; 1,600 tokens) -> +6.3% (keys keeping their length,
kv/codecs.py) -> +2.8% (KL 0.032) with the offset taken before RoPE.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KeyConditioning:
    rot_offset: torch.Tensor  # mu [n_kv, d]: turned by each key's position
    offset: torch.Tensor  # c [n_kv, d]
    scale: torch.Tensor  # s [n_kv, d]


def rotate_by_position(x: torch.Tensor, positions: torch.Tensor, rope_freq: torch.Tensor | None,
                       inverse: bool = False) -> torch.Tensor:
    """R_p x (or R_p^-1 x) for x [S, n_kv, d] or [n_kv, d] (then broadcast over the S
    positions [S]); float32 result, float64 angles."""
    if rope_freq is None:
        return x.to(torch.float32).expand(positions.shape[0], *x.shape[-2:])
    angles = positions.to(torch.float64)[:, None] * rope_freq.to(torch.float64)[None, :]  # [S, d/2]
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]
    if inverse:
        sin = -sin
    x = x.to(torch.float64)
    half = x.shape[-1] // 2
    lo, hi = x[..., :half], x[..., half:]
    return torch.cat((lo * cos - hi * sin, hi * cos + lo * sin), dim=-1).to(torch.float32)


def condition_keys(k: torch.Tensor, positions: torch.Tensor, rope_freq: torch.Tensor | None,
                   q: torch.Tensor | None = None) -> KeyConditioning:
    """The conditioning of a sequence from its first step: keys [T, n_kv, d] (RoPE applied) at
    `positions` [T], and the step's queries [T, n_head, d] (None: every channel weighs the same)."""
    k = k.to(torch.float32)
    rot_offset = rotate_by_position(k, positions, rope_freq, inverse=True).mean(dim=0)
    if rope_freq is not None:
        # a pair turning less than a thousandth of a radian in a million positions is fixed
        # (Gemma 4's proportional RoPE divides the frequencies of the pairs it leaves by 1e30)
        rot_offset = _strongest_pairs(rot_offset, rope_freq > 1e-9)
    residual = k - rotate_by_position(rot_offset, positions, rope_freq)
    offset = residual.mean(dim=0)
    if k.shape[0] < 2:
        return KeyConditioning(rot_offset, offset, torch.ones_like(offset))
    sd = _floored((residual - offset).pow(2).mean(dim=0).sqrt())
    if q is None:
        return KeyConditioning(rot_offset, offset, sd.sqrt())
    n_tok, n_kv = k.shape[:2]
    q_rms = q.to(torch.float32).reshape(n_tok, n_kv, -1, k.shape[-1]).pow(2).mean(dim=(0, 2)).sqrt()
    return KeyConditioning(rot_offset, offset, (sd / _floored(q_rms)).sqrt())


def _strongest_pairs(mu: torch.Tensor, turning: torch.Tensor) -> torch.Tensor:
    """mu [n_kv, d] with only the half of its pairs (i, i + d/2) of most energy kept, per KV head,
    among the pairs RoPE turns (`turning` [d/2]; Gemma 4's global layers turn a quarter of them:
    the others' offset is fixed, and c holds it)."""
    half = mu.shape[-1] // 2
    energy = torch.where(turning.to(mu.device), mu[:, :half].pow(2) + mu[:, half:].pow(2), torch.full_like(mu[:, :half], -1.0))
    n_keep = min(max(1, half // 2), int(turning.sum()))
    keep = torch.zeros_like(energy, dtype=torch.bool)
    if n_keep:
        keep.scatter_(1, energy.topk(n_keep, dim=-1).indices, True)
    keep = torch.cat((keep, keep), dim=-1)
    return torch.where(keep, mu, torch.zeros_like(mu))


def _floored(x: torch.Tensor) -> torch.Tensor:
    """x [n_kv, d] >= 0, raised to a tenth of its mean over channels; ones where that mean is 0."""
    floor = 0.1 * x.mean(dim=-1, keepdim=True)
    return torch.where(floor > 0, torch.maximum(x, floor), torch.ones_like(x))
