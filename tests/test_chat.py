"""Chat templates: the GGUF's own (sandboxed) and the built-in fallbacks."""

from __future__ import annotations

import pytest

from conftest import REFERENCE_DIR
from turbollm import Model, TurbollmError
from turbollm.text.chat_template import gemma4_turns, gemma_turns, render_template, strip_thinking

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " What is 2+2? "}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
     {"role": "assistant", "content": "<|channel>thought\nhmm<channel|>b"}, {"role": "user", "content": "c"}],
]


@pytest.fixture(scope="module")
def gemma4_model() -> Model:
    return Model.load(REFERENCE_DIR / "gemma4-tiny-moe" / "gemma4-tiny-moe-Q4_0.gguf")


@pytest.mark.parametrize("thinking", [False, True])
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_builtin_gemma4_format_equals_the_official_template(gemma4_model, messages, thinking):
    template = gemma4_model.gguf.get("tokenizer.chat_template")
    official = render_template(template, messages, bos_token="<bos>", enable_thinking=thinking)
    assert official == "<bos>" + gemma4_turns(messages, enable_thinking=thinking)


def test_model_chat_prompt_uses_the_gguf_template_without_a_second_bos(gemma4_model):
    messages = CONVERSATIONS[1]
    prompt = gemma4_model.chat_prompt(messages)
    assert prompt.startswith("<|turn>system\nBe brief.<turn|>\n<|turn>user\nWhat is 2+2?<turn|>\n<|turn>model\n")
    ids = gemma4_model.encode(prompt)
    assert ids[0] == gemma4_model.tokenizer.bos_id and ids[1] != ids[0]
    assert gemma4_model.chat_prompt(messages, enable_thinking=True).startswith("<|turn>system\n<|think|>Be brief.")


def test_old_thoughts_are_stripped_from_history():
    assert strip_thinking("<|channel>thought\nsecret<channel|>The answer") == "The answer"
    assert "secret" not in gemma4_turns([{"role": "user", "content": "q"},
                                         {"role": "assistant", "content": "<|channel>secret<channel|>a"},
                                         {"role": "user", "content": "q2"}])


def test_gemma3_turns():
    assert gemma_turns(CONVERSATIONS[1]) == (
        "<start_of_turn>user\nBe brief.\n\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n")
    with pytest.raises(TurbollmError, match="alternate"):
        gemma_turns([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(TurbollmError, match="unknown role 'robot'"):
        gemma_turns([{"role": "robot", "content": "a"}])


def test_template_sandbox_refuses_python_internals():
    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(TurbollmError, match="chat template"):
        render_template(evil, [{"role": "user", "content": "x"}])
    with pytest.raises(TurbollmError, match="chat template: stop here"):
        render_template("{{ raise_exception('stop here') }}", [])


def test_inspect_shows_gemma4_structure(capsys):
    from turbollm.cli import main

    assert main(["inspect", str(REFERENCE_DIR / "gemma4-tiny-moe" / "gemma4-tiny-moe-Q4_K_M.gguf"), "--no-tensors"]) == 0
    out = capsys.readouterr().out
    assert "layer pattern SSSSSG" in out and "sliding window 32" in out
    assert "experts: 16 per layer, 4 active per token, width 32" in out
    # 2,359,392 expert parameters of which 4/16 are active: 5,608,742 - 2,359,392 * 3/4
    assert "parameters: 5,608,742 total, 3,839,198 active per token" in out
    assert main(["inspect", str(REFERENCE_DIR / "gemma4-tiny-ple" / "gemma4-tiny-ple-Q4_K_M.gguf"), "--no-tensors"]) == 0
    out = capsys.readouterr().out
    assert "KV sharing: the last 3 layers reuse the K/V of layers [3, 4]" in out
    assert "per-layer embeddings: 32 per layer" in out
