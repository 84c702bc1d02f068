"""Text <-> token ids, bit-for-bit as llama.cpp does it, from a GGUF vocabulary.

What is shared by every tokenizer model lives in `Tokenizer`:

* the vocabulary (`_Vocab`): token texts, scores and llama.cpp's per-token attribute bits,
  including the fix-ups llama.cpp applies at load time (control-looking EOG tokens forced to
  CONTROL, control tokens named "unused..." marked UNUSED, the end-of-generation set);
* the split of raw text on special tokens (llama.cpp's `tokenizer_st_partition`): every token
  whose attributes include CONTROL, USER_DEFINED or UNKNOWN, longest first; with
  `parse_special=False` only the USER_DEFINED ones are split out;
* decoding (`token_to_piece`) and streaming (`StreamDecoder`).

What depends on `tokenizer.ggml.model` is an encoder class chosen from `_ENCODERS`: it turns
the partitioned fragments (raw text or token ids) into ids, adds BOS/EOS its own way, and says
what a token's bytes are. `_SpmEncoder` is llama.cpp's SPM tokenizer (`"llama"`, Gemma 3);
a `_BpeEncoder` for `"gemma4"` goes beside it.

The tokenizer takes plain Python data (`Tokenizer(...)`) or a metadata mapping
(`Tokenizer.from_metadata`); it never reads a file.
"""

from __future__ import annotations

import codecs
import heapq
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Union

from turbollm.errors import GGUFError, TurbollmError

__all__ = ["StreamDecoder", "Tokenizer"]

# llama.cpp's token attribute bits (llama.h, `llama_token_attr`).
ATTR_UNDEFINED = 0
ATTR_UNKNOWN = 1 << 0
ATTR_UNUSED = 1 << 1
ATTR_NORMAL = 1 << 2
ATTR_CONTROL = 1 << 3
ATTR_USER_DEFINED = 1 << 4
ATTR_BYTE = 1 << 5

# GGUF `tokenizer.ggml.token_type` values -> attribute bits; anything else is UNDEFINED.
_TYPE_TO_ATTR = {1: ATTR_NORMAL, 2: ATTR_UNKNOWN, 3: ATTR_CONTROL, 4: ATTR_USER_DEFINED,
                 5: ATTR_UNUSED, 6: ATTR_BYTE}

_SPECIAL_ATTRS = ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN  # split out before encoding
_HIDDEN_ATTRS = ATTR_CONTROL | ATTR_UNKNOWN  # empty when decoded without special=True

# Token texts llama.cpp treats as end of generation, whatever their type (they are forced to
# CONTROL). llama-vocab.cpp, "maintain a list of tokens that cause end-of-generation".
_EOG_TEXTS = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<\uff5cend\u2581of\u2581sentence\uff5c>", "[e~[",
)

# Special ids llama.cpp finds by text when the GGUF does not give them; the first found is
# forced to CONTROL. (llama.cpp walks an unordered_map, so if a vocabulary holds two candidates
# which one wins is unspecified; here the lowest id wins.)
_AUTO_DETECT_TEXTS = {
    "eot": ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
            "<|end_of_text|>", "<EOT>", "_<EOT>", "[EOT]", "<\uff5cend\u2581of\u2581sentence\uff5c>",
            "<end_of_utterance>"),
    "eom": ("<|eom_id|>",),
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<\uff5cfim\u2581begin\uff5c>", "<PRE>",
                "\u2581<PRE>", "<|code_prefix|>", "<|prefix|>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<\uff5cfim\u2581hole\uff5c>", "<SUF>",
                "\u2581<SUF>", "<|code_suffix|>", "<|suffix|>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<\uff5cfim\u2581end\uff5c>", "<MID>",
                "\u2581<MID>", "<|code_middle|>", "<|middle|>"),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}
_EXTRA_SPECIAL_NAMES = tuple(_AUTO_DETECT_TEXTS)  # keys accepted in `special_ids`

_PREFIX_KEY_LEN = 6  # special tokens are grouped by their first characters to skip absent ones

_SPACE = " "
_ESCAPED_SPACE = "\u2581"  # SentencePiece's visible space, "▁"

Fragment = Union[str, int]  # raw text still to encode, or a token id already decided


class _Vocab:
    """Token texts, scores and attribute bits, plus the text -> id map (built once)."""

    __slots__ = ("tokens", "scores", "attrs", "token_to_id", "n")

    def __init__(self, tokens: list[str], scores: list[float], attrs: list[int]):
        self.tokens = tokens
        self.scores = scores
        self.attrs = attrs
        self.n = len(tokens)
        self.token_to_id: dict[str, int] = dict(zip(tokens, range(self.n)))


def _parse_hex_byte(text: str) -> int:
    """llama.cpp's `strtol(text.substr(3, 2), 16)` for a `<0xXX>` byte token."""
    value = 0
    for ch in text[3:5]:
        digit = int(ch, 16) if ch in "0123456789abcdefABCDEF" else -1
        if digit < 0:
            break
        value = value * 16 + digit
    return value & 0xFF


class _SpmEncoder:
    """llama.cpp's SPM tokenizer (`tokenizer.ggml.model = "llama"`).

    Each raw fragment: optionally prefixed with a space, spaces escaped to U+2581, split into
    characters, then adjacent symbols merged greedily by the score of the token their
    concatenation forms (highest first, ties to the leftmost pair) until no pair forms a token.
    A remaining symbol that is not a token becomes its UTF-8 bytes as `<0xXX>` tokens.
    """

    model = "llama"

    def __init__(self, vocab: _Vocab, *, bos_id: int | None, eos_id: int | None,
                 add_bos: bool, add_eos: bool, add_space_prefix: bool, merges: list[str] | None):
        self.vocab = vocab
        self.bos_id, self.eos_id = bos_id, eos_id
        self.add_bos, self.add_eos, self.add_space_prefix = add_bos, add_eos, add_space_prefix
        if add_bos and bos_id is None:
            raise GGUFError("tokenizer adds a BOS token (tokenizer.ggml.add_bos_token) but has no bos_token_id")
        if add_eos and eos_id is None:
            raise GGUFError("tokenizer adds an EOS token (tokenizer.ggml.add_eos_token) but has no eos_token_id")
        self._neg_scores = [-s for s in vocab.scores]
        # byte -> token id: "<0xXX>", else the single character (llama.cpp's byte_to_token)
        t2i = vocab.token_to_id
        self._byte_ids: list[int | None] = []
        for b in range(256):
            tid = t2i.get(f"<0x{b:02X}>")
            if tid is None and b < 0x80:
                tid = t2i.get(chr(b))
            self._byte_ids.append(tid)

    # -- encoding ---------------------------------------------------------------------------
    def encode(self, fragments: Sequence[Fragment], add_special: bool) -> list[int]:
        out: list[int] = []
        is_prev_special = True  # the first fragment counts as following a special token
        if add_special and self.add_bos:
            out.append(self.bos_id)
        for frag in fragments:
            if isinstance(frag, str):
                text = _SPACE + frag if (self.add_space_prefix and is_prev_special) else frag
                self._encode_text(text.replace(_SPACE, _ESCAPED_SPACE), out)
                is_prev_special = False
            else:
                out.append(frag)
                is_prev_special = True
        if add_special and self.add_eos:
            out.append(self.eos_id)
        return out

    def _encode_text(self, text: str, out: list[int]) -> None:
        n = len(text)
        if n == 0:
            return
        t2i = self.vocab.token_to_id
        neg_scores = self._neg_scores
        # symbol i starts at character i; length[i] == 0 once it was merged into its left
        length = [1] * n
        prev = list(range(-1, n - 1))
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        heap = []
        for i in range(n - 1):
            tid = t2i.get(text[i:i + 2])
            if tid is not None:
                heap.append((neg_scores[tid], i, i + 1, 2))
        heapq.heapify(heap)
        pop, push = heapq.heappop, heapq.heappush
        while heap:
            _, left, right, size = pop(heap)
            ln, rn = length[left], length[right]
            if ln == 0 or rn == 0 or ln + rn != size:
                continue  # stale: one side has changed since this pair was queued
            length[left] = size
            length[right] = 0
            after = nxt[right]
            nxt[left] = after
            if after >= 0:
                prev[after] = left
            before = prev[left]
            if before >= 0:
                merged = length[before] + size
                tid = t2i.get(text[before:before + merged])
                if tid is not None:
                    push(heap, (neg_scores[tid], before, left, merged))
            if after >= 0:
                merged = size + length[after]
                tid = t2i.get(text[left:left + merged])
                if tid is not None:
                    push(heap, (neg_scores[tid], left, after, merged))
        i = 0
        while i != -1:
            piece = text[i:i + length[i]]
            tid = t2i.get(piece)
            if tid is not None:
                out.append(tid)
            else:
                # only single characters can get here: every merge formed a token
                for b in piece.encode("utf-8", "surrogatepass"):
                    bid = self._byte_ids[b]
                    if bid is None:
                        raise TurbollmError(f"cannot encode {piece!r}: the vocabulary has no byte token <0x{b:02X}>")
                    out.append(bid)
            i = nxt[i]

    # -- decoding ---------------------------------------------------------------------------
    def piece(self, token_id: int) -> bytes:
        """llama.cpp's token_to_piece with special=True (hiding is done by the caller)."""
        attr = self.vocab.attrs[token_id]
        text = self.vocab.tokens[token_id]
        if attr & (_HIDDEN_ATTRS | ATTR_USER_DEFINED):
            return text.encode("utf-8", "surrogatepass")
        if attr & ATTR_NORMAL:
            return text.replace(_ESCAPED_SPACE, _SPACE).encode("utf-8", "surrogatepass")
        if attr & ATTR_BYTE:
            return bytes((_parse_hex_byte(text),))
        return b""  # UNUSED / UNDEFINED tokens decode to nothing


class _BpeEncoder(_SpmEncoder):
    """llama.cpp's BPE tokenizer with the Gemma 4 pre-tokenizer (`tokenizer.ggml.model = "gemma4"`).

    SentencePiece-style BPE: spaces are escaped to U+2581, the text is split only into runs of
    newlines and runs of other characters (`[^\\n]+|[\\n]+`), and each run is merged by the
    rank of the merge in `tokenizer.ggml.merges` (lowest rank first, ties to the leftmost pair).
    A run of newlines that is itself a token is kept whole. Leftover symbols become `<0xXX>`
    byte tokens; a byte without a token is dropped, as llama.cpp does. Decoding is SPM's.
    """

    model = "gemma4"

    def __init__(self, vocab: _Vocab, *, merges: list[str] | None, **kwargs):
        kwargs["add_space_prefix"] = False  # BPE models never prefix a space
        super().__init__(vocab, merges=None, **kwargs)
        if not merges:
            raise GGUFError("the gemma4 tokenizer needs tokenizer.ggml.merges, which is missing or empty")
        self.ranks: dict[tuple[str, str], int] = {}
        for rank, merge in enumerate(merges):
            at = merge.find(" ", 1)  # llama.cpp splits at the first space after the first character
            if at > 0:
                self.ranks[(merge[:at], merge[at + 1:])] = rank

    def encode(self, fragments: Sequence[Fragment], add_special: bool) -> list[int]:
        out: list[int] = []
        if add_special and self.add_bos:
            out.append(self.bos_id)
        for frag in fragments:
            if isinstance(frag, str):
                for word in _newline_runs(frag.replace(_SPACE, _ESCAPED_SPACE)):
                    self._encode_word(word, out)
            else:
                out.append(frag)
        if add_special and self.add_eos:
            out.append(self.eos_id)
        return out

    def _encode_word(self, word: str, out: list[int]) -> None:
        t2i = self.vocab.token_to_id
        if word[0] == "\n" and word in t2i:
            out.append(t2i[word])
            return
        symbols = list(word)
        ranks = self.ranks
        heap = []
        for i in range(len(symbols) - 1):
            rank = ranks.get((symbols[i], symbols[i + 1]))
            if rank is not None:
                heap.append((rank, i, i + 1, symbols[i] + symbols[i + 1]))
        heapq.heapify(heap)
        prev = list(range(-1, len(symbols) - 1))
        nxt = list(range(1, len(symbols) + 1))
        nxt[-1] = -1
        while heap:
            _, left, right, text = heapq.heappop(heap)
            if not symbols[left] or not symbols[right] or symbols[left] + symbols[right] != text:
                continue  # stale: one side has changed since this pair was queued
            symbols[left], symbols[right] = text, ""
            after = nxt[right]
            nxt[left] = after
            if after >= 0:
                prev[after] = left
            for a, b in ((prev[left], left), (left, after)):
                if a >= 0 and b >= 0:
                    rank = ranks.get((symbols[a], symbols[b]))
                    if rank is not None:
                        heapq.heappush(heap, (rank, a, b, symbols[a] + symbols[b]))
        for piece in symbols:
            if not piece:
                continue
            tid = t2i.get(piece)
            if tid is not None:
                out.append(tid)
                continue
            for byte in piece.encode("utf-8", "surrogatepass"):
                bid = t2i.get(f"<0x{byte:02X}>")
                if bid is not None:
                    out.append(bid)


def _newline_runs(text: str) -> list[str]:
    """llama.cpp's Gemma 4 pre-tokenizer regex `[^\\n]+|[\\n]+`: alternating runs."""
    runs: list[str] = []
    start = 0
    for i in range(1, len(text) + 1):
        if i == len(text) or (text[i] == "\n") != (text[start] == "\n"):
            runs.append(text[start:i])
            start = i
    return runs


# tokenizer.ggml.model -> encoder class
_ENCODERS: dict[str, type] = {"llama": _SpmEncoder, "gemma4": _BpeEncoder}
_PLANNED: tuple[str, ...] = ()

# llama.cpp's defaults per model, used when the GGUF does not set the key.
_MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"bos": 1, "eos": 2, "unk": 0, "pad": None, "add_bos": True, "add_eos": False,
              "add_space_prefix": True},
    # ids come from the GGUF; llama.cpp forces add_bos on for Gemma 4 (PR 21500)
    "gemma4": {"bos": None, "eos": None, "unk": None, "pad": None, "add_bos": True, "add_eos": False,
               "add_space_prefix": False},
}


def _check_model(model: str) -> None:
    if model in _ENCODERS:
        return
    supported = ", ".join(repr(m) for m in _ENCODERS)
    if model in _PLANNED:
        raise GGUFError(f"{model} tokenizer not implemented yet (tokenizer.ggml.model = {model!r}; supported: {supported})")
    raise GGUFError(f"unknown tokenizer model {model!r} (tokenizer.ggml.model); supported: {supported}")


def _as_list(values: Any) -> list:
    return values.tolist() if hasattr(values, "tolist") else list(values)


class Tokenizer:
    """A GGUF vocabulary with llama.cpp's encoding and decoding rules."""

    def __init__(self, tokens: list[str], scores: Sequence[float] | None, token_types: Sequence[int] | None, *,
                 model: str, bos_id: int | None, eos_id: int | None, eot_id: int | None = None,
                 unk_id: int | None = None, pad_id: int | None = None, add_bos: bool = True,
                 add_space_prefix: bool = False, merges: list[str] | None = None,
                 add_eos: bool = False, special_ids: Mapping[str, int | None] | None = None):
        """`special_ids` optionally gives the other ids llama.cpp reads from the GGUF
        (keys "eom", "fim_pre", "fim_suf", "fim_mid", "fim_pad", "fim_rep", "fim_sep");
        those left out are found by their text, as llama.cpp does."""
        _check_model(model)
        tokens = _as_list(tokens)
        n = len(tokens)
        if n == 0:
            raise GGUFError("tokenizer vocabulary (tokenizer.ggml.tokens) is empty")
        scores = [0.0] * n if scores is None else [float(s) for s in _as_list(scores)]
        token_types = [1] * n if token_types is None else _as_list(token_types)
        if len(scores) != n or len(token_types) != n:
            raise GGUFError(f"tokenizer arrays differ in length: {n} tokens, {len(scores)} scores, "
                            f"{len(token_types)} token types")
        if "" in tokens:  # llama.cpp renames empty tokens
            tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
        get_attr = _TYPE_TO_ATTR.get
        attrs = [get_attr(t, ATTR_UNDEFINED) for t in token_types]
        vocab = _Vocab(tokens, scores, attrs)
        if len(vocab.token_to_id) != n:
            seen: set[str] = set()
            dup = next(t for t in tokens if t in seen or seen.add(t))
            raise GGUFError(f"tokenizer vocabulary has duplicate token {dup!r} (llama.cpp refuses it too)")
        self._vocab = vocab
        self.model = model
        self.n_vocab = n

        def check_id(name: str, value: int | None) -> int | None:
            if value is None:
                return None
            value = int(value)
            if not 0 <= value < n:
                raise GGUFError(f"tokenizer {name} token id {value} is out of range (vocabulary has {n} tokens)")
            return value

        self.bos_id = check_id("bos", bos_id)
        self.eos_id = check_id("eos", eos_id)
        self.unk_id = check_id("unknown", unk_id)
        self.pad_id = check_id("padding", pad_id)
        extra = dict(special_ids or {})
        unknown_names = set(extra) - set(_EXTRA_SPECIAL_NAMES)
        if unknown_names:
            raise ValueError(f"unknown special_ids keys {sorted(unknown_names)}; known: {list(_EXTRA_SPECIAL_NAMES)}")
        ids = {name: check_id(name, extra.get(name)) for name in _EXTRA_SPECIAL_NAMES}
        ids["eot"] = check_id("eot", eot_id)
        self._apply_llama_cpp_fixups(ids)
        self.eot_id = ids["eot"]
        self.special_ids = {k: v for k, v in ids.items() if v is not None}
        self.add_bos, self.add_eos, self.add_space_prefix = bool(add_bos), bool(add_eos), bool(add_space_prefix)
        self._encoder = _ENCODERS[model](vocab, bos_id=self.bos_id, eos_id=self.eos_id, add_bos=self.add_bos,
                                         add_eos=self.add_eos, add_space_prefix=self.add_space_prefix,
                                         merges=merges)
        self._build_special_cache()

    # -- construction helpers -------------------------------------------------------------
    def _apply_llama_cpp_fixups(self, ids: dict[str, int | None]) -> None:
        """The attribute changes and EOG set llama.cpp derives at load time (llama_vocab::impl::load)."""
        vocab = self._vocab
        attrs, t2i, tokens = vocab.attrs, vocab.token_to_id, vocab.tokens

        # special ids found by text when the metadata does not give them
        for name, texts in _AUTO_DETECT_TEXTS.items():
            if ids[name] is not None:
                continue
            found = [t2i[t] for t in texts if t in t2i]
            if found:
                tid = min(found)
                ids[name] = tid
                attrs[tid] |= ATTR_CONTROL

        # control tokens whose text contains "unused" are marked UNUSED
        for tid, attr in enumerate(attrs):
            if attr & ATTR_CONTROL and not attr & ATTR_UNUSED and "unused" in tokens[tid]:
                attrs[tid] = attr | ATTR_UNUSED

        eog: set[int] = {i for i in (ids["fim_pad"], ids["fim_rep"], ids["fim_sep"]) if i is not None}
        for text in _EOG_TEXTS:
            tid = t2i.get(text)
            if tid is not None:
                eog.add(tid)
                attrs[tid] |= ATTR_CONTROL
        # gpt-oss: always rendered
        for text in ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"):
            tid = t2i.get(text)
            if tid is not None:
                attrs[tid] = ATTR_USER_DEFINED
        for i in (self.eos_id, ids["eot"], ids["eom"]):
            if i is not None:
                eog.add(i)
        eog_texts = {tokens[i]: i for i in eog}
        # o200k_harmony / solar-open: "<|end|>" is not an end of generation there
        if "<|end|>" in eog_texts and (("<|return|>" in eog_texts and ("<|call|>" in eog_texts or "<|calls|>" in eog_texts))
                                       or (("<|call|>" in eog_texts or "<|calls|>" in eog_texts) and "<|flush|>" in eog_texts)):
            end_id = eog_texts["<|end|>"]
            eog.discard(end_id)
            attrs[end_id] = ATTR_USER_DEFINED
        # gemma4 / plamo: "</s>" is a normal token there
        if "</s>" in eog_texts and ("<|tool_response>" in eog_texts or "<|plamo:eos|>" in eog_texts):
            s_id = eog_texts["</s>"]
            eog.discard(s_id)
            attrs[s_id] = ATTR_NORMAL
        self.eog_ids: frozenset[int] = frozenset(eog)

    def _build_special_cache(self) -> None:
        """Special tokens in llama.cpp's partition order: longest (in UTF-8 bytes) first.

        llama.cpp uses std::sort, which leaves the order of equal-length tokens unspecified;
        here they keep id order. Only tokens that overlap each other could tell the difference.
        """
        vocab = self._vocab
        special = [i for i, a in enumerate(vocab.attrs) if a & _SPECIAL_ATTRS]
        special.sort(key=lambda i: -len(vocab.tokens[i].encode("utf-8", "surrogatepass")))
        self._special_order = special
        # (rank, text, id, always_split) grouped by leading characters: a group whose key is
        # absent from the text cannot match, so most of the ~6,400 tokens are skipped at once
        groups: dict[str, list[tuple[int, str, int, bool]]] = {}
        for rank, tid in enumerate(special):
            text = vocab.tokens[tid]
            always = not vocab.attrs[tid] & _HIDDEN_ATTRS  # user-defined: split even without parse_special
            groups.setdefault(text[:_PREFIX_KEY_LEN], []).append((rank, text, tid, always))
        self._special_groups = groups

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> "Tokenizer":
        """Build from GGUF metadata (key -> Python value, arrays as lists), with llama.cpp's defaults."""
        def get(key: str, default: Any = None) -> Any:
            return metadata.get("tokenizer.ggml." + key, default)

        model = get("model")
        if model is None:
            raise GGUFError("missing required metadata key 'tokenizer.ggml.model'")
        _check_model(model)
        tokens = get("tokens")
        if tokens is None:
            raise GGUFError("missing required metadata key 'tokenizer.ggml.tokens'")
        n = len(tokens)
        defaults = _MODEL_DEFAULTS[model]

        def special(key: str, default: int | None) -> int | None:
            # llama.cpp: a default out of range is dropped; a metadata id out of range is ignored
            if default is not None and default >= n:
                default = None
            value = get(key)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n:
                return default
            return value

        def flag(key: str, default: bool) -> bool:
            value = get(key)
            return bool(value) if isinstance(value, (bool, int)) else default

        extra = {name: special(f"{name}_token_id", None) for name in _EXTRA_SPECIAL_NAMES if name != "eot"}
        # deprecated spellings come last in llama.cpp's list, so they win when present
        for name, old in (("fim_pre", "prefix"), ("fim_suf", "suffix"), ("fim_mid", "middle")):
            extra[name] = special(f"{old}_token_id", extra[name])
        scores = get("scores")
        token_types = get("token_type")
        if scores is not None and len(scores) != n:
            raise GGUFError(f"tokenizer.ggml.scores has {len(scores)} entries, tokenizer.ggml.tokens has {n}")
        if token_types is not None and len(token_types) != n:
            raise GGUFError(f"tokenizer.ggml.token_type has {len(token_types)} entries, tokenizer.ggml.tokens has {n}")
        return cls(tokens, scores, token_types, model=model,
                   bos_id=special("bos_token_id", defaults["bos"]),
                   eos_id=special("eos_token_id", defaults["eos"]),
                   eot_id=special("eot_token_id", None),
                   unk_id=special("unknown_token_id", defaults["unk"]),
                   pad_id=special("padding_token_id", defaults["pad"]),
                   add_bos=flag("add_bos_token", defaults["add_bos"]) or model == "gemma4",
                   add_eos=flag("add_eos_token", defaults["add_eos"]),
                   add_space_prefix=flag("add_space_prefix", defaults["add_space_prefix"]),
                   merges=get("merges"), special_ids=extra)

    # -- encoding -------------------------------------------------------------------------
    def encode(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids for `text`, as llama.cpp's `llama_tokenize(vocab, text, add_special, parse_special)`."""
        fragments = self._partition(text, parse_special) if text else []
        return self._encoder.encode(fragments, add_special)

    def _partition(self, text: str, parse_special: bool) -> list[Fragment]:
        """Split raw text on special tokens, each token in turn (longest first) over every
        fragment still raw, as llama.cpp's tokenizer_st_partition."""
        present = []
        for key, group in self._special_groups.items():
            if key in text:
                for entry in group:
                    if (parse_special or entry[3]) and entry[1] in text:
                        present.append(entry)
        present.sort()
        fragments: list[Fragment] = [text]
        for _, special_text, tid, _ in present:
            new: list[Fragment] = []
            for frag in fragments:
                if isinstance(frag, str) and special_text in frag:
                    parts = frag.split(special_text)
                    if parts[0]:
                        new.append(parts[0])
                    for part in parts[1:]:
                        new.append(tid)
                        if part:
                            new.append(part)
                else:
                    new.append(frag)
            fragments = new
        return fragments

    # -- decoding -------------------------------------------------------------------------
    def _check(self, token_id: int) -> int:
        if not 0 <= token_id < self.n_vocab:
            raise TurbollmError(f"token id {token_id} is out of range (vocabulary has {self.n_vocab} tokens)")
        return token_id

    def token_bytes(self, token_id: int, special: bool = False) -> bytes:
        """llama.cpp's token_to_piece: control/unknown tokens are empty unless `special`."""
        token_id = self._check(int(token_id))
        if not special and self._vocab.attrs[token_id] & _HIDDEN_ATTRS:
            return b""
        return self._encoder.piece(token_id)

    def decode(self, ids: Iterable[int], special: bool = False) -> str:
        """The pieces of `ids` joined and decoded as UTF-8 (invalid bytes become U+FFFD)."""
        return b"".join(self.token_bytes(i, special) for i in ids).decode("utf-8", "replace")

    def token_text(self, token_id: int) -> str:
        """The token's raw vocabulary string (e.g. '▁the', '<0x0A>', '<start_of_turn>')."""
        return self._vocab.tokens[self._check(int(token_id))]

    def token_id(self, text: str) -> int | None:
        """The id of the token whose vocabulary string is `text`, or None."""
        return self._vocab.token_to_id.get(text)

    def token_attr(self, token_id: int) -> int:
        """llama.cpp's attribute bits for the token (ATTR_* in this module), after load-time fix-ups."""
        return self._vocab.attrs[self._check(int(token_id))]

    def is_special(self, token_id: int) -> bool:
        """True for control, unknown and user-defined tokens (those split out of raw text)."""
        return bool(self._vocab.attrs[self._check(int(token_id))] & _SPECIAL_ATTRS)

    def is_eog(self, token_id: int) -> bool:
        return token_id in self.eog_ids

    def __repr__(self) -> str:
        return (f"Tokenizer(model={self.model!r}, n_vocab={self.n_vocab}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id}, eog_ids={sorted(self.eog_ids)})")


class StreamDecoder:
    """Turns a stream of token ids into text pieces, never emitting half a UTF-8 character:
    bytes of an incomplete multi-byte sequence are held back until the rest arrives."""

    def __init__(self, tokenizer: Tokenizer, special: bool = False):
        self.tokenizer = tokenizer
        self.special = special
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Text that became complete with this token ('' if none). Bytes that can never form a
        character are emitted as U+FFFD at once; only a valid incomplete prefix is held."""
        return self._decoder.decode(self.tokenizer.token_bytes(token_id, self.special))

    def flush(self) -> str:
        """Whatever is left (an unfinished sequence as U+FFFD); the decoder is then empty."""
        return self._decoder.decode(b"", final=True)
