"""KV cache memory of the Gemma 4 26B-A4B architecture, beside llama.cpp's logged figures.

    python benchmarks/kv_memory.py [-m GGUF]

Without -m the layout comes from the synthetic 26B-A4B preset (turbollm.synthetic: the real
model's heads, window and layer pattern); with -m, from the GGUF's metadata. The figures are
the planner's (turbollm.kv.plan.plan_slots), which the tests hold equal to what is allocated.

llama.cpp's figures (its log for this model with q8_0 K and V) and where ours differ:
- global layers: both keep ctx positions of K and V: identical bytes;
- sliding layers: llama.cpp keeps n_swa * n_seq + n_ubatch cells (padded to 256) in one
  stream shared by the slots; turbollm keeps a ring of exactly `window` positions per slot and
  runs a longer step against the ring plus the step's own keys, so it needs no n_ubatch slack.
"""

from __future__ import annotations

import argparse

from turbollm.kv.plan import CacheConfig, LayerKVShape, plan_slots

MIB = 2**20
# (context, slots) -> llama.cpp's logged KV figures in MiB at q8_0: (global, sliding, total)
LLAMA_CPP_Q8_0 = {(65536, 4): (680, 478, 1158), (131072, 4): (None, None, 1838), (262144, 1): (None, None, 2879)}
CASES = [(65536, 4), (131072, 4), (262144, 1)]


def layout_from_preset() -> tuple[str, list[LayerKVShape]]:
    from turbollm.synthetic import PRESETS
    s = PRESETS["26b-a4b"]
    return s.name, [LayerKVShape(s.n_head_kv_swa, s.head_dim_swa, s.sliding_window) if s.is_swa(il)
                    else LayerKVShape(s.n_head_kv_global, s.head_dim_global) for il in range(s.n_layer)]


def layout_from_gguf(path: str) -> tuple[str, list[LayerKVShape | None]]:
    from turbollm.config import ModelConfig
    from turbollm.gguf.reader import GGUFFile
    gf = GGUFFile(path)
    cfg = ModelConfig.from_metadata(gf.metadata, path)
    return cfg.name, cfg.kv_layout()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", default=None, help="GGUF to read the layout from (default: the preset)")
    parser.add_argument("--types", default="q8_0,f16,q4_0,turbo4,turbo3,turbo2,q8_0/turbo4",
                        help="K[/V] cache types, comma-separated")
    args = parser.parse_args()
    name, layout = layout_from_gguf(args.model) if args.model else layout_from_preset()
    print(f"{name}: KV cache MiB (global + sliding = total); llama.cpp's logged q8_0 figures beside ours")
    print(f"{'cache K/V':<12} {'context':>8} {'slots':>5} {'global':>9} {'sliding':>9} {'total':>9}   llama.cpp")
    for entry in args.types.split(","):
        k, _, v = entry.partition("/")
        config = CacheConfig(k, v or k)
        for ctx, slots in CASES:
            plan = plan_slots(layout, ctx, slots, config)
            ref = LLAMA_CPP_Q8_0.get((ctx, slots)) if config.label == "q8_0" else None
            ref_text = "" if ref is None else " + ".join("?" if x is None else f"{x}" for x in ref[:2]) + f" = {ref[2]}"
            print(f"{config.label:<12} {ctx:>8} {slots:>5} {plan.global_bytes / MIB:>9.1f} "
                  f"{plan.sliding_bytes / MIB:>9.1f} {plan.nbytes / MIB:>9.1f}   {ref_text}")


if __name__ == "__main__":
    main()
