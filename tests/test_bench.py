"""`turbollm bench`: what it runs and what it reports (behaviour, not speed)."""

from __future__ import annotations

import json

import pytest
import torch

from turbollm.config import RunConfig
from turbollm.cli import bandwidth
from turbollm.cli.bench import BenchSettings, decode_weight_bytes, format_table, run_bench
from turbollm.cli import main
from turbollm.gguf.reader import GGUFFile
from turbollm.planner.process_memory import resident_file_bytes

from conftest import REFERENCE_DIR


def test_decode_bytes_count_active_experts_and_the_tied_head():
    gf = GGUFFile(REFERENCE_DIR / "gemma4-tiny-moe" / "gemma4-tiny-moe-Q4_0.gguf")
    experts = sum(t.n_bytes for t in gf.tensors.values() if "_exps." in t.name)
    others = sum(t.n_bytes for t in gf.tensors.values() if "_exps." not in t.name)
    assert "output.weight" not in gf.tensors and experts > 0  # tied LM head: the table is read whole
    # 16 experts, 4 active: each expert tensor is read for a quarter of its experts
    assert decode_weight_bytes(gf, 16, 4) == others + sum(
        t.n_bytes * 4 // 16 for t in gf.tensors.values() if "_exps." in t.name)


def test_decode_bytes_split_by_where_the_plan_puts_each_tensor():
    gf = GGUFFile(REFERENCE_DIR / "gemma4-tiny-moe" / "gemma4-tiny-moe-Q4_0.gguf")
    placement = {t.name: "cpu" if t.name.startswith("blk.0.") and "_exps" in t.name else "cuda:0" for t in gf.tensors.values()}
    by_device = bandwidth.decode_bytes(gf, 16, 4, placement)
    assert by_device["cpu"] == sum(t.n_bytes // 4 for t in gf.tensors.values() if placement[t.name] == "cpu")
    assert sum(by_device.values()) == decode_weight_bytes(gf, 16, 4) == bandwidth.decode_bytes(gf, 16, 4)["cpu"]


def test_share_of_bandwidth_is_bytes_per_token_times_tokens_per_second_over_bandwidth():
    bws = {"cuda:0": bandwidth.Bandwidth(copy=3.0e12, read=2.5e12), "cpu": bandwidth.Bandwidth(copy=40e9, read=50e9)}
    by_device = {"cuda:0": 2 * 10**9, "cpu": 10**8, "cuda:1": 0}
    gpu, cpu = bandwidth.shares(by_device, 150.0, bws)  # cuda:1 holds nothing, so no share
    assert (gpu.device, cpu.device) == ("cuda:0", "cpu")
    assert gpu.achieved == 3e11 and gpu.of_copy == pytest.approx(0.1) and gpu.of_read == pytest.approx(0.12)
    assert cpu.of_copy == pytest.approx(1.5e10 / 40e9)
    lines = bandwidth.format_lines(by_device, bws, ("tg128", 150.0), 128, 8)
    assert lines[0].startswith("decode reads 1.96 GiB of weights per token: cuda:0 1.86 GiB, cpu 95.37 MiB (estimated")
    assert "expert tensors x 8/128" in lines[0]
    assert lines[1] == ("memory bandwidth measured in this run: cuda:0 copy 3000.0 GB/s (read + written), read 2500.0 GB/s; "
                        "cpu copy 40.0 GB/s (read + written), read 50.0 GB/s")
    assert lines[2] == ("decode (tg128, 150.00 tok/s) reads the weights on cuda:0 at 300.0 GB/s = 10% of the copy bandwidth, "
                        "12% of the read bandwidth")
    assert len(lines) == 4 and "reads the weights on cpu at 15.0 GB/s = 38% of the copy" in lines[3]
    assert len(bandwidth.format_lines(by_device, bws, None)) == 2  # no decode test: no share


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="a CUDA/ROCm device"))])
def test_copy_and_read_bandwidth_are_measured_on_the_device(device):
    copy = bandwidth.copy_bandwidth(device, threads=1 if device == "cpu" else None, n_bytes=16 * 2**20, repetitions=2)
    read = bandwidth.read_bandwidth(device, threads=1 if device == "cpu" else None, n_bytes=16 * 2**20, repetitions=2)
    assert 1e8 < copy < 1e14 and 1e8 < read < 1e14  # 0.1 GB/s .. 100 TB/s
    if device == "cuda":
        assert min(bandwidth.measure("cuda").copy, bandwidth.measure("cuda").read) > 1e11  # any GPU: > 100 GB/s


def test_bench_prints_decode_share_of_measured_bandwidth(capsys):
    tiny = REFERENCE_DIR / "gemma4-tiny-moe" / "gemma4-tiny-moe-Q4_0.gguf"
    assert main(["bench", "-m", str(tiny), "-p", "4", "-n", "4", "-pg", "none", "-r", "1", "-t", "1"]) == 0
    out = capsys.readouterr().out
    assert "memory bandwidth measured in this run: cpu copy " in out and "expert tensors x 4/16" in out
    assert "decode (tg4, " in out and "of the copy bandwidth" in out


def test_bench_runs_every_test_and_reports_memory(default_model_path):
    settings = BenchSettings(RunConfig(threads=2), n_prompt=(8,), n_gen=(4,), prompt_gen=((6, 3),), repetitions=2)
    report = run_bench(settings)
    assert [(r.name, r.n_prompt, r.n_gen, len(r.seconds)) for r in report.results] == [
        ("pp8", 8, 0, 2), ("tg4", 0, 4, 2), ("pp6+tg3", 6, 3, 2)]
    assert all(s > 0 for r in report.results for s in r.seconds)
    assert report.results[2].tokens_per_second[0] == pytest.approx(9 / report.results[2].seconds[0])
    assert report.description == "gemma3 270M Q4_K_M" and report.threads == 2
    assert report.file_bytes == default_model_path.stat().st_size
    assert report.rss_before_load <= report.rss_after_load <= report.peak_rss
    assert report.max_kv_bytes > 0 and report.copy_bandwidth > 0 and report.read_bandwidth > 0
    # the weights were read into process memory once (the default on the CPU): the growth is
    # the tensors, the KV cache and buffers, within 10% of file + KV cache plus the buffers
    grown = report.max_anonymous - report.anonymous_before_load
    assert report.residency == "copy"
    assert sum(t.n_bytes for t in GGUFFile(default_model_path).tensors.values()) + report.max_kv_bytes <= grown
    assert grown <= 1.1 * (report.file_bytes + report.max_kv_bytes) + 128 * 2**20
    table = format_table(report)
    assert "| gemma3 270M Q4_K_M" in table and "pp6+tg3" in table and "of the read bandwidth" in table
    assert report.device == "cpu" and set(report.bandwidths) == {"cpu"} and report.copy_bandwidth == report.bandwidths["cpu"].copy
    as_json = json.loads(json.dumps(report.to_json()))
    assert as_json["results"][1]["test"] == "tg4" and 0 < as_json["decode_copy_share"] < 10


def test_bench_with_mmap_computes_from_the_files_own_pages(default_model_path):
    report = run_bench(BenchSettings(RunConfig(threads=2, residency="mmap"), n_prompt=(8,), n_gen=(4,), prompt_gen=(),
                                     repetitions=1))
    # the weights are the file's own pages, never a copy: all of them were read, none twice
    assert report.residency == "mmap"
    assert 0.9 * report.file_bytes < report.max_model_file_resident <= report.file_bytes + 4096  # last page whole
    assert report.max_anonymous - report.anonymous_before_load >= report.max_kv_bytes
    assert "(mmapped, of" in format_table(report)


def test_resident_file_pages_count_once_over_two_mappings(default_model_path):
    path = str(default_model_path.resolve())
    first, second = GGUFFile(path), GGUFFile(path)  # two mmaps of one file share its pages
    info = first.tensors["token_embd.weight"]
    before = resident_file_bytes(path)
    assert int(first.tensor_bytes(info.name).sum()) == int(second.tensor_bytes(info.name).sum())
    after = resident_file_bytes(path)
    # touched through both mappings, counted once (the kernel also maps a few neighbouring cached
    # pages). Another mapping in this process (a model loaded by an earlier test) may already hold
    # the pages: then nothing grows, but counting per mapping would still add them twice.
    assert after - before < info.n_bytes * 1.1 and after >= info.n_bytes * 0.9
    assert after <= first.file_size + 4096


def test_bench_cli_json(capsys):
    assert main(["bench", "-p", "4", "-n", "2", "-pg", "none", "-r", "1", "-t", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["test"] for r in out["results"]] == ["pp4", "tg2"] and out["threads"] == 1


@pytest.mark.parametrize("flags, message", [
    (["-r", "0"], "repetitions must be at least 1"),
    (["-p", "-3"], "test sizes must be positive"),
    (["-d", "-1"], "n-depth must be >= 0"),
    (["-pg", "1000000,10"], "needs 1000010 tokens of context"),
])
def test_bench_refuses_bad_settings(capsys, flags, message):
    assert main(["bench", "-n", "1", *flags]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_bench_rejects_malformed_pairs(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "-pg", "1150"])
    assert "PROMPT,GEN pairs" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_at_depth_starts_every_run_from_the_same_prefilled_context(gemma3_model):
    from turbollm.kv.plan import CacheConfig, plan_kv
    settings = BenchSettings(RunConfig(threads=2, cache=CacheConfig("q8_0", "turbo3")), n_prompt=(4,), n_gen=(3,),
                             prompt_gen=(), repetitions=2, depth=600)
    report = run_bench(settings)
    assert [r.name for r in report.results] == ["pp4 @ d600", "tg3 @ d600"]
    assert "KV cache q8_0/turbo3" in report.backend
    # the largest cache held the depth and the pp4 test: 604 positions
    assert report.max_kv_bytes == plan_kv(gemma3_model.network.kv_layout(), 604, settings.run.cache).nbytes


@pytest.mark.slow
def test_bench_spec_type_compares_plain_and_speculative_decoding(capsys):
    assert main(["bench", "--spec-type", "ngram", "-n", "48", "-r", "1", "-t", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["identical"] is True and out["spec"] == "ngram" and out["n_gen"] == 48
    assert out["acceptance"] > 0.5 and len(out["plain_ts"]) == len(out["spec_ts"]) == 1
    assert main(["bench", "--spec-type", "ngram", "-n", "8", "-r", "1"]) == 0
    assert "draft acceptance rate = " in capsys.readouterr().out
