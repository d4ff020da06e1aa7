"""Running judgments: both orders recorded, the verdict cache (a re-run asks nothing; an interrupted run
resumes to the same verdicts), repeats, single grades, baselines and all pairs, templates, the HTTP
client's retries and refusals, and the command line's reports and errors."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import httpx
import pytest
from test_bad_input import run_cli

from nomoat.api import judge_answers
from nomoat.errors import NomoatError
from nomoat.eval.answers import write_answers
from nomoat.eval.judge import JudgeTemplate
from nomoat.eval.judge_cache import JudgeReply, VerdictCache
from nomoat.eval.judge_client import EndpointJudge, JudgeInputError, JudgeSettings

QUESTIONS = [(1, "math", ["What is 2 + 2?", "And times 3?"], ["4", "12"]),
             (2, "writing", ["Write a haiku.", "Now a limerick."], None),
             (3, "stem", ["Why is the sky blue?", "And sunsets?"], None)]


def answer_file(path: Path, model_id: str, style: str, questions=QUESTIONS, with_question: bool = True) -> Path:
    recs = []
    for qid, cat, turns, ref in questions:
        rec = {"question_id": qid, "answer_id": f"{model_id}-{qid}", "model_id": model_id,
               "choices": [{"index": 0, "turns": [f"{style} answer to: {t}" for t in turns]}], "tstamp": 0.0}
        if with_question:
            rec["question"] = {"category": cat, "turns": turns} | ({"reference": ref} if ref else {})
        recs.append(rec)
    return write_answers(path, recs)


class FakeJudge:
    """A deterministic judge: the verdict is a function of the prompt; can fail after `fail_after` calls."""

    max_parallel = None

    def __init__(self, fail_after: int | None = None, name: str = "fake", mode: str = "pairwise") -> None:
        self.name, self.mode, self.fail_after = name, mode, fail_after
        self.calls, self.seeds, self.prompts = 0, [], []
        self._lock = threading.Lock()

    def __call__(self, messages, settings, seed) -> JudgeReply:
        with self._lock:
            self.calls += 1
            if self.fail_after is not None and self.calls > self.fail_after:
                raise NomoatError("the judge went away")
            self.seeds.append(seed)
            self.prompts.append(messages)
        h = hashlib.sha256(json.dumps(messages).encode()).digest()[0]
        if self.mode == "single":
            return JudgeReply(f"Fine. [[{1 + h % 10}]]" if h % 7 else "no score")
        return JudgeReply(f"Because. [[{'ABC'[h % 3]}]]" if h % 11 else "I cannot decide")


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path, Path]:
    return (answer_file(tmp_path / "base.jsonl", "base", "A short"),
            answer_file(tmp_path / "tuned.jsonl", "tuned", "A much longer and more careful"),
            answer_file(tmp_path / "other.jsonl", "other", "Another"))


def run(mode, answers, tmp_path, judge, **kw):
    return judge_answers(mode, answers, out=tmp_path / f"{mode}.jsonl", judge_impl=judge, png=False, **kw)


def test_pairwise_records_both_orders(files, tmp_path: Path) -> None:
    judge = FakeJudge()
    res = run("pairwise", files[:2], tmp_path, judge, settings=JudgeSettings(parallel=3))
    assert judge.calls == 12 and res.stats.requested == 12 and res.stats.cached == 0  # 3 questions x 2 turns x 2
    assert len(res.records) == 6 and res.out.exists() and res.cache == tmp_path / "pairwise.cache.sqlite"
    for r in res.records:
        assert (r["model_1"], r["model_2"], r["judge"]) == ("base", "tuned", "fake")
        o12, o21 = r["orders"]
        assert (o12["order"], o12["a"], o12["b"]) == ("1-2", "base", "tuned")
        assert (o21["order"], o21["a"], o21["b"]) == ("2-1", "tuned", "base")
        for o in (o12, o21):
            assert isinstance(o["text"], str) and o["verdict"] in ("A", "B", "C", None)
            named = {"A": o["a"], "B": o["b"], "C": "tie"}.get(o["verdict"])
            assert o["winner"] == {"base": "model_1", "tuned": "model_2", "tie": "tie", None: None}[named]
        assert r["len_2"] > r["len_1"]
    # The prompts: the swapped order shows the other answer first; turn 2 shows each model's own history,
    # and the math question carries its reference answer.
    users = [m[-1]["content"] for m in judge.prompts]
    assert any("A much longer" in u.split("[Answer of assistant B]")[0] for u in users)
    turn2 = [u for u in users if "And times 3?" in u]
    assert len(turn2) == 2 and all("A short answer to: What is 2 + 2?" in u and "12" in u for u in turn2)
    assert all(m[0]["role"] == "system" for m in judge.prompts)
    # Second run: everything from the cache, no request, the same verdicts.
    again = FakeJudge()
    res2 = run("pairwise", files[:2], tmp_path, again)
    assert again.calls == 0 and res2.stats.cached == 12 and res2.records == res.records
    assert res2.report.pairwise[0].overall.n == 6


@pytest.mark.parametrize("parallel", [1, 4])
def test_interrupted_run_resumes_to_the_same_verdicts(files, tmp_path: Path, parallel: int) -> None:
    clean = run("pairwise", files[:2], tmp_path / "clean", FakeJudge())
    broken = FakeJudge(fail_after=5)
    with pytest.raises(NomoatError, match="went away"):
        run("pairwise", files[:2], tmp_path / "cut", broken, settings=JudgeSettings(parallel=parallel))
    assert not (tmp_path / "cut" / "pairwise.jsonl").exists()  # no half-written verdicts file
    kept = len(VerdictCache(tmp_path / "cut" / "pairwise.cache.sqlite"))
    assert kept == 5  # every reply that came back was committed
    resumed = FakeJudge()
    res = run("pairwise", files[:2], tmp_path / "cut", resumed, settings=JudgeSettings(parallel=parallel))
    assert resumed.calls == 12 - kept and res.stats.cached == kept
    assert res.records == clean.records


def test_repeats_and_settings_are_part_of_the_key(files, tmp_path: Path) -> None:
    judge = FakeJudge()
    res = run("pairwise", files[:2], tmp_path, judge, settings=JudgeSettings(repeat=2, temperature=0.7))
    assert judge.calls == 24 and sorted(set(judge.seeds)) == [0, 1]
    assert {r["repeat"] for r in res.records} == {0, 1}
    assert res.report.pairwise[0].repeats == 2
    judge = FakeJudge()
    run("pairwise", files[:2], tmp_path, judge, settings=JudgeSettings(repeat=2, temperature=0.0))
    assert judge.calls == 24  # another temperature is another judgment
    judge = FakeJudge(name="other-judge")
    run("pairwise", files[:2], tmp_path, judge, settings=JudgeSettings(repeat=1, temperature=0.0))
    assert judge.calls == 12


def test_baseline_and_all_pairs(files, tmp_path: Path) -> None:
    res = run("pairwise", list(files), tmp_path, FakeJudge())
    assert {(r["model_1"], r["model_2"]) for r in res.records} == {("base", "tuned"), ("base", "other")}
    assert len(res.report.pairwise) == 2
    res = run("pairwise", list(files), tmp_path, FakeJudge(), all_pairs=True)
    assert {(r["model_1"], r["model_2"]) for r in res.records} == {("base", "tuned"), ("base", "other"),
                                                                   ("tuned", "other")}
    with pytest.raises(NomoatError, match="at least two answer files"):
        run("pairwise", files[:1], tmp_path, FakeJudge())
    twin = answer_file(tmp_path / "twin.jsonl", "base", "Same id")
    with pytest.raises(NomoatError, match=r"twin.jsonl: model_id 'base' is also the model of .*--model-id"):
        run("pairwise", [files[0], twin], tmp_path, FakeJudge())


def test_single_grades(files, tmp_path: Path) -> None:
    judge = FakeJudge(mode="single")
    res = run("single", files[:2], tmp_path, judge)
    assert judge.calls == 12 and len(res.records) == 12
    assert {r["model"] for r in res.records} == {"base", "tuned"}
    for r in res.records:
        assert r["score"] is None or 1 <= r["score"] <= 10
        assert (r["score"] is None) == ("[[" not in r["text"])
    (s1, s2) = res.report.single
    assert s1.n == 6 and s1.scored == sum(r["score"] is not None for r in res.records if r["model"] == s1.model)
    assert "[Answer of the assistant]" in judge.prompts[0][-1]["content"]
    again = FakeJudge(mode="single")
    run("single", files[:2], tmp_path, again)
    assert again.calls == 0


def test_mtbench_answers_need_their_questions(tmp_path: Path) -> None:
    a = answer_file(tmp_path / "a.jsonl", "a", "One", with_question=False)
    b = answer_file(tmp_path / "b.jsonl", "b", "Two", with_question=False)
    with pytest.raises(NomoatError, match=r"a.jsonl:1: the answer record does not carry its question.*--questions"):
        run("pairwise", [a, b], tmp_path, FakeJudge())
    q = tmp_path / "question.jsonl"
    q.write_text("".join(json.dumps({"question_id": i, "category": c, "turns": t}) + "\n" for i, c, t, _ in QUESTIONS))
    res = run("pairwise", [a, b], tmp_path, FakeJudge(), questions=q)
    assert len(res.records) == 6
    # A question answered in one file only is skipped, and said so.
    c = answer_file(tmp_path / "c.jsonl", "c", "Three", questions=QUESTIONS[:2])
    res = run("pairwise", [a, c], tmp_path, FakeJudge(), questions=q)
    assert len(res.records) == 4 and "not answered in every file: 3" in res.skipped[0]


def test_templates(tmp_path: Path) -> None:
    tpl = JudgeTemplate.load("pairwise")
    msgs = tpl.render(question="Q2?", answer_a="a2", answer_b="b2", turn=2, reference="R",
                      history=[{"question": "Q1?", "answer_a": "a1", "answer_b": "b1"}], category="math")
    assert [m["role"] for m in msgs] == ["system", "user"]
    user = msgs[1]["content"]
    assert user.index("Assistant A: a1") < user.index("User: Q2?") < user.index("Assistant A: a2")
    assert "Assistant B: b1" in user and "[Reference answer" in user and user.rstrip().endswith("for a tie.")
    one = JudgeTemplate.load("single").render(question="Q", answer="x", turn=1, history=[], reference=None,
                                              category="writing")
    assert "[Reference" not in one[1]["content"] and "[[6]]" in one[1]["content"]
    mine = tmp_path / "mine.jinja"
    mine.write_text("{% block user %}Which is better?\nA: {{ answer_a }}\nB: {{ answer_b }}{% endblock %}")
    assert JudgeTemplate.load("pairwise", mine).render(answer_a="x", answer_b="y") == [
        {"role": "user", "content": "Which is better?\nA: x\nB: y"}]
    mine.write_text("{% block user %}\n{{ answer_a }\n{% endblock %}")
    with pytest.raises(NomoatError, match=r"mine.jinja:\d+: template syntax error"):
        JudgeTemplate.load("pairwise", mine)
    mine.write_text("no blocks at all")
    with pytest.raises(NomoatError, match=r"mine.jinja: a judge template needs a \{% block user %\}"):
        JudgeTemplate.load("pairwise", mine)
    mine.write_text("{% block user %}{{ answr_a }}{% endblock %}")
    with pytest.raises(NomoatError, match=r"mine.jinja: 'answr_a' is undefined"):
        JudgeTemplate.load("pairwise", mine).render(answer_a="x")
    with pytest.raises(NomoatError, match="no such file"):
        JudgeTemplate.load("pairwise", tmp_path / "nope.jinja")
    # Worked examples become earlier chat turns (small judges copy the verdict format from them).
    short = JudgeTemplate.load("pairwise", "builtin:pairwise-verdict")
    msgs = short.render(question="Q?", answer_a="a", answer_b="b", turn=1, history=[], reference="R", category="x")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert msgs[2]["content"] == "[[B]]"
    assert msgs[-1]["content"] == "Question: Q?\nCorrect answer: R\n\nAnswer A: a\n\nAnswer B: b"
    one = JudgeTemplate.load("single", "builtin:single-verdict").render(question="Q?", answer="a", turn=1, history=[],
                                                                       reference=None, category="x")
    assert one[-1]["content"] == "Question: Q?\n\nAnswer: a"
    with pytest.raises(NomoatError, match=r"no such built-in template \(built in: builtin:pairwise, "):
        JudgeTemplate.load("pairwise", "builtin:nope")
    mine.write_text("{% block example_1_user %}x{% endblock %}{% block user %}y{% endblock %}")
    with pytest.raises(NomoatError, match="block example_1_user needs a block example_1_assistant"):
        JudgeTemplate.load("pairwise", mine)


def _endpoint(responses: list, calls: list, sleeps: list, **kw) -> EndpointJudge:
    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(json.loads(request.content))
        r = responses.pop(0)
        if isinstance(r, Exception):
            raise r
        return r

    return EndpointJudge("http://judge.test/v1/", "big-judge", api_key="k", transport=httpx.MockTransport(handler),
                         sleep=sleeps.append, **kw)


def _ok(text: str, logprobs=None) -> httpx.Response:
    return httpx.Response(200, json={"choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                                  "logprobs": logprobs and {"content": logprobs}}]})


def test_endpoint_retries_with_backoff() -> None:
    calls, sleeps = [], []
    j = _endpoint([httpx.Response(429, headers={"Retry-After": "0"}, json={"error": {"message": "slow down"}}),
                   httpx.Response(503, text="busy"), httpx.ConnectError("refused"), _ok("[[A]]", [{"token": "x"}])],
                  calls, sleeps)
    reply = j([{"role": "user", "content": "hi"}], JudgeSettings(soft=True, temperature=0.5, max_tokens=9), seed=3)
    assert reply.text == "[[A]]" and reply.logprobs == [{"token": "x"}]
    assert len(calls) == 4 and sleeps[0] == 0  # Retry-After honoured
    assert 0.5 <= sleeps[1] <= 1.0 and 1.0 <= sleeps[2] <= 2.0  # exponential, with jitter
    body = calls[0]
    assert body["model"] == "big-judge" and body["max_tokens"] == 9 and body["seed"] == 3
    assert body["logprobs"] is True and body["top_logprobs"] == 5
    calls, sleeps = [], []
    j = _endpoint([httpx.Response(500)] * 3, calls, sleeps, retries=2)
    with pytest.raises(NomoatError, match="gave up after 3 attempts"):
        j([{"role": "user", "content": "hi"}], JudgeSettings(), None)


def test_endpoint_refusals() -> None:
    calls, sleeps = [], []
    j = _endpoint([httpx.Response(401, json={"error": {"message": "invalid API key"}})], calls, sleeps)
    with pytest.raises(NomoatError, match=r"--judge http://judge.test/v1: HTTP 401: invalid API key") as e:
        j([{"role": "user", "content": "hi"}], JudgeSettings(), None)
    assert not isinstance(e.value, JudgeInputError) and len(calls) == 1 and not sleeps
    j = _endpoint([httpx.Response(400, json={"error": {"message": "too long"}})], calls, sleeps)
    with pytest.raises(JudgeInputError, match="too long"):
        j([{"role": "user", "content": "hi"}], JudgeSettings(), None)
    assert "seed" not in calls[-1] and "logprobs" not in calls[-1]  # greedy, not soft


def test_refused_inputs_are_recorded_not_cached(files, tmp_path: Path) -> None:
    class Picky(FakeJudge):
        asked = 0

        def __call__(self, messages, settings, seed):
            self.asked += 1
            if "haiku" in messages[-1]["content"]:
                raise JudgeInputError("too long for the judge")
            return super().__call__(messages, settings, seed)

    res = run("pairwise", files[:2], tmp_path, Picky(), settings=JudgeSettings(parallel=1))
    bad = [r for r in res.records if r["question_id"] == 2]
    assert res.stats.failed == 4 and all(o["error"] and o["verdict"] is None for r in bad for o in r["orders"])
    assert all(r["tie_kind"] == "unparseable" for r in bad)
    again = Picky()
    run("pairwise", files[:2], tmp_path, again)
    assert again.asked == 4  # refused judgments are asked again next time



@pytest.fixture(autouse=True)
def _wide_terminal(monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # tables printed by the CLI keep each row on one line


def test_cli_report_and_errors(files, tmp_path: Path, monkeypatch, capsys) -> None:
    res = run("pairwise", files[:2], tmp_path, FakeJudge())
    code, out, err = run_cli(["judge", "report", str(res.out), "--png", str(tmp_path / "plot.png")], monkeypatch,
                             capsys)
    assert code in (0, None), err
    assert "tuned vs base" in out and "adj. win rate" in out and "position consistency" in out
    assert "length-controlled" in out and (tmp_path / "plot.png").stat().st_size > 1000
    o = ["--out", str(tmp_path / "cli" / "v.jsonl")]
    for args, mention in (
        (["judge", "pairwise", str(files[0]), "--judge", "http://127.0.0.1:9/v1", "--judge-model", "m", *o],
         "at least two answer files"),
        (["judge", "pairwise", *map(str, files[:2]), "--judge", "gpt4", *o], "--judge 'gpt4'"),
        (["judge", "pairwise", *map(str, files[:2]), "--judge", "http://127.0.0.1:9/v1", *o], "--judge-model"),
        (["judge", "pairwise", *map(str, files[:2]), "--repeat", "0", *o], "--repeat"),
        (["judge", "single", str(tmp_path / "missing.jsonl"), *o], "missing.jsonl: no such file"),
        (["judge", "report", str(files[0])], 'base.jsonl:1: "mode" must be'),
    ):
        code, _, err = run_cli(args, monkeypatch, capsys)
        lines = err.strip().splitlines()
        assert code == 1 and len(lines) == 1 and lines[0].startswith("error: ") and mention in lines[0], (args, err)
    assert not (tmp_path / "cli").exists()  # nothing was written for a refused command
