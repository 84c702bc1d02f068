"""`turbollm quality` on the default model: the report's figures are what they claim to be."""

from __future__ import annotations

import json
import math

import pytest

from turbollm.cli import quality
from turbollm.cli import main
from turbollm.kv.plan import CacheConfig, plan_kv


@pytest.fixture(scope="module")
def report(gemma3_model):
    net = gemma3_model.network
    ids = gemma3_model.tokenizer.encode(quality.default_text(), add_special=True, parse_special=False)[:160]
    # turbo2 without the exact window: on 160 tokens its 65 f16 rows would hide the codec's cost
    configs = [CacheConfig("q8_0", "q8_0"), CacheConfig("turbo2", "turbo2", recent=0), CacheConfig("f32", "f32")]
    return quality.measure(net, ids, configs, chunk=64, model_name="default"), net, ids


def test_bundled_text_is_a_few_thousand_tokens_and_says_its_license(gemma3_model):
    text = quality.default_text()
    assert "public domain" in text.splitlines()[0]
    assert 2500 < len(gemma3_model.tokenizer.encode(text)) < 6000


@pytest.mark.slow
def test_baseline_row_compares_f16_with_itself(report):
    r, _, _ = report
    base = r.rows[0]
    assert base.cache == "f16" and base.kl_mean == 0.0 and base.top1_agreement == 1.0
    assert base.perplexity_change_pct == 0.0 and base.compression_vs_f16 == 1.0
    assert 1.0 < base.perplexity < 1000.0


def test_rows_order_the_codecs_by_their_error_and_bytes(report):
    r, net, ids = report
    rows = {row.cache: row for row in r.rows}
    assert [row.cache for row in r.rows] == ["f16", "q8_0", "turbo2~0", "f32"]
    rows["turbo2"] = rows["turbo2~0"]
    # f32 and q8_0 barely move the distribution; 2-bit TurboQuant moves it far more
    assert rows["f32"].kl_mean < 1e-4 and rows["q8_0"].kl_mean < 0.01
    assert rows["turbo2"].kl_mean > 10 * rows["q8_0"].kl_mean
    assert rows["turbo2"].top1_agreement < rows["q8_0"].top1_agreement <= 1.0
    for row in r.rows:
        plan = plan_kv(net.kv_layout(), len(ids), quality.parse_cache_entry(row.cache))
        assert row.bytes_per_token == plan.nbytes / len(ids)
        assert math.isclose(row.compression_vs_f16, rows["f16"].bytes_per_token / row.bytes_per_token)
    assert rows["turbo2"].compression_vs_f16 > 6.0  # 16 bits -> 2.125


@pytest.mark.slow
def test_cli_prints_json_and_draws_a_plot(tmp_path, capsys):
    png = tmp_path / "quality.png"
    assert main(["quality", "-t", "2", "--max-tokens", "40", "--cache-types", "q4_0,q8_0/turbo3@1", "--json",
                 "--plot", str(png)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [row["cache"] for row in out["rows"]] == ["f16", "q4_0", "q8_0/turbo3@1"] and out["n_tokens"] == 40
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_refuses_bad_entries_in_one_line(capsys):
    assert main(["quality", "--max-tokens", "40", "--cache-types", "q3_k"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: unknown KV cache type 'q3_k'") and err.count("\n") == 1
