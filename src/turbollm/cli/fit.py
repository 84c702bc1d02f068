"""`turbollm fit`: the memory plan of a run, printed without loading the model, and with
`--auto` the largest context (and the fastest placement and cache for it) that fits
(planner/fit.py)."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from turbollm.cli import flags
from turbollm.config import ModelConfig, RunConfig
from turbollm.gguf.reader import GGUFFile


@dataclass(frozen=True)
class FitArgs:
    run: RunConfig
    auto: bool = False


def add_parser(sub) -> None:
    p = sub.add_parser("fit", help="print the memory plan without loading; --auto finds the largest context that fits")
    p.add_argument("model", nargs="?", default=None, help="GGUF file (default: the default model)")
    p.add_argument("-c", "--ctx-size", type=int, default=None,
                   help="context of all slots together (default: the model's training context)")
    p.add_argument("-np", "--parallel", type=int, default=1, help="slots (default 1)")
    p.add_argument("-md", "--model-draft", "--mtp-head", dest="model_draft", default=None, metavar="FILE",
                   help="an MTP assistant head to place too")
    p.add_argument("--auto", action="store_true",
                   help="search --n-cpu-moe and cache types for the largest context that fits, and print the command")
    flags.placement_flags(p)
    flags.cache_flags(p)
    p.set_defaults(handler=lambda args: fit(FitArgs(run=flags.run_config(args), auto=args.auto), sys.stdout))


def fit(a: FitArgs, out) -> int:
    from turbollm import planner
    from turbollm.api import default_model_path
    from turbollm.planner.fit import command_line, largest_fit, moe_choices

    gf = GGUFFile(a.run.model if a.run.model is not None else default_model_path())
    cfg = ModelConfig.from_metadata(gf.metadata, str(gf.path))
    if a.auto:
        found = largest_fit(gf, cfg, a.run)
        if found is None:
            print(f"{gf.path}: no context of 256 tokens or more fits these budgets with any cache type"
                  + (" or --n-cpu-moe" if len(moe_choices(cfg, a.run)) > 1 else ""), file=out)
            return 1
        run, p = found
        print(p.format(), file=out)
        print("use: " + command_line(gf.path, run), file=out)
        return 0
    p = planner.plan_for_devices(gf, cfg, a.run)
    print(p.format(), file=out)
    if not p.fits:
        print(f"does not fit: {p.refusal()}", file=out)
        return 1
    print("fits", file=out)
    return 0
