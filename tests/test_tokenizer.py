"""Tokenizer: llama.cpp's token ids for Gemma 3 (SPM), decoding, streaming, load-time rules.

The Gemma 3 vocabulary is read once per module with turbollm's GGUF reader; the oracles are
llama.cpp's ids in tests/data/gemma3-270m-q4_k_m. Small hand-made vocabularies pin down the SPM rules
(merge priority, tie order, byte fallback, space prefix) and llama.cpp's load-time fix-ups.
"""

from __future__ import annotations

import pytest

from turbollm.errors import GGUFError, TurbollmError
from turbollm.text.tokenizer import ATTR_BYTE, ATTR_CONTROL, StreamDecoder, Tokenizer

PROMPT_NAMES = ["short_en", "code_py", "unicode_mix", "chat_turn", "long_swa"]

BOS, EOS, START_OF_TURN, END_OF_TURN, NEWLINE, SLASH_S = 2, 1, 105, 106, 107, 212


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def gemma3_metadata(default_model_path) -> dict:
    """The `tokenizer.*` metadata of the default Gemma 3 GGUF as plain Python values."""
    from turbollm.gguf.reader import GGUFFile

    return {k: v for k, v in GGUFFile(default_model_path).metadata.items() if k.startswith("tokenizer.")}


@pytest.fixture(scope="module")
def tok(gemma3_metadata) -> Tokenizer:
    return Tokenizer.from_metadata(gemma3_metadata)


def _plain_args(md: dict) -> tuple[list, list, list]:
    return md["tokenizer.ggml.tokens"], md["tokenizer.ggml.scores"], md["tokenizer.ggml.token_type"]


# --------------------------------------------------------------------------- Gemma 3 vs llama.cpp
def test_vocab_facts(tok, gemma3_metadata):
    assert gemma3_metadata["tokenizer.ggml.model"] == "llama"
    assert tok.n_vocab == 262144
    assert (tok.bos_id, tok.eos_id, tok.unk_id, tok.pad_id) == (2, 1, 3, 0)
    assert tok.add_bos and not tok.add_space_prefix and not tok.add_eos
    assert tok.eot_id == END_OF_TURN  # found by its text: the GGUF has no eot_token_id


@pytest.mark.parametrize("name", PROMPT_NAMES)
def test_encode_matches_llama_cpp(tok, gemma3_prompts, gemma3_oracle, name):
    expected = gemma3_oracle(name)["tokens"].tolist()
    assert tok.encode(gemma3_prompts[name]) == expected


@pytest.mark.parametrize("name", PROMPT_NAMES)
def test_decode_round_trip(tok, gemma3_prompts, name):
    text = gemma3_prompts[name]
    ids = tok.encode(text)
    assert ids[0] == BOS
    # special=True renders control tokens, so every prompt comes back byte for byte
    assert tok.decode(ids[1:], special=True) == text
    # special=False (the default) hides control tokens such as <start_of_turn>
    plain = text.replace("<start_of_turn>", "").replace("<end_of_turn>", "")
    assert tok.decode(ids[1:]) == plain


def test_empty_string(tok):
    assert tok.encode("") == [BOS]
    assert tok.encode("", add_special=False) == []


def test_add_special_false_drops_bos_only(tok, gemma3_prompts):
    text = gemma3_prompts["short_en"]
    assert tok.encode(text, add_special=False) == tok.encode(text)[1:]


def test_eog_ids(tok):
    # <eos> and <end_of_turn>, plus </s>: llama.cpp lists "</s>" among end-of-generation texts
    # (for paddleocr) and only drops it for gemma4/plamo vocabularies, so for Gemma 3 the
    # user-defined </s> (212) becomes a CONTROL, end-of-generation token.
    assert {EOS, END_OF_TURN} <= tok.eog_ids
    assert tok.eog_ids == frozenset({EOS, END_OF_TURN, SLASH_S})
    assert tok.is_eog(END_OF_TURN) and not tok.is_eog(BOS)


def test_parse_special_false_keeps_markup_as_text(tok, gemma3_prompts):
    text = gemma3_prompts["chat_turn"]
    parsed = tok.encode(text)
    assert parsed.count(START_OF_TURN) == 2 and parsed.count(END_OF_TURN) == 1
    raw = tok.encode(text, parse_special=False)
    assert START_OF_TURN not in raw and END_OF_TURN not in raw
    assert len(raw) > len(parsed)
    # user-defined tokens ("\n") are still split out without parse_special
    assert NEWLINE in raw
    assert all(not tok.is_special(i) or i in (BOS, NEWLINE) for i in raw)
    assert tok.decode(raw[1:]) == text


def test_slash_s_is_control_after_load(tok):
    # type 4 (user-defined) in the GGUF, CONTROL after llama.cpp's EOG fix-up
    assert tok.token_attr(SLASH_S) & ATTR_CONTROL
    assert tok.encode("a</s>b", add_special=False).count(SLASH_S) == 1
    assert SLASH_S not in tok.encode("a</s>b", add_special=False, parse_special=False)
    assert tok.token_bytes(SLASH_S) == b""
    assert tok.token_bytes(SLASH_S, special=True) == b"</s>"


def test_special_tokens_longest_first_and_whitespace_runs(tok):
    # runs of spaces/newlines are user-defined tokens, longest first; a single space is not
    ids = tok.encode(" " * 40 + "x\n\n\ny", add_special=False)
    assert tok.token_text(ids[0]) == " " * 31 and tok.token_text(ids[1]) == " " * 9
    assert tok.token_text(ids[-2]) == "\n\n\n"
    assert tok.decode(ids) == " " * 40 + "x\n\n\ny"


def test_token_bytes_by_type(tok):
    the = tok.token_id("\u2581the")
    assert the is not None and tok.token_bytes(the) == b" the"
    assert tok.token_text(248) == "<0x0A>" and tok.token_bytes(248) == b"\n"
    assert tok.token_bytes(START_OF_TURN) == b""
    assert tok.token_bytes(START_OF_TURN, special=True) == b"<start_of_turn>"
    assert tok.token_bytes(NEWLINE) == b"\n"  # user-defined: verbatim even without special
    assert tok.token_bytes(6) == b"" and tok.token_bytes(6, special=True) == b"<unused0>"
    assert tok.decode([START_OF_TURN, NEWLINE], special=True) == "<start_of_turn>\n"


def test_is_special(tok):
    assert tok.is_special(START_OF_TURN) and tok.is_special(NEWLINE) and tok.is_special(BOS)
    assert not tok.is_special(248) and not tok.is_special(tok.token_id("\u2581the"))


def test_token_text_and_bad_ids(tok):
    assert tok.token_text(START_OF_TURN) == "<start_of_turn>"
    with pytest.raises(TurbollmError, match="out of range"):
        tok.token_text(tok.n_vocab)
    with pytest.raises(TurbollmError, match="out of range"):
        tok.decode([1, -1])


def test_equal_length_special_tokens_never_overlap(tok):
    """llama.cpp sorts special tokens by length with an unstable std::sort, so the order of
    equal-length ones is unspecified. It only matters if one can overlap another in a text
    (a proper suffix of one is a proper prefix of the other); for this vocabulary none can."""
    by_len: dict[int, list[str]] = {}
    for i in range(tok.n_vocab):
        if tok.is_special(i):
            text = tok.token_text(i)
            by_len.setdefault(len(text.encode()), []).append(text)
    assert sum(len(v) for v in by_len.values()) > 6000
    for texts in by_len.values():
        prefixes: dict[str, set[str]] = {}
        for t in texts:
            for k in range(1, len(t)):
                prefixes.setdefault(t[:k], set()).add(t)
        for t in texts:
            for k in range(1, len(t)):
                assert not (prefixes.get(t[k:], set()) - {t}), t


# --------------------------------------------------------------------------- streaming
def test_stream_decoder_holds_partial_characters(tok):
    # U+F0000 (private use) and U+20000 (CJK ext. B) are not in the vocabulary: they fall back
    # to <0xXX> byte tokens, 4 per character, so a naive per-token decode would split them
    text = "Hi \U000f0000 \u6771\u4eac \U00020000\U0001f680!"
    ids = tok.encode(text, add_special=False)
    byte_ids = [i for i in ids if tok.token_attr(i) & ATTR_BYTE]
    assert len(byte_ids) >= 8
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids]
    assert "" in pieces  # some bytes were held back
    for piece in pieces:
        assert "\ufffd" not in piece
    assert "".join(pieces) + dec.flush() == text
    # byte by byte: nothing is released until the 4th byte of the character arrives
    dec = StreamDecoder(tok)
    first = ids.index(byte_ids[0])
    assert [dec.push(i) for i in ids[first:first + 4]] == ["", "", "", "\U000f0000"]


def test_stream_decoder_invalid_bytes_and_flush(tok):
    b = {n: tok.token_id(f"<0x{n:02X}>") for n in (0x41, 0x80, 0xE6, 0xF0)}
    dec = StreamDecoder(tok)
    assert dec.push(b[0x80]) == "\ufffd"  # a stray continuation byte cannot become valid
    assert dec.push(b[0xF0]) == ""  # a lead byte waits for the rest
    assert dec.flush() == "\ufffd"  # ... which never came
    assert dec.push(b[0x41]) == "A"  # and the decoder is usable again
    dec = StreamDecoder(tok)
    assert dec.push(b[0xE6]) == ""
    assert dec.push(b[0x41]) == "\ufffdA"  # an interrupted sequence is replaced, not held


def test_stream_decoder_special(tok):
    assert StreamDecoder(tok).push(START_OF_TURN) == ""
    assert StreamDecoder(tok, special=True).push(START_OF_TURN) == "<start_of_turn>"


# --------------------------------------------------------------------------- construction
def test_plain_constructor(tok, gemma3_metadata, gemma3_prompts, gemma3_oracle):
    tokens, scores, types = _plain_args(gemma3_metadata)
    plain = Tokenizer(tokens, scores, types, model="llama", bos_id=2, eos_id=1, unk_id=3, pad_id=0,
                      add_bos=True, add_space_prefix=False)
    assert plain.encode(gemma3_prompts["long_swa"]) == gemma3_oracle("long_swa")["tokens"].tolist()
    assert plain.eog_ids == tok.eog_ids


def test_from_metadata_defaults(gemma3_metadata):
    # without the add_* keys llama.cpp's SPM defaults apply: add BOS, add a space prefix
    md = {k: v for k, v in gemma3_metadata.items()
          if k not in ("tokenizer.ggml.add_space_prefix", "tokenizer.ggml.add_bos_token")}
    t = Tokenizer.from_metadata(md)
    assert t.add_bos and t.add_space_prefix
    assert t.encode("Hi") == [BOS, t.token_id("\u2581Hi")]
    md["tokenizer.ggml.add_bos_token"] = False
    md["tokenizer.ggml.bos_token_id"] = 10**9  # out of range: llama.cpp keeps the default (1)
    t = Tokenizer.from_metadata(md)
    assert not t.add_bos and t.bos_id == 1
    assert t.encode("Hi") == [t.token_id("\u2581Hi")]


def test_errors(gemma3_metadata):
    tokens, scores, types = _plain_args(gemma3_metadata)
    with pytest.raises(GGUFError, match=r"unknown tokenizer model 'bert'.*supported: 'llama', 'gemma4'"):
        Tokenizer.from_metadata({**gemma3_metadata, "tokenizer.ggml.model": "bert"})
    with pytest.raises(GGUFError, match="gemma4 tokenizer needs tokenizer.ggml.merges"):
        Tokenizer(tokens, scores, types, model="gemma4", bos_id=2, eos_id=1)
    with pytest.raises(GGUFError, match="differ in length"):
        Tokenizer(tokens, scores[:-1], types, model="llama", bos_id=2, eos_id=1)
    with pytest.raises(GGUFError, match="token_type has 3 entries"):
        Tokenizer.from_metadata({**gemma3_metadata, "tokenizer.ggml.token_type": [1, 1, 1]})
    with pytest.raises(GGUFError, match="tokenizer.ggml.model"):
        Tokenizer.from_metadata({k: v for k, v in gemma3_metadata.items() if k != "tokenizer.ggml.model"})


# --------------------------------------------------------------------------- small vocabularies
def _tiny(entries: list[tuple[str, float, int]], *, byte_tokens: bool = True, **kw) -> Tokenizer:
    """<unk>, <s>, </s>, then `entries` (text, score, type), then optionally the 256 byte tokens."""
    rows = [("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("</s>", 0.0, 3), *entries]
    if byte_tokens:
        rows += [(f"<0x{b:02X}>", 0.0, 6) for b in range(256)]
    kw.setdefault("bos_id", 1)
    kw.setdefault("eos_id", 2)
    return Tokenizer([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], model="llama", **kw)


def _pieces(t: Tokenizer, text: str, **kw) -> list[str]:
    return [t.token_text(i) for i in t.encode(text, add_special=False, **kw)]


def test_spm_highest_score_first():
    base = [("a", -1, 1), ("b", -1, 1), ("c", -1, 1), ("ab", -2.0, 1), ("bc", -1.5, 1)]
    assert _pieces(_tiny(base), "abc") == ["a", "bc"]  # "bc" outscores "ab"
    assert _pieces(_tiny([*base[:3], ("ab", -1.0, 1), ("bc", -1.5, 1)]), "abc") == ["ab", "c"]
    # merged symbols keep merging: "a" + "bc" forms "abc"; the second "ab" merges on its own
    t = _tiny([*base, ("abc", -3, 1)])
    assert _pieces(t, "abcab") == ["abc", "ab"]


def test_spm_ties_go_to_the_leftmost_pair():
    t = _tiny([("a", -1, 1), ("aa", -1, 1)])
    assert _pieces(t, "aaa") == ["aa", "a"]
    assert _pieces(t, "aaaaa") == ["aa", "aa", "a"]


def test_spm_byte_fallback_and_space_escape():
    t = _tiny([("h", -1, 1), ("i", -1, 1), ("\u2581", -1, 1), ("hi", -0.5, 1), ("\u2581hi", -0.1, 1)])
    assert _pieces(t, "hi hi") == ["hi", "\u2581hi"]
    assert _pieces(t, "h\u00e9") == ["h", "<0xC3>", "<0xA9>"]
    assert t.decode(t.encode("h\u00e9 hi")) == "h\u00e9 hi"
    no_bytes = _tiny([("h", -1, 1)], byte_tokens=False)
    with pytest.raises(TurbollmError, match="no byte token"):
        no_bytes.encode("\u00e9")


def test_space_prefix_after_every_special_token():
    t = _tiny([("h", -1, 1), ("i", -1, 1), ("\u2581", -1, 1), ("hi", -0.5, 1), ("\u2581hi", -0.1, 1),
               ("<x>", 0, 3), ("<u>", 0, 4)], add_space_prefix=True)
    assert _pieces(t, "hi") == ["\u2581hi"]
    assert _pieces(t, "hi<x>hi<u>hi") == ["\u2581hi", "<x>", "\u2581hi", "<u>", "\u2581hi"]
    # with parse_special=False the control token is raw text, the user-defined one is still split
    assert "<u>" in _pieces(t, "hi<x>hi<u>hi", parse_special=False)
    assert "<x>" not in _pieces(t, "hi<x>hi<u>hi", parse_special=False)
    assert t.encode("hi")[0] == 1  # BOS


def test_partition_longest_token_first_not_leftmost():
    # llama.cpp splits on each special token in turn, longest first over the whole text, so
    # "bcd" wins over "ab" although "ab" starts earlier
    t = _tiny([("a", -1, 1), ("b", -1, 1), ("c", -1, 1), ("d", -1, 1), ("ab", 0, 4), ("bcd", 0, 4)])
    assert _pieces(t, "abcd") == ["a", "bcd"]
    assert _pieces(t, "abab") == ["ab", "ab"]


def test_load_time_fixups():
    t = _tiny([("<end_of_turn>", 0, 1), ("<unused3>", 0, 3), ("x", -1, 1)])
    eot = t.token_id("<end_of_turn>")
    assert t.eot_id == eot and eot in t.eog_ids and 2 in t.eog_ids  # </s> and the eos id
    assert t.token_attr(eot) & ATTR_CONTROL  # a NORMAL token forced to CONTROL
    assert t.token_bytes(eot) == b"" and t.is_special(eot)
    assert t.encode("x<end_of_turn>", add_special=False) == [t.token_id("x"), eot]
    unused = t.token_id("<unused3>")
    assert t.token_bytes(unused, special=True) == b"<unused3>"


def test_gemma4_style_slash_s_is_normal():
    # with "<|tool_response>" present, llama.cpp makes </s> a normal, non-EOG token
    t = _tiny([("<|tool_response>", 0, 3), ("x", -1, 1)])
    assert 2 not in t.eog_ids and t.token_id("<|tool_response>") in t.eog_ids
    assert not t.is_special(2) and t.token_bytes(2) == b"</s>"


def test_duplicate_tokens_rejected():
    with pytest.raises(GGUFError, match="duplicate token 'x'"):
        _tiny([("x", 0, 1), ("x", 0, 1)])


def test_missing_bos_with_add_bos_rejected():
    with pytest.raises(GGUFError, match="no bos_token_id"):
        _tiny([("x", 0, 1)], bos_id=None)
    assert _tiny([("x", 0, 1)], bos_id=None, add_bos=False).encode("x") == [3]


# --------------------------------------------------------------------------- Gemma 4 (BPE)
GEMMA4_MODELS = ["moe", "dense", "ple", "assistant"]


def _gemma4_tokenizer(name: str) -> tuple[Tokenizer, dict]:
    import json

    from conftest import REFERENCE_DIR, TINY_SHIPPED
    from turbollm.gguf.reader import GGUFFile

    folder = REFERENCE_DIR / f"gemma4-tiny-{name}"
    md = GGUFFile(folder / f"gemma4-tiny-{name}-{TINY_SHIPPED[name]}.gguf").metadata
    return Tokenizer.from_metadata(md), json.loads((folder / "prompts.json").read_text())


@pytest.mark.parametrize("name", GEMMA4_MODELS)
def test_gemma4_encode_matches_llama_cpp(name):
    tok, prompts = _gemma4_tokenizer(name)
    assert tok.model == "gemma4" and tok.add_bos and not tok.add_space_prefix
    for prompt in prompts.values():
        ids = tok.encode(prompt["text"])
        assert ids == prompt["tokens"]
        assert tok.decode(ids[1:], special=True) == prompt["text"]


def test_gemma4_special_tokens_and_end_of_generation():
    tok, _ = _gemma4_tokenizer("moe")
    assert {tok.token_text(i) for i in tok.eog_ids} == {"<eos>", "<turn|>", "<|tool_response>"}
    assert tok.encode("<|turn>user\nHi<turn|>", add_special=False)[:3] == [105, tok.token_id("user"), 107]
    assert tok.token_id("<|think|>") == 98 and tok.is_special(98)


def _tiny_bpe(pieces: list[str], merges: list[str]) -> Tokenizer:
    tokens = ["<pad>", "<eos>", "<bos>"] + pieces + [f"<0x{b:02X}>" for b in range(256)]
    types = [3, 3, 3] + [1] * len(pieces) + [6] * 256
    return Tokenizer(tokens, None, types, model="gemma4", bos_id=2, eos_id=1, merges=merges)


def test_bpe_lowest_rank_first_and_leftmost_on_ties():
    tok = _tiny_bpe(["a", "b", "ab", "ba", "aba"], ["b a", "a b", "ab a"])
    # "aba": rank 0 merges (b,a) first -> a|ba; no merge for (a, ba)
    assert [tok.token_text(i) for i in tok.encode("aba", add_special=False)] == ["a", "ba"]
    tok = _tiny_bpe(["a", "aa", "aaa"], ["a a", "aa a"])
    # "aaa": (a,a) at 0 and at 1 have the same rank: the leftmost wins, then (aa, a)
    assert [tok.token_text(i) for i in tok.encode("aaa", add_special=False)] == ["aaa"]


def test_bpe_spaces_newlines_and_byte_fallback():
    tok = _tiny_bpe(["\u2581", "x", "\n", "\n\n", "\u2581x"], ["\u2581 x"])
    texts = [tok.token_text(i) for i in tok.encode(" x\n\nx\n\n\n", add_special=False)]
    # newline runs are split from the rest; a run that is a token stays whole, "\n\n\n" is not one
    assert texts == ["\u2581x", "\n\n", "x", "\n", "\n", "\n"]
    assert [tok.token_text(i) for i in tok.encode("é", add_special=False)] == ["<0xC3>", "<0xA9>"]
