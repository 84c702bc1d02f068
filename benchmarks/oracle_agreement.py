"""Print how far turbollm's logits are from the two oracles of the default model.

    python benchmarks/oracle_agreement.py [--reference tests/data] [--backend reference|fast]

For each prompt of gemma3-270m-q4_k_m: max |ours - transformers| over the top-32 entries of
every prompt position and over the full last row, top-1 agreement with both oracles, and the
median / max per-position distance to llama.cpp's top-32 values (llama.cpp quantizes
activations, so ~0.45 is its own noise level against exact maths).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from turbollm import Model
from turbollm.kv.plan import CacheConfig

F32_CACHE = CacheConfig("f32", "f32")  # the exact path the oracles are held to


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", default=str(Path(__file__).resolve().parents[1] / "tests" / "data"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backend", choices=("reference", "fast"), default="reference",
                        help="kernels (fast: prompt rows use the prefill path, dequantized tiles + float GEMM)")
    args = parser.parse_args()
    folder = Path(args.reference) / "gemma3-270m-q4_k_m"
    model = Model.load(threads=args.threads, backend=args.backend)
    net = model.network
    prompts = json.loads((folder / "prompts.json").read_text())
    print(f"{'prompt':<12} {'n':>4} {'hf top32 max':>13} {'hf last max':>12} {'top1=hf':>8} {'top1=llama':>11} {'llama med':>10} {'llama max':>10}")
    for name in prompts:
        ref = dict(np.load(folder / f"{name}.npz"))
        ids = torch.from_numpy(ref["tokens"].astype(np.int64))
        hidden = net.forward(ids, net.new_cache(len(ids), F32_CACHE))
        hf_diff, llama_diff, top1 = [], [], []
        for start in range(0, len(ids), 128):
            logits = net.logits(hidden[start:start + 128])
            rows = slice(start, start + logits.shape[0])
            hf_diff.append((torch.gather(logits, 1, torch.from_numpy(ref["hf_topk_idx"][rows].astype(np.int64))) - torch.from_numpy(ref["hf_topk_val"][rows])).abs().amax(1))
            llama_diff.append((torch.gather(logits, 1, torch.from_numpy(ref["topk_idx"][rows].astype(np.int64))) - torch.from_numpy(ref["topk_val"][rows])).abs().amax(1))
            top1.append(logits.argmax(1))
        last = net.logits(hidden[-1:])[0].numpy()
        hf_diff, llama_diff, top1 = torch.cat(hf_diff).numpy(), torch.cat(llama_diff).numpy(), torch.cat(top1).numpy()
        print(f"{name:<12} {len(ids):>4} {hf_diff.max():>13.2e} {np.abs(last - ref['hf_last_logits']).max():>12.2e} "
              f"{(top1 == ref['hf_topk_idx'][:, 0]).mean():>8.3f} {(top1 == ref['topk_idx'][:, 0]).mean():>11.3f} "
              f"{np.median(llama_diff):>10.3f} {llama_diff.max():>10.3f}")


if __name__ == "__main__":
    main()
