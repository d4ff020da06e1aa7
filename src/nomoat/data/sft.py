"""Instruction-tuning data for LoRA fine-tuning: load, tokenize with loss masks, pack, split, batch.

Labels follow the Hugging Face convention: they are aligned with ``input_ids`` (the training
loop shifts them), and ``IGNORE_INDEX`` (-100) marks every token that carries no loss.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol, TypeVar

import torch

from nomoat.data.records import kind_of, read_records
from nomoat.errors import NomoatError
from nomoat.model.losses import IGNORE_INDEX

FORMATS = ("alpaca", "chat", "sharegpt", "text", "completion")
# The key that identifies each format, in the order auto-detection tries them.
_FORMAT_KEY = {
    "chat": "messages",
    "sharegpt": "conversations",
    "alpaca": "instruction",
    "completion": "prompt",
    "text": "text",
}
_CHAT_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
_SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}

Pair = tuple[list[int], list[int]]
T = TypeVar("T")


class ChatTokenizer(Protocol):
    """What this module needs from a tokenizer (duck-typed)."""

    eos_id: int
    pad_id: int
    bos_id: int | None
    add_bos: bool
    has_chat_template: bool

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str: ...


@dataclass
class Example:
    """One training example: a conversation (``messages``) or plain ``text``, never both."""

    messages: list[dict] | None
    text: str | None
    source: str  # "file:line", for error messages and skip reports

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.text is None):
            raise ValueError("Example needs exactly one of messages or text")


# --------------------------------------------------------------------------- loading


def load_examples(path: str | Path, fmt: str = "auto") -> list[Example]:
    """Read a ``.jsonl`` (one object per line) or ``.json`` (array of objects) data file.

    ``fmt`` is one of ``auto``, ``alpaca``, ``chat`` (alias ``openai``), ``sharegpt``, ``text``,
    ``completion``. ``auto`` picks the format from the first record's keys; every record must
    then be in that format. Every problem raises NomoatError naming ``file:line``.
    """
    name = str(path)
    fmt = "chat" if fmt == "openai" else fmt
    if fmt != "auto" and fmt not in FORMATS:
        choices = ", ".join(FORMATS)
        raise NomoatError(f"{name}: unknown data format {fmt!r}; expected auto or one of {choices}")
    records = read_records(path, "records", name)
    if fmt == "auto":
        first_line, first = records[0]
        fmt = _detect_format(first, f"{name}:{first_line}")
        hint = f" (this file is in {fmt} format, detected from line {first_line})"
    else:
        hint = f" (expected {fmt} format)"
    key = _FORMAT_KEY[fmt]
    examples = []
    for line, rec in records:
        src = f"{name}:{line}"
        if key not in rec:
            raise NomoatError(f'{src}: record has no "{key}" field{hint}')
        examples.append(_PARSERS[fmt](rec, src))
    return examples


def _detect_format(rec: dict, src: str) -> str:
    for fmt, key in _FORMAT_KEY.items():
        if key in rec:
            return fmt
    keys = ", ".join(sorted(rec)) or "none"
    raise NomoatError(
        f"{src}: cannot tell the data format from the record's keys ({keys}); expected one of "
        '"messages", "conversations", "instruction", "prompt", "text"'
    )


def _field(rec: dict, key: str, src: str, required: bool = True) -> str:
    """A string field; absent/null optional fields read as ""."""
    value = rec.get(key)
    if value is None:
        if required:
            raise NomoatError(f'{src}: record has no "{key}" field')
        return ""
    if not isinstance(value, str):
        raise NomoatError(f'{src}: "{key}" must be a string, got {kind_of(value)}')
    return _unicode(value, src, key)


_SURROGATE = re.compile("[\ud800-\udfff]")


def _unicode(value: str, src: str, key: str) -> str:
    # JSON can spell an unpaired surrogate ("\ud800"), which is no Unicode text: tokenizers cannot take it.
    if _SURROGATE.search(value):
        raise NomoatError(f'{src}: "{key}" holds an unpaired surrogate (U+D800..U+DFFF), which is not Unicode text')
    return value


def _response(rec: dict, key: str, src: str) -> str:
    value = _field(rec, key, src)
    if not value.strip():
        raise NomoatError(f'{src}: "{key}" is empty; every example needs a response to train on')
    return value


def _parse_alpaca(rec: dict, src: str) -> Example:
    instruction = _field(rec, "instruction", src)
    extra = _field(rec, "input", src, required=False)
    output = _response(rec, "output", src)
    system = _field(rec, "system", src, required=False)
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return Example(messages=messages, text=None, source=src)


def _parse_completion(rec: dict, src: str) -> Example:
    prompt = _field(rec, "prompt", src)
    completion = _response(rec, "completion", src)
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    return Example(messages=messages, text=None, source=src)


def _parse_text(rec: dict, src: str) -> Example:
    text = _field(rec, "text", src)
    if not text.strip():
        raise NomoatError(f'{src}: "text" is empty')
    return Example(messages=None, text=text, source=src)


def _parse_turns(
    rec: dict, src: str, key: str, role_key: str, content_key: str, roles: dict[str, str]
) -> Example:
    turns = rec[key]
    if not isinstance(turns, list) or not turns:
        got = "empty" if isinstance(turns, list) else kind_of(turns)
        raise NomoatError(f'{src}: "{key}" must be a non-empty array of turns, got {got}')
    messages = []
    for i, turn in enumerate(turns):
        where = f'{src}: "{key}"[{i}]'
        if not isinstance(turn, dict):
            raise NomoatError(f"{where} is {kind_of(turn)}, expected an object")
        role, content = turn.get(role_key), turn.get(content_key)
        if not isinstance(role, str):
            raise NomoatError(f'{where}: "{role_key}" must be a string, got {kind_of(role)}')
        if role not in roles:
            raise NomoatError(f'{where}: unknown {role_key} "{role}"; expected one of {", ".join(roles)}')
        if not isinstance(content, str):
            raise NomoatError(f'{where}: "{content_key}" must be a string, got {kind_of(content)}')
        _unicode(content, where, content_key)
        if roles[role] == "assistant" and not content.strip():
            raise NomoatError(f"{where}: empty assistant reply")
        messages.append({"role": roles[role], "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise NomoatError(f"{src}: conversation has no assistant reply to train on")
    return Example(messages=messages, text=None, source=src)


def _parse_chat(rec: dict, src: str) -> Example:
    return _parse_turns(rec, src, "messages", "role", "content", _CHAT_ROLES)


def _parse_sharegpt(rec: dict, src: str) -> Example:
    return _parse_turns(rec, src, "conversations", "from", "value", _SHAREGPT_ROLES)


_PARSERS = {
    "alpaca": _parse_alpaca,
    "chat": _parse_chat,
    "sharegpt": _parse_sharegpt,
    "text": _parse_text,
    "completion": _parse_completion,
}


# --------------------------------------------------------------------------- tokenizing


def tokenize_example(ex: Example, tok: ChatTokenizer, seq_len: int, train_on_prompt: bool = False) -> Pair:
    """(input_ids, labels) for one example, cut to ``seq_len`` tokens (right truncation).

    Chat examples carry loss on each assistant reply and the end-of-turn token closing it, not
    on the role header; ``train_on_prompt`` puts loss on every token. Text examples carry loss
    everywhere and end with eos. A prepended BOS never carries loss. Truncation can leave no
    loss token at all: the pair is still returned (see ``has_loss``); ``build_dataset`` skips it.
    An example far longer than ``seq_len`` is cut to a character budget before it is tokenized
    (`clip_example`), which leaves the first ``seq_len`` tokens as they are.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    ids, labels = _tokenize(clip_example(ex, char_budget(tok, seq_len)), tok, train_on_prompt)
    return ids[:seq_len], labels[:seq_len]


# Tokenizing costs ~200 bytes of transient memory per character: a 100 MB record would take 20 GB.
# Records are therefore cut before tokenizing (unpacked) or tokenized in pieces (packed).
LONG_PIECE = 1 << 18  # characters tokenized in one call


def max_token_chars(tok: ChatTokenizer) -> int:
    """`Tokenizer.max_token_chars`, or a generous bound for a tokenizer that does not say."""
    return getattr(tok, "max_token_chars", 256)


def char_budget(tok: ChatTokenizer, seq_len: int) -> int:
    """Characters of content beyond which no token can land within the first ``seq_len`` tokens: every
    token covers at most `max_token_chars`, so this many characters make at least 2 * seq_len tokens."""
    return 2 * seq_len * max(max_token_chars(tok), 1) + 4096


def clip_example(ex: Example, budget: int) -> Example:
    """The example with its text, or its messages' contents in order, cut to `budget` characters in all
    (messages past the budget dropped); the example itself when it fits."""
    if ex.text is not None:
        return ex if len(ex.text) <= budget else Example(messages=None, text=ex.text[:budget], source=ex.source)
    messages = ex.messages or []
    if sum(len(m["content"]) for m in messages) <= budget:
        return ex
    kept, left = [], budget
    for m in messages:
        if left <= 0:
            break
        kept.append({**m, "content": m["content"][:left]})
        left -= len(m["content"])
    return Example(messages=kept, text=None, source=ex.source)


def _cut_before(text: str, lo: int, hi: int) -> int | None:
    """The last offset in [lo, hi) right after a line break between two non-space characters."""
    i = text.rfind("\n", lo, hi - 1)
    while i > lo:
        if not text[i - 1].isspace() and not text[i + 1].isspace():
            return i + 1
        i = text.rfind("\n", lo, i)
    return None


def encode_long(tok: ChatTokenizer, text: str, source: str) -> list[int]:
    """Token ids of a text of any length, tokenized in pieces of at most ~LONG_PIECE characters.

    Pieces end at a line break between two non-space characters; the tokens across each cut are checked
    against tokenizing its surroundings whole, so the ids are those of one call. A tokenizer whose tokens
    change at such a cut, or a text without one, is refused by its source.
    """
    if len(text) <= LONG_PIECE:
        return tok.encode(text)
    cuts, start = [0], 0
    while len(text) - start > LONG_PIECE:
        cut = _cut_before(text, start + LONG_PIECE // 2, start + LONG_PIECE)
        if cut is None:
            raise NomoatError(f"{source}: a record of {len(text)} characters with no line break to tokenize it "
                              f"by in pieces; split it into records under {LONG_PIECE} characters")
        start = cut
        cuts.append(start)
    cuts.append(len(text))
    for c in cuts[1:-1]:
        a, b = text[max(0, c - 256):c], text[c:c + 256]
        if tok.encode(a) + tok.encode(b) != tok.encode(a + b):
            raise NomoatError(f"{source}: a record of {len(text)} characters is too long to tokenize at once with "
                              f"this tokenizer; split it into records under {LONG_PIECE} characters")
    ids: list[int] = []
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        ids += tok.encode(text[lo:hi])
    return ids


def has_loss(labels: Sequence[int]) -> bool:
    return any(label != IGNORE_INDEX for label in labels)


def _tokenize(ex: Example, tok: ChatTokenizer, train_on_prompt: bool) -> Pair:
    if ex.text is not None:
        ids = encode_long(tok, ex.text, ex.source) + [tok.eos_id]
        loss = [True] * len(ids)
    elif tok.has_chat_template and train_on_prompt:
        # No spans needed, so templates that are not prefix-stable still work here.
        ids = tok.encode(_render(tok, ex.messages or [], False, ex.source))
        loss = [True] * len(ids)
    elif tok.has_chat_template:
        ids, loss = _template_ids(ex, tok)
    else:
        ids, loss = fallback_chat_ids(tok, ex.messages or [])
    if train_on_prompt:
        loss = [True] * len(ids)
    # Templates often write BOS themselves; never double it.
    if tok.add_bos and tok.bos_id is not None and (not ids or ids[0] != tok.bos_id):
        ids, loss = [tok.bos_id, *ids], [False, *loss]
    if ids and ids[0] == tok.bos_id:
        loss[0] = False
    return ids, [i if keep else IGNORE_INDEX for i, keep in zip(ids, loss, strict=True)]


def _render(tok: ChatTokenizer, messages: list[dict], generation_prompt: bool, src: str) -> str:
    try:
        return tok.apply_chat_template(messages, add_generation_prompt=generation_prompt)
    except Exception as e:  # templates raise anything (jinja2 raise_exception, KeyError, ...)
        detail = " ".join(str(e).split()) or type(e).__name__
        raise NomoatError(f"{src}: the chat template rejected this conversation: {detail}") from e


def _template_ids(ex: Example, tok: ChatTokenizer) -> tuple[list[int], list[bool]]:
    """Render with the model's template and mark each assistant reply by rendering prefixes.

    The reply spans from the end of ``messages[:i]`` + generation prompt to the end of
    ``messages[:i+1]``, minus trailing whitespace (the "\\n" after ``<|im_end|>`` is never
    generated, so it is not trained).
    """
    messages, src = ex.messages or [], ex.source
    full = _render(tok, messages, False, src)
    bounds = [0]  # character offsets alternating prompt / reply segments
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tok, messages[:i], True, src)
        upto = _render(tok, messages[: i + 1], False, src)
        if not (upto.startswith(before) and full.startswith(upto) and len(before) >= bounds[-1]):
            raise NomoatError(
                f"{src}: the chat template renders turn {i + 1} differently once later turns follow, "
                "so the assistant replies cannot be located; use train_on_prompt or another format"
            )
        bounds += [len(before), max(len(before), len(upto.rstrip()))]
    bounds.append(len(full))
    ids = tok.encode(full)
    cuts = [0]
    for offset in bounds[1:-1]:
        prefix = tok.encode(full[:offset])
        if ids[: len(prefix)] != prefix:
            break
        cuts.append(len(prefix))
    else:
        cuts.append(len(ids))
        return ids, _segment_mask(cuts)
    # A BPE merge straddles a turn boundary: encode the segments separately so the spans are exact.
    ids, cuts = [], [0]
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        ids += tok.encode(full[start:end])
        cuts.append(len(ids))
    return ids, _segment_mask(cuts)


def _segment_mask(cuts: list[int]) -> list[bool]:
    """Loss mask for token segments that alternate prompt, reply, prompt, ..."""
    mask: list[bool] = []
    for k, (start, end) in enumerate(zip(cuts[:-1], cuts[1:], strict=True)):
        mask += [k % 2 == 1] * (end - start)
    return mask


def fallback_chat_ids(
    tok: ChatTokenizer, messages: list[dict], add_generation_prompt: bool = False
) -> tuple[list[int], list[bool]]:
    """Token ids and loss mask in the "### Instruction / ### Response" style, for models without a
    chat template. Each reply is followed by eos. Generation code must build prompts with this too
    (``add_generation_prompt=True`` appends the response header).
    """
    ids: list[int] = []
    loss: list[bool] = []

    def add(part: list[int], trained: bool) -> None:
        ids.extend(part)
        loss.extend([trained] * len(part))

    for m in messages:
        if m["role"] == "system":
            add(tok.encode(f"{m['content']}\n\n"), False)
        elif m["role"] == "user":
            add(tok.encode(f"### Instruction:\n{m['content']}\n\n"), False)
        else:
            add(tok.encode("### Response:\n"), False)
            add(tok.encode(m["content"]) + [tok.eos_id], True)
    if add_generation_prompt:
        add(tok.encode("### Response:\n"), False)
    return ids, loss


# --------------------------------------------------------------------------- dataset


def build_dataset(
    examples: Sequence[Example],
    tok: ChatTokenizer,
    seq_len: int,
    train_on_prompt: bool = False,
    pack: bool = False,
    *,
    skipped: list[str] | None = None,
) -> list[Pair]:
    """Tokenize every example into (input_ids, labels) rows of at most ``seq_len`` tokens.

    Unpacked: one row per example, truncated; an example left without loss tokens is skipped
    and its source appended to ``skipped`` (if given). Packed: all examples are concatenated in
    order and cut into ``seq_len`` windows (a long example continues in the next window, not
    truncated); windows without loss tokens are dropped. Packed rows have no boundary mask, so
    attention crosses example boundaries (each example ends with eos / end-of-turn). Raises
    NomoatError when no row is left.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    rows: list[Pair] = []
    if pack:
        stream_ids: list[int] = []
        stream_labels: list[int] = []
        for ex in examples:
            # A packed example is not cut: a long text is tokenized in pieces, a long conversation refused.
            chars = sum(len(m["content"]) for m in ex.messages or [])
            if chars > LONG_PIECE:
                raise NomoatError(f"{ex.source}: a conversation of {chars} characters is too long for --pack "
                                  f"(at most {LONG_PIECE}); split it, or train without --pack")
            ids, labels = _tokenize(ex, tok, train_on_prompt)
            stream_ids += ids
            stream_labels += labels
        for start in range(0, len(stream_ids), seq_len):
            window = stream_labels[start : start + seq_len]
            if has_loss(window):
                rows.append((stream_ids[start : start + seq_len], window))
    else:
        for ex in examples:
            ids, labels = tokenize_example(ex, tok, seq_len, train_on_prompt)
            if has_loss(labels):
                rows.append((ids, labels))
            elif skipped is not None:
                skipped.append(ex.source)
    if not rows:
        where = examples[0].source if examples else "data"
        raise NomoatError(f"{where}: no example has a response token within seq_len={seq_len}")
    return rows


def split_validation(items: Sequence[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """Deterministic (train, val) split; both keep the input order.

    ``val`` gets ``round(len * fraction)`` items, at least one when ``fraction > 0``, and ``train``
    always keeps at least one.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    n = len(items)
    n_val = 0 if fraction == 0 or n < 2 else min(n - 1, max(1, round(n * fraction)))
    picked = set(random.Random(f"nomoat-split:{seed}").sample(range(n), n_val))
    train = [x for i, x in enumerate(items) if i not in picked]
    val = [x for i, x in enumerate(items) if i in picked]
    return train, val


class Batch(NamedTuple):
    input_ids: torch.Tensor  # LongTensor [B, T]
    labels: torch.Tensor  # LongTensor [B, T], IGNORE_INDEX at padding
    attention_mask: torch.Tensor  # BoolTensor [B, T], True on real tokens


class Batches:
    """Shuffled, right-padded batches that are a pure function of (seed, epoch).

    Resuming at (epoch, batch index k) is ``batches(..., epoch, start=k)``; the last batch of an
    epoch may be smaller than ``batch_size``.
    """

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    @staticmethod
    def order(n: int, seed: int, epoch: int) -> list[int]:
        # A string seed is hashed with sha512 by random, so it is stable across runs and platforms.
        perm = list(range(n))
        random.Random(f"nomoat-batches:{seed}:{epoch}").shuffle(perm)
        return perm

    @staticmethod
    def count(n_items: int, batch_size: int) -> int:
        return -(-n_items // batch_size)

    def iter_batches(
        self, items: Sequence[Pair], batch_size: int, seed: int, epoch: int, start: int = 0
    ) -> Iterator[Batch]:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        perm = self.order(len(items), seed, epoch)
        for b in range(start, self.count(len(items), batch_size)):
            yield self.collate([items[i] for i in perm[b * batch_size : (b + 1) * batch_size]])

    def batches(
        self, items: Sequence[Pair], batch_size: int, seed: int, epoch: int, start: int = 0
    ) -> list[Batch]:
        return list(self.iter_batches(items, batch_size, seed, epoch, start))

    def collate(self, rows: Sequence[Pair]) -> Batch:
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for r, (ids, labs) in enumerate(rows):
            input_ids[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            labels[r, : len(labs)] = torch.tensor(labs, dtype=torch.long)
            mask[r, : len(ids)] = True
        return Batch(input_ids, labels, mask)


def data_fingerprint(path: str | Path) -> str:
    """sha256 (hex) of the data file's bytes, recorded with the adapter for provenance."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except FileNotFoundError:
        raise NomoatError(f"{path}: no such data file") from None
    return digest.hexdigest()
