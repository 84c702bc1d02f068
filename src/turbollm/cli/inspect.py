"""`turbollm inspect`: a GGUF's architecture, metadata and tensors, without loading it."""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass



@dataclass(frozen=True)
class InspectArgs:
    model: str | None
    tensors: bool


def add_parser(sub) -> None:
    p = sub.add_parser("inspect", help="print a GGUF's architecture, metadata and tensors")
    p.add_argument("model", nargs="?", default=None, help="GGUF file (default: the default model)")
    p.add_argument("--no-tensors", dest="tensors", action="store_false", help="omit the tensor table")
    p.set_defaults(handler=lambda args: inspect(InspectArgs(model=args.model, tensors=args.tensors)))


def describe_architecture(cfg, gf) -> list[str]:
    """Human-readable structure: layers, attention pattern, experts, PLE, parameters."""
    tensors = gf.tensors.values()
    total = sum(t.n_elements for t in tensors)
    expert = sum(t.n_elements for t in tensors if "_exps." in t.name)
    ple = sum(t.n_elements for t in tensors if t.name == "per_layer_token_embd.weight")
    active = total - expert + (expert * cfg.n_expert_used // cfg.n_expert if cfg.n_expert else 0)
    lines = [
        f"architecture: {cfg.arch} ({cfg.name}): {cfg.n_layer} layers, hidden {cfg.n_embd}, {cfg.n_head} query heads, "
        f"vocab {cfg.n_vocab}, training context {cfg.n_ctx_train}",
        f"attention: layer pattern {''.join('S' if s else 'G' for s in cfg.swa_layers)} (S sliding, G global), "
        f"sliding window {cfg.sliding_window}, RoPE base {cfg.rope_base:g} global / {cfg.rope_base_swa:g} sliding",
        "heads: " + ", ".join(f"{kind} {cfg.n_head_kv[il]} KV x {cfg.head_dim[il]}"
                             for kind, il in _first_of_each_kind(cfg)),
        f"feed-forward: dense width {'/'.join(str(n) for n in sorted(set(cfg.n_ff)))}",
    ]
    if cfg.n_expert:
        lines.append(f"experts: {cfg.n_expert} per layer, {cfg.n_expert_used} active per token, width {cfg.n_ff_expert} "
                     f"(beside the dense MLP)")
    if cfg.n_kv_shared:
        lines.append(f"KV sharing: the last {cfg.n_kv_shared} layers reuse the K/V of layers "
                     f"{sorted({cfg.kv_source(il) for il in range(cfg.n_layer) if not cfg.has_kv(il)})}")
    if cfg.n_embd_per_layer:
        lines.append(f"per-layer embeddings: {cfg.n_embd_per_layer} per layer, table of {ple:,} parameters "
                     f"(looked up one row per token)")
    line = f"parameters: {total:,} total"
    if cfg.n_expert:
        line += f", {active:,} active per token ({expert:,} in experts)"
    if ple:
        line += f", {total - ple:,} without the per-layer embedding table"
    lines.append(line)
    return lines


def _first_of_each_kind(cfg):
    seen = {}
    for il in range(cfg.n_layer):
        seen.setdefault("sliding" if cfg.is_swa(il) else "global", il)
    return list(seen.items())


def inspect(a: InspectArgs) -> int:
    from turbollm.api import default_model_path
    from turbollm.config import SUPPORTED_ARCHITECTURES, ModelConfig
    from turbollm.gguf.reader import GGUFFile

    gf = GGUFFile(a.model if a.model is not None else default_model_path())
    out = sys.stdout
    print(f"file: {gf.path}", file=out)
    print(f"size: {gf.file_size:,} bytes, {len(gf.tensors)} tensors, {gf.tensor_data_bytes:,} bytes of tensor data", file=out)
    types = Counter(t.qtype.name for t in gf.tensors.values())
    print("tensor types: " + ", ".join(f"{name} x{n}" for name, n in types.most_common()), file=out)
    arch = gf.get("general.architecture", "?")
    if arch in SUPPORTED_ARCHITECTURES:
        cfg = ModelConfig.from_metadata(gf.metadata, str(gf.path))
        for line in describe_architecture(cfg, gf):
            print(line, file=out)
    else:
        print(f"parameters: {sum(t.n_elements for t in gf.tensors.values()):,}", file=out)
        print(f"architecture: {arch} (not supported for running; supported: {', '.join(SUPPORTED_ARCHITECTURES)})", file=out)
    print("\nmetadata:", file=out)
    for key, value in gf.metadata.items():
        if isinstance(value, list) and len(value) > 16:
            shown = f"<{len(value)} entries>"
        elif isinstance(value, str) and len(value) > 120:
            shown = f"<{len(value)} characters>"
        else:
            shown = repr(value)
        print(f"  {key} = {shown}", file=out)
    if a.tensors:
        print(f"\n{'tensor':<40} {'type':<8} {'shape':<22} {'bytes':>14}", file=out)
        for t in gf.tensors.values():
            print(f"{t.name:<40} {t.qtype.name:<8} {str(list(t.shape)):<22} {t.n_bytes:>14,}", file=out)
    return 0
