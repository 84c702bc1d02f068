"""Generated tokens' log probabilities (engine.sampler.TokenLogprob) in the three shapes the
server answers with: OpenAI's chat (`logprobs.content`), OpenAI's legacy completions
(`tokens` / `token_logprobs` / `top_logprobs` / `text_offset`) and llama-server's
`completion_probabilities` (with `prob` / `top_probs` under `post_sampling_probs`).

A token's text is its bytes decoded as UTF-8 (a byte that is half a character shows as U+FFFD;
`bytes` has the exact bytes, as OpenAI's do). JSON has no -inf: a token outside the sampler's
final distribution (possible only under `post_sampling_probs`) gets OpenAI's floor, -9999.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from turbollm.engine.sampler import TokenLogprob

LOGPROB_FLOOR = -9999.0  # what OpenAI reports for a probability that underflows


def _finite(logprob: float) -> float:
    return logprob if logprob > LOGPROB_FLOOR else LOGPROB_FLOOR


class LogprobFormatter:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def _token(self, token_id: int) -> tuple[str, list[int]]:
        raw = self.tokenizer.token_bytes(token_id, special=True)
        return raw.decode("utf-8", errors="replace"), list(raw)

    def _entry(self, token_id: int, logprob: float) -> dict:
        text, raw = self._token(token_id)
        return {"token": text, "logprob": _finite(logprob), "bytes": raw}

    def chat(self, entries: Iterable[TokenLogprob]) -> list[dict]:
        """OpenAI chat: `choices[i].logprobs.content` (whole, or a chunk's share when streamed)."""
        return [{**self._entry(e.token_id, e.logprob), "top_logprobs": [self._entry(t, lp) for t, lp in e.top]}
                for e in entries]

    def completion(self, entries: Iterable[TokenLogprob], text_offset: int) -> dict:
        """OpenAI legacy completions: `choices[i].logprobs`; `text_offset` is where the first
        token's text starts in the choice's text (the tokens' offsets follow from their bytes)."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for e in entries:
            text, _ = self._token(e.token_id)
            out["tokens"].append(text)
            out["token_logprobs"].append(_finite(e.logprob))
            out["top_logprobs"].append({self._token(t)[0]: _finite(lp) for t, lp in e.top})
            out["text_offset"].append(text_offset)
            text_offset += len(text)
        return out

    def native(self, entries: Iterable[TokenLogprob], post_sampling: bool) -> list[dict]:
        """llama-server's `completion_probabilities`: log probabilities, or under
        `post_sampling_probs` probabilities (`prob`, `top_probs`)."""
        out = []
        for e in entries:
            if post_sampling:
                top = [{"id": t, **self._probability(t, lp)} for t, lp in e.top]
                out.append({"id": e.token_id, **self._probability(e.token_id, e.logprob), "top_probs": top})
            else:
                top = [{"id": t, **self._entry(t, lp)} for t, lp in e.top]
                out.append({"id": e.token_id, **self._entry(e.token_id, e.logprob), "top_logprobs": top})
        return out

    def _probability(self, token_id: int, logprob: float) -> dict:
        text, raw = self._token(token_id)
        return {"token": text, "prob": math.exp(logprob), "bytes": raw}
