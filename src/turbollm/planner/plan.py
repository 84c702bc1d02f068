"""The memory planner: where every tensor and every KV byte lives, decided before loading.

One planner serves `fit`, `run`, `serve` and `bench`. From the GGUF's tensor table (no weight
is read), the devices and their budgets, and the run's settings (context, slots, cache types,
`--n-gpu-layers`, `--n-cpu-moe`, `--override-tensor`, a draft head) it places each tensor:

1. `-ot REGEX=DEVICE` rules first, in order, matched against on-disk names (`token_embd\\.weight`,
   `blk\\.1[0-9]\\.ffn_.*_exps`), as llama.cpp's `--override-tensor`;
2. the expert tensors (`*_exps*`) of the first `--n-cpu-moe` layers stay in CPU memory (the CPU
   kernels compute them; only activations cross);
3. the token embedding stays in CPU memory (one row per token is read: llama.cpp does the same);
4. with an accelerator, layers below `--n-gpu-layers` (default: all) and the output head go
   to it; the rest is CPU.
Each layer's K/V lives with that layer's attention weights. Compute buffers are estimated from
the largest temporaries of a step (see `compute_bytes`). Then every device's total is held
against its budget; a plan that does not fit is refused with the numbers and the flags that
would make it fit (`suggestions`), never shrunk.

Weights in CPU memory count against RAM whether they are read into the process (the default on
the CPU, `resolve_residency`) or mapped (`--mmap`): decode reads all of them every token, and
mapped pages that do not stay resident would be read from disk at every token.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace

from turbollm.config import ModelConfig, Residency, RunConfig
from turbollm.errors import TurbollmError
from turbollm.gguf.reader import GGUFFile
from turbollm.kv.plan import plan_kv

MIB = 2**20
_LAYER = re.compile(r"^blk\.(\d+)\.")


@dataclass(frozen=True)
class Device:
    name: str  # "cpu", "cuda:0"
    budget: int  # bytes this run may use on it
    total: int  # bytes the device has
    integrated: bool = False  # an iGPU sharing system memory
    pretend: bool = False  # a budget given on the command line, not a device torch sees

    @property
    def is_cpu(self) -> bool:
        return self.name == "cpu"


@dataclass(frozen=True)
class TensorPlace:
    name: str
    n_bytes: int
    device: str
    why: str  # "-ot token_embd\\.weight", "--n-cpu-moe 4", "layer 3", "token embedding"
    draft: bool = False


@dataclass
class Plan:
    model: str
    devices: list[Device]
    run: RunConfig  # what it was planned for
    ctx: int  # the context of all slots together
    tensors: list[TensorPlace] = field(default_factory=list)
    kv_global: dict[str, int] = field(default_factory=dict)  # device -> bytes
    kv_sliding: dict[str, int] = field(default_factory=dict)
    compute: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    cfg: ModelConfig | None = field(default=None, repr=False)  # what it was made from: suggestions re-plan
    gguf: GGUFFile | None = field(default=None, repr=False)
    draft: GGUFFile | None = field(default=None, repr=False)

    def weights(self, device: str, experts: bool | None = None) -> int:
        return sum(t.n_bytes for t in self.tensors if t.device == device
                   and (experts is None or _is_expert(t.name) == experts))

    def total(self, device: str) -> int:
        return self.weights(device) + self.kv_global.get(device, 0) + self.kv_sliding.get(device, 0) + self.compute.get(device, 0)

    @property
    def kv_bytes(self) -> int:
        return sum(self.kv_global.values()) + sum(self.kv_sliding.values())

    def over_budget(self) -> list[Device]:
        return [d for d in self.devices if self.total(d.name) > d.budget]

    @property
    def fits(self) -> bool:
        return not self.over_budget()

    def device(self, name: str) -> Device:
        return next(d for d in self.devices if d.name == name)

    def placement(self) -> dict[str, str]:
        """Tensor name -> device, for the loader (draft tensors prefixed 'draft:')."""
        return {("draft:" if t.draft else "") + t.name: t.device for t in self.tensors}

    def format(self) -> str:
        r = self.run
        lines = [f"memory plan for {self.model}: context {self.ctx} ({r.parallel} slot(s) of {self.ctx // r.parallel}), "
                 f"KV cache {r.cache.label}" + (f", --n-cpu-moe {r.n_cpu_moe}" if r.n_cpu_moe else "")
                 + (f", -ngl {r.n_gpu_layers}" if r.n_gpu_layers >= 0 else "")]
        lines.append(f"{'device':<10} {'weights':>10} {'(experts)':>10} {'KV global':>10} {'KV sliding':>10} "
                     f"{'compute':>9} {'total':>10} {'budget':>10}  ")
        for d in self.devices:
            n = d.name
            mark = "ok" if self.total(n) <= d.budget else f"OVER by {(self.total(n) - d.budget) / MIB:,.0f} MiB"
            label = n + (" (pretend)" if d.pretend else "") + (" (integrated)" if d.integrated else "")
            lines.append(f"{label:<10} {self.weights(n) / MIB:>10,.0f} {self.weights(n, True) / MIB:>10,.0f} "
                         f"{self.kv_global.get(n, 0) / MIB:>10,.0f} {self.kv_sliding.get(n, 0) / MIB:>10,.0f} "
                         f"{self.compute.get(n, 0) / MIB:>9,.0f} {self.total(n) / MIB:>10,.0f} {d.budget / MIB:>10,.0f}  {mark}")
        lines.append("(MiB; weights on the CPU are read every token: they must stay in RAM)")
        has_accel = any(not d.is_cpu for d in self.devices)
        host_experts = [t for t in self.tensors if has_accel and _is_expert(t.name) and t.device == "cpu"]
        if host_experts:
            layers = sorted({int(_LAYER.match(t.name).group(1)) for t in host_experts if _LAYER.match(t.name)})
            lines.append(f"host-resident experts: {len(host_experts)} tensors of layers {_ranges(layers)}, "
                         f"{sum(t.n_bytes for t in host_experts) / MIB:,.0f} MiB, computed by the CPU kernels")
        lines += self.notes
        return "\n".join(lines)

    def refusal(self) -> str:
        """One paragraph: what does not fit, by how much, and what would make it fit."""
        over = self.over_budget()
        parts = [f"{d.name} needs {self.total(d.name) / MIB:,.0f} MiB but has {d.budget / MIB:,.0f} MiB"
                 + (" (pretend budget)" if d.pretend else "") for d in over]
        return (f"{self.model}: the plan does not fit: " + "; ".join(parts)
                + f" (context {self.ctx}, {self.run.parallel} slot(s), KV {self.run.cache.label}, "
                f"KV {self.kv_bytes / MIB:,.0f} MiB). Nothing was loaded. To fit: " + "; ".join(self.suggestions()))

    def suggestions(self) -> list[str]:
        return suggest(self)


def _is_expert(name: str) -> bool:
    return "_exps" in name


def _moe_part(name: str) -> bool:
    """A tensor of a layer's MoE block (experts, router, their norms and scales): the block
    computes where its experts are."""
    return "_exps" in name or "ffn_gate_inp" in name or "ffw_norm_2" in name


def _ranges(xs: list[int]) -> str:
    out, start = [], None
    for i, x in enumerate(xs):
        if start is None:
            start = x
        if i + 1 == len(xs) or xs[i + 1] != x + 1:
            out.append(f"{start}" if start == x else f"{start}-{x}")
            start = None
    return ",".join(out)


def parse_size(text: str) -> int:
    """'16GiB', '16G', '800MiB', '1.5T', '12345' (bytes) -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read {text!r} as a size: use e.g. 16GiB, 800MiB or a byte count")
    scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[m.group(2).upper()]
    return int(float(m.group(1)) * scale)


def parse_override(text: str) -> tuple[str, str]:
    """'REGEX=DEVICE' (-ot) with the regex checked and the device named as torch names it
    (llama.cpp's 'CPU' and 'CUDA0' are read too)."""
    regex, sep, device = text.rpartition("=")
    if not sep or not regex:
        raise ValueError(f"-ot/--override-tensor takes REGEX=DEVICE (e.g. 'ffn_.*_exps=cpu'), got {text!r}")
    try:
        re.compile(regex)
    except re.error as e:
        raise ValueError(f"-ot {text!r}: bad regular expression: {e}") from None
    return regex, normalize_device(device)


def normalize_device(name: str) -> str:
    n = name.strip().lower()
    m = re.fullmatch(r"(cuda|rocm|hip|gpu)[:]?(\d*)", n)
    if n == "cpu":
        return "cpu"
    if m:
        return f"cuda:{m.group(2) or 0}"  # ROCm builds of torch name their devices cuda too
    raise ValueError(f"unknown device {name!r}: use cpu or cuda:N")


def cpu_device(budget: int | None = None) -> Device:
    """System memory: budget = what is available now (MemAvailable) unless given."""
    total = available = None
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        total, available = info.get("MemTotal"), info.get("MemAvailable")
    except (OSError, ValueError):
        pass
    if total is None:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Device("cpu", budget if budget is not None else (available or total), total, pretend=budget is not None)


def accelerators(chosen: str | None, vram: int | None) -> tuple[list[Device], list[str]]:
    """The accelerator to use (only the one chosen with --device), and warnings. With --vram the
    budget is that figure: on a machine without the device it is a pretend device, so plans
    for one can be made (and tested) anywhere."""
    notes: list[str] = []
    if chosen is None or chosen == "cpu":
        if vram is not None:
            raise ValueError("--vram needs --device cuda:N (the device it describes)")
        return [], notes
    name = normalize_device(chosen)
    index = int(name.split(":")[1])
    seen = []
    try:
        import torch
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                props = torch.cuda.get_device_properties(i)
                free, total = torch.cuda.mem_get_info(i)
                seen.append((i, props.name, bool(getattr(props, "is_integrated", False)), free, total))
    except Exception as e:  # a broken driver must not hide the plan
        notes.append(f"note: could not query CUDA devices ({type(e).__name__}: {e})")
    if any(s[2] for s in seen) and any(not s[2] for s in seen):
        notes.append("warning: an integrated GPU is visible beside a discrete one; only --device "
                     f"{name} is used (set CUDA_VISIBLE_DEVICES to hide the other)")
    match = next((s for s in seen if s[0] == index), None)
    if match is None:
        if vram is None:
            raise TurbollmError(f"--device {name}: torch sees no such device; give --vram SIZE to plan for it anyway")
        return [Device(name, vram, vram, pretend=True)], notes
    _, _, integrated, free, total = match
    return [Device(name, vram if vram is not None else free, total, integrated, pretend=vram is not None)], notes


def compute_bytes(cfg: ModelConfig, n_batch: int, n_slots: int, ctx_slot: int) -> int:
    """Memory a step takes beyond weights and KV, at most: the larger of a prompt chunk and a
    decode step of every slot (logits of n_slots rows). A prompt chunk's temporaries are freed
    layer by layer, but the allocator keeps the memory they took: measured over one 512-token
    forward, the process grew 943 MiB on the 26B-A4B (30 layers of 2,816) and 71 MiB on the 270M
    model (18 of 640), about four float32 rows of n_embd per token and layer, plus the MoE
    pairs' rows (n_batch * n_used of them). The rest of the estimate: the widest FFN's three
    buffers, q/k/v rows, 256-key score chunks, a 4 MiB dequantized weight tile and its bf16 copy,
    one row of logits. Calibrated on those two models, an estimate for others."""
    d, widest = cfg.n_embd, max(cfg.n_ff)
    retained = 4 * cfg.n_layer * n_batch * d * 4
    pairs = 2 * n_batch * cfg.n_expert_used * (d + 3 * cfg.n_ff_expert) * 4 if cfg.n_expert else 0
    ffn = 3 * n_batch * max(widest, cfg.n_expert_used * cfg.n_ff_expert if cfg.n_expert else 0) * 4
    q_dim = cfg.n_head * max(cfg.head_dim)
    rows = n_batch * (6 * d + 3 * q_dim) * 4
    scores = cfg.n_head * n_batch * 256 * 4
    tile = 6 * MIB
    prefill = retained + pairs + ffn + rows + scores + tile + cfg.n_vocab * 4
    decode = n_slots * (cfg.n_vocab * 4 + (6 * d + 3 * q_dim + 3 * widest) * 4)
    return max(prefill, decode)


def plan(gguf: GGUFFile, cfg: ModelConfig, devices: list[Device], run: RunConfig,
         draft: GGUFFile | None = None, notes: list[str] | None = None) -> Plan:
    """Place every tensor and KV byte (see the module docstring). Never refuses: `Plan.fits`
    and `Plan.refusal()` say what the caller must do."""
    slot = run.slot_ctx(cfg)
    ctx = slot * run.parallel
    if not 0 <= run.n_cpu_moe:
        raise TurbollmError(f"--n-cpu-moe must be >= 0, got {run.n_cpu_moe}")
    accel = next((d.name for d in devices if not d.is_cpu), None)
    n_gpu = cfg.n_layer if run.n_gpu_layers < 0 else min(run.n_gpu_layers, cfg.n_layer)
    p = Plan(str(gguf.path), devices, run, ctx, notes=list(notes or []), cfg=cfg, gguf=gguf, draft=draft)
    names = {d.name for d in devices}

    def place(name: str, overrides, draft_file: bool) -> tuple[str, str]:
        for regex, device in overrides:
            if re.search(regex, name):
                if device not in names:
                    raise TurbollmError(f"-ot {regex}={device}: no such device in this plan (devices: {', '.join(sorted(names))})")
                return device, f"-ot {regex}"
        if accel is None:
            return "cpu", "no accelerator"
        all_layers = n_gpu == cfg.n_layer
        if draft_file:  # the head computes where the target's last layers do, its table too
            return (accel, "draft head") if all_layers else ("cpu", "draft head, target's last layer on the CPU")
        m = _LAYER.match(name)
        if m is None:
            if name == "token_embd.weight" and "output.weight" in gguf.tensors:
                return "cpu", "input embedding (one row per token)"
            # output norm and head; a tied embedding is the head too, read whole every token:
            # it goes where the head computes, so no token reads it across the bus
            return (accel, "output head") if all_layers else ("cpu", "output head with the last layer")
        il = int(m.group(1))
        if _moe_part(name) and il < run.n_cpu_moe:
            return "cpu", f"--n-cpu-moe {run.n_cpu_moe}"
        return (accel, f"layer {il}") if il < n_gpu else ("cpu", f"layer {il} beyond -ngl {n_gpu}")

    for t in gguf.tensors.values():
        device, why = place(t.name, run.overrides, False)
        p.tensors.append(TensorPlace(t.name, t.n_bytes, device, why))
    # a MoE block's router, norms and scales follow its experts (models/moe.py loads them so)
    expert_at = {_LAYER.match(t.name).group(1): (t.device, t.why) for t in p.tensors
                 if t.name.endswith(("ffn_gate_up_exps.weight", "ffn_gate_exps.weight"))}
    p.tensors = [replace(t, device=expert_at[m.group(1)][0], why=expert_at[m.group(1)][1])
                 if _moe_part(t.name) and (m := _LAYER.match(t.name)) and m.group(1) in expert_at else t
                 for t in p.tensors]
    if draft is not None:
        for t in draft.tensors.values():
            device, why = place(t.name, run.draft_overrides, True)
            p.tensors.append(TensorPlace(t.name, t.n_bytes, device, why, draft=True))

    try:
        kv = plan_kv(cfg.kv_layout(), slot, run.cache)
    except ValueError as e:  # a codec that does not fit the head size
        raise TurbollmError(f"{gguf.path}: {e}") from None
    for lp in kv.stored:
        device = next((t.device for t in p.tensors if t.name == f"blk.{lp.layer}.attn_k.weight"), "cpu")
        bucket = p.kv_sliding if lp.window > 0 else p.kv_global
        bucket[device] = bucket.get(device, 0) + run.parallel * lp.nbytes
    compute = compute_bytes(cfg, run.n_batch, run.parallel, slot)
    p.compute[accel or "cpu"] = compute
    if accel is not None:  # the CPU still runs what it holds (experts, embedding rows): a chunk's rows
        p.compute["cpu"] = p.compute.get("cpu", 0) + run.n_batch * cfg.n_embd * 4 * 4
    return p


def suggest(p: Plan) -> list[str]:
    """Flags that would make `p` fit, found by re-planning: more experts in CPU memory, a
    smaller KV cache type, fewer slots of the same size, shorter slots."""
    out = []
    r, cfg, slot = p.run, p.cfg, p.ctx // p.run.parallel

    def fits(**changes) -> bool:
        try:
            return plan(p.gguf, cfg, p.devices, replace(r, **changes), p.draft).fits
        except TurbollmError:
            return False

    if cfg.n_expert and any(not d.is_cpu for d in p.devices):
        n = next((n for n in range(r.n_cpu_moe + 1, cfg.n_layer + 1) if fits(n_cpu_moe=n)), None)
        if n is not None:
            out.append(f"--n-cpu-moe {n}")
    for k, v in (("q8_0", "q8_0"), ("q8_0", "turbo4"), ("turbo4", "turbo4"), ("turbo3", "turbo3")):
        cache = replace(r.cache, type_k=k, type_v=v)
        if cache != r.cache and fits(cache=cache):
            out.append(f"-ctk {k} -ctv {v}")
            break
    n = next((n for n in range(r.parallel - 1, 0, -1) if fits(parallel=n, ctx_size=slot * n)), None)
    if n is not None:
        out.append(f"--parallel {n} --ctx-size {slot * n} (slots of {slot} tokens)")
    size = slot
    while size > 256:
        size //= 2
        if fits(ctx_size=size * r.parallel):
            out.append(f"--ctx-size {size * r.parallel} ({r.parallel} slot(s) of {size} tokens)")
            break
    return out or ["nothing in reach fits: a smaller quantization of the model, or more memory"]


def resolve_residency(residency: Residency, device: str) -> Residency:
    """"auto": on the CPU, read the weights into process memory. Decode streams every weight
    each token, and it measured faster from anonymous memory than from the file's page-cache
    pages (26B-A4B Q4_0, 2 threads: tg32 4.82 tok/s mapped, 5.83 copied; the 270M model
    56.3 -> 58.0): the page cache hands out scattered 4 KiB pages, a fresh allocation is mostly
    contiguous (huge pages made no difference: measured on the 605 MB LM head, 19.8 vs 20.1
    GB/s). The copy costs the file's size once (the page cache's pages are reclaimable), and a
    load reads the file (~1 s per GB from the page cache). On an accelerator the weights are
    copied to the device anyway, so the host side stays mapped."""
    if residency is Residency.AUTO:
        return Residency.COPY if device == "cpu" else Residency.MMAP
    return residency


def plan_for_devices(gguf: GGUFFile, cfg: ModelConfig, run: RunConfig) -> Plan:
    """The plan of a run on `run.device` (and the CPU): budgets from what is free now unless
    `run.ram` / `run.vram` give them."""
    accel, notes = accelerators(None if run.device == "cpu" else run.device, run.vram)
    draft = GGUFFile(run.draft_model) if run.draft_model else None
    return plan(gguf, cfg, [cpu_device(run.ram)] + accel, run, draft, notes)


def loader_placement(p: Plan, main_device: str) -> dict[str, str]:
    """The plan as the model loader takes it: the tensors kept off the main device. The model
    code runs a layer where its attention weights are, so what may live elsewhere is what it
    hops to and from: a MoE block (experts and router) and the input embedding. Anything else
    off the main device (-ngl below the layer count, -ot of a dense tensor) is refused here,
    before loading, rather than run across the bus tensor by tensor."""
    main = normalize_device(main_device) if main_device != "cpu" else "cpu"
    off = {t.name: t.device for t in p.tensors if not t.draft and t.device != main}
    bad = [n for n in off if not (_moe_part(n) or (n == "token_embd.weight" and "output.weight" in p.gguf.tensors))]
    if bad:
        raise TurbollmError(f"{len(bad)} tensors would compute off {main} ({', '.join(bad[:3])}"
                            f"{', ...' if len(bad) > 3 else ''}): only MoE blocks (--n-cpu-moe, -ot ...exps=cpu) and the input "
                            f"embedding can live on another device in this version; drop -ngl / that -ot")
    drafts_off = [t.name for t in p.tensors if t.draft and t.device != main]
    if drafts_off:
        raise TurbollmError(f"the draft head computes on {main} with its tables ({drafts_off[0]} was placed on "
                            f"{p.device(next(t.device for t in p.tensors if t.draft and t.device != main)).name}): drop that -otd")
    return off
