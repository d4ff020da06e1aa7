"""Judge statistics as pure functions, checked against values computed by hand: the both-orders tie rule,
win / tie / loss, the adjusted win rate, position consistency, first-position preference, the bootstrap
interval, the length-controlled win rate, soft verdicts, repeats; and strict verdict parsing."""

from __future__ import annotations

import math

import pytest

from nomoat.errors import NomoatError
from nomoat.eval.judge import parse_pairwise, parse_single, soft_pairwise
from nomoat.eval.judge_stats import (
    bootstrap_ci,
    build_report,
    combine_orders,
    length_controlled_rate,
    load_verdicts,
    summarize_pairwise,
    summarize_single,
)
from nomoat.eval.questions import write_jsonl


def rec(qid: int, v12: str | None, v21: str | None, len_1: int = 100, len_2: int = 100, category: str = "math",
        repeat: int = 0, turn: int = 1, soft: tuple[dict | None, dict | None] = (None, None)) -> dict:
    """A pairwise record from the two orders' verdict letters (order 1-2 shows model 1 as A)."""
    w12 = {"A": "model_1", "B": "model_2", "C": "tie"}.get(v12 or "")
    w21 = {"A": "model_2", "B": "model_1", "C": "tie"}.get(v21 or "")
    orders = [{"order": "1-2", "verdict": v12, "winner": w12, "text": f"[[{v12}]]", "soft": soft[0]},
              {"order": "2-1", "verdict": v21, "winner": w21, "text": f"[[{v21}]]", "soft": soft[1]}]
    return {"mode": "pairwise", "question_id": qid, "category": category, "turn": turn, "repeat": repeat,
            "model_1": "base", "model_2": "tuned", "judge": "j", "len_1": len_1, "len_2": len_2, "orders": orders}


# The fixed verdict table: one comparison per question.
TABLE = [
    rec(1, "B", "A", 100, 300),  # both orders pick model 2: a win
    rec(2, "A", "B", 200, 100),  # both orders pick model 1: a loss
    rec(3, "A", "A", 100, 100),  # each order picks the first answer: inconsistent -> tie
    rec(4, "C", "A", 100, 200, category="writing"),  # one order tie, one a win -> tie
    rec(5, None, "A", 150, 150, category="writing"),  # unparseable in one order -> tie
    rec(6, "C", "C", 100, 100, category="writing"),  # both orders tie
]


def test_tie_rule() -> None:
    assert combine_orders("model_2", "model_2") == ("model_2", None)
    assert combine_orders("model_1", "model_1") == ("model_1", None)
    assert combine_orders("tie", "tie") == ("tie", "both_tie")
    assert combine_orders("tie", "model_2") == ("tie", "one_tie")
    assert combine_orders("model_1", "tie") == ("tie", "one_tie")
    assert combine_orders("model_1", "model_2") == ("tie", "inconsistent")
    assert combine_orders(None, "model_2") == ("tie", "unparseable")
    assert combine_orders("tie", None) == ("tie", "unparseable")


def test_fixed_table_by_hand() -> None:
    (s,) = summarize_pairwise(TABLE)
    assert (s.model_1, s.model_2, s.questions) == ("base", "tuned", 6)
    o = s.overall
    assert (o.n, o.wins, o.ties, o.losses) == (6, 1, 4, 1)
    assert s.tie_kinds == {"both_tie": 1, "one_tie": 1, "inconsistent": 1, "unparseable": 1}
    assert o.adjusted == pytest.approx((1 + 4 / 2) / 6)  # win + tie/2 = 0.5
    # Both orders parsed in questions 1, 2, 3, 4, 6; they agree in 1, 2, 6.
    assert s.consistency == pytest.approx(3 / 5)
    # Decisive per-order letters: B A | A B | A A | . A | . A | . . -> 6 of 8 pick A, the answer shown first.
    assert s.first_position == pytest.approx(6 / 8)
    # Per-order points of model 2 over the 11 parsed orders: 1 1 | 0 0 | 0 1 | .5 1 | 1 | .5 .5
    assert s.per_order == pytest.approx(6.5 / 11)
    # The interval resamples whole questions: the same as the bootstrap of the per-question points.
    assert o.ci == bootstrap_ci([[1.0], [0.0], [0.5], [0.5], [0.5], [0.5]])
    assert o.ci[0] < 0.5 < o.ci[1]
    math_t, writing_t = s.categories["math"], s.categories["writing"]
    assert (math_t.n, math_t.wins, math_t.ties, math_t.losses, math_t.adjusted) == (3, 1, 1, 1, 0.5)
    assert (writing_t.n, writing_t.wins, writing_t.ties, writing_t.losses, writing_t.adjusted) == (3, 0, 3, 0, 0.5)
    # Consistency 60% and first-position 75% are the marks of a weak judge: both are flagged.
    assert any("first" in w and "75%" in w for w in s.warnings)
    assert not any("position consistency" in w for w in s.warnings)  # 60% is at the threshold, not below
    assert any("unparseable" in w for w in s.warnings)


def test_stored_winner_is_recomputed_from_the_orders() -> None:
    r = rec(1, "A", "A") | {"winner": "model_2"}  # a hand-edited file cannot turn an inconsistency into a win
    (s,) = summarize_pairwise([r])
    assert (s.overall.wins, s.overall.ties) == (0, 1)


def test_bootstrap_by_hand() -> None:
    assert bootstrap_ci([[0.5], [0.5], [0.5]]) == (0.5, 0.5)
    # Two questions, a win and a loss: resample means 0, 0.5, 1 with odds 1/4, 1/2, 1/4 -> the 95% interval
    # spans both extremes.
    assert bootstrap_ci([[1.0], [0.0]]) == (0.0, 1.0)
    # Groups are resampled whole: [1, 1, 1] and [0] give means 1, 3/4 (one of each) or 0.
    lo, hi = bootstrap_ci([[1.0, 1.0, 1.0], [0.0]], resamples=2000)
    assert (lo, hi) == (0.0, 1.0)
    # Three questions 1, 0.5, 0: P(mean = 0) = P(mean = 1) = 1/27 > 2.5%, so the interval is [0, 1] as well;
    # with 20 copies of each the interval must be much narrower and centred on 0.5.
    lo, hi = bootstrap_ci([[1.0], [0.5], [0.0]] * 20)
    assert 0.35 < lo < 0.5 < hi < 0.65 and hi - 0.5 == pytest.approx(0.5 - lo, abs=0.03)
    assert bootstrap_ci([[1.0], [0.5], [0.0]] * 20, seed=1) != (lo, hi)  # seeded, and the seed matters
    assert bootstrap_ci([[1.0], [0.5], [0.0]] * 20) == (lo, hi)
    assert all(math.isnan(x) for x in bootstrap_ci([]))


def test_length_controlled_rate_by_hand() -> None:
    # Two length-difference groups: the logistic model fits each group's mean exactly, so at zero difference
    # it reads the mean of the group with equal lengths: 0.25, while the raw rate is 0.5.
    y = [1, 0, 0, 0] + [1, 1, 1, 0]
    d = [0, 0, 0, 0] + [300, 300, 300, 300]
    assert length_controlled_rate(y, d) == pytest.approx(0.25, abs=1e-6)
    # Symmetric differences +-a: b0 is the mean of the two groups' logits. Means 0.9 (longer) and 0.5
    # (shorter): sigmoid((logit 0.9 + logit 0.5) / 2) = sigmoid(ln(9) / 2) = 3 / 4, raw 0.7.
    y = [1] * 9 + [0] + [1] * 5 + [0] * 5
    d = [50] * 10 + [-50] * 10
    assert length_controlled_rate(y, d) == pytest.approx(0.75, abs=1e-6)
    # Ties count half (a fractional target); equal lengths everywhere: the raw mean.
    assert length_controlled_rate([1, 0.5, 0], [10, 10, 10]) == pytest.approx(0.5)
    assert length_controlled_rate([1, 1, 1], [5, -5, 0]) == 1.0


def test_length_warning_in_the_summary() -> None:
    # Model 2 wins 3 of 4 comparisons where its answer is longer and 1 of 4 at equal length: raw per-order
    # rate 0.5, at equal length 0.25.
    rows = [rec(q, "B", "A", 100, 400) for q in range(1, 4)] + [rec(4, "A", "B", 100, 400)] + \
           [rec(q, "A", "B") for q in range(5, 8)] + [rec(8, "B", "A")]
    (s,) = summarize_pairwise(rows)
    assert s.per_order == pytest.approx(0.5)
    assert s.length_controlled == pytest.approx(0.25, abs=1e-6)
    assert any("length-controlled" in w for w in s.warnings)


def test_soft_and_repeats() -> None:
    # Order 1-2: model 2 is B: 0.7 + 0.1 / 2 = 0.75; order 2-1: model 2 is A: 0.6 + 0.1 / 2 = 0.65 -> 0.7.
    soft = ({"A": 0.2, "B": 0.7, "C": 0.1}, {"A": 0.6, "B": 0.3, "C": 0.1})
    rows = [rec(1, "B", "A", soft=soft, repeat=0), rec(1, "B", "B", soft=soft, repeat=1),
            rec(2, "A", "B", repeat=0), rec(2, "A", "B", repeat=1)]
    (s,) = summarize_pairwise(rows)
    assert s.soft is not None and s.soft[0] == pytest.approx(0.7)
    assert s.repeats == 2
    assert s.repeat_rates == [pytest.approx(0.5), pytest.approx(0.25)]  # (1 + 0) / 2, (0.5 + 0) / 2
    assert s.repeat_agreement == pytest.approx(0.5)  # question 2 the same both times, question 1 not


def test_single_summary() -> None:
    rows = [{"mode": "single", "question_id": q, "category": c, "turn": 1, "repeat": 0, "model": "m", "judge": "j",
             "score": sc} for q, c, sc in ((1, "math", 8), (2, "math", 6), (3, "writing", None), (4, "writing", 4))]
    (s,) = summarize_single(rows)
    assert (s.n, s.scored, s.mean) == (4, 3, pytest.approx(6.0))
    assert s.categories["math"][:2] == (2, 7.0) and s.categories["writing"][:2] == (1, 4.0)
    assert s.ci[0] <= 6.0 <= s.ci[1]
    assert any("unparseable" in w for w in s.warnings)


def test_strict_parsing() -> None:
    assert parse_pairwise("A is clearer.\n[[A]]") == "A"
    assert parse_pairwise("[[C]] ... so [[C]]") == "C"
    for bad in ("[[A]] or [[B]]", "A", "[[ A ]]", "[A]", "[[D]]", "", "verdict: B"):
        assert parse_pairwise(bad) is None, bad
    assert parse_single("Good.\n[[7]]") == 7.0
    assert parse_single("[[7.5]]") == 7.5
    for bad in ("[[11]]", "[[0]]", "[[7]] [[8]]", "Rating: 7", "[[seven]]"):
        assert parse_single(bad) is None, bad


def _tok(token: str, lp: float, top: list[tuple[str, float]] = ()) -> dict:
    return {"token": token, "logprob": lp, "top_logprobs": [{"token": t, "logprob": v} for t, v in top]}


def test_soft_verdict_from_logprobs() -> None:
    ln = math.log
    content = [_tok("The", -1), _tok(" answer", -1), _tok(" is", -1), _tok(" [[", -0.1),
               _tok("B", ln(0.6), [("B", ln(0.6)), ("A", ln(0.3)), ("C", ln(0.05)), ("D", ln(0.05))]), _tok("]]", 0)]
    p = soft_pairwise("The answer is [[B]]", content)
    assert p == pytest.approx({"A": 0.3 / 0.95, "B": 0.6 / 0.95, "C": 0.05 / 0.95})
    # A token that holds "[[" and the letter together: alternatives with the same prefix count.
    content = [_tok("[[A", ln(0.5), [("[[A", ln(0.5)), ("[[B", ln(0.25)), ("[[", ln(0.2)), ("[[C", ln(0.05))]),
               _tok("]]", 0)]
    assert soft_pairwise("[[A]]", content) == pytest.approx({"A": 0.5 / 0.8, "B": 0.25 / 0.8, "C": 0.05 / 0.8})
    assert soft_pairwise("no verdict", content) is None
    assert soft_pairwise("[[A]]", None) is None


def test_report_from_a_file(tmp_path) -> None:
    path = write_jsonl(tmp_path / "v.jsonl", TABLE)
    rep = build_report(load_verdicts(path))
    assert len(rep.pairwise) == 1 and rep.pairwise[0].overall.adjusted == pytest.approx(0.5)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(path.read_text().splitlines()[0] + "\n" + '{"mode": "pairwise", "question_id": 1}\n')
    with pytest.raises(NomoatError, match=r"bad.jsonl:2: a pairwise verdict record needs"):
        load_verdicts(bad)
