"""Token log-probabilities in the OpenAI API's two shapes: chat completions (`choices[i].logprobs.content`,
one object per token with its bytes and alternatives) and legacy text completions (`choices[i].logprobs`
as parallel lists `tokens`, `token_logprobs`, `top_logprobs`, `text_offset`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from nomoat.runtime.logprobs import TokenLogprob, TokenText


def _token(tt: TokenText, i: int, logprob: float) -> dict[str, Any]:
    return {"token": tt.text(i), "logprob": logprob, "bytes": list(tt.bytes(i))}


def chat_logprobs(tt: TokenText, entries: Sequence[TokenLogprob]) -> dict[str, Any]:
    """`{"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}], "refusal": None}`."""
    content = [{**_token(tt, e.token, e.logprob), "top_logprobs": [_token(tt, i, lp) for i, lp in e.top]}
               for e in entries]
    return {"content": content, "refusal": None}


class CompletionLogprobs:
    """Builds the legacy completions' `logprobs` object; `text_offset` counts characters from the start of the
    completion and carries on across the chunks of one streamed response."""

    def __init__(self, tt: TokenText) -> None:
        self.tt, self.offset = tt, 0

    def __call__(self, entries: Sequence[TokenLogprob]) -> dict[str, Any]:
        tokens, offsets = [], []
        for e in entries:
            text = self.tt.text(e.token)
            tokens.append(text)
            offsets.append(self.offset)
            self.offset += len(text)
        tops = []
        for e in entries:
            top: dict[str, float] = {}
            for i, lp in e.top:  # most likely first: two tokens with the same text keep the higher logprob
                top.setdefault(self.tt.text(i), lp)
            tops.append(top)
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries], "top_logprobs": tops,
                "text_offset": offsets}
