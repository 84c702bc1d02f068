"""The HTTP server, started for real on a free loopback port with the default model, driven
by the official `openai` client: chat, streaming, completions, errors, concurrency, metrics."""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import openai
import pytest

from conftest import start_server, stop_server

pytestmark = [pytest.mark.server]

CTX, PARALLEL = 8192, 4  # 2,048 tokens per slot
CHAT = [{"role": "user", "content": "Write one sentence about the sea."}]


@pytest.fixture(scope="module")
def server():
    proc, url = start_server("-c", str(CTX), "-np", str(PARALLEL), "-t", "2")
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model_id(client):
    return client.models.list().data[0].id


def metric(server: str, name: str, labels: str = "") -> float:
    for line in httpx.get(server + "/metrics").text.splitlines():
        if line.startswith(name + labels + " "):
            return float(line.split()[-1])
    return 0.0


def test_models_lists_the_loaded_file(client, model_id):
    assert model_id == "gemma-3-270m-q4_k_m.gguf"
    assert [m.id for m in client.models.list().data] == [model_id]


def test_chat_completion_matches_the_python_api(client, model_id, fast_model):
    r = client.chat.completions.create(model=model_id, messages=CHAT, max_tokens=24, temperature=0)
    expected = fast_model.generate(fast_model.chat_prompt(CHAT), _greedy(24))
    assert r.choices[0].message.content == expected.text
    assert r.choices[0].finish_reason == expected.finish_reason
    assert r.usage.prompt_tokens == len(fast_model.encode(fast_model.chat_prompt(CHAT)))
    assert r.usage.completion_tokens == len(expected.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def _greedy(n: int, stop=()):
    from turbollm import SamplingParams
    return SamplingParams(temperature=0, max_tokens=n, stop=tuple(stop))


def test_streaming_gives_the_same_text_in_pieces_with_usage(client, model_id):
    whole = client.chat.completions.create(model=model_id, messages=CHAT, max_tokens=24, temperature=0)
    chunks = list(client.chat.completions.create(model=model_id, messages=CHAT, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 5 and "".join(pieces) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == 24 and chunks[-1].choices == []


def test_completions_with_stop_and_seed(client, model_id, fast_model):
    r = client.completions.create(model=model_id, prompt="1, 2, 3, 4,", max_tokens=20, temperature=0, stop=[" 7,"])
    assert r.choices[0].text == " 5, 6," and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=model_id, prompt="1, 2, 3, 4,", max_tokens=20, temperature=0, stop=[" 7,"], stream=True) if c.choices)
    assert streamed == " 5, 6,"
    sampled = [client.completions.create(model=model_id, prompt="Once upon a time", max_tokens=16, temperature=1.0,
                                         seed=seed).choices[0].text for seed in (5, 5, 6)]
    assert sampled[0] == sampled[1] != sampled[2]


def test_n_choices_are_separate_sequences(client, model_id):
    r = client.completions.create(model=model_id, prompt="Once upon a time", max_tokens=12, temperature=1.0, seed=3, n=2)
    assert [c.index for c in r.choices] == [0, 1] and r.choices[0].text != r.choices[1].text
    assert r.usage.completion_tokens == 24


def test_eight_concurrent_streams_on_four_slots_match_their_solo_runs(client, model_id, server):
    prompts = ["The capital of France is", "def fibonacci(n):", "List three colors:", "Once upon a time",
               "1, 2, 3, 4,", "The meaning of life is", "Hello, my name is", "Water boils at"]

    def stream(prompt: str) -> str:
        chunks = client.completions.create(model=model_id, prompt=prompt, max_tokens=32, temperature=0, stream=True)
        return "".join(c.choices[0].text for c in chunks if c.choices)

    solo = [stream(p) for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(stream, prompts))
    assert together == solo
    assert all(len(t) > 10 for t in solo)


def test_a_client_that_disconnects_frees_its_slot(server, model_id):
    before = metric(server, "turbollm_requests_finished_total", '{reason="cancelled"}')
    body = {"model": model_id, "prompt": "Once upon a time", "max_tokens": 1500, "stream": True, "temperature": 0}
    with httpx.stream("POST", server + "/v1/completions", json=body, timeout=60) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 6:
                break
    deadline = time.time() + 30
    while time.time() < deadline and metric(server, "turbollm_requests_finished_total", '{reason="cancelled"}') == before:
        time.sleep(0.1)
    assert metric(server, "turbollm_requests_finished_total", '{reason="cancelled"}') == before + 1
    assert metric(server, "turbollm_requests_running") == 0


def test_metrics_are_prometheus_text(server, client, model_id):
    client.completions.create(model=model_id, prompt="Hello", max_tokens=4, temperature=0)
    text = httpx.get(server + "/metrics").text
    assert "# TYPE turbollm_generation_tokens_total counter" in text
    for name in ("turbollm_prompt_tokens_total", "turbollm_generation_tokens_total", "turbollm_requests_running",
                 "turbollm_requests_waiting", "turbollm_kv_cache_usage_ratio", "turbollm_generation_tokens_per_second"):
        assert name in text
    assert metric(server, "turbollm_generation_tokens_total") >= 4
    assert metric(server, "turbollm_generation_tokens_per_second") > 0


# ---- errors: OpenAI-style JSON with 4xx codes; the server carries on -------------------------

def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    return r.json()["error"]


def test_malformed_json_and_wrong_types_are_400(server):
    e = _error(httpx.post(server + "/v1/chat/completions", content=b'{"messages": [', timeout=10), 400)
    assert "malformed JSON" in e["message"]
    e = _error(httpx.post(server + "/v1/chat/completions", json={"messages": "hello"}, timeout=10), 400)
    assert e["param"] == "messages" and e["type"] == "invalid_request_error"
    e = _error(httpx.post(server + "/v1/completions", json={"prompt": "hi", "max_tokens": "many"}, timeout=10), 400)
    assert e["param"] == "max_tokens"
    e = _error(httpx.post(server + "/v1/chat/completions", json={"messages": [{"role": "robot", "content": "x"}]}), 400)
    assert "messages.0.role" in e["message"]
    e = _error(httpx.post(server + "/v1/completions", json={"prompt": "hi", "presence_penalty": 0.5}), 400)
    assert "repeat_penalty" in e["message"]
    assert httpx.get(server + "/health").json()["status"] == "ok"


def test_a_prompt_longer_than_the_slot_is_refused_not_truncated(client, model_id):
    long_text = "word " * 2100  # > 2,048 tokens per slot
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model_id, prompt=long_text, max_tokens=4)
    assert e.value.code == "context_length_exceeded" and "2048" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model_id, messages=CHAT, max_tokens=5000)
    assert e.value.code == "context_length_exceeded" and "max_tokens 5000" in e.value.message


def test_an_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=CHAT, max_tokens=4)
    assert e.value.code == "model_not_found"


def test_the_api_key_is_required_when_set():
    proc, url = start_server("-c", "2048", "--api-key", "sesame", "-a", "gemma")
    try:
        bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        good = openai.OpenAI(base_url=url + "/v1", api_key="sesame", max_retries=0)
        assert [m.id for m in good.models.list().data] == ["gemma"]
        r = good.chat.completions.create(model="gemma", messages=CHAT, max_tokens=3, temperature=0)
        assert r.usage.completion_tokens == 3
        assert httpx.get(url + "/health").status_code == 200  # health stays open for probes
    finally:
        stop_server(proc)
