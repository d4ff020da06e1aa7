"""Statistics over judge verdicts: the both-orders tie rule, win / tie / loss, the adjusted win rate with a
bootstrap interval over questions, position consistency and first-position preference, a length-controlled
win rate, run-to-run spread over repeats, single-grading means; the report table's rows and its plot.

Pure functions of verdict records (see `nomoat.eval.judge`); nothing here calls a model.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nomoat.errors import NomoatError
from nomoat.eval.questions import read_records

WINNERS = ("model_1", "model_2", "tie")
TIE_KINDS = ("both_tie", "one_tie", "inconsistent", "unparseable")
LC_WARN = 0.1  # warn when the length-controlled rate is this far from the raw per-order rate
SCORE = {"model_2": 1.0, "tie": 0.5, "model_1": 0.0}  # model 2's points for a verdict


def combine_orders(w12: str | None, w21: str | None) -> tuple[str, str | None]:
    """The comparison's result from its two orders' winners: (winner, kind of tie or None).

    A win needs both orders to name the same model; anything else is a tie, told apart by kind: both
    orders said tie, one said tie and one named a model, the orders named different models, or either
    order's verdict was unparseable (None).
    """
    if w12 is None or w21 is None:
        return "tie", "unparseable"
    if w12 == w21:
        return (w12, "both_tie") if w12 == "tie" else (w12, None)
    if "tie" in (w12, w21):
        return "tie", "one_tie"
    return "tie", "inconsistent"


def bootstrap_ci(groups: Sequence[Sequence[float]], resamples: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the pooled mean, resampling whole groups (questions) with replacement.

    Each group holds the values of one question (its turns and repeats); a resample draws as many groups
    as there are, and its statistic is the mean over all values drawn. Seeded: the same input gives the
    same interval.
    """
    groups = [g for g in groups if len(g)]
    if not groups:
        return math.nan, math.nan
    sums = np.array([float(np.sum(g)) for g in groups])
    counts = np.array([len(g) for g in groups], dtype=float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(groups), size=(resamples, len(groups)))
    stats = sums[idx].sum(1) / counts[idx].sum(1)
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def logistic_fit(x: np.ndarray, y: np.ndarray, ridge: float = 1e-9, iters: int = 100) -> tuple[float, float]:
    """(intercept, slope) of P(y=1) = sigmoid(b0 + b1 x) by Newton's method; y may be fractional (a tie is
    0.5: half a win, the cross-entropy with a soft target)."""
    X = np.stack([np.ones_like(x), x], 1)
    b = np.zeros(2)

    def loss(b: np.ndarray) -> float:
        z = X @ b
        return float(np.sum(np.logaddexp(0, z) - y * z) + 0.5 * ridge * b @ b)

    cur = loss(b)
    for _ in range(iters):
        p = 1 / (1 + np.exp(-(X @ b)))
        g = X.T @ (p - y) + ridge * b
        H = X.T @ (X * (p * (1 - p))[:, None]) + ridge * np.eye(2)
        step = np.linalg.solve(H, g)
        t = 1.0
        while True:  # halve the step until the loss does not go up (Newton can overshoot)
            nb = np.clip(b - t * step, -50, 50)
            new = loss(nb)
            if new <= cur or t < 1e-6:
                break
            t /= 2
        if new > cur:
            break
        converged = cur - new < 1e-12
        b, cur = nb, new
        if converged:
            break
    return float(b[0]), float(b[1])


def length_controlled_rate(y: Sequence[float], diff: Sequence[float]) -> float:
    """Model 2's per-order win rate at equal answer lengths: the logistic regression of the per-order
    outcome `y` (1 win, 0.5 tie, 0 loss) on the standardised length difference (model 2 minus model 1,
    divided by its standard deviation, not centred), read at zero difference."""
    y_arr, d = np.asarray(y, float), np.asarray(diff, float)
    if not len(y_arr):
        return math.nan
    mean, sd = float(y_arr.mean()), float(d.std())
    if mean in (0.0, 1.0) or sd == 0:
        return mean
    b0, _ = logistic_fit(d / sd, y_arr)
    return 1 / (1 + math.exp(-b0))


# --------------------------------------------------------------------------- pairwise


@dataclass
class Tally:
    """Win / tie / loss of model 2 over a set of comparisons, with the adjusted rate's interval."""

    n: int = 0
    wins: int = 0
    ties: int = 0
    losses: int = 0
    adjusted: float = math.nan
    ci: tuple[float, float] = (math.nan, math.nan)


def _tally(records: Sequence[dict[str, Any]], resamples: int, seed: int) -> Tally:
    by_q: dict[str, list[float]] = defaultdict(list)
    for r in records:
        by_q[str(r["question_id"])].append(SCORE[r["winner"]])
    wins = sum(r["winner"] == "model_2" for r in records)
    losses = sum(r["winner"] == "model_1" for r in records)
    n = len(records)
    adjusted = (wins + (n - wins - losses) / 2) / n if n else math.nan
    return Tally(n, wins, n - wins - losses, losses, adjusted, bootstrap_ci(list(by_q.values()), resamples, seed))


@dataclass
class PairwiseSummary:
    """Model 2 against model 1 under one judge."""

    model_1: str
    model_2: str
    judge: str
    questions: int
    overall: Tally
    tie_kinds: dict[str, int]
    per_order: float  # mean per-order outcome (parsed orders), the raw rate the length-controlled one sits beside
    length_controlled: float
    consistency: float  # share of comparisons (both orders parsed) whose two orders agree
    first_position: float  # share of decisive per-order verdicts that pick the answer shown first
    categories: dict[str, Tally]
    soft: tuple[float, float, float] | None = None  # (rate, low, high) from the verdict probabilities
    repeats: int = 1
    repeat_rates: list[float] = field(default_factory=list)
    repeat_agreement: float | None = None  # share of comparisons with the same result in every repeat
    warnings: list[str] = field(default_factory=list)


def _winner(o: dict[str, Any]) -> str | None:
    return o.get("winner") if o.get("winner") in WINNERS else None


def combined(r: dict[str, Any]) -> tuple[str, str | None]:
    """A record's result, recomputed from its orders (the stored `winner` is a convenience)."""
    return combine_orders(_winner(r["orders"][0]), _winner(r["orders"][1]))


def summarize_pairwise(records: Sequence[dict[str, Any]], resamples: int = 1000,
                       seed: int = 0) -> list[PairwiseSummary]:
    """One summary per (judge, model 1, model 2) in the records."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        winner, kind = combined(r)
        groups[(r["judge"], r["model_1"], r["model_2"])].append({**r, "winner": winner, "tie_kind": kind})
    return [_pair_summary(j, m1, m2, rs, resamples, seed) for (j, m1, m2), rs in groups.items()]


def _pair_summary(judge: str, m1: str, m2: str, rs: list[dict[str, Any]], resamples: int,
                  seed: int) -> PairwiseSummary:
    overall = _tally(rs, resamples, seed)
    kinds = {k: sum(r["tie_kind"] == k for r in rs) for k in TIE_KINDS}
    y, diff, letters, agree = [], [], [], []
    for r in rs:
        ws = [_winner(o) for o in r["orders"]]
        if None not in ws:
            agree.append(ws[0] == ws[1])
        for o, w in zip(r["orders"], ws):
            if w is not None:
                y.append(SCORE[w])
                diff.append(float(r["len_2"]) - float(r["len_1"]))
            if o.get("verdict") in ("A", "B"):
                letters.append(o["verdict"] == "A")
    per_order = float(np.mean(y)) if y else math.nan
    lc = length_controlled_rate(y, diff)
    cats: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rs:
        cats[str(r.get("category", "general"))].append(r)
    s = PairwiseSummary(m1, m2, judge, len({str(r["question_id"]) for r in rs}), overall, kinds, per_order, lc,
                        float(np.mean(agree)) if agree else math.nan,
                        float(np.mean(letters)) if letters else math.nan,
                        {c: _tally(v, resamples, seed) for c, v in sorted(cats.items())})
    soft = _soft(rs, resamples, seed)
    if soft is not None:
        s.soft = soft
    _repeats(s, rs)
    _warn(s)
    return s


def _soft(rs: list[dict[str, Any]], resamples: int, seed: int) -> tuple[float, float, float] | None:
    """Model 2's expected points from the verdict probabilities, averaged over both orders."""
    by_q: dict[str, list[float]] = defaultdict(list)
    for r in rs:
        pts = []
        for o in r["orders"]:
            p = o.get("soft")
            if not isinstance(p, dict):
                break
            shown_first_is_2 = o.get("order") == "2-1"
            p2 = p.get("A", 0.0) if shown_first_is_2 else p.get("B", 0.0)
            pts.append(p2 + p.get("C", 0.0) / 2)
        if len(pts) == 2:
            by_q[str(r["question_id"])].append(sum(pts) / 2)
    if not by_q:
        return None
    values = [v for g in by_q.values() for v in g]
    lo, hi = bootstrap_ci(list(by_q.values()), resamples, seed)
    return float(np.mean(values)), lo, hi


def _repeats(s: PairwiseSummary, rs: list[dict[str, Any]]) -> None:
    n_rep = 1 + max(int(r.get("repeat", 0)) for r in rs)
    s.repeats = n_rep
    if n_rep < 2:
        return
    by_rep: dict[int, list[float]] = defaultdict(list)
    by_item: dict[tuple[str, int], dict[int, str]] = defaultdict(dict)
    for r in rs:
        by_rep[int(r.get("repeat", 0))].append(SCORE[r["winner"]])
        by_item[(str(r["question_id"]), int(r["turn"]))][int(r.get("repeat", 0))] = r["winner"]
    s.repeat_rates = [float(np.mean(by_rep[i])) for i in sorted(by_rep)]
    full = [v for v in by_item.values() if len(v) == n_rep]
    s.repeat_agreement = float(np.mean([len(set(v.values())) == 1 for v in full])) if full else None


def _warn(s: PairwiseSummary) -> None:
    w = s.warnings
    if not math.isnan(s.length_controlled) and abs(s.length_controlled - s.per_order) > LC_WARN:
        w.append(f"{s.model_2} vs {s.model_1}: the length-controlled win rate ({s.length_controlled:.2f}) differs from "
                 f"the raw per-order rate ({s.per_order:.2f}) by more than {LC_WARN}: verdicts follow answer length")
    if not math.isnan(s.consistency) and s.consistency < 0.6:
        w.append(f"{s.model_2} vs {s.model_1}: position consistency is {s.consistency:.0%}: the judge's verdict often "
                 "flips when the answers swap places; its verdicts are weak evidence")
    if not math.isnan(s.first_position) and abs(s.first_position - 0.5) > 0.15:
        w.append(f"{s.model_2} vs {s.model_1}: the judge picks the answer shown first in {s.first_position:.0%} of its "
                 "decisive verdicts (50% is unbiased)")
    bad = s.tie_kinds["unparseable"]
    if bad > 0.1 * s.overall.n:
        w.append(f"{s.model_2} vs {s.model_1}: {bad} of {s.overall.n} comparisons have an unparseable verdict in at "
                 "least one order (counted as ties)")


# --------------------------------------------------------------------------- single


@dataclass
class SingleSummary:
    """One model's scores under one judge."""

    model: str
    judge: str
    n: int
    scored: int
    mean: float
    ci: tuple[float, float]
    categories: dict[str, tuple[int, float, tuple[float, float]]]  # category -> (scored, mean, interval)
    repeats: int = 1
    repeat_means: list[float] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _mean_ci(rs: Iterable[dict[str, Any]], resamples: int, seed: int) -> tuple[int, float, tuple[float, float]]:
    by_q: dict[str, list[float]] = defaultdict(list)
    for r in rs:
        if r.get("score") is not None:
            by_q[str(r["question_id"])].append(float(r["score"]))
    values = [v for g in by_q.values() for v in g]
    mean = float(np.mean(values)) if values else math.nan
    return len(values), mean, bootstrap_ci(list(by_q.values()), resamples, seed)


def summarize_single(records: Sequence[dict[str, Any]], resamples: int = 1000, seed: int = 0) -> list[SingleSummary]:
    """One summary per (judge, model): the mean score with its bootstrap interval over questions."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[(r["judge"], r["model"])].append(r)
    out = []
    for (judge, model), rs in groups.items():
        scored, mean, ci = _mean_ci(rs, resamples, seed)
        cats: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in rs:
            cats[str(r.get("category", "general"))].append(r)
        s = SingleSummary(model, judge, len(rs), scored, mean, ci,
                          {c: _mean_ci(v, resamples, seed) for c, v in sorted(cats.items())})
        s.repeats = 1 + max(int(r.get("repeat", 0)) for r in rs)
        if s.repeats > 1:
            s.repeat_means = [_mean_ci([r for r in rs if int(r.get("repeat", 0)) == i], resamples, seed)[1]
                              for i in range(s.repeats)]
        if s.n - s.scored > 0.1 * s.n:
            s.warnings.append(f"{model}: {s.n - s.scored} of {s.n} grades are unparseable (left out of the mean)")
        out.append(s)
    return out


# --------------------------------------------------------------------------- verdict files and the report


def _check_record(r: dict[str, Any], src: str) -> None:
    mode = r.get("mode")
    if mode not in ("pairwise", "single"):
        raise NomoatError(f'{src}: "mode" must be "pairwise" or "single", got {mode!r}')
    need = ("question_id", "turn", "judge") + (("model_1", "model_2", "orders", "len_1", "len_2")
                                               if mode == "pairwise" else ("model",))
    for k in need:
        if r.get(k) is None:
            raise NomoatError(f'{src}: a {mode} verdict record needs "{k}"')
    if not isinstance(r["turn"], int) or not isinstance(r.get("repeat", 0), int):
        raise NomoatError(f'{src}: "turn" and "repeat" must be integers')
    if mode == "pairwise":
        orders = r["orders"]
        if not isinstance(orders, list) or len(orders) != 2 or not all(isinstance(o, dict) for o in orders):
            raise NomoatError(f'{src}: "orders" must hold the two orders\' verdicts')
        for o in orders:
            if o.get("winner") not in (*WINNERS, None):
                raise NomoatError(f'{src}: an order\'s "winner" must be model_1, model_2, tie or null')
        if not all(isinstance(r[k], (int, float)) for k in ("len_1", "len_2")):
            raise NomoatError(f'{src}: "len_1" and "len_2" must be numbers')
    elif r.get("score") is not None and not isinstance(r["score"], (int, float)):
        raise NomoatError(f'{src}: "score" must be a number or null')


def load_verdicts(path: str | Path) -> list[dict[str, Any]]:
    """Verdict records from a file `nomoat judge` wrote; `file:line` for anything malformed."""
    path = Path(path)
    out = []
    for line, rec in read_records(path, "verdicts"):
        _check_record(rec, f"{path}:{line}")
        out.append(rec)
    return out


@dataclass
class Report:
    pairwise: list[PairwiseSummary]
    single: list[SingleSummary]
    png: Path | None = None

    @property
    def warnings(self) -> list[str]:
        return [w for s in (*self.pairwise, *self.single) for w in s.warnings]


def build_report(records: Sequence[dict[str, Any]], resamples: int = 1000, seed: int = 0) -> Report:
    return Report(summarize_pairwise([r for r in records if r["mode"] == "pairwise"], resamples, seed),
                  summarize_single([r for r in records if r["mode"] == "single"], resamples, seed))


def plot_report(report: Report, png: str | Path) -> Path | None:
    """A PNG of the adjusted win rates (pairwise) and mean scores (single), overall and per category, with
    their 95% intervals; None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    panels = [("pairwise", s) for s in report.pairwise] + [("single", s) for s in report.single]
    if not panels:
        return None
    heights = [1 + 0.3 * (1 + len(s.categories)) for _, s in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, sum(heights) + 0.5), dpi=100, squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, (kind, s) in zip(axes[:, 0], panels):
        if kind == "pairwise":
            rows = [("overall", s.overall.adjusted, s.overall.ci)] + [
                (c, t.adjusted, t.ci) for c, t in s.categories.items()]
            ax.axvline(0.5, color="grey", lw=1, ls="--")
            ax.set_xlim(0, 1)
            ax.set_title(f"{s.model_2} vs {s.model_1}: adjusted win rate (judge {s.judge[:40]})", fontsize=9)
        else:
            rows = [("overall", s.mean, s.ci)] + [(c, m, ci) for c, (_, m, ci) in s.categories.items()]
            ax.set_xlim(1, 10)
            ax.set_title(f"{s.model}: mean score (judge {s.judge[:40]})", fontsize=9)
        ys = np.arange(len(rows))[::-1]
        vals = np.array([v for _, v, _ in rows], float)
        lo = np.array([v - ci[0] for _, v, ci in rows], float)
        hi = np.array([ci[1] - v for _, v, ci in rows], float)
        ax.errorbar(vals, ys, xerr=np.nan_to_num(np.stack([lo, hi])), fmt="o", capsize=3)
        ax.set_yticks(ys, [r[0] for r in rows], fontsize=8)
        ax.grid(alpha=0.3, axis="x")
    return save_figure(fig, png)


def save_figure(fig: Any, png: str | Path) -> Path:
    """Write a matplotlib figure as a PNG atomically (temporary file, then rename) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    tmp = png.with_name(f".{png.stem}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(png)
    return png
