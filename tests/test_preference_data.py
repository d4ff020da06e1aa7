"""Preference data: every layout nomoat dpo reads (TRL records, Open Assistant trees and messages, judge verdicts,
arena battles), the shared prompt, the loss mask, truncation, batching, and one-line errors for bad records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_lm

from nomoat.data.preference import (
    IGNORE_INDEX,
    PreferenceBatches,
    PreferencePair,
    build_preference_rows,
    load_pairs,
    pairs_from_battles,
    tokenize_pair,
)
from nomoat.errors import NomoatError


def _write(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def U(text: str) -> dict:
    return {"role": "user", "content": text}


def A(text: str) -> dict:
    return {"role": "assistant", "content": text}


@pytest.fixture(scope="module")
def tok():
    return make_tiny_lm().tokenizer


# --------------------------------------------------------------------------- TRL records


def test_trl_text_messages_and_implicit_prompts(tmp_path) -> None:
    f = _write(tmp_path / "p.jsonl", [
        {"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."},
        {"prompt": [{"role": "system", "content": "Be kind."}, U("Hi?")], "chosen": [A("Hello!")],
         "rejected": [A("No.")], "score_chosen": 8},
        {"chosen": [U("Hi?"), A("Hello!")], "rejected": [U("Hi?"), A("Bye.")]},
        {"chosen": "\n\nHuman: Hi?\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi?\n\nAssistant: Bye."},
        {"chosen": [U("a"), A("b"), U("c"), A("good")], "rejected": [U("a"), A("b"), U("c"), A("bad")]},
        {"prompt": "Hi?", "chosen": "Same.", "rejected": "Same."},
    ])
    skipped: list[str] = []
    pairs = load_pairs(f, skipped=skipped)
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
        ([U("Hi?")], [A("Hello!")], [A("Go away.")]),
        ([{"role": "system", "content": "Be kind."}, U("Hi?")], [A("Hello!")], [A("No.")]),
        ([U("Hi?")], [A("Hello!")], [A("Bye.")]),
        ([U("Hi?")], [A("Hello!")], [A("Bye.")]),
        ([U("a"), A("b"), U("c")], [A("good")], [A("bad")]),
    ]
    assert pairs[2].source == f"{f}:3" and skipped == [f"{f}:6: chosen and rejected are identical"]
    # A JSON array reads the same, with each record's line.
    arr = tmp_path / "p.json"
    arr.write_text(json.dumps([{"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."}], indent=1))
    assert load_pairs(arr)[0].source == f"{arr}:2"


@pytest.mark.parametrize("record,message", [
    ({"prompt": "Hi", "chosen": 3, "rejected": "x"}, '"chosen" must be an array of messages, got a number'),
    ({"prompt": "Hi", "chosen": "x"}, 'no "rejected" field'),
    ({"chosen": "a plain text", "rejected": "another"}, 'no "prompt" field'),
    ({"prompt": [U("Hi")], "chosen": [{"role": "robot", "content": "x"}], "rejected": [A("y")]}, "role must be one of"),
    ({"prompt": [U("Hi")], "chosen": [U("x")], "rejected": [A("y")]}, '"chosen" has no assistant reply'),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, '"prompt" is empty'),
    ({"prompt": "Hi", "chosen": [A("")], "rejected": [A("y")]}, "empty assistant reply"),
])
def test_bad_trl_records_name_file_and_line(record, message, tmp_path) -> None:
    f = _write(tmp_path / "bad.jsonl", [{"prompt": "Hi", "chosen": "a", "rejected": "b"}, record])
    with pytest.raises(NomoatError) as e:
        load_pairs(f)
    assert str(e.value).startswith(f"{f}:2") and message in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def test_format_detection_and_forcing(tmp_path) -> None:
    f = _write(tmp_path / "x.jsonl", [{"text": "hello"}])
    with pytest.raises(NomoatError, match=rf"{f}:1: cannot tell the preference data format"):
        load_pairs(f)
    g = _write(tmp_path / "p.jsonl", [{"prompt": "Hi", "chosen": "a", "rejected": "b"}])
    with pytest.raises(NomoatError, match=rf"{g}:1: not an Open Assistant message tree"):
        load_pairs(g, "oasst")
    with pytest.raises(NomoatError, match="unknown preference data format 'csv'"):
        load_pairs(g, "csv")
    with pytest.raises(NomoatError, match=rf"{g}: --lang filters Open Assistant data; this file is in the trl"):
        load_pairs(g, langs=["en"])


# --------------------------------------------------------------------------- Open Assistant


def _msg(mid: str, role: str, text: str, rank=None, replies=(), lang="en", review=True, deleted=False) -> dict:
    return {"message_id": mid, "role": role, "text": text, "rank": rank, "lang": lang, "review_result": review,
            "review_count": 3, "deleted": deleted, "synthetic": False, "replies": list(replies)}


def _tree() -> dict:
    follow_up = _msg("p2", "prompter", "And in German?", rank=0, replies=[
        _msg("a21", "assistant", "Hallo", rank=1, lang="de"), _msg("a20", "assistant", "Guten Tag", rank=0, lang="de")])
    root = _msg("p1", "prompter", "Greet me", replies=[
        _msg("a0", "assistant", "Good day to you!", rank=0, replies=[follow_up]),
        _msg("a1", "assistant", "Hi.", rank=1),
        _msg("a2", "assistant", "Whatever.", rank=2),
        _msg("a3", "assistant", "Deleted reply.", rank=3, deleted=True),
        _msg("a4", "assistant", "Rejected by reviewers.", rank=4, review=False),
        _msg("a5", "assistant", "Unranked.", rank=None),
    ])
    return {"message_tree_id": "t1", "tree_state": "ready_for_export", "prompt": root}


def _flat(tree: dict) -> list[dict]:
    out, stack = [], [(tree["prompt"], None)]
    while stack:
        m, parent = stack.pop()
        out.append({**{k: v for k, v in m.items() if k != "replies"}, "parent_id": parent, "message_tree_id": "t1"})
        stack.extend((r, m["message_id"]) for r in m["replies"])
    return out


def test_open_assistant_ranked_siblings_become_pairs(tmp_path) -> None:
    for name, records in (("trees", [_tree()]), ("messages", _flat(_tree()))):
        f = _write(tmp_path / f"{name}.jsonl", records)
        skipped: list[str] = []
        pairs = load_pairs(f, skipped=skipped)
        got = sorted((tuple(m["content"] for m in p.prompt), p.chosen[0]["content"], p.rejected[0]["content"])
                     for p in pairs)
        assert got == sorted([
            (("Greet me",), "Good day to you!", "Hi."), (("Greet me",), "Good day to you!", "Whatever."),
            (("Greet me",), "Hi.", "Whatever."),
            (("Greet me", "Good day to you!", "And in German?"), "Guten Tag", "Hallo"),
        ]), name
        assert any("a3" in s for s in skipped) and any("a4" in s for s in skipped)
        assert pairs[0].prompt[0]["role"] == "user" and load_pairs(f, "oasst") and all(
            p.source.startswith(f"{f}:") for p in pairs)
    # The language filter keeps a pair only when every message of it is in one of the languages.
    f = tmp_path / "trees.jsonl"
    assert {p.chosen[0]["content"] for p in load_pairs(f, langs=["en"])} == {"Good day to you!", "Hi."}
    assert {p.chosen[0]["content"] for p in load_pairs(f, langs=["en", "de"])} >= {"Guten Tag"}
    with pytest.raises(NomoatError, match="no preference pairs"):
        load_pairs(f, langs=["fr"])


def test_bad_open_assistant_messages(tmp_path) -> None:
    tree = _tree()
    tree["prompt"]["replies"][1]["role"] = "bot"
    f = _write(tmp_path / "t.jsonl", [tree])
    with pytest.raises(NomoatError, match=rf"{f}:1 \(message a1\): \"role\" must be prompter or assistant"):
        load_pairs(f)
    tree = _tree()
    tree["prompt"]["replies"][0]["rank"] = "first"
    with pytest.raises(NomoatError, match=r"\(message a0\): \"rank\" must be a non-negative integer"):
        load_pairs(_write(tmp_path / "t.jsonl", [tree]))


# --------------------------------------------------------------------------- judge verdicts and arena battles


def _verdict(winner, turn=1, repeat=0, qid="q1", a1=("one", "uno"), a2=("two", "dos")) -> dict:
    return {"mode": "pairwise", "question_id": qid, "turn": turn, "repeat": repeat, "model_1": "base", "model_2": "sft",
            "winner": winner, "tie_kind": None, "turns": ["Q1", "Q2"][:turn], "answers_1": list(a1[:turn]),
            "answers_2": list(a2[:turn])}


def test_judge_verdicts_the_winner_is_chosen(tmp_path) -> None:
    f = _write(tmp_path / "v.jsonl", [
        _verdict("model_2"),
        _verdict("model_1", turn=2),
        _verdict("tie", qid="q2"),
        _verdict("model_1", qid="q3"), _verdict("model_1", qid="q3", repeat=1), _verdict("tie", qid="q3", repeat=2),
        _verdict("model_1", qid="q4"), _verdict("model_2", qid="q4", repeat=1),
        {"mode": "single", "question_id": "q1", "model": "base", "score": 5},
    ])
    skipped: list[str] = []
    pairs = load_pairs(f, skipped=skipped)
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
        ([U("Q1")], [A("two")], [A("one")]),
        ([U("Q1")], [A("one"), U("Q2"), A("uno")], [A("two"), U("Q2"), A("dos")]),  # each side's own history
        ([U("Q1")], [A("one")], [A("two")]),  # q3: won 2 of 3 repeats
    ]
    assert len(skipped) == 3  # the tie, q4's split repeats, the single grade
    old = _verdict("model_1")
    del old["answers_1"]
    with pytest.raises(NomoatError, match=rf"{tmp_path / 'old.jsonl'}:1: .*older nomoat judge"):
        load_pairs(_write(tmp_path / "old.jsonl", [old]))


def _battle(winner: str, a: str = "Paris.", b: str = "Lyon?") -> dict:
    return {"model_a": "base", "model_b": "sft", "winner": winner, "turn": 1, "anony": True, "tstamp": 1.0,
            "conversation_a": [U("Capital of France?"), A(a)], "conversation_b": [U("Capital of France?"), A(b)]}


def test_arena_battles_decided_votes_only(tmp_path) -> None:
    f = _write(tmp_path / "b.jsonl", [_battle("model_a"), _battle("model_b"), _battle("tie"),
                                      _battle("tie (bothbad)")])
    skipped: list[str] = []
    pairs = load_pairs(f, skipped=skipped)
    assert [(p.chosen[0]["content"], p.rejected[0]["content"]) for p in pairs] == [("Paris.", "Lyon?"),
                                                                                   ("Lyon?", "Paris.")]
    assert pairs[0].prompt == [U("Capital of France?")] and len(skipped) == 2
    with pytest.raises(NomoatError, match=rf"{f}:1: \"winner\" must be"):
        load_pairs(_write(f, [_battle("a")]))
    with pytest.raises(NomoatError, match="db#3: \"conversation_a\" must be an array"):
        pairs_from_battles([("db#3", {**_battle("model_a"), "conversation_a": None})])


# --------------------------------------------------------------------------- tokenizing and batching


def test_loss_covers_the_completions_only(tok) -> None:
    pair = PreferencePair([U("Say hi"), A("Hi!"), U("Again?")], [A("Hello there.")], [A("No.")], "x:1")
    row = tokenize_pair(pair, tok, 512)
    kept = lambda ids, labels: tok.decode([i for i, y in zip(ids, labels) if y != IGNORE_INDEX])  # noqa: E731
    assert kept(row.chosen, row.chosen_labels) == "Hello there.<|im_end|>"
    assert kept(row.rejected, row.rejected_labels) == "No.<|im_end|>"
    assert tok.decode(row.prompt) == tok.apply_chat_template(pair.prompt, add_generation_prompt=True)
    assert row.chosen_labels == row.chosen  # nothing trails the last trained token


def test_truncation_and_skips(tok) -> None:
    long = PreferencePair([U("Hi")], [A("one two three four five six seven eight nine ten " * 3)], [A("No.")], "x:1")
    prompt_len = len(tokenize_pair(long, tok, 512).prompt)
    row = tokenize_pair(long, tok, prompt_len + 5)
    assert len(row.prompt) + len(row.chosen) == prompt_len + 5 and all(y != IGNORE_INDEX for y in row.chosen_labels)
    assert "prompt fills --seq-len" in tokenize_pair(long, tok, prompt_len)
    same_start = PreferencePair([U("Hi")], [A("Hello there friend")], [A("Hello there enemy")], "x:2")
    assert "the same within --seq-len" in tokenize_pair(same_start, tok, prompt_len + 2)
    skipped: list[str] = []
    rows = build_preference_rows([long, same_start], tok, prompt_len + 2, skipped)
    assert len(rows) == 1 and skipped == ["x:2: chosen and rejected are the same within --seq-len " f"{prompt_len + 2}"]
    with pytest.raises(NomoatError, match="no pair has a completion token"):
        build_preference_rows([long], tok, prompt_len)


def test_batches_are_a_function_of_seed_and_epoch(tok) -> None:
    pairs = [PreferencePair([U(f"Q{i}")], [A("yes " * (i + 1))], [A("no")], f"x:{i}") for i in range(7)]
    rows = build_preference_rows(pairs, tok, 512)
    pb = PreferenceBatches(tok.pad_id)
    first = list(pb.iter_batches(rows, 3, seed=1, epoch=0))
    assert [b.index.tolist() for b in first] == [b.index.tolist() for b in pb.iter_batches(rows, 3, 1, 0)]
    assert sorted(i for b in first for i in b.index.tolist()) == list(range(7))
    assert [b.index.tolist() for b in pb.iter_batches(rows, 3, 1, 0, start=1)] == [b.index.tolist() for b in first[1:]]
    assert [b.index.tolist() for b in first] != [b.index.tolist() for b in pb.iter_batches(rows, 3, 1, 1)]
    b = first[0]
    B = b.index.numel()
    assert b.lengths.tolist() == [float(sum(y != IGNORE_INDEX for y in rows[i].chosen_labels)) for i in b.index] + [
        float(sum(y != IGNORE_INDEX for y in rows[i].rejected_labels)) for i in b.index]
    assert b.tokens == sum(rows[i].width for i in b.index) and b.attention.shape == (B, b.input_ids.shape[1],
                                                                                      b.input_ids.shape[1])
    assert bool(b.attention.any(-1).all())  # every query, padding included, sees some key
    # A chosen token is predicted from the position before it; the rejected's first one from the prompt's end.
    chosen = b.seq < B
    assert torch.equal(b.target[chosen], b.input_ids[b.src_row, b.src_pos + 1][chosen])
    assert not torch.equal(b.target[~chosen], b.input_ids[b.src_row, b.src_pos + 1][~chosen])
