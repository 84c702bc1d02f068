"""The reasoning/answer split through the HTTP API: a Gemma 4 model whose network is replaced
by a script (random tiny weights never think), so the thought channel surely comes out, as
`message.reasoning_content` and as streamed `delta.reasoning_content`."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from fastapi.testclient import TestClient

from conftest import REFERENCE_DIR

pytestmark = [pytest.mark.server]

SCRIPT = "<|channel>thought\nThe user greets me.<channel|>Hello there!"


class ScriptedNetwork:
    """Every sequence generates the same scripted tokens: the hidden row of a step carries the
    step number, and the logits put all mass on that step's token."""

    def __init__(self, script: list[int], n_vocab: int):
        self.script, self.n_vocab = script, n_vocab

    def new_cache_plan(self, capacity, config):
        return SimpleNamespace(nbytes=capacity)

    def new_cache(self, capacity, config):
        return SimpleNamespace(nbytes=capacity, steps=0, describe=lambda: "scripted")

    def forward(self, ids, cache):
        return self.forward_batch([ids], [cache])

    def forward_batch(self, ids, caches):
        rows = []
        for seq_ids, cache in zip(ids, caches):
            cache.steps += 1
            rows.append(torch.full((len(seq_ids), 1), float(cache.steps - 1)))
        return torch.cat(rows)

    def logits(self, hidden):
        out = torch.zeros(hidden.shape[0], self.n_vocab)
        for r, step in enumerate(hidden[:, 0].long().tolist()):
            out[r, self.script[min(step, len(self.script) - 1)]] = 100.0  # certain at any temperature
        return out


@pytest.fixture(scope="module")
def client():
    from turbollm import Model
    from turbollm.engine.engine import Engine
    from turbollm.server.app import ServerSettings, create_app
    model = Model.load(REFERENCE_DIR / "gemma4-tiny-moe" / "gemma4-tiny-moe-Q4_0.gguf", ctx_size=512)
    tok = model.tokenizer
    model.network = ScriptedNetwork(tok.encode(SCRIPT, add_special=False, parse_special=True) + [tok.eos_id], tok.n_vocab)
    engine = Engine(model, n_slots=2, slot_ctx=256).start()
    with TestClient(create_app(engine, ServerSettings(model_id="tiny", thinking_default=True))) as c:
        yield c
    engine.stop()


def test_thoughts_go_to_reasoning_content(client):
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "temperature": 0})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "Hello there!", "reasoning_content": "The user greets me."}
    assert choice["finish_reason"] == "stop"


def test_streamed_thoughts_arrive_as_reasoning_deltas_before_the_answer(client):
    import json
    body = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0, "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    deltas = [json.loads(e)["choices"][0]["delta"] for e in events[:-1]]
    reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
    content = "".join(d.get("content", "") for d in deltas)
    assert reasoning == "The user greets me." and content == "Hello there!"
    first_answer = next(i for i, d in enumerate(deltas) if d.get("content"))
    assert all("reasoning_content" not in d for d in deltas[first_answer:])
