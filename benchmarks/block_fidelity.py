"""How far each fused native block and each multi-row path of the fast backend is from its definition.

    python benchmarks/block_fidelity.py [--reference tests/data] [--models moe,dense,ple] [--variants Q4_K_M,IQ3_M]

On the tiny Gemma 4 fixtures, with the prompt "The lighthouse keeper wrote in the log that
the fog", a tapped forward (models.gemma `tap`) records every block's input; then for every
layer each fused block (kernels/native/csrc/gemma_blocks.c: attention, FFN, MoE) runs on that input and
is compared, as the relative L2 distance of its output, with
  - the same block composed from the fast backend's single ops (same arithmetic: only the
    order of float additions may differ, ~1e-7), and
  - the reference backend's block (exact float32 on the dequantized weights: the 8-bit
    activation noise, ~5e-3).
The paths that run several rows are compared on whole logits: two sequences in one batched
step against each alone, a 4-row verify step (speculative decoding) against 4 single steps,
and a prefill forward (past 32 rows: float GEMMs) against token-by-token decode, which
differ by the 8-bit activation noise of the decode path.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from turbollm import Model
from turbollm.kernels import blocks, fast, reference
from turbollm.kv.plan import CacheConfig

FAST, REFERENCE = fast.FastBackend("fp32"), reference.ReferenceBackend()  # the prefill tiles exact

PROMPT = "The lighthouse keeper wrote in the log that the fog"
CACHE = CacheConfig("f32", "f32")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def block_distances(model: Model, ids: torch.Tensor) -> dict[str, tuple[float, float]]:
    """block -> (max over layers of fused-vs-composed, of fused-vs-reference)."""
    net = model.network
    taps: dict[tuple[str, int], torch.Tensor] = {}
    net.tap = lambda name, il, t: taps.__setitem__((name, il), t.clone())
    net.forward(ids, net.new_cache(64, CACHE))
    net.tap = None
    out: dict[str, list[tuple[float, float]]] = {"ffn": [], "moe": []}
    for il, layer in enumerate(net.layers):
        h = taps[("attn_out", il)]
        fused = FAST.ffn_block(h, layer.ffn)
        out["ffn"].append((rel(fused, blocks.ffn_block(FAST, h, layer.ffn)),
                           rel(fused, blocks.ffn_block(REFERENCE, h, layer.ffn))))
        if layer.moe is not None:
            fused = FAST.moe_block(h, layer.moe)
            out["moe"].append((rel(fused, blocks.moe_block(FAST, h, layer.moe)),
                               rel(fused, blocks.moe_block(REFERENCE, h, layer.moe))))
    # attention reads and writes a cache: each version gets its own, filled by the same steps
    out["attention"] = attention_distances(net, ids)
    return {k: (max(a for a, _ in v), max(b for _, b in v)) for k, v in out.items() if v}


class _With:
    """A backend with its attention_block replaced (instances: the settings stay the backend's)."""

    def __init__(self, ops, attention_block):
        self._ops, self.attention_block = ops, attention_block

    def __getattr__(self, name):
        return getattr(self._ops, name)


def attention_distances(net, ids: torch.Tensor) -> list[tuple[float, float]]:
    results = []
    for variant in ("fused", "composed", "reference"):
        ops = {"fused": FAST, "composed": _composed(FAST), "reference": REFERENCE}[variant]
        saved, outs = net.ops, []

        def spy(x, b, rope, slots, positions, _original=ops.attention_block):
            y = _original(x, b, rope, slots, positions)
            outs.append(y)
            return y

        net.ops = _With(ops, spy)
        net.forward(ids, net.new_cache(64, CACHE))
        net.ops = saved
        results.append(outs)
    return [(rel(f, c), rel(f, r)) for f, c, r in zip(*results)]


def _composed(ops):
    return _With(ops, lambda x, b, rope, slots, positions: blocks.attention_block(ops, x, b, rope, slots, positions))


def path_distances(model: Model, ids: torch.Tensor) -> dict[str, float]:
    net = model.network

    def steps(tokens: torch.Tensor, chunk: int) -> torch.Tensor:
        cache = net.new_cache(256, CACHE)
        return torch.cat([net.logits(net.forward(tokens[i:i + chunk], cache)) for i in range(0, len(tokens), chunk)])

    # batched decode: two sequences with their prompts in their caches, then one step of both
    other = torch.flip(ids, [0])
    caches = [net.new_cache(64, CACHE), net.new_cache(64, CACHE)]
    for seq, cache in zip((ids, other), caches):
        net.forward(seq[:-1], cache)
    batched = net.logits(net.forward_batch([ids[-1:], other[-1:]], caches))
    alone = []
    for seq in (ids, other):
        cache = net.new_cache(64, CACHE)
        net.forward(seq[:-1], cache)
        alone.append(net.logits(net.forward(seq[-1:], cache)))
    long = ids.repeat(3)  # past DECODE_MAX_TOKENS rows: the prefill path (dequantized tiles, GEMM)
    saved, net.ops = net.ops, fast.FastBackend("fp32")
    try:
        prefill = net.logits(net.forward(long, net.new_cache(256, CACHE)))
    finally:
        net.ops = saved
    return {
        "batched decode (2 sequences)": rel(batched, torch.cat(alone)),
        f"verify (4 rows a step, {len(ids)} tokens)": rel(steps(ids, 4), steps(ids, 1)),
        f"prefill fp32 ({len(long)} rows) vs decode": rel(prefill, steps(long, 1)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", default=str(Path(__file__).resolve().parents[1] / "tests" / "data"))
    parser.add_argument("--models", default="moe,dense,ple")
    parser.add_argument("--variants", default="Q8_0,Q6_K,Q4_K_M,Q4_0,IQ4_NL,IQ3_M")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    print(f"{'file':<16} {'block':<10} {'fused-composed':>15} {'fused-reference':>16}")
    for name in args.models.split(","):
        for variant in args.variants.split(","):
            path = Path(args.reference) / f"gemma4-tiny-{name}" / f"gemma4-tiny-{name}-{variant}.gguf"
            model = Model.load(path, backend="fast", threads=args.threads, cache=CACHE)
            ids = torch.tensor(model.encode(PROMPT))
            label = f"{name} {variant}"
            for block, (composed, ref) in block_distances(model, ids).items():
                print(f"{label:<16} {block:<10} {composed:>15.2e} {ref:>16.2e}")
            for path_name, d in path_distances(model, ids).items():
                print(f"{label:<16} {path_name:<36} logits {d:.2e}")


if __name__ == "__main__":
    main()
