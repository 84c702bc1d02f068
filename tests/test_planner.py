"""The memory planner and `turbollm fit`: predicted bytes equal allocated bytes, refusals carry
the numbers and the fix, --n-cpu-moe and -ot place exactly what they name, and the 26B-A4B
configurations of the seeds under a pretend 16 GiB accelerator."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

from turbollm import Model, planner
from turbollm.cli import main as cli_main
from turbollm.config import ModelConfig
from turbollm.errors import TurbollmError
from turbollm.kv.plan import CacheConfig
from turbollm.config import RunConfig
from turbollm.planner import parse_size

from conftest import REFERENCE_DIR

GIB, MIB = 2**30, 2**20
Q8 = CacheConfig("q8_0", "q8_0")


@pytest.fixture(scope="module")
def gemma4_26b():
    """The 26B-A4B architecture as the planner sees a GGUF: its metadata and tensor table
    (from the synthetic preset, whose file is the real model's layout), no weights."""
    from turbollm.synthetic import PRESETS, _nbytes, architecture_metadata, tensor_plan
    s = PRESETS["26b-a4b"]
    md = {**architecture_metadata(s), "general.architecture": "gemma4", "tokenizer.ggml.tokens": [""] * s.n_vocab}
    tensors = {name: SimpleNamespace(name=name, n_bytes=_nbytes(shape, qtype)) for name, shape, qtype in tensor_plan(s)}
    return SimpleNamespace(path="gemma4-26b-a4b (layout)", tensors=tensors), ModelConfig.from_metadata(md)


def plan_26b(gemma4_26b, ctx, parallel, n_cpu_moe=0, cache=Q8, overrides=()):
    gf, cfg = gemma4_26b
    devices = [planner.cpu_device(24 * GIB), planner.Device("cuda:0", 16 * GIB, 16 * GIB, pretend=True)]
    return planner.plan(gf, cfg, devices, RunConfig(ctx_size=ctx, parallel=parallel, cache=cache,
                                                    n_cpu_moe=n_cpu_moe, overrides=overrides))


@pytest.mark.parametrize("path, parallel, ctx", [
    (None, 1, 4096), (None, 3, 3 * 1024),
    (REFERENCE_DIR / "gemma4-tiny-moe" / "gemma4-tiny-moe-Q4_K_M.gguf", 2, 1024),
    (REFERENCE_DIR / "gemma4-tiny-ple" / "gemma4-tiny-ple-Q4_K_M.gguf", 1, 2048),
    (REFERENCE_DIR / "gemma4-tiny-dense" / "gemma4-tiny-dense-Q4_0.gguf", 4, 4 * 256),
])
def test_predicted_bytes_equal_what_is_allocated(path, parallel, ctx, default_model_path):
    from turbollm import SamplingParams
    from turbollm.planner.process_memory import resident_file_bytes
    cache = CacheConfig("q8_0", "q4_0")
    model = Model.load(path or default_model_path, ctx_size=ctx, parallel=parallel, cache=cache,
                       residency="mmap")  # mapped: the file's resident pages are the weights
    p = model.plan
    # weights: every tensor of the file, on the CPU; a forward maps them in (views of the mmap, no copies)
    assert p.weights("cpu") == sum(t.n_bytes for t in model.gguf.tensors.values())
    model.generate("Hello there", SamplingParams(temperature=0, max_tokens=2))
    resident = resident_file_bytes(str(model.gguf.path))
    row_tables = sum(t.n_bytes for t in model.gguf.tensors.values() if t.name == "per_layer_token_embd.weight")
    assert (p.weights("cpu") - row_tables) * 0.99 <= resident <= model.gguf.file_size + 4096  # whole pages;
    # a per-layer embedding table is read a row per token, so only its rows in use are resident
    # KV: one full cache per slot, as the serving engine allocates them, global and sliding apart
    one = model.network.new_cache(ctx // parallel, cache)
    assert p.kv_bytes == parallel * one.nbytes
    assert p.kv_global["cpu"] == parallel * one.plan.global_bytes
    assert p.kv_sliding.get("cpu", 0) == parallel * one.plan.sliding_bytes


def test_a_run_that_does_not_fit_is_refused_before_loading_with_the_fix(default_model_path):
    with pytest.raises(TurbollmError) as e:
        Model.load(default_model_path, ctx_size=4 * 32768, parallel=4, ram=600 * MIB)
    message = str(e.value)
    assert "cpu needs 774 MiB but has 600 MiB (pretend budget)" in message and "Nothing was loaded" in message
    assert "-ctk q8_0 -ctv q8_0" in message and "--parallel 2" in message
    assert Model.load(default_model_path, ctx_size=4 * 32768, parallel=4, ram=600 * MIB,
                      cache=Q8).plan.fits  # the first suggestion fits


def test_26b_at_262k_with_four_full_slots_is_refused_and_one_slot_fits(gemma4_26b):
    four = plan_26b(gemma4_26b, 4 * 262144, 4, n_cpu_moe=8)
    assert not four.fits and round(four.kv_global["cuda:0"] / MIB) == 4 * 2720
    refusal = four.refusal()
    assert re.search(r"cuda:0 needs 22,\d{3} MiB but has 16,384 MiB", refusal)
    assert "--n-cpu-moe" in refusal and "--parallel 1 --ctx-size 262144" in refusal
    one = plan_26b(gemma4_26b, 262144, 1, n_cpu_moe=8)
    assert one.fits and round(one.kv_global["cuda:0"] / MIB) == 2720


def test_seed_configurations_beside_llama_cpp(gemma4_26b):
    """llama.cpp logged 680 + 478 = 1,158 MiB of q8_0 KV at 64K / 4 slots (ours: 680 + 427, its
    sliding cache adds a 512-token batch of slack per stream), 1,838 at 131K / 4, 2,879 at 262K / 1."""
    p64 = plan_26b(gemma4_26b, 65536, 4, n_cpu_moe=4)
    assert p64.fits and round(p64.kv_global["cuda:0"] / MIB) == 680 and p64.kv_sliding["cuda:0"] < 478 * MIB
    assert plan_26b(gemma4_26b, 131072, 4, n_cpu_moe=4).kv_bytes <= 1838 * MIB
    assert plan_26b(gemma4_26b, 262144, 1, n_cpu_moe=8).kv_bytes <= 2879 * MIB


def test_n_cpu_moe_moves_exactly_the_moe_blocks_of_those_layers(gemma4_26b):
    p = plan_26b(gemma4_26b, 65536, 4, n_cpu_moe=4)
    on_cpu = {t.name for t in p.tensors if t.device == "cpu"}
    expected = {t.name for t in p.tensors if (m := re.match(r"blk\.(\d+)\.", t.name)) and int(m.group(1)) < 4
                and ("_exps" in t.name or "ffn_gate_inp" in t.name or "ffw_norm_2" in t.name)}
    assert on_cpu == expected and len([n for n in expected if n.endswith("_exps.weight")]) == 8
    assert p.weights("cpu", experts=True) == sum(t.n_bytes for t in p.tensors if t.name in expected and "_exps" in t.name)


def test_override_tensor_regexes_match_on_disk_names(gemma4_26b):
    p = plan_26b(gemma4_26b, 65536, 4, overrides=(planner.parse_override(r"token_embd\.weight=CPU"),
                                                 planner.parse_override(r"blk\.(2[0-9])\.ffn_.*_exps=cpu")))
    cpu = sorted(t.name for t in p.tensors if t.device == "cpu")
    assert "token_embd.weight" in cpu
    assert {n for n in cpu if "_exps" in n} == {f"blk.{il}.{k}" for il in range(20, 30)
                                                for k in ("ffn_gate_up_exps.weight", "ffn_down_exps.weight", "ffn_down_exps.scale")}
    assert next(t for t in p.tensors if t.name == "token_embd.weight").why == r"-ot token_embd\.weight"
    # a moved layer's router, norms and scales follow its experts (the MoE block computes there)
    assert {f"blk.{il}.ffn_gate_inp.weight" for il in range(20, 30)} <= set(cpu)
    assert "blk.19.ffn_gate_inp.weight" not in cpu
    with pytest.raises(ValueError, match="REGEX=DEVICE"):
        planner.parse_override("token_embd")
    with pytest.raises(ValueError, match="bad regular expression"):
        planner.parse_override("blk.(=cpu")


def test_sizes_and_devices_parse_like_llama_cpp():
    assert parse_size("16GiB") == 16 * GIB == parse_size("16G") and parse_size("800MiB") == 800 * MIB
    assert planner.normalize_device("CUDA0") == "cuda:0" == planner.normalize_device("cuda") and planner.normalize_device("CPU") == "cpu"
    with pytest.raises(ValueError, match="cannot read"):
        parse_size("lots")


def test_fit_prints_the_plan_and_auto_the_command(capsys, default_model_path):
    assert cli_main(["fit", "-c", "8192", "-np", "2", "-ctk", "q8_0", "-ctv", "q8_0"]) == 0
    out = capsys.readouterr().out
    assert "memory plan for" in out and "2 slot(s) of 4096" in out and out.strip().endswith("fits")
    assert cli_main(["fit", "-c", "131072", "-np", "4", "--ram", "600MiB"]) == 1
    assert "does not fit" in capsys.readouterr().out
    assert cli_main(["fit", "--ram", "400MiB", "--auto"]) == 0
    out = capsys.readouterr().out
    command = next(line for line in out.splitlines() if line.startswith("use: "))
    assert command.startswith("use: turbollm run -m ") and " -c " in command
    assert cli_main(["fit", "--device", "cuda:0"]) == 1  # no such device here and no --vram to pretend with
    assert "give --vram SIZE" in capsys.readouterr().err


def test_fit_plans_a_pretend_accelerator_and_warns_nothing_on_cpu(capsys):
    path = str(REFERENCE_DIR / "gemma4-tiny-moe" / "gemma4-tiny-moe-Q4_0.gguf")
    assert cli_main(["fit", path, "--device", "cuda:0", "--vram", "2MiB", "--n-cpu-moe", "1", "-c", "512"]) in (0, 1)
    out = capsys.readouterr().out
    assert "cuda:0 (pretend)" in out and "host-resident experts: " in out and "layers 0" in out


def test_placement_that_the_model_cannot_run_is_refused_before_loading(default_model_path):
    with pytest.raises(TurbollmError, match="no such device"):
        Model.load(default_model_path, overrides=(("token_embd", "cuda:0"),))


def test_by_default_the_cpu_reads_the_weights_into_process_memory(default_model_path):
    from turbollm import SamplingParams
    params = SamplingParams(temperature=0, max_tokens=6)
    mapped = Model.load(default_model_path, ctx_size=256, residency="mmap").generate(
        "The capital of France is", params)
    copied_model = Model.load(default_model_path, ctx_size=256)  # the default on the CPU: --no-mmap
    assert copied_model.generate("The capital of France is", params).token_ids == mapped.token_ids
    import numpy as np  # the tensors view a plain array read from the file, not the map
    assert not isinstance(copied_model.gguf._data, np.memmap)
    assert copied_model.gguf.tensor_bytes("token_embd.weight").data_ptr() - copied_model.gguf._data.ctypes.data == \
        copied_model.gguf.tensors["token_embd.weight"].offset


def test_mlock_pins_the_weights_or_says_how_to_allow_it(default_model_path):
    from turbollm import SamplingParams
    from turbollm.errors import GGUFError
    params = SamplingParams(temperature=0, max_tokens=6)
    try:
        locked = Model.load(default_model_path, ctx_size=256, residency="lock")
    except GGUFError as e:  # an unprivileged process with a small RLIMIT_MEMLOCK
        assert "--mlock failed" in str(e) and "ulimit -l" in str(e)
        return
    assert locked.generate("Hello", params).token_ids == Model.load(default_model_path, ctx_size=256).generate("Hello", params).token_ids


def test_only_the_chosen_accelerator_is_used_and_an_igpu_beside_a_discrete_one_is_named(monkeypatch):
    """torch's CUDA queries stand in for a machine with a discrete GPU and an integrated one."""
    import torch
    gpus = [SimpleNamespace(name="discrete", is_integrated=False, mem=(12 * GIB, 16 * GIB)),
            SimpleNamespace(name="igpu", is_integrated=True, mem=(2 * GIB, 4 * GIB))]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(gpus))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: gpus[i])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: gpus[i].mem)
    devices, notes = planner.accelerators("cuda:0", None)
    assert [(d.name, d.budget, d.total, d.integrated, d.pretend) for d in devices] == [("cuda:0", 12 * GIB, 16 * GIB, False, False)]
    assert any("integrated GPU is visible beside a discrete one" in n for n in notes)
    devices, _ = planner.accelerators("cuda:1", 1 * GIB)  # an explicit budget wins over what is free
    assert [(d.name, d.budget, d.integrated) for d in devices] == [("cuda:1", GIB, True)]
    with pytest.raises(TurbollmError, match="torch sees no such device"):
        planner.accelerators("cuda:2", None)
