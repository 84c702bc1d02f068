"""Measure TurboQuant's QJL residual stage before keeping it (arXiv 2504.19874, TurboQuant_prod).

    MODE=mse3|mse2|qjl python benchmarks/kv_qjl.py [N_TOKENS]

Keys of the default model go through a round trip at three bits per value, with turbollm's key
conditioning (kv/conditioning.py, queries weighed in) and blocks of 128; values stay f16:
    mse3  the 3-bit Lloyd-Max quantizer (what turbo3 stores)
    mse2  the 2-bit quantizer alone
    qjl   2-bit quantizer + 1-bit QJL of the residual r: x^ + |r| sqrt(pi/2)/d S^T sign(S r),
          S a fixed Gaussian matrix (unbiased inner products, at the price of variance)
The round-tripped keys are stored exactly (an f32 cache), and `turbollm.cli.quality` compares the
result with the f16 cache on the bundled text. A measurement script, not a codec: it patches
KVSlots.write for the f32 cache only.
"""

from __future__ import annotations

import math
import os
import sys

import torch

from turbollm import Model
from turbollm.cli import quality
from turbollm.kv import cache as kc
from turbollm.kv.conditioning import condition_keys, rotate_by_position
from turbollm.kv.turboquant import TurboQuantMSE

BLOCK = 128


def round_trip(x: torch.Tensor, mode: str) -> torch.Tensor:
    blocks = x.reshape(-1, BLOCK)
    if mode == "mse3":
        q = TurboQuantMSE(3, BLOCK, 0)
        return q.decode(*q.encode(blocks, keep_length=True)).reshape(x.shape)  # as turbo3 keys
    q = TurboQuantMSE(2, BLOCK, 0)
    approx = q.decode(*q.encode(blocks))
    if mode == "mse2":
        return approx.reshape(x.shape)
    s = torch.randn(BLOCK, BLOCK, generator=torch.Generator().manual_seed(1))
    r = blocks - approx
    signs = torch.sign(r @ s.T)
    return (approx + r.norm(dim=-1, keepdim=True) * math.sqrt(math.pi / 2) / BLOCK * (signs @ s)).reshape(x.shape)


def main() -> None:
    mode = os.environ.get("MODE", "qjl")
    n_tokens = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    conditioning: dict = {}
    write = kc.KVSlots.write

    def patched(self, k, v, encode=None, q=None):
        if self.plan.k.name == "f32":  # the configuration under test; the f16 baseline is untouched
            c = conditioning.setdefault(id(self.k), condition_keys(k, self.tail_positions, self.rope_freq, q))
            offset = rotate_by_position(c.rot_offset, self.tail_positions, self.rope_freq) + c.offset
            k = round_trip((k - offset) / c.scale, mode) * c.scale + offset
        write(self, k, v, encode, q)

    kc.KVSlots.write = patched
    model = Model.load(threads=2)
    ids = model.tokenizer.encode(quality.default_text())[:n_tokens]
    report = quality.measure(model.network, ids, [kc.CacheConfig("f32", "f16")])
    row = report.rows[-1]
    print(f"{mode}: perplexity {row.perplexity:.4f} ({row.perplexity_change_pct:+.2f}% vs f16), "
          f"KL {row.kl_mean:.5f}, top-1 {row.top1_agreement:.4f} ({n_tokens} tokens)")


if __name__ == "__main__":
    main()
