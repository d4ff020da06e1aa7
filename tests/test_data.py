"""Tests for nomoat.data with an in-test BPE tokenizer and the ChatML template (no model files)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jinja2
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from nomoat.data import (
    IGNORE_INDEX,
    Batches,
    Example,
    build_dataset,
    data_fingerprint,
    load_examples,
    split_validation,
    tokenize_example,
)
from nomoat.errors import NomoatError

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
CORPUS = [
    "Say hi to Bob. Hi there! You are a helpful assistant.",
    "The quick brown fox jumps over the lazy dog.",
    "What is two plus two? Two plus two is four.",
    "user: hello assistant::-) smile ::-) ::-) ::-)",
] * 5


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(CORPUS, trainer)
    return tk


class StandIn:
    """The duck-typed tokenizer interface nomoat.data expects."""

    def __init__(self, tk: Tokenizer, template: str | None = CHATML, add_bos: bool = False) -> None:
        self._tk = tk
        self._template = jinja2.Environment().from_string(template) if template else None
        self.has_chat_template = template is not None
        self.eos_id = tk.token_to_id("<|im_end|>")
        self.pad_id = tk.token_to_id("<pad>")
        self.bos_id = tk.token_to_id("<|endoftext|>")
        self.add_bos = add_bos

    def encode(self, text: str) -> list[int]:
        return self._tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tk.decode(list(ids), skip_special_tokens=False)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        assert self._template is not None
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt)


@pytest.fixture
def tok(bpe: Tokenizer) -> StandIn:
    return StandIn(bpe)


def loss_runs(tok: StandIn, ids: list[int], labels: list[int]) -> list[str]:
    """Decoded text of each contiguous run of loss-carrying tokens."""
    runs, current = [], []
    for i, label in zip(ids, labels, strict=True):
        if label == IGNORE_INDEX:
            if current:
                runs.append(tok.decode(current))
            current = []
        else:
            assert label == i
            current.append(i)
    if current:
        runs.append(tok.decode(current))
    return runs


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def jsonl(*records: object) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def chat(*turns: tuple[str, str]) -> Example:
    return Example(messages=[{"role": r, "content": c} for r, c in turns], text=None, source="t.jsonl:1")


# --------------------------------------------------------------------------- loading

EXPECTED = [{"role": "user", "content": "Say hi\n\nto Bob"}, {"role": "assistant", "content": "Hi Bob!"}]
SAME_RECORD = {
    "alpaca": {"instruction": "Say hi", "input": "to Bob", "output": "Hi Bob!"},
    "chat": {"messages": EXPECTED},
    "sharegpt": {
        "conversations": [{"from": "human", "value": "Say hi\n\nto Bob"}, {"from": "gpt", "value": "Hi Bob!"}]
    },
    "completion": {"prompt": "Say hi\n\nto Bob", "completion": "Hi Bob!"},
}


@pytest.mark.parametrize("fmt", sorted(SAME_RECORD))
def test_formats_parse_to_same_messages(tmp_path: Path, fmt: str) -> None:
    path = write(tmp_path, "data.jsonl", jsonl(SAME_RECORD[fmt], SAME_RECORD[fmt]))
    for requested in ("auto", fmt):
        examples = load_examples(path, requested)
        assert [ex.messages for ex in examples] == [EXPECTED, EXPECTED]
        assert all(ex.text is None for ex in examples)
        assert [ex.source for ex in examples] == [f"{path}:1", f"{path}:2"]


def test_openai_alias_and_alpaca_system_without_input(tmp_path: Path) -> None:
    record = {"instruction": "Hi", "input": "", "output": "Yo", "system": "S"}
    path = write(tmp_path, "a.jsonl", jsonl(record))
    assert load_examples(path)[0].messages == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Yo"},
    ]
    path = write(tmp_path, "c.jsonl", jsonl(SAME_RECORD["chat"]))
    assert load_examples(path, "openai")[0].messages == EXPECTED


def test_text_format_and_line_numbers(tmp_path: Path) -> None:
    path = write(tmp_path, "t.jsonl", '{"text": "one"}\n\n  \n{"text": "two"}\n')
    examples = load_examples(path)
    assert [(ex.text, ex.messages, ex.source) for ex in examples] == [
        ("one", None, f"{path}:1"),
        ("two", None, f"{path}:4"),
    ]


def test_json_array_matches_jsonl(tmp_path: Path) -> None:
    records = [SAME_RECORD["alpaca"], SAME_RECORD["alpaca"]]
    path = write(tmp_path, "data.json", json.dumps(records, indent=2))
    examples = load_examples(path)
    assert [ex.messages for ex in examples] == [EXPECTED, EXPECTED]
    # indent=2 puts the elements' opening braces on lines 2 and 7
    assert [ex.source for ex in examples] == [f"{path}:2", f"{path}:7"]


ALPACA = {"instruction": "x", "output": "y"}
USER = {"role": "user", "content": "hi"}
BOT = {"role": "assistant", "content": "yo"}
ERRORS = {
    "empty file": ("data.jsonl", "\n \n", "auto", 1),
    "invalid json": ("data.jsonl", '{"text": "a"}\n\n{"text": }\n', "auto", 3),
    "not an object": ("data.jsonl", '{"text": "a"}\n[1, 2]\n', "auto", 2),
    "missing output": ("data.jsonl", jsonl(ALPACA, {"instruction": "x"}), "auto", 2),
    "empty output": ("data.jsonl", jsonl(ALPACA, ALPACA, {"instruction": "x", "output": " "}), "auto", 3),
    "no assistant turn": ("data.jsonl", jsonl({"messages": [USER]}), "chat", 1),
    "empty assistant turn": ("data.jsonl", jsonl({"messages": [USER, {**BOT, "content": ""}]}), "auto", 1),
    "messages not a list": ("data.jsonl", jsonl({"messages": "hi"}), "auto", 1),
    "content not a string": ("data.jsonl", jsonl({"messages": [{**USER, "content": 5}, BOT]}), "auto", 1),
    "instruction not a string": ("data.jsonl", jsonl({"instruction": ["x"], "output": "y"}), "auto", 1),
    "unknown role": ("data.jsonl", jsonl({"messages": [{**USER, "role": "tool"}, BOT]}), "auto", 1),
    "unknown sharegpt from": (
        "data.jsonl",
        jsonl({"conversations": [{"from": "bot", "value": "x"}]}),
        "sharegpt",
        1,
    ),
    "mixed formats": ("data.jsonl", jsonl({"text": "a"}, ALPACA), "auto", 2),
    "format not detectable": ("data.jsonl", jsonl({"foo": 1}), "auto", 1),
    "explicit format mismatch": ("data.jsonl", jsonl(ALPACA), "chat", 1),
    "json array bad element": ("data.json", '[\n  {"text": "a"},\n  {"text": 3}\n]', "auto", 3),
    "json array bad syntax": ("data.json", '[\n  {"text": "a"},\n  {"text" "b"}\n]', "auto", 3),
    "json array empty": ("data.json", "[]", "auto", 1),
    "not utf-8": ("data.jsonl", b'{"text": "a"}\n{"text": "\xff"}\n', "auto", 2),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_errors_name_file_and_line(tmp_path: Path, case: str) -> None:
    name, content, fmt, line = ERRORS[case]
    path = write(tmp_path, name, content)
    with pytest.raises(NomoatError) as err:
        load_examples(path, fmt)
    message = str(err.value)
    assert f"{path}:{line}:" in message
    assert "\n" not in message


def test_missing_file_and_unknown_format_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(NomoatError, match="nope.jsonl"):
        load_examples(tmp_path / "nope.jsonl")
    path = write(tmp_path, "data.jsonl", jsonl(ALPACA))
    with pytest.raises(NomoatError, match=r"data\.jsonl.*unknown data format 'yaml'"):
        load_examples(path, "yaml")


# --------------------------------------------------------------------------- tokenizing


def test_chatml_masks_prompt_and_header_but_trains_reply_and_im_end(tok: StandIn) -> None:
    ex = chat(("system", "You are a helpful assistant."), ("user", "Say hi"), ("assistant", "Hi there!"))
    ids, labels = tokenize_example(ex, tok, seq_len=512)
    assert tok.decode(ids) == tok.apply_chat_template(ex.messages)
    assert loss_runs(tok, ids, labels) == ["Hi there!<|im_end|>"]
    first = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    assert tok.decode(ids[:first]).endswith("<|im_start|>assistant\n")
    assert labels[-1] == IGNORE_INDEX and tok.decode(ids[-1:]) == "\n"


def test_multi_turn_masks_every_non_assistant_turn(tok: StandIn) -> None:
    ex = chat(
        ("system", "You are a helpful assistant."),
        ("user", "What is two plus two?"),
        ("assistant", "Four."),
        ("user", "Say hi to Bob."),
        ("assistant", "Hi Bob!"),
    )
    ids, labels = tokenize_example(ex, tok, seq_len=512)
    assert loss_runs(tok, ids, labels) == ["Four.<|im_end|>", "Hi Bob!<|im_end|>"]


def test_train_on_prompt_trains_everything(tok: StandIn) -> None:
    ex = chat(("user", "Say hi"), ("assistant", "Hi"))
    ids, labels = tokenize_example(ex, tok, 512, train_on_prompt=True)
    assert labels == ids


def test_bos_is_prepended_once_without_loss(bpe: Tokenizer) -> None:
    ex = chat(("user", "Say hi"), ("assistant", "Hi"))
    tok = StandIn(bpe, add_bos=True)
    ids, labels = tokenize_example(ex, tok, 512)
    assert ids[0] == tok.bos_id and labels[0] == IGNORE_INDEX and ids[1] != tok.bos_id
    tok = StandIn(bpe, template="<|endoftext|>" + CHATML, add_bos=True)
    ids, labels = tokenize_example(ex, tok, 512)
    assert ids[0] == tok.bos_id and ids[1] != tok.bos_id
    assert loss_runs(tok, ids, labels) == ["Hi<|im_end|>"]


def test_no_chat_template_falls_back_to_instruction_response(bpe: Tokenizer) -> None:
    tok = StandIn(bpe, template=None)
    ex = chat(("system", "Be brief."), ("user", "Say hi"), ("assistant", "Hi there!"))
    ids, labels = tokenize_example(ex, tok, 512)
    assert tok.decode(ids) == "Be brief.\n\n### Instruction:\nSay hi\n\n### Response:\nHi there!<|im_end|>"
    assert loss_runs(tok, ids, labels) == ["Hi there!<|im_end|>"]


def test_text_example_trains_every_token_and_ends_with_eos(tok: StandIn) -> None:
    ex = Example(messages=None, text="The quick brown fox.", source="t.jsonl:1")
    ids, labels = tokenize_example(ex, tok, 512)
    assert labels == ids and ids[-1] == tok.eos_id
    assert tok.decode(ids) == "The quick brown fox.<|im_end|>"


def test_bpe_merge_across_turn_boundary_still_masks_exactly(bpe: Tokenizer) -> None:
    # "assistant:" + ":-)" renders "::-)", which the corpus taught BPE to merge across the boundary.
    template = (
        "{% for m in messages %}{{ m['role'] }}:{{ m['content'] }}|{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    tok = StandIn(bpe, template=template)
    ex = chat(("user", "hello"), ("assistant", ":-)"))
    full = tok.apply_chat_template(ex.messages)
    prompt = tok.apply_chat_template(ex.messages[:1], add_generation_prompt=True)
    assert tok.encode(full)[: len(tok.encode(prompt))] != tok.encode(prompt)  # the case under test
    ids, labels = tokenize_example(ex, tok, 512)
    assert tok.decode(ids) == full
    assert loss_runs(tok, ids, labels) == [":-)|"]


@pytest.mark.parametrize(
    "template",
    [
        "{{ messages[5]['content'] }}",  # raises on render
        "{% for m in messages %}{{ m['content'] }}{% if loop.last %}!{% endif %}\n{% endfor %}",  # unstable
    ],
)
def test_template_problems_are_nomoat_errors_naming_the_example(bpe: Tokenizer, template: str) -> None:
    tok = StandIn(bpe, template=template)
    with pytest.raises(NomoatError, match=r"^t\.jsonl:1: ") as err:
        tokenize_example(chat(("user", "hi"), ("assistant", "yo")), tok, 512)
    assert "\n" not in str(err.value)


def test_unstable_template_still_works_with_train_on_prompt(bpe: Tokenizer) -> None:
    tok = StandIn(
        bpe, template="{% for m in messages %}{{ m['content'] }}{% if loop.last %}!{% endif %}{% endfor %}"
    )
    ids, labels = tokenize_example(chat(("user", "hi "), ("assistant", "yo")), tok, 512, train_on_prompt=True)
    assert tok.decode(ids) == "hi yo!" and labels == ids


def test_truncation_and_skipping(tok: StandIn) -> None:
    ex = chat(("user", "The quick brown fox jumps over the lazy dog."), ("assistant", "Hi"))
    ids, labels = tokenize_example(ex, tok, seq_len=5)
    assert len(ids) == len(labels) == 5
    assert all(label == IGNORE_INDEX for label in labels)
    kept = chat(("user", "hi"), ("assistant", "The quick brown fox jumps over the lazy dog."))
    kept.source = "t.jsonl:2"
    skipped: list[str] = []
    rows = build_dataset([ex, kept], tok, seq_len=12, skipped=skipped)
    assert skipped == ["t.jsonl:1"]
    assert len(rows) == 1 and len(rows[0][0]) == 12 and rows[0][1][-1] != IGNORE_INDEX
    with pytest.raises(NomoatError, match=r"^t\.jsonl:1: .*seq_len=5"):
        build_dataset([ex], tok, seq_len=5)


def test_packing_keeps_labels_aligned(tok: StandIn) -> None:
    texts = [Example(messages=None, text=s, source=f"t.jsonl:{i}") for i, s in enumerate(CORPUS[:4], 1)]
    whole = [tokenize_example(ex, tok, 10_000) for ex in texts]
    rows = build_dataset(texts, tok, seq_len=16, pack=True)
    assert all(len(ids) == len(labels) == 16 for ids, labels in rows[:-1]) and len(rows[-1][0]) <= 16
    assert sum((ids for ids, _ in rows), []) == sum((ids for ids, _ in whole), [])
    assert sum((labels for _, labels in rows), []) == sum((labels for _, labels in whole), [])

    chats = [
        chat(("user", "What is two plus two?"), ("assistant", "Four.")),
        chat(("system", "Be brief."), ("user", "Say hi"), ("assistant", "Hi there!")),
    ] * 3
    whole = [tokenize_example(ex, tok, 10_000) for ex in chats]
    rows = build_dataset(chats, tok, seq_len=8, pack=True)
    for ids, labels in rows:
        assert len(ids) == len(labels) <= 8
        assert all(label in (IGNORE_INDEX, i) for i, label in zip(ids, labels, strict=True))
    # Dropped windows have no loss tokens, so the trained tokens survive packing in order.
    trained = [label for _, labels in rows for label in labels if label != IGNORE_INDEX]
    assert trained == [label for _, labels in whole for label in labels if label != IGNORE_INDEX]


# --------------------------------------------------------------------------- split, batches, fingerprint


def test_split_validation_is_deterministic() -> None:
    items = list(range(20))
    train, val = split_validation(items, 0.25, seed=3)
    assert (train, val) == split_validation(items, 0.25, seed=3)
    assert len(val) == 5 and sorted(train + val) == items and train == sorted(train)
    assert split_validation(items, 0.25, seed=4) != (train, val)
    assert split_validation(items, 0.0, seed=3) == (items, [])
    assert split_validation([1, 2], 0.01, seed=0)[1] != []


def test_batches_are_deterministic_resumable_and_padded() -> None:
    rows = [([n] * n, [IGNORE_INDEX] + [n] * (n - 1)) for n in range(1, 12)]
    loader = Batches(pad_id=99)
    epoch0 = loader.batches(rows, batch_size=3, seed=7, epoch=0)
    again = loader.batches(rows, batch_size=3, seed=7, epoch=0)
    assert len(epoch0) == Batches.count(len(rows), 3) == 4
    for a, b in zip(epoch0, again, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    resumed = loader.batches(rows, batch_size=3, seed=7, epoch=0, start=2)
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(epoch0[2:], resumed, strict=True))
    epoch1 = loader.batches(rows, batch_size=3, seed=7, epoch=1)
    assert [b.input_ids[:, 0].tolist() for b in epoch0] != [b.input_ids[:, 0].tolist() for b in epoch1]

    seen = []
    for batch in epoch0:
        assert batch.input_ids.dtype == batch.labels.dtype == torch.long
        assert batch.attention_mask.dtype == torch.bool
        assert batch.input_ids.shape[1] == batch.attention_mask.sum(1).max()
        for ids, labels, mask in zip(*batch, strict=True):
            n = int(mask.sum())
            assert mask[:n].all() and not mask[n:].any()
            assert (ids[n:] == 99).all() and (labels[n:] == IGNORE_INDEX).all()
            assert ids[:n].tolist() == [n] * n
            seen.append(n)
    assert sorted(seen) == list(range(1, 12))


def test_data_fingerprint(tmp_path: Path) -> None:
    path = write(tmp_path, "d.jsonl", jsonl(ALPACA))
    assert data_fingerprint(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(NomoatError, match="missing.jsonl"):
        data_fingerprint(tmp_path / "missing.jsonl")
