"""`turbollm fit`: the memory plan of a run, printed without loading the model, and with
`--auto` the largest context (and the fastest placement and cache for it) that fits.

Budgets can be pretend (`--device cuda:0 --vram 16GiB`, `--ram 24GiB`), so plans for a machine
you do not have are made here, and tested on a CPU-only machine."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, replace

from turbollm import planner
from turbollm.config import ModelConfig
from turbollm.gguf.reader import GGUFFile

AUTO_CACHES = (("f16", "f16"), ("q8_0", "q8_0"), ("q8_0", "turbo4"), ("turbo4", "turbo4"), ("turbo3", "turbo3"))


@dataclass(frozen=True)
class FitArgs:
    model: str | None
    request: planner.PlanRequest
    device: str = "cpu"
    vram: int | None = None
    ram: int | None = None
    auto: bool = False


def fit(a: FitArgs, out) -> int:
    from turbollm.api import default_model_path

    gf = GGUFFile(a.model if a.model is not None else default_model_path())
    cfg = ModelConfig.from_metadata(gf.metadata, str(gf.path))
    if a.auto:
        return _auto(a, gf, cfg, out)
    p = planner.plan_for_devices(gf, cfg, a.request, a.device, a.ram, a.vram)
    print(p.format(), file=out)
    if not p.fits:
        print(f"does not fit: {p.refusal()}", file=out)
        return 1
    print("fits", file=out)
    return 0


def _auto(a: FitArgs, gf: GGUFFile, cfg: ModelConfig, out) -> int:
    """Largest slot context first (the training context, then halves); for it, the fewest
    experts in CPU memory and the most precise cache that fit (speed, then quality)."""
    r = a.request
    sizes, size = [], cfg.n_ctx_train
    while size >= 256:
        sizes.append(size)
        size //= 2
    has_accel = a.device != "cpu"
    moe_choices = range(r.n_cpu_moe, cfg.n_layer + 1) if cfg.n_expert and has_accel else (r.n_cpu_moe,)
    for slot in sizes:
        for n_cpu_moe in moe_choices:
            for k, v in AUTO_CACHES:
                trial = replace(r, ctx_size=slot * r.parallel, n_cpu_moe=n_cpu_moe,
                                cache=replace(r.cache, type_k=k, type_v=v))
                p = planner.plan_for_devices(gf, cfg, trial, a.device, a.ram, a.vram)
                if p.fits:
                    print(p.format(), file=out)
                    print("use: " + command_line(gf.path, a, trial), file=out)
                    return 0
    print(f"{gf.path}: no context of 256 tokens or more fits these budgets with any cache type"
          + (" or --n-cpu-moe" if len(moe_choices) > 1 else ""), file=out)
    return 1


def command_line(path, a: FitArgs, r: planner.PlanRequest) -> str:
    words = ["turbollm", "serve" if r.parallel > 1 else "run", "-m", str(path), "-c", str(r.ctx_size)]
    if r.parallel > 1:
        words += ["-np", str(r.parallel)]
    if r.cache.type_k != "f16" or r.cache.type_v != "f16":
        words += ["-ctk", r.cache.type_k, "-ctv", r.cache.type_v]
    if a.device != "cpu":
        words += ["--device", a.device]
    if r.n_cpu_moe:
        words += ["--n-cpu-moe", str(r.n_cpu_moe)]
    if r.n_gpu_layers >= 0:
        words += ["-ngl", str(r.n_gpu_layers)]
    for regex, device in r.overrides:
        words += ["-ot", f"{regex}={device}"]
    return shlex.join(words)
