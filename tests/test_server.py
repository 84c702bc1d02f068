"""The HTTP server, started for real on a free loopback port with the default model, driven
by the official `openai` client: chat, streaming, completions, errors, concurrency, metrics;
and llama-server's own endpoints (/tokenize, /detokenize, /apply-template, /props, /slots,
/completion) and CORS, with httpx."""

from __future__ import annotations

import concurrent.futures
import json
import time

import httpx
import openai
import pytest

from conftest import openai_client, start_server, stop_server

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
    return openai_client(server)


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


def test_no_cors_headers_by_default(server):
    r = httpx.get(server + "/health", headers={"Origin": "http://localhost:3000"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    preflight = httpx.options(server + "/v1/chat/completions", headers={
        "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers


def test_the_api_key_is_required_when_set():
    # this server also allows one browser origin (--cors-origins), to test CORS beside the key
    proc, url = start_server("-c", "2048", "--api-key", "sesame", "-a", "gemma", "--cors-origins", "http://ok.example, http://two.example")
    try:
        bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        good = openai.OpenAI(base_url=url + "/v1", api_key="sesame", max_retries=0)
        assert [m.id for m in good.models.list().data] == ["gemma"]
        r = good.chat.completions.create(model="gemma", messages=CHAT, max_tokens=3, temperature=0)
        assert r.usage.completion_tokens == 3
        assert httpx.get(url + "/health").status_code == 200  # health stays open for probes
        assert httpx.get(url + "/v1/health").status_code == 200
        for route in ("/slots", "/props"):
            assert httpx.get(url + route).status_code == 401
            assert httpx.get(url + route, headers={"Authorization": "Bearer sesame"}).status_code == 200
        assert httpx.post(url + "/tokenize", json={"content": "hi"}).status_code == 401

        # CORS: the allowed origins get the header (on a 401 too, so a page can read why), others not
        for origin in ("http://ok.example", "http://two.example"):
            r = httpx.get(url + "/v1/models", headers={"Origin": origin, "Authorization": "Bearer sesame"})
            assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
        assert httpx.get(url + "/slots", headers={"Origin": "http://ok.example"}).headers["access-control-allow-origin"] == "http://ok.example"
        r = httpx.get(url + "/v1/models", headers={"Origin": "http://evil.example", "Authorization": "Bearer sesame"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
        # a preflight carries no key: it is answered before the key check
        ask = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization, content-type"}
        r = httpx.options(url + "/v1/chat/completions", headers={"Origin": "http://ok.example", **ask})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://ok.example"
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
        r = httpx.options(url + "/v1/chat/completions", headers={"Origin": "http://evil.example", **ask})
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    finally:
        stop_server(proc)


# ---- llama-server's own endpoints ---------------------------------------------------------------

TEXT = "What is the capital of France? <start_of_turn> 媽 🤗"


def test_tokenize_and_detokenize_round_trip_as_the_python_api(server, fast_model):
    tok = fast_model.tokenizer
    plain = httpx.post(server + "/tokenize", json={"content": TEXT}).json()["tokens"]
    assert plain == tok.encode(TEXT, add_special=False)  # llama-server's defaults: no BOS, specials parsed
    assert tok.token_id("<start_of_turn>") in plain
    with_bos = httpx.post(server + "/tokenize", json={"content": TEXT, "add_special": True}).json()["tokens"]
    assert with_bos == fast_model.encode(TEXT) == [tok.bos_id] + plain
    raw = httpx.post(server + "/tokenize", json={"content": TEXT, "parse_special": False}).json()["tokens"]
    assert raw == tok.encode(TEXT, add_special=False, parse_special=False) and tok.token_id("<start_of_turn>") not in raw
    assert httpx.post(server + "/detokenize", json={"tokens": plain}).json() == {"content": TEXT}
    assert httpx.post(server + "/detokenize", json={"tokens": with_bos}).json()["content"] == "<bos>" + TEXT
    mixed = httpx.post(server + "/tokenize", json={"content": ["Hi", tok.eos_id, " there"], "add_special": True}).json()
    assert mixed["tokens"] == [tok.bos_id, *tok.encode("Hi", add_special=False), tok.eos_id,
                               *tok.encode(" there", add_special=False)]


def test_tokenize_with_pieces_gives_text_or_bytes(server, fast_model):
    tok = fast_model.tokenizer
    r = httpx.post(server + "/tokenize", json={"content": TEXT, "with_pieces": True}).json()["tokens"]
    assert [t["id"] for t in r] == tok.encode(TEXT, add_special=False)
    assert "".join(t["piece"] for t in r) == TEXT and all(isinstance(t["piece"], str) for t in r)
    byte_token = tok.token_id("<0xE5>")  # the first byte of 媽: not UTF-8 on its own
    r = httpx.post(server + "/tokenize", json={"content": ["a", byte_token], "with_pieces": True}).json()["tokens"]
    assert r[-1] == {"id": byte_token, "piece": [0xE5]}


def test_out_of_vocabulary_ids_are_400_naming_the_field(server, fast_model):
    n_vocab = fast_model.tokenizer.n_vocab
    e = _error(httpx.post(server + "/detokenize", json={"tokens": [2, n_vocab]}), 400)
    assert e["param"] == "tokens" and str(n_vocab) in e["message"]
    e = _error(httpx.post(server + "/detokenize", json={"tokens": [-1]}), 400)
    assert e["param"] == "tokens"
    e = _error(httpx.post(server + "/tokenize", json={"content": ["a", n_vocab], "with_pieces": True}), 400)
    assert e["param"] == "content"
    e = _error(httpx.post(server + "/detokenize", json={"tokens": "hello"}), 400)
    assert e["param"] == "tokens"


def test_apply_template_is_the_prompt_the_chat_route_runs(server, client, model_id, fast_model):
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Write one sentence about the sea."}]
    prompt = httpx.post(server + "/apply-template", json={"messages": chat}).json()["prompt"]
    assert prompt == fast_model.chat_prompt(chat)
    r = client.chat.completions.create(model=model_id, messages=chat, max_tokens=1, temperature=0)
    assert r.usage.prompt_tokens == len(fast_model.encode(prompt))
    e = _error(httpx.post(server + "/apply-template", json={"messages": [{"role": "robot", "content": "x"}]}), 400)
    assert "messages.0.role" in e["message"]


def test_props_agree_with_models_and_the_flags(server, fast_model):
    props = httpx.get(server + "/props").json()
    meta = httpx.get(server + "/v1/models").json()["data"][0]
    settings = props["default_generation_settings"]
    assert settings["n_ctx"] == meta["meta"]["n_ctx_slot"] == CTX // PARALLEL
    assert props["total_slots"] == PARALLEL
    assert props["model_alias"] == meta["id"] and props["model_path"].endswith("/" + meta["id"])
    template = fast_model.gguf.get("tokenizer.chat_template")  # the default model's file has none
    assert props["chat_template"] == (template or "")
    assert props["chat_template_builtin"] == (None if template else "gemma")
    assert props["modalities"]["vision"] is False and props["build_info"].startswith("turbollm ")
    assert props["bos_token"] == "<bos>"
    p = settings["params"]
    assert (p["temperature"], p["top_k"], p["top_p"], p["min_p"], p["seed"], p["n_predict"]) == (0.8, 40, 0.95, 0.05, 4294967295, -1)
    e = _error(httpx.post(server + "/props", json={"n_ctx": 1}), 501)
    assert e["type"] == "not_supported_error"
    assert httpx.get(server + "/v1/health").json()["status"] == "ok"


def test_slots_show_each_slot_and_the_running_request(server, model_id, fast_model):
    idle = httpx.get(server + "/slots").json()
    assert [s["id"] for s in idle] == list(range(PARALLEL))
    assert all(s["n_ctx"] == CTX // PARALLEL and s["is_processing"] is False and "params" not in s for s in idle)
    prompt = "Once upon a time"
    body = {"model": model_id, "prompt": prompt, "max_tokens": 1500, "stream": True, "temperature": 0}
    with httpx.stream("POST", server + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        for _ in range(10):
            next(lines)
        busy = [s for s in httpx.get(server + "/slots").json() if s["is_processing"]]
    assert len(busy) == 1
    s = busy[0]
    assert s["id_request"] == json.loads(first[6:])["id"]
    assert s["n_prompt_tokens"] == s["n_prompt_tokens_processed"] == len(fast_model.encode(prompt))
    assert s["n_past"] > s["n_prompt_tokens"] and s["next_token"][0]["n_decoded"] >= 5
    assert s["params"]["max_tokens"] == 1500 and s["params"]["temperature"] == 0


def test_native_completion_matches_the_python_api(server, fast_model):
    prompt = "1, 2, 3, 4,"
    expected = fast_model.generate(prompt, _greedy(8))
    r = httpx.post(server + "/completion", json={"prompt": prompt, "n_predict": 8, "temperature": 0,
                                                  "return_tokens": True}, timeout=60).json()
    assert r["content"] == expected.text and r["tokens"] == expected.token_ids and r["stop"] is True
    assert r["stop_type"] == "limit" and r["tokens_predicted"] == r["timings"]["predicted_n"] == 8
    assert r["tokens_evaluated"] == len(fast_model.encode(prompt))  # prefilled or reused from a kept prompt:
    assert r["timings"]["prompt_n"] + r["timings"]["cache_n"] == r["tokens_evaluated"]
    assert r["tokens_cached"] == r["timings"]["cache_n"]
    assert r["generation_settings"]["n_predict"] == 8 and r["prompt"] == "<bos>" + prompt
    assert r["id_slot"] in range(PARALLEL) and r["truncated"] is False
    stopped = httpx.post(server + "/completion", json={"prompt": prompt, "n_predict": 20, "temperature": 0,
                                                        "stop": [" 7,"]}, timeout=60).json()
    assert stopped["content"] == " 5, 6," and (stopped["stop_type"], stopped["stopping_word"]) == ("word", " 7,")
    assert stopped["tokens"] == []  # only with return_tokens, as llama-server


def test_native_completion_streams_as_llama_server(server):
    body = {"prompt": "Once upon a time", "n_predict": 12, "temperature": 0, "seed": -1}
    whole = httpx.post(server + "/completion", json=body, timeout=60).json()
    with httpx.stream("POST", server + "/completion", json={**body, "stream": True}, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] != "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    chunks = [json.loads(line[6:]) for line in lines]
    assert all(c["stop"] is False and c["tokens"] for c in chunks[:-1]) and chunks[-1]["stop"] is True
    assert "".join(c["content"] for c in chunks) == whole["content"]
    assert chunks[-1]["stop_type"] == "limit" and chunks[-1]["timings"]["predicted_n"] == 12
    e = _error(httpx.post(server + "/completion", json={"prompt": "hi", "grammar": "root ::= missing"}), 400)
    assert e["param"] == "grammar" and "missing" in e["message"]


def test_the_next_turn_of_a_chat_reuses_the_kept_prompt(server, model_id):
    """Prompt caching: the second turn starts from the first turn's cache; usage and /metrics say
    how much; cache_prompt: false prefills it all again."""
    def chat(messages, **extra):
        body = {"model": model_id, "messages": messages, "max_tokens": 8, "temperature": 0, **extra}
        return httpx.post(server + "/v1/chat/completions", json=body, timeout=60).json()
    turn1 = [{"role": "user", "content": "Name three rivers of Europe, briefly, and say which is longest."}]
    first = chat(turn1)
    hits = metric(server, "turbollm_prompt_cache_hits_total")
    turn2 = turn1 + [{"role": "assistant", "content": first["choices"][0]["message"]["content"]},
                     {"role": "user", "content": "And in Asia?"}]
    second = chat(turn2)
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] >= first["usage"]["prompt_tokens"] - 1
    assert metric(server, "turbollm_prompt_cache_hits_total") == hits + 1
    again = chat(turn2, cache_prompt=False)
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert again["choices"][0]["message"]["content"] == second["choices"][0]["message"]["content"]


def test_chat_logprobs_whole_and_streamed(client, model_id, fast_model):
    """logprobs + top_logprobs: one entry per generated token, the sampled token's own entry
    among the top ones with the same log probability (greedy: the first), streamed as whole."""
    body = dict(model=model_id, messages=CHAT, max_tokens=10, temperature=0, logprobs=True, top_logprobs=3)
    whole = client.chat.completions.create(**body)
    entries = whole.choices[0].logprobs.content
    assert len(entries) == whole.usage.completion_tokens == 10
    assert "".join(e.token for e in entries) == whole.choices[0].message.content
    for e in entries:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3 and bytes(e.bytes).decode() == e.token
        assert (e.top_logprobs[0].token, e.top_logprobs[0].logprob) == (e.token, e.logprob)
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
    chunks = list(client.chat.completions.create(**body, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in entries]
    plain = client.chat.completions.create(model=model_id, messages=CHAT, max_tokens=4, temperature=0)
    assert plain.choices[0].logprobs is None


def test_completion_logprobs_in_the_legacy_shape(client, model_id):
    r = client.completions.create(model=model_id, prompt="Once upon a time", max_tokens=6, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text and len(lp.token_logprobs) == 6
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    assert all(len(top) == 2 and top[tok] == own for top, tok, own in zip(lp.top_logprobs, lp.tokens, lp.token_logprobs))


def test_native_completion_n_probs(server):
    body = {"prompt": "1, 2, 3, 4,", "n_predict": 5, "temperature": 0, "n_probs": 2}
    r = httpx.post(server + "/completion", json=body, timeout=60).json()
    probs = r["completion_probabilities"]
    assert "".join(p["token"] for p in probs) == r["content"] and len(probs) == 5
    assert all(p["top_logprobs"][0]["id"] == p["id"] and len(p["top_logprobs"]) == 2 for p in probs)
    post = httpx.post(server + "/completion", json={**body, "post_sampling_probs": True}, timeout=60).json()
    assert [p["prob"] for p in post["completion_probabilities"]] == [1.0] * 5  # greedy draws from the argmax alone
    with httpx.stream("POST", server + "/completion", json={**body, "stream": True}, timeout=60) as s:
        chunks = [json.loads(line[6:]) for line in s.iter_lines() if line]
    streamed = [p["id"] for c in chunks for p in c.get("completion_probabilities", [])]
    assert streamed == [p["id"] for p in probs]
    e = _error(httpx.post(server + "/v1/chat/completions", json={"messages": CHAT, "top_logprobs": 2}), 400)
    assert e["param"] == "top_logprobs" and "logprobs: true" in e["message"]
