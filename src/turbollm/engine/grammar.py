"""Structured output: which tokens a grammar allows next, through llguidance.

A request's constraint (a JSON schema, "any JSON object", or a llama.cpp GBNF grammar) is
checked and turned into llguidance's grammar form once, when the request is parsed
(`Constraint`: a bad schema or grammar is a ValueError naming the problem). Each constrained
sequence then gets its own matcher (`Grammar`): before every sampled token it gives the mask
of allowed tokens, which the sampler applies to the logits first (disallowed ones to -inf);
after it, it advances by the sampled token, and says when nothing more can follow (the
sequence ends there, as at an end-of-generation token). End-of-generation tokens are allowed
exactly when the text so far is complete.

llguidance works on the tokens' bytes, so it needs the vocabulary once per model
(`Vocabulary.of`: about 2 s on Gemma's 262,144 tokens, built at the first constrained request
and kept). Why llguidance and not xgrammar: docs/server.md (benchmarks/grammar_mask.py).
Unconstrained sequences never reach llguidance (it is not even imported).
"""

from __future__ import annotations

import json
import threading
import weakref
from dataclasses import dataclass
from typing import Any

import torch

# Whitespace a JSON grammar allows between tokens: llama.cpp's JSON grammars' `space` rule
# (common/json-schema-to-grammar.cpp), a bounded run, so that a small model cannot fill its
# answer with blank lines; llguidance's own default is any run of any length.
JSON_WHITESPACE = r"(?: |\n{1,2}[ \t]{0,20})"
_JSON_OPTIONS = {"whitespace_pattern": JSON_WHITESPACE}

# [256, 8]: the additive mask of one mask byte (bit j set: token 8b + j allowed, 0; else -inf),
# so a 262,144-token mask is one index_select of 32,768 rows (~0.2 ms on one core, against
# ~1.4 ms for unpacking bits into a boolean mask and masked_fill).
_BYTE_MASKS = torch.where((torch.arange(256).view(-1, 1) >> torch.arange(8)) & 1 == 1, 0.0, float("-inf"))


def _llguidance():
    import llguidance  # imported on first use: a server that never constrains never loads it
    return llguidance


@dataclass(frozen=True)
class Constraint:
    """What a request's output must match: `kind` ("json_schema", "json_object" or "gbnf")
    and `grammar`, llguidance's grammar (JSON text) for it, already checked."""

    kind: str
    grammar: str

    @classmethod
    def json_schema(cls, schema: Any) -> "Constraint":
        """Output that is one JSON value valid against `schema` (a dict, or its JSON text)."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise ValueError(f"the JSON schema is not valid JSON: {e}") from None
        if not isinstance(schema, (dict, bool)):
            raise ValueError(f"a JSON schema is an object (or true/false), got {type(schema).__name__}")
        return cls._checked("json_schema", _llguidance().LLMatcher.grammar_from_json_schema(
            json.dumps(schema), defaults=_JSON_OPTIONS), "JSON schema")

    @classmethod
    def json_object(cls) -> "Constraint":
        """Output that is one JSON object, any keys and values (response_format json_object)."""
        return cls._checked("json_object", _llguidance().LLMatcher.grammar_from_json_schema(
            '{"type": "object"}', defaults=_JSON_OPTIONS), "JSON object grammar")

    @classmethod
    def gbnf(cls, text: str) -> "Constraint":
        """Output that the llama.cpp GBNF grammar `text` derives from its `root` rule
        (llguidance converts it to its Lark form; Lark grammars are taken too)."""
        if not text.strip():
            raise ValueError("the grammar is empty: give GBNF rules, starting with root ::= ...")
        try:
            grammar = _llguidance().grammar_from("gbnf", text)
        except ValueError as e:
            raise ValueError(f"the grammar is not valid GBNF: {_summary(str(e))}") from None
        return cls._checked("gbnf", grammar, "grammar")

    @classmethod
    def _checked(cls, kind: str, grammar: str, what: str) -> "Constraint":
        is_error, messages = _llguidance().LLMatcher.validate_grammar_with_warnings(grammar)
        if is_error:
            raise ValueError(f"the {what} cannot be used: {_summary(messages[0])}")
        return cls(kind, grammar)


def _summary(message: str) -> str:
    """llguidance's error on one line, without the parser state dump a matcher's error carries."""
    return " ".join(message.split("<state>")[0].split()) or "unknown error"


class Vocabulary:
    """llguidance's view of a turbollm tokenizer: every token's bytes, control tokens marked
    special (llguidance's convention, as in its llama.cpp adapter: their bytes start with
    0xFF, so no grammar text matches them), and the end-of-generation ids as its EOS set."""

    _built: "weakref.WeakKeyDictionary[Any, Vocabulary]" = weakref.WeakKeyDictionary()  # tokenizer -> its vocabulary
    _lock = threading.Lock()

    def __init__(self, tokenizer):
        llg = _llguidance()
        self.n_vocab = tokenizer.n_vocab
        special = [i for i in range(self.n_vocab) if tokenizer.is_special(i) and not tokenizer.token_bytes(i)]
        hidden = set(special)
        tokens = [b"\xff" + tokenizer.token_bytes(i, special=True) if i in hidden else tokenizer.token_bytes(i)
                  for i in range(self.n_vocab)]

        class Adapter:  # the object llguidance.TokenizerWrapper reads
            eos_token_id, bos_token_id, special_token_ids = tokenizer.eos_id, tokenizer.bos_id, special

            def __call__(self, text: str | bytes) -> list[int]:
                if isinstance(text, bytes):
                    text = text.decode("utf-8", "replace")
                return tokenizer.encode(text, add_special=False, parse_special=False)

        Adapter.tokens = tokens
        self.llg_tokenizer = llg.LLTokenizer(llg.TokenizerWrapper(Adapter()), n_vocab=self.n_vocab,
                                             eos_token=sorted(tokenizer.eog_ids))

    @classmethod
    def of(cls, tokenizer) -> "Vocabulary":
        """The vocabulary of `tokenizer`, built on first use and kept for as long as it lives."""
        with cls._lock:
            vocab = cls._built.get(tokenizer)
            if vocab is None:
                vocab = cls._built[tokenizer] = cls(tokenizer)
            return vocab


class Grammar:
    """One sequence's position in its constraint: the mask for the next token, advanced by
    each sampled token."""

    def __init__(self, constraint: Constraint, vocab: Vocabulary):
        self.constraint, self.n_vocab = constraint, vocab.n_vocab
        self._matcher = _llguidance().LLMatcher(vocab.llg_tokenizer, constraint.grammar, log_level=0)
        if self._matcher.is_error():
            raise ValueError(f"the {constraint.kind} constraint cannot be used: {_summary(self._matcher.get_error())}")
        self._mask = torch.zeros((self.n_vocab + 31) // 32, dtype=torch.int32)  # bit j of word w: token 32w+j
        self._mask_current = False  # _mask is this position's (a sampler and its logprobs ask twice)

    def mask_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` [n_vocab] (CPU float32) with every token the grammar does not allow next at
        -inf (a new tensor; the caller's is left as it was). The mask is computed once per position."""
        if not self._mask_current:
            self._matcher.unsafe_compute_mask_ptr(self._mask.data_ptr(), self._mask.numel() * 4)
            self._check()
            self._mask_current = True
        return apply_mask(logits.clone(), self._mask)

    def advance(self, token: int) -> None:
        """Move past the sampled `token` (one the last mask allowed)."""
        self._mask_current = False
        if not self._matcher.consume_token(int(token)):
            raise RuntimeError(f"the grammar refused token {token}: {_summary(self._matcher.get_error())}")

    @property
    def is_complete(self) -> bool:
        """Nothing more can follow: the output matches the constraint, and must end here."""
        return self._matcher.is_stopped()

    @property
    def accepts_end(self) -> bool:
        """The output so far is a complete match (it may end here, or go on)."""
        return self._matcher.is_accepting()

    def _check(self) -> None:
        if self._matcher.is_error():
            raise RuntimeError(f"structured output: {_summary(self._matcher.get_error())}")


def apply_mask(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Add the bitmask `mask` (int32 [ceil(n/32)], bit j of word w = token 32w + j) to `logits`
    [n] in place as 0 (allowed) or -inf (not); returns `logits`."""
    rows = torch.index_select(_BYTE_MASKS, 0, mask.view(torch.uint8).int())  # [4 * words, 8]
    return logits.add_(rows.view(-1)[:logits.numel()])
