"""`fit --auto`'s search: the largest context that fits the budgets, and for it the fewest
experts in CPU memory and the most precise KV cache (speed first, then quality). Budgets can
be pretend (`--device cuda:0 --vram 16GiB`, `--ram 24GiB`), so plans for a machine you do not
have are made here, and tested on a CPU-only machine."""

from __future__ import annotations

import shlex
from dataclasses import replace

from turbollm.config import ModelConfig, RunConfig
from turbollm.gguf.reader import GGUFFile
from turbollm.planner.plan import Plan, plan_for_devices

AUTO_CACHES = (("f16", "f16"), ("q8_0", "q8_0"), ("q8_0", "turbo4"), ("turbo4", "turbo4"), ("turbo3", "turbo3"))
MIN_SLOT = 256  # the smallest slot the search offers


def largest_fit(gf: GGUFFile, cfg: ModelConfig, run: RunConfig) -> tuple[RunConfig, Plan] | None:
    """The first run that fits, trying slot contexts from the training context down by halves;
    for each, --n-cpu-moe from the given value up (with an accelerator and experts), and cache
    types from f16 down. None when nothing of MIN_SLOT tokens or more fits."""
    sizes, size = [], cfg.n_ctx_train
    while size >= MIN_SLOT:
        sizes.append(size)
        size //= 2
    for slot in sizes:
        for n_cpu_moe in moe_choices(cfg, run):
            for k, v in AUTO_CACHES:
                trial = replace(run, ctx_size=slot * run.parallel, n_cpu_moe=n_cpu_moe,
                                cache=replace(run.cache, type_k=k, type_v=v))
                p = plan_for_devices(gf, cfg, trial)
                if p.fits:
                    return trial, p
    return None


def moe_choices(cfg: ModelConfig, run: RunConfig) -> range | tuple[int, ...]:
    """The --n-cpu-moe values worth trying: more experts in CPU memory only help an accelerator."""
    return range(run.n_cpu_moe, cfg.n_layer + 1) if cfg.n_expert and run.device != "cpu" else (run.n_cpu_moe,)


def command_line(path, run: RunConfig) -> str:
    """The turbollm command that runs `run`."""
    words = ["turbollm", "serve" if run.parallel > 1 else "run", "-m", str(path), "-c", str(run.ctx_size)]
    if run.parallel > 1:
        words += ["-np", str(run.parallel)]
    if run.cache.type_k != "f16" or run.cache.type_v != "f16":
        words += ["-ctk", run.cache.type_k, "-ctv", run.cache.type_v]
    if run.device != "cpu":
        words += ["--device", run.device]
    if run.n_cpu_moe:
        words += ["--n-cpu-moe", str(run.n_cpu_moe)]
    if run.n_gpu_layers >= 0:
        words += ["-ngl", str(run.n_gpu_layers)]
    for regex, device in run.overrides:
        words += ["-ot", f"{regex}={device}"]
    return shlex.join(words)
