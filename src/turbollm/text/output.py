"""From generated token ids to the text a client sees: UTF-8 pieces that are never half a
character, cut at the first stop string (which is not returned), with the text that might be
the start of a stop string held back until it is decided. One per sequence, in the engine."""

from __future__ import annotations

from collections.abc import Sequence

from turbollm.text.tokenizer import StreamDecoder, Tokenizer


class TextAssembler:
    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str] = ()):
        self._decoder = StreamDecoder(tokenizer)
        self._stops = tuple(s for s in stops if s)
        self._held = ""
        self.stopped = False  # a stop string was found: the sequence is finished

    def push(self, token_id: int) -> str:
        """The text that token `token_id` made safe to emit ('' if none)."""
        if self.stopped:
            return ""
        self._held += self._decoder.push(token_id)
        emit, self._held, self.stopped = split_at_stop(self._held, self._stops)
        return emit

    def flush(self) -> str:
        """What is left when the sequence ends without a stop string."""
        if self.stopped:
            return ""
        text = self._held + self._decoder.flush()
        self._held = ""
        emit, _, self.stopped = split_at_stop(text, self._stops, final=True)
        return emit


def split_at_stop(text: str, stops: Sequence[str], final: bool = False) -> tuple[str, str, bool]:
    """Split `text` into (safe to emit, held back, stop found). Text that could be the start of a
    stop string is held back until it is decided."""
    if not stops:
        return text, "", False
    found = [at for at in (text.find(stop) for stop in stops) if at >= 0]
    if found:
        return text[:min(found)], "", True
    if final:
        return text, "", False
    hold = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                hold = max(hold, n)
                break
    return text[:len(text) - hold], text[len(text) - hold:], False


THOUGHT_OPEN, THOUGHT_CLOSE = "<|channel>", "<channel|>"  # Gemma 4: <|channel>thought\n...<channel|>


class OutputText:
    """A sequence's output split into (channel, text) pieces: Gemma 4 writes its thinking as
    `<|channel>thought\\n ... <channel|>` before the answer; that text is the "reasoning"
    channel (the channel's name line is dropped), the rest is "content". Stop strings apply to
    the content. A model without these tokens only ever produces content."""

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str] = ()):
        self._open, self._close = tokenizer.token_id(THOUGHT_OPEN), tokenizer.token_id(THOUGHT_CLOSE)
        self._tokenizer = tokenizer
        self.content = TextAssembler(tokenizer, stops)
        self.reasoning = TextAssembler(tokenizer)
        self._mode = "content"  # "name": inside the channel's name line; "reasoning"
        self._name = ""

    @property
    def stopped(self) -> bool:
        return self.content.stopped

    def push(self, token_id: int) -> list[tuple[str, str]]:
        if self._open is not None and token_id == self._open:
            self._mode, self._name = "name", ""
            return []
        if self._close is not None and token_id == self._close:
            self._mode = "content"
            return [("reasoning", text) for text in [self.reasoning.flush()] if text]
        if self._mode == "name":
            # the channel's name ends at the first newline; what follows it is thought text
            self._name += self._tokenizer.decode([token_id])
            if "\n" not in self._name:
                return []
            self._mode = "reasoning"
            rest = self._name.split("\n", 1)[1]
            return [("reasoning", rest)] if rest else []
        assembler = self.reasoning if self._mode == "reasoning" else self.content
        text = assembler.push(token_id)
        return [(self._mode, text)] if text else []

    def flush(self) -> list[tuple[str, str]]:
        out = [("reasoning", self.reasoning.flush()), ("content", self.content.flush())]
        return [(channel, text) for channel, text in out if text]
