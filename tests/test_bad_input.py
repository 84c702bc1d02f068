"""Bad input gets one clear line naming what is wrong, never a traceback from deep inside.

Each case corrupts a real copy of the default model file in one place (found by searching the
header bytes for the key or tensor name) and checks the error names the file and the culprit.
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest

from turbollm import ContextLengthError, GGUFError, Model, SamplingParams
from turbollm.cli import main as cli_main
from turbollm.gguf.reader import GGUFFile

from conftest import REFERENCE_DIR

HEADER_BYTES = 8 * 2**20  # the header (vocabulary included) lies in the first few MB


@pytest.fixture
def corrupt(tmp_path, default_model_path):
    """corrupt(edit, source=default model) -> path of a copy of `source` whose header bytes were
    changed by edit(bytearray-of-header, path)."""

    def make(edit, source: Path | None = None) -> Path:
        path = tmp_path / "model.gguf"
        shutil.copyfile(source or default_model_path, path)
        with open(path, "r+b") as f:
            header = bytearray(f.read(HEADER_BYTES))
            edit(header, path)
            f.seek(0)
            f.write(header)
        return path

    return make


def _tensor_info_at(header: bytearray, name: str) -> int:
    """Offset just past the name of tensor `name` in the tensor-info table."""
    needle = struct.pack("<Q", len(name)) + name.encode()
    at = header.find(needle)
    assert at >= 0
    return at + len(needle)


def _one_line(e: BaseException) -> str:
    text = str(e)
    assert "\n" not in text
    return text


def test_bad_magic(corrupt):
    path = corrupt(lambda h, p: h.__setitem__(slice(0, 4), b"GGUX"))
    with pytest.raises(GGUFError) as e:
        GGUFFile(path)
    assert "not a GGUF file" in _one_line(e.value) and str(path) in str(e.value)


def test_truncated_header(tmp_path, default_model_path):
    path = tmp_path / "cut.gguf"
    with open(default_model_path, "rb") as src, open(path, "wb") as dst:
        dst.write(src.read(100_000))  # ends inside the vocabulary
    with pytest.raises(GGUFError) as e:
        GGUFFile(path)
    assert "truncated" in _one_line(e.value) and str(path) in str(e.value)


def test_truncated_tensor_data(tmp_path, default_model_path):
    path = tmp_path / "cut.gguf"
    shutil.copyfile(default_model_path, path)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - 1000)
    with pytest.raises(GGUFError) as e:
        GGUFFile(path)
    message = _one_line(e.value)
    assert "runs past the end of the file" in message and "tensor '" in message and str(path) in message


def test_tensor_offset_past_end(corrupt):
    def edit(h, p):
        at = _tensor_info_at(h, "blk.3.ffn_up.weight")
        n_dims = struct.unpack_from("<I", h, at)[0]
        offset_at = at + 4 + 8 * n_dims + 4
        struct.pack_into("<Q", h, offset_at, 2**32)  # aligned, far past the end
    with pytest.raises(GGUFError) as e:
        GGUFFile(corrupt(edit))
    assert "'blk.3.ffn_up.weight'" in _one_line(e.value) and "past the end" in str(e.value)


def test_unknown_quant_type(corrupt):
    def edit(h, p):
        at = _tensor_info_at(h, "blk.0.attn_q.weight")
        n_dims = struct.unpack_from("<I", h, at)[0]
        struct.pack_into("<I", h, at + 4 + 8 * n_dims, 99)
    with pytest.raises(GGUFError) as e:
        GGUFFile(corrupt(edit))
    message = _one_line(e.value)
    assert "'blk.0.attn_q.weight'" in message and "unknown quantization type 99" in message


def test_missing_required_key(corrupt):
    def edit(h, p):
        at = h.find(b"gemma3.block_count")
        h[at:at + len(b"gemma3.block_count")] = b"gemma3.block_xount"
    with pytest.raises(GGUFError) as e:
        Model.load(corrupt(edit))
    assert "missing required metadata key 'gemma3.block_count'" in _one_line(e.value)


def test_unsupported_architecture(corrupt):
    def edit(h, p):
        key = b"general.architecture"
        at = h.find(key) + len(key) + 4 + 8  # value type (uint32), string length (uint64)
        assert h[at:at + 6] == b"gemma3"
        h[at:at + 6] = b"llamaX"
    with pytest.raises(GGUFError) as e:
        Model.load(corrupt(edit))
    assert "architecture 'llamaX' is not supported" in _one_line(e.value)


def test_wrong_tensor_shape_is_named(corrupt):
    def edit(h, p):  # declare attn_q as [640, 512] instead of [640, 1024]: same type, half the bytes
        at = _tensor_info_at(h, "blk.2.attn_q.weight")
        struct.pack_into("<Q", h, at + 4 + 8, 512)
    with pytest.raises(GGUFError) as e:
        Model.load(corrupt(edit))
    message = _one_line(e.value)
    assert "'blk.2.attn_q.weight'" in message and "(512, 640)" in message and "(1024, 640)" in message


def test_missing_file(tmp_path):
    with pytest.raises(GGUFError) as e:
        GGUFFile(tmp_path / "nope.gguf")
    assert "no such file" in _one_line(e.value)


def test_prompt_longer_than_context(default_model_path):
    model = Model.load(default_model_path, ctx_size=16)
    prompt = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen"
    with pytest.raises(ContextLengthError) as e:
        model.generate(prompt, SamplingParams(temperature=0, max_tokens=4))
    message = _one_line(e.value)
    assert "context size is 16" in message and "--ctx-size" in message


def test_a_token_id_outside_the_vocabulary_is_refused(fast_model):
    with pytest.raises(ValueError, match="token id 300000 is outside the vocabulary"):
        fast_model.generate([2, 300000], SamplingParams(temperature=0, max_tokens=2))


def test_ctx_size_beyond_training_context_is_refused(default_model_path):
    with pytest.raises(Exception) as e:
        Model.load(default_model_path, ctx_size=10**6)
    assert "32768" in _one_line(e.value)


def test_cli_reports_one_line_and_exit_status(capsys, default_model_path):
    status = cli_main(["run", "-m", str(default_model_path), "-c", "8", "-p", "a b c d e f g h i j k l", "-n", "4"])
    err = capsys.readouterr().err.strip()
    assert status == 1
    assert err.startswith("error: ") and "\n" not in err and "context size is 8" in err


def test_cli_bad_sampling_value(capsys, default_model_path):
    status = cli_main(["run", "-m", str(default_model_path), "-p", "hi", "--top-p", "0"])
    err = capsys.readouterr().err.strip()
    assert status == 1 and err == "error: top_p must be in (0, 1], got 0.0"


# ---- Gemma 4 -------------------------------------------------------------------------------

TINY_MOE = REFERENCE_DIR / "gemma4-tiny-moe" / "gemma4-tiny-moe-Q4_0.gguf"


def _set_uint32_key(header: bytearray, key: str, value: int) -> None:
    at = header.find(struct.pack("<Q", len(key)) + key.encode()) + 8 + len(key)
    assert struct.unpack_from("<I", header, at)[0] in (4, 5)  # GGUF uint32 / int32 value type
    struct.pack_into("<I", header, at + 4, value)


def test_gemma4_missing_expert_tensor_is_named_with_its_shape(corrupt):
    def edit(h, p):
        name = b"blk.2.ffn_down_exps.weight"
        at = h.find(struct.pack("<Q", len(name)) + name) + 8
        h[at:at + len(name)] = b"blk.2.ffn_down_exps.weighX"
    with pytest.raises(GGUFError) as e:
        Model.load(corrupt(edit, TINY_MOE))
    assert "missing tensor 'blk.2.ffn_down_exps.weight' (expected shape (16, 256, 32))" in _one_line(e.value)


def test_gemma4_wrong_expert_count_in_metadata(corrupt):
    with pytest.raises(GGUFError) as e:
        Model.load(corrupt(lambda h, p: _set_uint32_key(h, "gemma4.expert_count", 8), TINY_MOE))
    message = _one_line(e.value)
    assert "'blk.0.ffn_down_exps.weight' holds 16 along its first dimension, but metadata 'gemma4.expert_count' says 8" in message


def test_gemma4_more_active_experts_than_experts(corrupt):
    with pytest.raises(GGUFError) as e:
        Model.load(corrupt(lambda h, p: _set_uint32_key(h, "gemma4.expert_used_count", 17), TINY_MOE))
    assert "expert_used_count 17 must be in 1..16" in _one_line(e.value)


def test_gemma4_mismatched_expert_shape(corrupt):
    def edit(h, p):  # blk.1.ffn_gate_up_exps.weight: ggml dims [256, 64, 16] -> [256, 32, 16]
        at = _tensor_info_at(h, "blk.1.ffn_gate_up_exps.weight")
        struct.pack_into("<Q", h, at + 4 + 8, 32)
    with pytest.raises(GGUFError) as e:
        Model.load(corrupt(edit, TINY_MOE))
    message = _one_line(e.value)
    assert "'blk.1.ffn_gate_up_exps.weight' has shape (16, 32, 256), expected (16, 64, 256)" in message
