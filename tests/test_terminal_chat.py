"""`turbollm chat`: multi-turn in the terminal, history through the chat template, /clear."""

from __future__ import annotations

import io

from turbollm import SamplingParams
from turbollm.cli import main as cli_main

SEA, SKY = "Write one sentence about the sea.", "And one about the sky."


def test_each_turn_sees_the_conversation_and_clear_forgets_it(fast_model, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{SEA}\n{SKY}\n/clear\n{SKY}\n/exit\nnever read\n"))
    out = io.StringIO()
    monkeypatch.setattr("sys.stdout", out)
    assert cli_main(["chat", "--temp", "0", "-n", "12", "-c", "4096"]) == 0
    lines = out.getvalue().split("\n")
    params = SamplingParams(temperature=0, max_tokens=12)
    first = fast_model.generate(fast_model.chat_prompt([{"role": "user", "content": SEA}]), params).text
    history = [{"role": "user", "content": SEA}, {"role": "assistant", "content": first},
               {"role": "user", "content": SKY}]
    second = fast_model.generate(fast_model.chat_prompt(history), params).text
    fresh = fast_model.generate(fast_model.chat_prompt([{"role": "user", "content": SKY}]), params).text
    assert second != fresh  # the history changes the answer, so the test can tell
    expected = f"{first}\n{second}\n(conversation cleared)\n{fresh}\n"
    assert "\n".join(lines[1:]) == expected
    assert lines[0].startswith("gemma-3-270m-q4_k_m.gguf: 4096 tokens of context")


def test_a_turn_that_does_not_fit_is_refused_and_the_session_goes_on(monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("word " * 300 + "\nHi\n"))
    out = io.StringIO()
    monkeypatch.setattr("sys.stdout", out)
    assert cli_main(["chat", "--temp", "0", "-n", "4", "-c", "128"]) == 0
    lines = out.getvalue().split("\n")
    assert lines[1].startswith("error: the prompt has ") and "the context size is 128 tokens" in lines[1]
    assert lines[1].endswith("(/clear starts over)")
    assert len(lines[2]) > 0  # the next turn was answered
