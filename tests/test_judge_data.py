"""Question sets and answer files: the built-in set, MT-bench layouts read and written unchanged, plain and
Alpaca records, `file:line` errors, and answers generated in batches with multi-turn history."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from conftest import make_tiny_lm
from test_bad_input import run_cli

from nomoat.api import convert_to_hf
from nomoat.errors import NomoatError
from nomoat.eval.answers import AnswerSettings, generate_answers, load_answers, write_answers
from nomoat.eval.questions import CATEGORIES, Question, load_questions, write_questions
from nomoat.runtime.generate import GenerationConfig, generate_batch
from nomoat.runtime.prompts import prompt_ids


def write_lines(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_builtin_set() -> None:
    qs = load_questions("builtin")
    assert len(qs) == 24 and len({q.key for q in qs}) == 24
    assert Counter(q.category for q in qs) == dict.fromkeys(CATEGORIES, 3)
    assert all(len(q.turns) == 2 and all(t.strip() for t in q.turns) for q in qs)
    for q in qs:
        has_ref = q.category in ("math", "reasoning", "coding")
        assert (q.reference is not None and len(q.reference) == 2) == has_ref, q
    temps = {q.category: q.temperature() for q in qs}
    assert temps == {"writing": 0.7, "roleplay": 0.7, "reasoning": 0.0, "math": 0.0, "coding": 0.0,
                     "extraction": 0.0, "stem": 0.1, "humanities": 0.1}


MT_QUESTIONS = [
    {"question_id": 81, "category": "writing", "turns": ["Write a note.", "Shorten it."]},
    {"question_id": 111, "category": "math", "turns": ["2 + 2?", "Times 3?"], "reference": ["4", "12"]},
]


def test_mtbench_question_file_round_trips(tmp_path: Path) -> None:
    src = write_lines(tmp_path / "question.jsonl", MT_QUESTIONS)
    qs = load_questions(src)
    assert [q.question_id for q in qs] == [81, 111] and qs[1].reference == ("4", "12")
    assert qs[0].temperature() == 0.7 and qs[1].temperature() == 0.0
    again = write_questions(tmp_path / "again.jsonl", qs)
    assert [json.loads(line) for line in again.read_text().splitlines()] == MT_QUESTIONS


def test_plain_and_alpaca_records(tmp_path: Path) -> None:
    f = write_lines(tmp_path / "mixed.jsonl", [
        {"prompt": "Say hi."},
        {"instruction": "Translate to English.", "input": "Hallo", "output": "Hello"},
        {"instruction": "Name a colour.", "id": "c1", "category": "stem"},
        {"prompt": "2+2?", "reference": "4", "question_id": 7},
    ])
    a, b, c, d = load_questions(f)
    assert (a.question_id, a.category, a.turns, a.reference) == (1, "general", ("Say hi.",), None)
    assert b.turns == ("Translate to English.\n\nHallo",) and b.reference == ("Hello",)
    assert (c.question_id, c.category, c.reference) == ("c1", "stem", None)
    assert (d.question_id, d.reference) == (7, ("4",))
    arr = tmp_path / "alpaca.json"
    arr.write_text('[\n  {"instruction": "One", "output": "1"},\n  {"instruction": "Two", "output": "2"}\n]\n')
    assert [q.turns[0] for q in load_questions(arr)] == ["One", "Two"]
    arr.write_text('[\n  {"instruction": "One"},\n  {"output": "2"}\n]\n')
    with pytest.raises(NomoatError, match=r"alpaca.json:3: not a question record"):
        load_questions(arr)


BAD_QUESTIONS = [
    ("invalid JSON", ['{"question_id": 1, "turns": ["a"]}', '{"question_id": 2, "turns": ['],
     "q.jsonl:2: invalid JSON"),
    ("empty turns", [{"question_id": 1, "turns": ["a"]}, {"question_id": 2, "turns": []}],
     'q.jsonl:2: "turns" must be a non-empty list of strings'),
    ("turn not a string", [{"question_id": 1, "turns": ["a", 3]}], 'q.jsonl:1: "turns" must be a non-empty list'),
    ("no id", [{"category": "math", "turns": ["a"]}], 'q.jsonl:1: no "question_id" field'),
    ("duplicate id", [{"question_id": 1, "turns": ["a"]}, {"question_id": 2, "turns": ["b"]},
                      {"question_id": "1", "turns": ["c"]}], "q.jsonl:3: question_id '1' is already used at"),
    ("not an object", [{"question_id": 1, "turns": ["a"]}, "[1, 2]"], "q.jsonl:2: a record is an array"),
    ("unknown layout", [{"question": "hi"}], "q.jsonl:1: not a question record"),
    ("bad reference", [{"question_id": 1, "turns": ["a"], "reference": [1]}], 'q.jsonl:1: "reference" must be'),
    ("empty file", ["  "], "q.jsonl:1: empty file"),
]


@pytest.mark.parametrize("rows,message", [b[1:] for b in BAD_QUESTIONS], ids=[b[0] for b in BAD_QUESTIONS])
def test_bad_question_files(tmp_path: Path, rows: list, message: str) -> None:
    with pytest.raises(NomoatError) as e:
        load_questions(write_lines(tmp_path / "q.jsonl", rows))
    assert message in str(e.value) and "\n" not in str(e.value)


MT_ANSWERS = [  # as FastChat writes data/mt_bench/model_answer/MODEL.jsonl
    {"question_id": 81, "answer_id": "Hx3", "model_id": "vicuna-7b",
     "choices": [{"index": 0, "turns": ["Dear all, ...", "All: come."]}], "tstamp": 1687000000.5},
    {"question_id": 111, "answer_id": "Ab9", "model_id": "vicuna-7b",
     "choices": [{"index": 0, "turns": ["4", "12"]}], "tstamp": 1687000001.5},
]


def test_mtbench_answer_file_round_trips(tmp_path: Path) -> None:
    src = write_lines(tmp_path / "vicuna-7b.jsonl", MT_ANSWERS)
    s = load_answers(src)
    assert s.model_id == "vicuna-7b" and s.answers["111"].turns == ("4", "12")
    assert s.answers["81"].question is None  # MT-bench's records do not carry the question
    again = write_answers(tmp_path / "again.jsonl", [a.record for a in s.answers.values()])
    assert [json.loads(line) for line in again.read_text().splitlines()] == MT_ANSWERS


BAD_ANSWERS = [
    ("two models", [MT_ANSWERS[0], MT_ANSWERS[1] | {"model_id": "other"}],
     "a.jsonl:2: model_id 'other' differs from 'vicuna-7b' at"),
    ("answered twice", [MT_ANSWERS[0], MT_ANSWERS[0]], "a.jsonl:2: question_id 81 is already answered at"),
    ("no choices", [{"question_id": 1, "model_id": "m"}], 'a.jsonl:1: "choices" must be a non-empty list'),
    ("turns not strings", [{"question_id": 1, "model_id": "m", "choices": [{"turns": [None]}]}],
     'a.jsonl:1: choices[0]: "turns" must be a non-empty list of strings'),
    ("no model id", [{"question_id": 1, "choices": [{"turns": ["x"]}]}], 'a.jsonl:1: "model_id" must be'),
    ("truncated", [MT_ANSWERS[0], '{"question_id": 111, "model_id": "vic'], "a.jsonl:2: invalid JSON"),
]


@pytest.mark.parametrize("rows,message", [b[1:] for b in BAD_ANSWERS], ids=[b[0] for b in BAD_ANSWERS])
def test_bad_answer_files(tmp_path: Path, rows: list, message: str) -> None:
    with pytest.raises(NomoatError) as e:
        load_answers(write_lines(tmp_path / "a.jsonl", rows))
    assert message in str(e.value) and "\n" not in str(e.value)


def _greedy(lm, messages: list[dict], n: int) -> str:
    cfg = GenerationConfig(max_new_tokens=n, temperature=0)
    return generate_batch(lm.model, lm.tokenizer, [prompt_ids(lm, messages)], cfg)[0].text.strip()


def test_generate_answers_multi_turn() -> None:
    lm = make_tiny_lm(seed=1, max_position_embeddings=1024)
    qs = [Question(1, "math", ("What is 2 plus 2?", "And 3 plus 3?"), ("4", "6")),
          Question(2, "writing", ("Hello there, how are you?", "Tell me more.")),
          Question(3, "coding", ("def add(a, b):",))]
    settings = AnswerSettings(max_new_tokens=10, batch_size=2, system="Be brief.")
    recs = generate_answers(lm, qs, "tiny", settings, {"base_fingerprint": "fp"})
    assert [r["question_id"] for r in recs] == [1, 2, 3]
    r1 = recs[0]
    assert r1["model_id"] == "tiny" and r1["base_fingerprint"] == "fp" and r1["answer_id"]
    assert r1["question"] == {"category": "math", "turns": list(qs[0].turns), "reference": ["4", "6"]}
    assert r1["generation"]["temperature"] == 0.0 and recs[1]["generation"]["temperature"] == 0.7
    assert [len(r["choices"][0]["turns"]) for r in recs] == [2, 2, 1]
    # Greedy answers equal a lone greedy run; the second turn sees the model's own first answer.
    sys_msg = [{"role": "system", "content": "Be brief."}]
    a1, a2 = r1["choices"][0]["turns"]
    assert a1 == _greedy(lm, sys_msg + [{"role": "user", "content": qs[0].turns[0]}], 10)
    history = sys_msg + [{"role": "user", "content": qs[0].turns[0]}, {"role": "assistant", "content": a1},
                         {"role": "user", "content": qs[0].turns[1]}]
    assert a2 == _greedy(lm, history, 10)
    # Sampled categories are seeded: the same settings answer the same.
    again = generate_answers(lm, qs, "tiny", settings)
    assert [r["choices"] for r in again] == [r["choices"] for r in recs]
    other = generate_answers(lm, qs, "tiny", AnswerSettings(max_new_tokens=10, batch_size=2, system="Be brief.",
                                                            seed=5))
    assert other[1]["choices"] != recs[1]["choices"] and other[0]["choices"] == recs[0]["choices"]


def test_answer_command(tmp_path: Path, monkeypatch, capsys) -> None:
    model_dir = convert_to_hf(make_tiny_lm(seed=2, max_position_embeddings=1024), tmp_path / "tiny-model")
    qfile = write_lines(tmp_path / "question.jsonl", MT_QUESTIONS)
    out = tmp_path / "answers.jsonl"
    code, _, err = run_cli(["answer", "--questions", str(qfile), "--model", str(model_dir), "--out", str(out),
                            "-n", "6", "--threads", "1"], monkeypatch, capsys)
    assert code in (0, None), err
    s = load_answers(out)
    assert s.model_id == "tiny-model" and set(s.answers) == {"81", "111"}
    rec = s.answers["111"].record
    assert rec["base_fingerprint"].startswith("fp1:") and rec["adapters"] == []
    assert rec["generation"]["max_new_tokens"] == 6
    assert s.answers["111"].question.reference == ("4", "12")
    assert not list(tmp_path.glob(".answers.jsonl.*"))  # the temporary file is gone
    code, _, err = run_cli(["answer", "--questions", str(write_lines(tmp_path / "bad.jsonl", ['{"turns": 5}'])),
                            "--model", str(model_dir)], monkeypatch, capsys)
    assert code == 1 and err.strip().startswith("error: ") and "bad.jsonl:1:" in err and len(err.splitlines()) == 1
