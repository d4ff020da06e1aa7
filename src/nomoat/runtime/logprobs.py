"""Log-probabilities of generated tokens as the OpenAI API reports them: the log-softmax of the model's
logits at each step, before temperature, top-k / top-p and penalties, with the most likely alternatives.

`stream` computes them only when `GenerationConfig.logprobs` asks (the normal path pays one `is None`
check per token) and hands them out on the text pieces it yields (`Piece.logprobs`), so that the serving
engine relays them without knowing about them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from nomoat.formats.tokenizer import Tokenizer

MAX_TOP_LOGPROBS = 20  # the OpenAI API's limit for top_logprobs


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token: its id, its log-probability, and the `k` most likely tokens at that step."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


def token_logprob(logits: torch.Tensor, token: int, k: int) -> TokenLogprob:
    """The log-softmax of one step's raw logits [V] read at `token`, with the top `k` alternatives."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    top: tuple[tuple[int, float], ...] = ()
    if k > 0:
        vals, idx = lp.topk(min(k, lp.shape[-1]))
        top = tuple(zip(idx.tolist(), vals.tolist()))
    return TokenLogprob(token, float(lp[token]), top)


class Piece(str):
    """A text piece from `stream` that carries the log-probabilities of the tokens decoded since the
    previous piece (a piece may hold several tokens, or none when a token's bytes are held back)."""

    logprobs: tuple[TokenLogprob, ...]

    def __new__(cls, text: str, logprobs: Sequence[TokenLogprob] = ()) -> Piece:
        obj = super().__new__(cls, text)
        obj.logprobs = tuple(logprobs)
        return obj


_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenText:
    """Each token id's bytes and text, as OpenAI's `bytes` and `token` fields give them.

    Byte-level BPE vocabularies (GPT-2 style, 'Ġ' for a space) and sentencepiece ones ('▁' for a space,
    `<0xNN>` byte tokens) spell bytes differently; which one a vocabulary uses is read from the vocabulary
    itself (which space marker its tokens start with), once.
    """

    def __init__(self, tok: Tokenizer) -> None:
        from nomoat.formats.tokenizer import _byte_alphabet

        self.tok = tok
        vocab = tok.tk.get_vocab(with_added_tokens=False)
        self.byte_level = sum(t.startswith("Ġ") for t in vocab) >= sum(t.startswith("▁") for t in vocab)
        self._unbyte = {c: b for b, c in _byte_alphabet().items()}
        self._special = {i for i, t in tok.tk.get_added_tokens_decoder().items() if t.special}
        self._cache: dict[int, bytes] = {}

    def bytes(self, i: int) -> bytes:
        b = self._cache.get(i)
        if b is None:
            b = self._cache[i] = self._bytes(i)
        return b

    def _bytes(self, i: int) -> bytes:
        s = self.tok.token(i)
        if s is None:
            return b""
        if i in self._special:
            return s.encode("utf-8")
        if self.byte_level:
            if all(c in self._unbyte for c in s):
                return bytes(self._unbyte[c] for c in s)
            return s.encode("utf-8")
        m = _BYTE_TOKEN.fullmatch(s)
        if m:
            return bytes([int(m.group(1), 16)])
        return s.replace("▁", " ").encode("utf-8")

    def text(self, i: int) -> str:
        """The token's text; a token holding part of a UTF-8 character shows U+FFFD for the missing bytes."""
        return self.bytes(i).decode("utf-8", errors="replace")
