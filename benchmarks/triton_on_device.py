"""The checks of tests/test_triton_kernels.py with the kernels on a device: Triton compiled for the
GPU, not interpreted. benchmarks/gpu_check.sh runs it on a lent GPU.

    python benchmarks/triton_on_device.py                 # cuda:0
    TRITON_INTERPRET=1 python benchmarks/triton_on_device.py --device cpu   # the same, interpreted

Why a script beside the tests: tests/test_triton_kernels.py builds its weights and inputs on the
CPU and loads its models with no device, which is right under the interpreter (CI) and wrong on a
GPU (with a GPU, conftest leaves TRITON_INTERPRET unset, so a kernel launched on CPU tensors fails,
and `Model.load(..., backend="triton")` on the CPU is refused). To run there the tests would need a
device chosen once (cuda when torch sees one, else cpu) that the weights (`QTensor.to`), the inputs
and `Model.load(..., device=)` take, with the reference computed on the CPU to compare with.

Prints one line per check and `N passed, N failed` last; exits 1 if any failed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as QType
from gguf import quants as gguf_quants

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
REL_TOL = 2e-6  # as tests/test_triton_kernels.py: float32 products in another summation order


def _quantized(qtype: QType, n: int, k: int):
    from turbollm.kernels.qtensor import QTensor
    w = np.random.default_rng(int(qtype)).standard_normal((n, k)).astype(np.float32)
    return QTensor(torch.from_numpy(gguf_quants.quantize(w, qtype).copy()), qtype, (n, k))


def _from_file(path: Path, name: str):
    from turbollm.gguf.reader import GGUFFile
    from turbollm.kernels.qtensor import QTensor
    gf = GGUFFile(path)
    t = gf.tensors[name]
    return QTensor(gf.tensor_bytes(name), t.qtype, tuple(t.shape), name)


def weights() -> dict:
    moe = DATA / "gemma4-tiny-moe" / "gemma4-tiny-moe-Q4_K_M.gguf"
    out = {q.name: (lambda q=q: _quantized(q, 37, 96)) for q in (QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1, QType.Q8_0)}
    out["Q4_K"] = lambda: _from_file(moe, "blk.0.attn_q.weight")
    out["Q6_K"] = lambda: _from_file(moe, "token_embd.weight")
    return out


def check_linear(device: str, name: str, make, n_rows: int) -> tuple[bool, str]:
    from turbollm.kernels import reference
    from turbollm.kernels.triton import quantized_linear as triton_linear
    w = make()
    x = torch.randn(n_rows, w.shape[1], generator=torch.Generator().manual_seed(n_rows))
    ref = reference.linear(x, w)
    wd = w.to(device)
    if not triton_linear.supports(wd):
        return False, "not supported"
    ours = triton_linear.linear(x.to(device), wd).cpu()
    if ours.shape != ref.shape:
        return False, f"shape {tuple(ours.shape)}, the reference's {tuple(ref.shape)}"
    err = float((ours - ref).abs().max()) / float(ref.abs().max())  # NaN (never passes) where not finite
    return err <= REL_TOL, f"max |ours - ref| / max |ref| = {err:.1e} (bound {REL_TOL:g})"


def check_model(device: str, name: str, variant: str) -> tuple[bool, str]:
    from turbollm import Model, SamplingParams
    path = DATA / f"gemma4-tiny-{name}" / f"gemma4-tiny-{name}-{variant}.gguf"
    prompt = [2, 818, 1279, 529, 3001]
    ref = Model.load(path, backend="reference", ctx_size=64)
    tri = Model.load(path, backend="triton", ctx_size=64, device=device)
    if tri.network.ops.name != "triton":
        return False, f"loaded on the {tri.network.ops.name} backend"
    ids = torch.tensor(prompt)
    ref_logits = ref.network.logits(ref.network.forward(ids, ref.network.new_cache(8)))
    tri_logits = tri.network.logits(tri.network.forward(ids, tri.network.new_cache(8))).cpu()
    err = float((tri_logits - ref_logits).abs().max())
    bound = 1e-4 * float(ref_logits.abs().max()) + 1e-4
    params = SamplingParams(temperature=0, max_tokens=2)
    same = tri.generate(prompt, params).token_ids == ref.generate(prompt, params).token_ids
    return err < bound and same, f"logits max err {err:.1e} (bound {bound:.1e}), greedy tokens {'equal' if same else 'DIFFER'}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--linear-only", action="store_true", help="the quantized linear checks, not the whole models")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"error: {args.device}: torch sees no CUDA/ROCm device", file=sys.stderr)
        return 1
    if args.device.startswith("cuda"):
        print(f"device: {torch.cuda.get_device_name(args.device)}; torch {torch.__version__}", flush=True)
    import triton
    print(f"triton {triton.__version__}; TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '(unset)')}")
    checks = [(f"linear {n} x{rows}", lambda n=n, m=m, rows=rows: check_linear(args.device, n, m, rows))
              for n, m in weights().items() for rows in (1, 3, 17)]
    checks += [] if args.linear_only else [(f"model tiny-{n} {v}", lambda n=n, v=v: check_model(args.device, n, v))
                                           for n, v in (("dense", "Q4_0"), ("moe", "Q4_K_M"))]
    passed = failed = 0
    for label, fn in checks:
        start = time.perf_counter()
        try:
            ok, detail = fn()
        except Exception as e:  # one failing check must not hide the rest
            ok, detail = False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        passed, failed = passed + ok, failed + (not ok)
        print(f"{'PASS' if ok else 'FAIL'} {label}: {detail} ({time.perf_counter() - start:.1f} s)", flush=True)
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
