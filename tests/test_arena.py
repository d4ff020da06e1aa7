"""The blind arena and its ratings: Bradley–Terry against scikit-learn's logistic regression (as Chatbot Arena's
notebook fit it), interval coverage on simulated battles, the battle readers, blindness of every response
before the vote, votes once per battle, rate limits, keys, 20 concurrent voters, a killed server, and the
`nomoat ratings` command. The arena page in a real browser is in test_web.py."""

from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from test_bad_input import assert_one_line_error, run_cli
from test_serve import Live, free_port, start_server, stop_server
from test_serve import files as files  # noqa: F401  (the module-scoped model + adapters fixture)
from test_serve import load_with_adapters as load_served

from nomoat.errors import NomoatError
from nomoat.eval.arena import ArenaSettings
from nomoat.eval.arena_store import ArenaStore
from nomoat.eval.battles import battles_from_verdicts, read_battles, write_battles
from nomoat.eval.ratings import agreement, build_report, rate
from nomoat.serve import ServerSettings

NAMES = ["tiny", "support", "pirate", "support+pirate"]


def simulate(strengths: dict[str, float], n: int, rng: np.random.Generator, tie_band: float = 0.05) -> list[dict]:
    """Battles between random pairs decided by the Bradley–Terry model with the given ratings."""
    names = list(strengths)
    out = []
    for _ in range(n):
        i, j = rng.choice(len(names), 2, replace=False)
        a, b = names[i], names[j]
        p = 1 / (1 + 10 ** ((strengths[b] - strengths[a]) / 400))
        u = rng.random()
        # A tie band around p keeps P(a wins) + P(tie)/2 = p: ties count half in the model as in the fit.
        w = "tie" if abs(u - p) < tie_band else "model_a" if u < p else "model_b"
        out.append({"model_a": a, "model_b": b, "winner": w, "rater": "human", "turn": 1,
                    "conversation_a": [], "conversation_b": []})
    return out


# --------------------------------------------------------------------------- ratings


def sklearn_ratings(battles: list[dict]) -> dict[str, float]:
    """Chatbot Arena's original MLE: logistic regression without intercept on +-log(10) features, each tie
    entered once as a win and once as a loss, 400 * coef + 1000."""
    lm = pytest.importorskip("sklearn.linear_model")
    names = sorted({b["model_a"] for b in battles} | {b["model_b"] for b in battles})
    idx = {n: i for i, n in enumerate(names)}
    X, Y = [], []
    for b in battles:
        x = np.zeros(len(names))
        x[idx[b["model_a"]]], x[idx[b["model_b"]]] = math.log(10), -math.log(10)
        ys = {"model_a": (1, 1), "model_b": (0, 0)}.get(b["winner"], (1, 0))
        X += [x, x]
        Y += list(ys)
    fit = lm.LogisticRegression(fit_intercept=False, C=np.inf, tol=1e-10, max_iter=10_000).fit(np.array(X),
                                                                                               np.array(Y))
    return {n: 400 * fit.coef_[0][i] + 1000 for n, i in idx.items()}


def test_bradley_terry_equals_logistic_regression() -> None:
    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
    truth = {f"m{i}": float(v) for i, v in enumerate(rng.normal(1000, 150, 6))}
    battles = simulate(truth, 3000, rng)
    ours = {c.name: c.rating for c in rate(battles, resamples=0).contestants}
    ref = sklearn_ratings(battles)
    assert max(abs(ours[n] - ref[n]) for n in ref) < 0.5, (ours, ref)
    # Anchored at a contestant: the same differences, that contestant at 1000.
    anchored = {c.name: c.rating for c in rate(battles, resamples=0, anchor="m2").contestants}
    assert anchored["m2"] == pytest.approx(1000)
    assert all(anchored[n] - anchored["m0"] == pytest.approx(ours[n] - ours["m0"], abs=1e-6) for n in ours)


def test_bootstrap_intervals_cover_the_true_strengths_at_about_the_nominal_rate() -> None:
    rng = np.random.default_rng(7)
    truth = {"a": 1150.0, "b": 1060.0, "c": 1000.0, "d": 950.0, "e": 840.0}
    mean = np.mean(list(truth.values()))
    hits = total = 0
    for trial in range(40):
        board = rate(simulate(truth, 400, rng), resamples=100, seed=trial)
        for c in board.contestants:
            hits += c.lower <= truth[c.name] - mean + 1000 <= c.upper
            total += 1
    assert 0.85 <= hits / total <= 1.0, hits / total


def test_ranks_separate_only_non_overlapping_intervals_and_win_rates_add_up() -> None:
    rng = np.random.default_rng(3)
    board = rate(simulate({"top": 1400.0, "mid1": 1000.0, "mid2": 1005.0, "low": 600.0}, 2000, rng), 100)
    ranks = {c.name: c.rank for c in board.contestants}
    assert ranks["top"] == 1 and ranks["low"] == 4
    assert ranks["mid1"] == ranks["mid2"] == 2  # overlapping intervals share a rank
    for a, row in board.win_rates.items():
        for b, (r, n) in row.items():
            assert board.win_rates[b][a][1] == n and board.win_rates[b][a][0] == pytest.approx(1 - r)
    assert sum(c.battles for c in board.contestants) == 2 * board.battles


def test_one_sided_results_stay_finite_and_ordered() -> None:
    battles = [{"model_a": "x", "model_b": "y", "winner": "model_a", "rater": "human", "turn": 1,
                "conversation_a": [], "conversation_b": []}] * 5
    board = rate(battles, resamples=20)
    r = {c.name: c.rating for c in board.contestants}
    assert all(math.isfinite(v) for v in r.values()) and r["x"] > r["y"]


def _conv(q: str, a: str) -> list[dict]:
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def test_agreement_with_and_without_ties() -> None:
    def b(q: str, a: str, bb: str, w: str, rater: str) -> dict:
        return {"model_a": a, "model_b": bb, "winner": w, "rater": rater, "turn": 1,
                "conversation_a": _conv(q, "x"), "conversation_b": _conv(q, "y")}

    battles = [b("q1", "m", "n", "model_a", "human"), b("q1", "n", "m", "model_b", "judge j"),  # agree (swapped)
               b("q2", "m", "n", "model_a", "human"), b("q2", "m", "n", "model_b", "judge j"),  # disagree
               b("q3", "m", "n", "tie", "human"), b("q3", "m", "n", "model_a", "judge j"),  # tie vs win
               b("q4", "m", "n", "model_a", "human")]  # the judge never saw q4
    g = agreement(battles, "human", "judge j")
    assert g.comparisons == 3
    assert g.with_ties == pytest.approx(1 / 3) and g.without_ties == pytest.approx(1 / 2)
    rep = build_report(battles, resamples=10)
    assert set(rep.by_rater) == {"human", "judge j"} and rep.agreements[0].comparisons == 3


# --------------------------------------------------------------------------- files


def test_battle_files_verdicts_and_errors(tmp_path) -> None:
    verdict = {"mode": "pairwise", "question_id": 7, "turn": 1, "judge": "gpt-x", "model_1": "m", "model_2": "n",
               "orders": [{"winner": "model_2"}, {"winner": "model_2"}], "len_1": 3, "len_2": 4,
               "winner": "model_2", "turns": ["q?"], "answers_1": ["a1"], "answers_2": ["a2"]}
    vf = tmp_path / "verdicts.jsonl"
    vf.write_text(json.dumps(verdict) + "\n" + json.dumps({**verdict, "winner": "tie", "question_id": 8}) + "\n")
    bs = read_battles(vf)
    assert [b["winner"] for b in bs] == ["model_b", "tie"]
    assert bs[0]["conversation_a"] == _conv("q?", "a1") and bs[0]["rater"] == "judge gpt-x"
    assert battles_from_verdicts([{**verdict, "mode": "single"}]) == []

    out = write_battles(tmp_path / "b.jsonl", bs)
    again = read_battles(out)
    assert [(b["model_a"], b["winner"], b["rater"]) for b in again] == [(b["model_a"], b["winner"], b["rater"])
                                                                         for b in bs]
    # Another arena's cleaned battles: no rater field (people), extra fields kept, their `judge` a voter id.
    other = tmp_path / "clean_battle.json"
    other.write_text(json.dumps([{"model_a": "p", "model_b": "q", "winner": "tie (bothbad)", "judge": "arena_user_1",
                                  "turn": 1, "anony": True, "language": "English", "tstamp": 1.5,
                                  "conversation_a": _conv("hi", "a"), "conversation_b": _conv("hi", "b")}]))
    assert read_battles(other)[0]["rater"] == "human"

    bad = tmp_path / "bad.jsonl"
    for line, msg in ((json.dumps({"model_a": "p", "model_b": "q", "winner": "draw"}), '"winner"'),
                      (json.dumps({"model_a": "p", "model_b": "p", "winner": "tie"}), "both"),
                      (json.dumps({"model_a": "p", "model_b": "q", "winner": "tie", "turn": 0}), '"turn"'),
                      (json.dumps({"model_a": "p", "model_b": "q", "winner": "tie", "conversation_a": "x"}),
                       "conversation_a")):
        bad.write_text(json.dumps({"model_a": "p", "model_b": "q", "winner": "tie"}) + "\n" + line + "\n")
        with pytest.raises(NomoatError, match=f"bad.jsonl:2: .*{msg}"):
            read_battles(bad)
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"SQLite format 3\x00" + b"\x00" * 100)
    with pytest.raises(NomoatError, match="junk.sqlite"):
        read_battles(junk)


def test_store_votes_once_and_exports_the_conversation_as_voted(tmp_path) -> None:
    db = tmp_path / "a.sqlite"
    with ArenaStore(db) as s:
        bid = s.create("m", "n", {}, {"ad": {"weight": 1.0, "source": "/x"}}, "base", "fp")
        with pytest.raises(ValueError, match="no answers"):
            s.vote(bid, "a", "v1")
        s.save_turn(bid, _conv("q1", "a1"), _conv("q1", "b1"), 1)
        assert s.vote(bid, "b", "v1")["winner"] == "model_b"
        with pytest.raises(Exception, match=bid):
            s.vote(bid, "a", "v2")
        s.save_turn(bid, _conv("q1", "a1") + _conv("q2", "a2"), _conv("q1", "b1") + _conv("q2", "b2"), 2)
    (b,) = read_battles(db)
    assert b["winner"] == "model_b" and b["turn"] == 1 and b["conversation_a"] == _conv("q1", "a1")
    assert b["stack_b"] == {"ad": {"weight": 1.0, "source": "/x"}} and b["base_fingerprint"] == "fp"
    with sqlite3.connect(db) as con:  # the full conversation stays in the database
        assert json.loads(con.execute("SELECT conversation_a FROM battles").fetchone()[0])[-1]["content"] == "a2"


# --------------------------------------------------------------------------- the arena over HTTP


@pytest.fixture(scope="module")
def arena(files, tmp_path_factory) -> Iterator[tuple[Live, Path]]:  # noqa: F811
    db = tmp_path_factory.mktemp("arena") / "arena.sqlite"
    lm = load_served(*files)
    settings = ServerSettings(max_tokens_limit=64)
    live = start_server(lm, "tiny", {"support": 1.0, "pirate": 1.0}, settings,
                        arena=ArenaSettings(str(db), max_tokens=16, votes_per_minute=5000, seed=0),
                        adapter_sources={k: str(v) for k, v in files[1].items()})
    yield live, db
    stop_server(live)


def _sse(text: str) -> list[dict]:
    return [json.loads(line[5:]) for line in text.splitlines() if line.startswith("data:")]


def _leaks(text: str, names: list[str]) -> list[str]:
    return [n for n in names if n in text]


def test_battle_is_blind_until_the_vote(arena, files) -> None:  # noqa: F811
    live, db = arena
    secret = [*NAMES[1:], *(str(p) for p in files[1].values()), '"tiny"']
    seen: list[str] = [httpx.get(live.url + "/arena").text, httpx.get(live.url + "/arena/api/config").text]
    r = httpx.post(live.url + "/arena/api/battles", json={"prompt": "Say hi", "stream": True, "max_tokens": 8},
                   timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    seen.append(r.text + json.dumps(dict(r.headers)))
    events = _sse(r.text)
    bid = events[0]["battle_id"]
    assert {e["side"] for e in events if "delta" in e} == {"a", "b"}
    assert events[-1] == {"done": True, "turn": 1}
    r2 = httpx.post(f"{live.url}/arena/api/battles/{bid}/turns", json={"prompt": "More", "stream": False,
                                                                       "max_tokens": 8}, timeout=60)
    seen.append(r2.text + json.dumps(dict(r2.headers)))
    assert r2.json()["turn"] == 2 and set(r2.json()) == {"battle_id", "turn", "answer_a", "answer_b"}
    leaks = [n for text in seen for n in _leaks(text, secret)]
    assert not leaks, leaks

    v = httpx.post(f"{live.url}/arena/api/battles/{bid}/vote", json={"winner": "a"}, headers={"X-Arena-Voter": "t1"})
    assert v.status_code == 200, v.text
    got = v.json()
    assert {got["model_a"], got["model_b"]} <= set(NAMES) and got["winner"] == "model_a" and got["turn"] == 2
    again = httpx.post(f"{live.url}/arena/api/battles/{bid}/vote", json={"winner": "b"})
    assert again.status_code == 409
    assert httpx.post(f"{live.url}/arena/api/battles/{'0' * 32}/vote", json={"winner": "a"}).status_code == 404
    assert httpx.post(f"{live.url}/arena/api/battles/{bid}/vote", json={"winner": "A"}).status_code == 400
    # After the vote the battle may go on, revealed; the stored vote keeps both conversations as voted.
    r3 = httpx.post(f"{live.url}/arena/api/battles/{bid}/turns", json={"prompt": "And?", "stream": False,
                                                                       "max_tokens": 4}, timeout=60)
    assert r3.json()["turn"] == 3
    (b,) = [x for x in read_battles(db) if x["battle_id"] == bid]
    assert b["model_a"] == got["model_a"] and b["turn"] == 2 and len(b["conversation_a"]) == 4
    assert b["conversation_b"][0]["content"] == "Say hi" and b["judge"] == "arena_user_t1"
    for k, stack in (("model_a", b["stack_a"]), ("model_b", b["stack_b"])):
        assert sorted(stack) == sorted(p for p in b[k].split("+") if p != "tiny")


def test_bad_arena_requests(arena) -> None:
    live, _ = arena
    for body, status in (({"prompt": ""}, 400), ({"prompt": "x", "max_tokens": 10_000}, 400), ({}, 400),
                         ({"prompt": "x" * 20_000}, 400)):
        assert httpx.post(live.url + "/arena/api/battles", json=body).status_code == status, body
    assert httpx.post(live.url + "/arena/api/battles", content=b"[1]").status_code == 400
    assert httpx.get(live.url + "/arena/api/question").status_code == 404  # no question set loaded


def test_pairs_spread_over_contestants(arena) -> None:
    live, _ = arena
    arena_state = live.app.state.arena
    seen = {frozenset(arena_state.draw()) for _ in range(300)}
    assert len(seen) == 6  # every pair of the 4 contestants gets drawn


def test_twenty_voters_lose_no_vote(arena) -> None:
    live, db = arena
    with ThreadPoolExecutor(8) as pool:
        bids = list(pool.map(lambda _: httpx.post(live.url + "/arena/api/battles", timeout=120, json={
            "prompt": "hi", "stream": False, "max_tokens": 1}).json()["battle_id"], range(1000)))
    before = ArenaStore(db, readonly=True).counts()[1]
    accepted = []
    lock = threading.Lock()

    def voter(k: int) -> None:
        with httpx.Client(base_url=live.url, timeout=60) as c:
            for bid in bids[k::20]:
                r = c.post(f"/arena/api/battles/{bid}/vote", json={"winner": "tie"},
                           headers={"X-Arena-Voter": f"voter{k}"})
                assert r.status_code == 200, r.text
                with lock:
                    accepted.append(bid)
            r = c.post(f"/arena/api/battles/{bids[k]}/vote", json={"winner": "a"})  # a double vote
            assert r.status_code == 409

    t0 = time.perf_counter()
    with ThreadPoolExecutor(20) as pool:
        list(pool.map(voter, range(20)))
    assert len(accepted) == 1000, time.perf_counter() - t0
    assert ArenaStore(db, readonly=True).counts()[1] - before == 1000


def test_rate_limit_and_tokens(files, tmp_path) -> None:  # noqa: F811
    lm = load_served(*files)
    live = start_server(lm, "tiny", {"support": 1.0}, ServerSettings(api_key="admin", max_tokens_limit=8),
                        arena=ArenaSettings(str(tmp_path / "a.sqlite"), token="voters", max_tokens=2,
                                            votes_per_minute=2))
    try:
        url = live.url + "/arena/api/battles"
        assert httpx.get(live.url + "/arena").status_code == 200  # the page itself holds nothing to protect
        assert httpx.post(url, json={"prompt": "x", "stream": False}).status_code == 401
        assert httpx.post(url, json={"prompt": "x"}, headers={"Authorization": "Bearer nope"}).status_code == 401
        codes = []
        for key in ("voters", "admin", "voters"):
            h = {"Authorization": f"Bearer {key}", "X-Arena-Voter": "same"}
            bid = httpx.post(url, json={"prompt": "x", "stream": False}, headers=h, timeout=60).json()["battle_id"]
            codes.append(httpx.post(f"{url}/{bid}/vote", json={"winner": "tie"}, headers=h).status_code)
        assert codes == [200, 200, 429]  # two votes a minute for one voter
        assert httpx.get(live.url + "/v1/models", headers={"Authorization": "Bearer voters"}).status_code == 401
    finally:
        stop_server(live)


def test_arena_needs_two_contestants_and_known_names(files, tmp_path) -> None:  # noqa: F811
    from nomoat.serve import create_app

    lm = load_served(files[0], {})
    with pytest.raises(NomoatError, match="at least two contestants"):
        create_app(lm, "tiny", {}, arena=ArenaSettings(str(tmp_path / "a.sqlite")))
    with pytest.raises(NomoatError, match="'nope' is not a model id"):
        create_app(lm, "tiny", {}, arena=ArenaSettings(str(tmp_path / "a.sqlite"), contestants=["tiny", "nope"]))


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from nomoat.cli import main; main()", *args]


def test_killed_server_keeps_every_acknowledged_vote(files, tmp_path) -> None:  # noqa: F811
    model_dir, paths = files
    db, port = tmp_path / "arena.sqlite", free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_cli("serve", "--model", str(model_dir), "--adapter", f"support={paths['support']}",
                                 "--port", str(port), "--threads", "1", "--arena", str(db),
                                 "--arena-votes-per-minute", "100000", "--arena-max-tokens", "1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    acked: list[str] = []
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        bids = [httpx.post(url + "/arena/api/battles", json={"prompt": "hi", "stream": False}, timeout=60).json()[
            "battle_id"] for _ in range(150)]

        def voter(k: int) -> None:
            with httpx.Client(base_url=url, timeout=30) as c:
                for bid in bids[k::10]:
                    try:
                        r = c.post(f"/arena/api/battles/{bid}/vote", json={"winner": "b"})
                    except httpx.TransportError:
                        return
                    if r.status_code == 200:
                        acked.append(bid)

        threads = [threading.Thread(target=voter, args=(k,)) for k in range(10)]
        for t in threads:
            t.start()
        while len(acked) < 40:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        for t in threads:
            t.join(60)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
    stored = {b["battle_id"] for b in read_battles(db)}
    assert set(acked) <= stored and len(acked) >= 40


def test_ratings_command(tmp_path, monkeypatch, capsys) -> None:
    rng = np.random.default_rng(0)
    humans = simulate({"base": 950.0, "sft": 1050.0, "dpo": 1150.0}, 300, rng)
    for k, b in enumerate(humans):
        b["conversation_a"] = b["conversation_b"] = _conv(f"q{k % 20}", "x")
    judged = [{**b, "rater": "judge big", "winner": "model_a" if k % 3 else b["winner"]} for k, b in enumerate(humans)]
    hf, jf = write_battles(tmp_path / "humans.jsonl", humans), write_battles(tmp_path / "judge.jsonl", judged)
    code, out, err = run_cli(["ratings", str(hf), str(jf), "--json", str(tmp_path / "r.json"), "--export",
                              str(tmp_path / "all.jsonl"), "--bootstrap", "50"], monkeypatch, capsys)
    assert code in (0, None), err
    assert "dpo" in out and "agreement human vs judge big" in out and "95% CI" in out
    rep = json.loads((tmp_path / "r.json").read_text())
    top = rep["contestants"][0]
    assert top["name"] == "dpo" and top["lower"] < top["rating"] < top["upper"] and top["battles"] > 0
    assert set(rep["by_rater"]) == {"human", "judge big"} and rep["agreement"][0]["comparisons"] > 0
    assert len(read_battles(tmp_path / "all.jsonl")) == 600
    assert (tmp_path / "humans.ratings.png").stat().st_size > 1000

    code, out, err = run_cli(["ratings", str(hf), "--anchor", "nobody"], monkeypatch, capsys)
    assert_one_line_error(code, err, "--anchor", "nobody")
    code, out, err = run_cli(["ratings", str(tmp_path / "missing.jsonl")], monkeypatch, capsys)
    assert_one_line_error(code, err, "missing.jsonl")
    code, out, err = run_cli(["ratings", str(hf), "--rater", "judge small"], monkeypatch, capsys)
    assert_one_line_error(code, err, "judge small", "human")
