"""Shared fixtures: the oracle folders (tests/data) and the default model, loaded once.

tests/data holds part of the fixture matrix (tools/trim_fixtures.py: which GGUF files, and the
arrays that go with them). Point TURBOLLM_REFERENCE at the full fixture folder (~150 MB: every
tiny Gemma 4 model in 7 GGUF types) and the tests that need the other files run too; without
it they skip, saying which file they need.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors (read when a kernel
# module is imported, so set before any test imports one)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DATA_DIR = Path(__file__).resolve().parent / "data"
REFERENCE_DIR = Path(os.environ.get("TURBOLLM_REFERENCE") or DATA_DIR)
GEMMA3_DIR = REFERENCE_DIR / "gemma3-270m-q4_k_m"


def _require_reference() -> None:
    if not GEMMA3_DIR.is_dir():
        raise RuntimeError(f"oracle folder {GEMMA3_DIR} not found (TURBOLLM_REFERENCE names a folder without it)")


# one GGUF of each tiny model that tests/data ships, for tests that need a model, not a type
TINY_SHIPPED = {"moe": "Q4_0", "dense": "Q4_0", "ple": "Q4_K_M", "assistant": "Q4_0"}


def _tiny_path(name: str, variant: str) -> Path:
    return REFERENCE_DIR / f"gemma4-tiny-{name}" / f"gemma4-tiny-{name}-{variant}.gguf"


def tiny_variants(name: str, variants: list[str]) -> list[str]:
    """Those of `variants` whose gemma4-tiny-NAME file is here."""
    return [v for v in variants if _tiny_path(name, v).is_file()]


def tiny_gguf(name: str, variant: str) -> Path:
    """gemma4-tiny-NAME-VARIANT.gguf; skips the test where only the full fixture folder has it."""
    path = _tiny_path(name, variant)
    if not path.is_file():
        pytest.skip(f"{path.name} is in the full fixture folder only (set TURBOLLM_REFERENCE to it)")
    return path


@pytest.fixture(scope="session", autouse=True)
def _threads():
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seeded():
    """Every test draws the same random inputs whatever ran before it, so a result on one machine
    is the result on CI: a test that compares two summation orders through an 8-bit activation
    quantizer can meet a rounding tie on some draw (about one in two hundred), and that must not
    depend on test order."""
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    from turbollm.api import default_model_path
    return default_model_path()


@pytest.fixture(scope="session")
def gemma3_prompts() -> dict[str, str]:
    _require_reference()
    return json.loads((GEMMA3_DIR / "prompts.json").read_text())


@pytest.fixture(scope="session")
def gemma3_oracle():
    """name -> npz record (llama.cpp and transformers arrays; see the folder's README)."""
    _require_reference()
    cache: dict[str, dict] = {}

    def load(name: str) -> dict:
        if name not in cache:
            with np.load(GEMMA3_DIR / f"{name}.npz") as f:
                cache[name] = {k: f[k] for k in f.files}
        return cache[name]

    return load


@pytest.fixture(scope="session")
def tiny_record():
    """(model, prompt) -> that tiny Gemma 4 model's npz record (see its folder's README), loaded once."""
    cache: dict[tuple[str, str], dict] = {}

    def load(name: str, prompt: str) -> dict:
        if (name, prompt) not in cache:
            with np.load(REFERENCE_DIR / f"gemma4-tiny-{name}" / f"{prompt}.npz") as f:
                cache[name, prompt] = {k: f[k] for k in f.files}
        return cache[name, prompt]

    return load


@pytest.fixture(scope="session")
def gemma3_model(default_model_path):
    from turbollm import Model
    from turbollm.kv.plan import CacheConfig
    return Model.load(default_model_path, backend="reference", cache=CacheConfig("f32", "f32"))  # exact maths


@pytest.fixture(scope="session")
def fast_model(default_model_path):
    """The default model on the native kernels, as `turbollm run` and `serve` load it."""
    from turbollm import Model
    return Model.load(default_model_path, ctx_size=4096)


# ---- a real `turbollm serve` on a free loopback port ------------------------------------------

def start_server(*flags: str):
    """Start `turbollm serve FLAGS` on a free port; (process, base URL) once /health answers."""
    from turbollm.cli.serve import launch
    return launch(list(flags), log=tempfile.TemporaryFile("w+"))


def openai_client(url: str):
    """The official `openai` client on a server started by start_server (no retries: a failure shows)."""
    import openai
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def stop_server(proc) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
