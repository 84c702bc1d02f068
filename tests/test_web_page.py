"""The web chat page at /, in headless Chromium (Debian's chromium driven by Playwright):
it loads, sends a message to the running server with the default model and shows the streamed
answer; a thinking model's thoughts land in a collapsed section; Stop ends an answer and
frees the slot. CI installs chromium (.ci/run sets TURBOLLM_REQUIRE_BROWSER=1, so these never
skip there)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import threading
import time

import httpx
import pytest

from conftest import REFERENCE_DIR, start_server, stop_server
from turbollm.cli.serve import free_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if not os.environ.get("TURBOLLM_REQUIRE_BROWSER") and (CHROMIUM is None or importlib.util.find_spec("playwright") is None):
    pytest.skip("needs chromium (apt install chromium) and playwright (the test extra); CI requires both",
                allow_module_level=True)
from playwright.sync_api import sync_playwright  # noqa: E402

pytestmark = [pytest.mark.server, pytest.mark.browser]


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def server():
    proc, url = start_server("-c", "4096", "-np", "2", "-t", "2")
    yield url
    stop_server(proc)


def _set(page, field: str, value: str) -> None:
    """Set a parameter as a user does: open the Parameters panel, type, leave the field."""
    if not page.is_visible("#" + field):
        page.click("header summary")
    page.fill("#" + field, value)
    page.dispatch_event("#" + field, "change")


def _ask(page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def test_the_page_streams_an_answer_from_the_default_model(browser, server):
    page = browser.new_page()
    page.goto(server + "/")
    page.wait_for_function("document.getElementById('model').textContent.includes('gemma-3-270m')")
    _set(page, "temperature", "0")
    _set(page, "max_tokens", "16")
    _ask(page, "Write one sentence about the sea.")
    page.wait_for_selector(".msg.assistant[data-done=true]", timeout=60_000)
    shown = page.inner_text(".msg.assistant .answer")
    expected = httpx.post(server + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "Write one sentence about the sea."}],
        "temperature": 0, "top_p": 0.95, "max_tokens": 16}).json()["choices"][0]["message"]["content"]
    assert shown.strip() == expected.strip() and len(shown) > 10
    assert "16 tokens" in page.inner_text(".msg.assistant .stats")
    assert page.is_hidden(".msg.assistant details.thinking")  # Gemma 3 does not think
    page.close()


def test_stop_ends_the_answer_and_frees_the_slot(browser, server):
    page = browser.new_page()
    page.goto(server + "/")
    page.wait_for_function("document.getElementById('model').textContent.includes('gemma-3-270m')")
    _set(page, "max_tokens", "1500")
    _ask(page, "Tell me a very long story about a dragon.")
    page.wait_for_function("document.querySelector('.msg.assistant .answer') && "
                           "document.querySelector('.msg.assistant .answer').textContent.length > 20", timeout=60_000)
    page.click("#stop")
    page.wait_for_selector(".msg.assistant[data-done=true]", timeout=10_000)
    assert "stopped" in page.inner_text(".msg.assistant .stats")
    deadline = time.time() + 20
    while time.time() < deadline and httpx.get(server + "/health").json()["slots_processing"]:
        time.sleep(0.1)
    assert httpx.get(server + "/health").json()["slots_processing"] == 0
    assert page.is_enabled("#send")
    page.close()


def test_thoughts_appear_in_a_collapsed_section(browser):
    import uvicorn
    from test_server_reasoning import SCRIPT, ScriptedNetwork
    from turbollm import Model
    from turbollm.engine.engine import Engine
    from turbollm.server.app import ServerSettings, create_app
    model = Model.load(REFERENCE_DIR / "gemma4-tiny-moe" / "gemma4-tiny-moe-Q4_0.gguf", ctx_size=512)
    tok = model.tokenizer
    model.network = ScriptedNetwork(tok.encode(SCRIPT, add_special=False, parse_special=True) + [tok.eos_id], tok.n_vocab)
    engine = Engine(model, n_slots=1, slot_ctx=256).start()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine, ServerSettings(model_id="tiny", thinking_default=True)),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{port}/")
        page.wait_for_function("document.getElementById('model').textContent.includes('tiny')")
        _ask(page, "hi")
        page.wait_for_selector(".msg.assistant[data-done=true]", timeout=30_000)
        assert page.inner_text(".msg.assistant .answer") == "Hello there!"
        thinking = page.locator(".msg.assistant details.thinking")
        assert thinking.is_visible() and thinking.get_attribute("open") is None  # collapsed
        thinking.locator("summary").click()
        assert "The user greets me." in thinking.inner_text()
        page.close()
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        engine.stop()
