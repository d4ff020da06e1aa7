"""`nomoat judge pairwise` end to end against a real `nomoat serve` (uvicorn on a free port): the tiny model
for the command line's plumbing, soft verdicts and the cache; the real default model (slow) for answers
from two settings judged with both orders recorded, and for its logprobs against its own logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_lm
from test_bad_input import run_cli
from test_serve import start_server, stop_server

from nomoat.eval.answers import AnswerSettings, generate_answers, write_answers
from nomoat.eval.judge_stats import load_verdicts
from nomoat.eval.questions import load_questions
from nomoat.runtime.generate import GenerationConfig, stream
from nomoat.runtime.loading import LoadedModel
from nomoat.runtime.prompts import prompt_ids
from nomoat.serve import ServerSettings

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")



@pytest.fixture(autouse=True)
def _wide_terminal(monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # tables printed by the CLI keep each row on one line


def check_records(records: list[dict], n: int, judge: str) -> None:
    assert len(records) == n
    for r in records:
        assert r["judge"] == judge and [o["order"] for o in r["orders"]] == ["1-2", "2-1"]
        for o in r["orders"]:
            assert isinstance(o["text"], str) and o["error"] is None
            assert o["verdict"] in ("A", "B", "C", None) and "winner" in o
            assert o["soft"] is None or sum(o["soft"].values()) == pytest.approx(1.0)
        assert r["winner"] in ("model_1", "model_2", "tie")


def _answers(tmp_path: Path, name: str, n_q: int = 2) -> Path:
    recs = [{"question_id": q, "model_id": name, "choices": [{"index": 0, "turns": [f"{name} says {q}", "And more."]}],
             "question": {"category": "writing", "turns": [f"Question {q}?", "Go on."]}} for q in range(1, n_q + 1)]
    return write_answers(tmp_path / f"{name}.jsonl", recs)


def test_cli_against_a_tiny_server(tmp_path: Path, monkeypatch, capsys) -> None:
    live = start_server(make_tiny_lm(seed=3, max_position_embeddings=4096), "tiny", {}, ServerSettings())
    try:
        a, b = _answers(tmp_path, "base"), _answers(tmp_path, "tuned")
        out = tmp_path / "verdicts.jsonl"
        args = ["judge", "pairwise", str(a), str(b), "--judge", live.url + "/v1", "--judge-model", "tiny",
                "--judge-max-tokens", "8", "--parallel", "2", "--soft", "--out", str(out)]
        code, stdout, err = run_cli(args, monkeypatch, capsys)
        assert code in (0, None), err
        assert "8 judgments, 0 from the cache" in err and "tuned vs base" in stdout
        check_records(load_verdicts(out), 4, "tiny")
        served = httpx.get(live.url + "/health").json()["completed"]
        assert served == 8
        # Again: every verdict from the cache, not one request to the server.
        code, _, err = run_cli(args, monkeypatch, capsys)
        assert code in (0, None) and "8 from the cache" in err and "0 requested" in err
        assert httpx.get(live.url + "/health").json()["completed"] == served
        assert (tmp_path / "verdicts.cache.sqlite").exists() and (tmp_path / "verdicts.png").exists()
    finally:
        stop_server(live)


@pytest.mark.slow
def test_default_model_judges_over_serve(default_lm: LoadedModel, tmp_path: Path, monkeypatch, capsys) -> None:
    """Answers from the default model with and without a system prompt, judged by the default model through
    `nomoat serve`: every record carries both orders' raw texts and parsed winners; a re-run asks nothing."""
    qs = {q.category: q for q in reversed(load_questions("builtin"))}
    two = [qs["math"], qs["stem"]]  # the math question carries a reference answer
    files = []
    for name, system in (("plain", None), ("brief", "Answer in one short sentence.")):
        recs = generate_answers(default_lm, two, name, AnswerSettings(max_new_tokens=24, temperature=0, system=system))
        files.append(write_answers(tmp_path / f"{name}.jsonl", recs))
    live = start_server(default_lm, "smollm2", {}, ServerSettings())
    try:
        out = tmp_path / "verdicts.jsonl"
        args = ["judge", "pairwise", *map(str, files), "--judge", live.url + "/v1", "--judge-model", "smollm2",
                "--judge-max-tokens", "40", "--parallel", "2", "--soft", "--out", str(out)]
        code, stdout, err = run_cli(args, monkeypatch, capsys)
        assert code in (0, None), err
        records = load_verdicts(out)
        check_records(records, 4, "smollm2")
        assert {(r["question_id"], r["turn"]) for r in records} == {(q.question_id, t) for q in two for t in (1, 2)}
        assert all(o["text"].strip() for r in records for o in r["orders"])  # the judge's raw replies are kept
        assert "brief vs plain" in stdout and "position consistency" in stdout
        served = httpx.get(live.url + "/health").json()["completed"]
        code, _, err = run_cli(args, monkeypatch, capsys)
        assert code in (0, None) and "0 requested" in err
        assert httpx.get(live.url + "/health").json()["completed"] == served
        assert [json.loads(x) for x in out.read_text().splitlines()] == records
        # The server's logprobs are the log-softmax of nomoat's own logits for the same tokens.
        msgs = [{"role": "user", "content": "What is the capital of France?"}]
        r = live.client().chat.completions.create(model="smollm2", messages=msgs, max_tokens=12, temperature=0,
                                                  logprobs=True, top_logprobs=3)
        content = r.choices[0].logprobs.content
    finally:
        stop_server(live)
    ids = prompt_ids(default_lm, msgs)
    cfg = GenerationConfig(max_new_tokens=12, temperature=0, logprobs=3)
    pieces = list(stream(default_lm.model, default_lm.tokenizer, ids, cfg))
    entries = [e for p in pieces for e in p.logprobs]
    assert [c.token for c in content] and len(content) == len(entries)
    with torch.no_grad():
        logits = default_lm.model(torch.tensor([ids + [e.token for e in entries]]))[0].float()
    own = torch.log_softmax(logits[len(ids) - 1:-1], -1)
    for i, (c, e) in enumerate(zip(content, entries)):
        assert c.logprob == pytest.approx(e.logprob, abs=1e-5)  # the same decode as in-process
        assert c.logprob == pytest.approx(float(own[i, e.token]), abs=0.05)  # and as one full forward pass
    assert "Paris" in r.choices[0].message.content

