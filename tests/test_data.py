"""The fixture files in tests/data are the files the oracles were computed on: each GGUF's
sha256 equals the one its folder's README lists for it (the table the fixtures were made with)."""

from __future__ import annotations

import hashlib
import re

import pytest

from conftest import REFERENCE_DIR

GGUFS = sorted(REFERENCE_DIR.glob("gemma4-tiny-*/*.gguf"))


def test_every_tiny_model_has_a_gguf_here():
    assert {p.parent.name for p in GGUFS} == {f"gemma4-tiny-{n}" for n in ("moe", "dense", "ple", "assistant")}


@pytest.mark.parametrize("path", GGUFS, ids=lambda p: p.name)
def test_gguf_is_the_one_the_oracles_were_computed_on(path):
    listed = dict(re.findall(r"\| `([\w.-]+\.gguf)` \| [^|]+ \| `([0-9a-f]{16})` \|", (path.parent / "README.md").read_text()))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest[:16] == listed[path.name]
