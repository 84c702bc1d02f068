"""Copy into tests/data the part of the oracle fixtures that the test suite needs.

    python tools/trim_fixtures.py /path/to/shared/reference [tests/data]

The full fixture folder (tiny random Gemma 4 models in 7 GGUF types each, with transformers
and llama.cpp arrays; the Gemma 3 270M arrays) is ~150 MB, too much for the repository. This
keeps the GGUF files listed in SHIPPED (their quant mixes hold every block type of the
fixtures: Q4_K_M has Q4_K, Q5_0, Q6_K and Q8_0 tensors, IQ3_M has IQ3_S, IQ4_NL, Q4_K and Q6_K)
and, of each prompt record, only the arrays of those files and of transformers, uncompressed
values exactly as they were. The tests run every other file too when TURBOLLM_REFERENCE
points at the full folder (tests/conftest.py).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np

SHIPPED = {"gemma4-tiny-moe": ["Q4_0", "Q4_K_M", "IQ3_M"], "gemma4-tiny-dense": ["Q4_0"],
           "gemma4-tiny-ple": ["Q4_K_M"], "gemma4-tiny-assistant": ["Q4_0"]}
GEMMA3 = "gemma3-270m-q4_k_m"
GEMMA3_KEYS = {"tokens", "topk_idx", "topk_val", "greedy", "greedy_margin", "hf_topk_idx", "hf_topk_val",
               "hf_last_logits", "hf_forced_argmax", "hf_forced_margin", "hf_greedy", "hf_greedy_margin"}


def keep_key(key: str, variants: list[str]) -> bool:
    """transformers' arrays on the original weights (hf_*), the shipped files' (llama_<v>_*,
    hfdeq_<v>_*), and what belongs to no file (tokens, the target's state)."""
    tags = {v.lower() for v in variants}
    for prefix in ("llama_", "hfdeq_"):
        if key.startswith(prefix):
            return any(key.startswith(prefix + t + "_") for t in tags)
    return True


def main() -> None:
    src = Path(sys.argv[1])
    dst = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(__file__).resolve().parents[1] / "tests" / "data"
    for folder, variants in {**SHIPPED, GEMMA3: []}.items():
        out = dst / folder
        out.mkdir(parents=True, exist_ok=True)
        for f in sorted((src / folder).iterdir()):
            if f.suffix == ".gguf":
                if f.stem.rsplit("-", 1)[1] in variants:
                    shutil.copyfile(f, out / f.name)
            elif f.suffix == ".npz":
                with np.load(f) as z:
                    keep = {k: z[k] for k in z.files
                            if (k in GEMMA3_KEYS if folder == GEMMA3 else keep_key(k, variants))}
                np.savez_compressed(out / f.name, **keep)
            elif f.suffix in (".json", ".md") and f.name != "metrics.json":
                shutil.copyfile(f, out / f.name)
    total = sum(p.stat().st_size for p in dst.rglob("*") if p.is_file())
    print(f"{dst}: {total / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
