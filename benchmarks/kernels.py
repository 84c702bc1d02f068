"""Throughput of the native matrix-vector kernels, per quantization type and code path.

    python benchmarks/kernels.py [-t 2] [--rows 4096,65536] [--cols 2816] [--tokens 1,4] [--types Q4_0,Q8_0]

For each type, code path the CPU has (portable C, AVX2, AVX-512 VNNI), weight size and token
count, prints milliseconds per product and GB/s of weight bytes read. 4,096 rows of 2,816
(6.5 MB of Q4_0) stay in this machine's cache; 65,536 rows (104 MB) stream from memory, the
decode case. Weights are random blocks with small fp16 scales.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

from turbollm.kernels import native
from turbollm.kernels.qtensor import QTensor

# byte offsets of the fp16 scales in a block, set to sane values so no block overflows
SCALE_AT = {Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2], Q.Q8_0: [0], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2],
            Q.Q6_K: [208], Q.IQ4_NL: [0], Q.IQ4_XS: [0], Q.IQ3_S: [0]}


def random_weight(qtype: Q, n_rows: int, n_cols: int) -> QTensor:
    block, size = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(n_rows * n_cols // block, size), dtype=np.uint8)
    for at in SCALE_AT[qtype]:
        raw[:, at:at + 2] = np.full(len(raw), 0.01, dtype=np.float16).view(np.uint8).reshape(-1, 2)
    return QTensor(torch.from_numpy(raw).reshape(n_rows, -1), qtype, (n_rows, n_cols))


def seconds_per_product(x: torch.Tensor, w: QTensor, min_seconds: float = 0.3) -> float:
    native.matmul(x, w)
    reps, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < min_seconds or reps < 3:
        native.matmul(x, w)
        reps += 1
    return elapsed / reps


def main() -> None:
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-t", "--threads", type=int, default=2)
    p.add_argument("--rows", type=ints, default=[4096, 65536])
    p.add_argument("--cols", type=int, default=2816)
    p.add_argument("--tokens", type=ints, default=[1, 4])
    p.add_argument("--types", default="Q4_0,Q5_0,Q8_0,IQ4_NL,Q4_K,Q6_K")
    args = p.parse_args()
    if not native.available():
        raise SystemExit(native.load_error())
    native.set_num_threads(args.threads)
    best = native.set_simd(len(native.SIMD_NAMES) - 1)
    print(f"{args.threads} threads; code paths: {', '.join(native.SIMD_NAMES[:best + 1])}")
    print(f"{'type':<7} {'path':<20} {'rows':>6} {'tokens':>6} {'ms':>8} {'GB/s':>6}")
    for name in args.types.split(","):
        qtype = Q[name]
        for rows in args.rows:
            w = random_weight(qtype, rows, args.cols)
            for level in range(best + 1):
                native.set_simd(level)
                for n_tok in args.tokens:
                    x = torch.randn(n_tok, args.cols)
                    s = seconds_per_product(x, w)
                    print(f"{name:<7} {native.SIMD_NAMES[level]:<20} {rows:>6} {n_tok:>6} {s * 1e3:>8.3f} "
                          f"{w.data.numel() / s / 1e9:>6.1f}")
    native.set_simd(best)


if __name__ == "__main__":
    main()
