"""Bradley–Terry ratings from battles: the maximum-likelihood fit on the familiar Elo-like scale, bootstrap
intervals, ranks that separate only what the intervals separate, the pairwise win-rate matrix, and the
agreement between people and a judge where both decided the same comparison.

P(a beats b) = 1 / (1 + 10 ** ((R_b - R_a) / 400)); a tie (or both bad) counts as half a win for each side.
The fit runs on the battles aggregated per pair of contestants, so 10k battles cost no more than a few dozen
pairs; bootstrap resamples re-weight the battles. Pure functions of battle dicts (`nomoat.eval.battles`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nomoat.errors import NomoatError
from nomoat.eval.battles import user_turns
from nomoat.eval.judge_stats import save_figure

SCALE = 400.0  # rating points per factor of 10 in the odds
INIT = 1000.0  # the anchor's rating (by default, the mean contestant's)
RIDGE = 1e-6  # a vanishing prior, so that a contestant that never lost still gets a finite rating
_LN10 = math.log(10.0)


def score_of(winner: str) -> float:
    """Model a's points for a battle's winner."""
    return {"model_a": 1.0, "model_b": 0.0}.get(winner, 0.5)


@dataclass
class _Data:
    names: list[str]
    pair: np.ndarray  # per battle: index into pairs
    score: np.ndarray  # per battle: the first contestant's points in its pair (0, 0.5, 1)
    pairs: np.ndarray  # (P, 2) contestant indices, i < j


def _encode(battles: Sequence[dict[str, Any]]) -> _Data:
    names = sorted({b["model_a"] for b in battles} | {b["model_b"] for b in battles})
    idx = {n: i for i, n in enumerate(names)}
    pair_id: dict[tuple[int, int], int] = {}
    pair, score = np.empty(len(battles), np.int64), np.empty(len(battles))
    for k, b in enumerate(battles):
        i, j, s = idx[b["model_a"]], idx[b["model_b"]], score_of(b["winner"])
        if i > j:
            i, j, s = j, i, 1.0 - s
        pair[k] = pair_id.setdefault((i, j), len(pair_id))
        score[k] = s
    pairs = np.array(list(pair_id), np.int64).reshape(-1, 2)
    return _Data(names, pair, score, pairs)


def fit_bt(n: int, pairs: np.ndarray, wins: np.ndarray, games: np.ndarray, prior: float | None = None,
           iters: int = 100) -> np.ndarray:
    """Strengths (natural log-odds units, mean 0) maximising the Bradley–Terry likelihood of `wins[p]` points
    for `pairs[p, 0]` out of `games[p]` against `pairs[p, 1]`, by Newton's method with a backtracking step.
    `prior` is the weight of a Gaussian prior on the strengths (default: a vanishing one)."""
    theta = np.zeros(n)
    i, j = pairs[:, 0], pairs[:, 1]
    lam = RIDGE * max(float(games.sum()), 1.0) if prior is None else prior

    def nll(t: np.ndarray) -> float:
        d = t[i] - t[j]
        return float(np.sum(games * np.logaddexp(0, d) - wins * d) + 0.5 * lam * t @ t)

    cur = nll(theta)
    for _ in range(iters):
        d = theta[i] - theta[j]
        p = 1 / (1 + np.exp(-d))
        r = games * p - wins  # d nll / d d
        g = np.bincount(i, r, n) - np.bincount(j, r, n) + lam * theta
        w = games * p * (1 - p)
        H = np.diag(np.bincount(i, w, n) + np.bincount(j, w, n) + lam)
        np.add.at(H, (i, j), -w)
        np.add.at(H, (j, i), -w)
        step = np.linalg.solve(H, g)
        t = 1.0
        while t > 1e-6:
            new = theta - t * step
            val = nll(new)
            if val <= cur + 1e-12:
                break
            t /= 2
        theta, done = new, cur - val < 1e-12 * max(1.0, abs(cur))
        cur = val
        if done or np.abs(g).max() < 1e-10:
            break
    return theta - theta.mean()


def _ratings(data: _Data, weights: np.ndarray, anchor: int | None) -> np.ndarray:
    P = len(data.pairs)
    wins = np.bincount(data.pair, weights * data.score, P)
    games = np.bincount(data.pair, weights, P)
    theta = fit_bt(len(data.names), data.pairs, wins, games)
    r = SCALE / _LN10 * theta
    return r - r[anchor] + INIT if anchor is not None else r + INIT


@dataclass
class Contestant:
    name: str
    rating: float
    lower: float
    upper: float
    battles: int
    wins: float  # ties count half
    rank: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "rank": self.rank, "rating": round(self.rating, 2), "lower": round(self.lower, 2),
                "upper": round(self.upper, 2), "battles": self.battles, "win_rate": round(self.wins / self.battles, 4)}


@dataclass
class Ratings:
    """One leaderboard: contestants best first, and the observed pairwise results."""

    rater: str
    contestants: list[Contestant]
    battles: int
    resamples: int
    anchor: str | None
    win_rates: dict[str, dict[str, tuple[float, int]]] = field(default_factory=dict)  # a -> b -> (a's rate, n)

    def to_json(self) -> dict[str, Any]:
        return {"rater": self.rater, "battles": self.battles, "resamples": self.resamples, "anchor": self.anchor,
                "contestants": [c.to_json() for c in self.contestants],
                "win_rates": {a: {b: {"rate": round(r, 4), "battles": n} for b, (r, n) in row.items()}
                              for a, row in self.win_rates.items()}}


def rate(battles: Sequence[dict[str, Any]], resamples: int = 100, seed: int = 0, anchor: str | None = None,
         rater: str = "all", level: float = 0.95) -> Ratings:
    """Bradley–Terry ratings with percentile bootstrap intervals (resampling battles, seeded).

    Raises:
        NomoatError: no battles, or an anchor that is not a contestant.
    """
    if not battles:
        raise NomoatError("no battles to rate (ratings need at least one voted battle)")
    if resamples < 0:
        raise NomoatError("--bootstrap must be at least 0")
    data = _encode(battles)
    if anchor is not None and anchor not in data.names:
        raise NomoatError(f"--anchor {anchor!r} is not a contestant; contestants: {', '.join(data.names)}")
    a_idx = data.names.index(anchor) if anchor is not None else None
    point = _ratings(data, np.ones(len(battles)), a_idx)
    if resamples:
        rng = np.random.default_rng(seed)
        boot = np.stack([_ratings(data, np.bincount(rng.integers(0, len(battles), len(battles)),
                                                    minlength=len(battles)).astype(float), a_idx)
                         for _ in range(resamples)])
        lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2], axis=0)
    else:
        lo, hi = point.copy(), point.copy()
    n = np.zeros(len(data.names), np.int64)
    wins = np.zeros(len(data.names))
    rates: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0.0, 0]))
    for (i, j), s in zip(data.pairs[data.pair], data.score):
        n[i] += 1
        n[j] += 1
        wins[i] += s
        wins[j] += 1 - s
        a, b = data.names[i], data.names[j]
        rates[a][b][0] += s
        rates[a][b][1] += 1
        rates[b][a][0] += 1 - s
        rates[b][a][1] += 1
    people = [Contestant(nm, float(point[k]), float(lo[k]), float(hi[k]), int(n[k]), float(wins[k]))
              for k, nm in enumerate(data.names)]
    people.sort(key=lambda c: -c.rating)
    for c in people:
        # Ranked below only those whose whole interval lies above this one's.
        c.rank = 1 + sum(o.lower > c.upper for o in people)
    win_rates = {a: {b: (v[0] / v[1], int(v[1])) for b, v in row.items()} for a, row in rates.items()}
    return Ratings(rater, people, len(battles), resamples, anchor, win_rates)


# --------------------------------------------------------------------------- people and judges


def _outcome(b: dict[str, Any]) -> str:
    """The winner by name (or "tie"), so that battles with the sides swapped compare."""
    return {"model_a": b["model_a"], "model_b": b["model_b"]}.get(b["winner"], "tie")


def _key(b: dict[str, Any]) -> tuple[Any, ...]:
    conv = b["conversation_a"] or b["conversation_b"]
    turns = user_turns(conv)[:b["turn"]] if conv else (b.get("question_id"),)
    return (frozenset((b["model_a"], b["model_b"])), turns)


@dataclass
class Agreement:
    a: str
    b: str
    comparisons: int  # shared comparisons (same pair of contestants, same user turns)
    with_ties: float  # P(agree) over every (a vote, b vote) on a shared comparison
    without_ties: float  # the same over votes where neither said tie
    pairs_without_ties: int

    def to_json(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "comparisons": self.comparisons,
                "agreement_with_ties": _round(self.with_ties), "agreement_without_ties": _round(self.without_ties),
                "votes_without_ties": self.pairs_without_ties}


def _round(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 4)


def agreement(battles: Sequence[dict[str, Any]], a: str, b: str) -> Agreement:
    """How often raters `a` and `b` decide alike where both judged the same comparison (as MT-bench's human
    agreement study counts it: every pair of one vote from each side, with and without ties)."""
    by: dict[str, dict[tuple[Any, ...], list[str]]] = {a: defaultdict(list), b: defaultdict(list)}
    for x in battles:
        if x["rater"] in by:
            by[x["rater"]][_key(x)].append(_outcome(x))
    shared = set(by[a]) & set(by[b])
    agree = total = agree_nt = total_nt = 0
    for k in shared:
        for u in by[a][k]:
            for v in by[b][k]:
                total += 1
                agree += u == v
                if u != "tie" and v != "tie":
                    total_nt += 1
                    agree_nt += u == v
    return Agreement(a, b, len(shared), agree / total if total else math.nan,
                     agree_nt / total_nt if total_nt else math.nan, total_nt)


@dataclass
class Report:
    overall: Ratings
    by_rater: dict[str, Ratings]
    agreements: list[Agreement]

    def to_json(self) -> dict[str, Any]:
        out = {**self.overall.to_json(), "by_rater": {k: v.to_json() for k, v in self.by_rater.items()},
               "agreement": [g.to_json() for g in self.agreements]}
        return out


def build_report(battles: Sequence[dict[str, Any]], resamples: int = 100, seed: int = 0,
                 anchor: str | None = None) -> Report:
    """Ratings over all battles; per rater (people, each judge) when more than one decided; their agreement."""
    overall = rate(battles, resamples, seed, anchor)
    raters = sorted({b["rater"] for b in battles})
    by_rater: dict[str, Ratings] = {}
    agreements: list[Agreement] = []
    if len(raters) > 1:
        for r in raters:
            sub = [b for b in battles if b["rater"] == r]
            has_anchor = anchor is None or any(anchor in (b["model_a"], b["model_b"]) for b in sub)
            by_rater[r] = rate(sub, resamples, seed, anchor if has_anchor else None, rater=r)
        humans = [r for r in raters if r == "human"]
        agreements = [agreement(battles, h, r) for h in humans for r in raters if r != h]
    return Report(overall, by_rater, agreements)


def plot_ratings(report: Report, png: str | Path) -> Path | None:
    """A PNG of each contestant's rating with its 95% interval (one marker per rater when several decided);
    None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    order = [c.name for c in report.overall.contestants]
    boards = [("all", report.overall)] + list(report.by_rater.items())
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(order) + 1.4), dpi=100)
    for k, (label, board) in enumerate(boards):
        pos = {c.name: c for c in board.contestants}
        ys = [len(order) - 1 - i + 0.18 * (k - (len(boards) - 1) / 2) for i, n in enumerate(order) if n in pos]
        cs = [pos[n] for n in order if n in pos]
        err = [[c.rating - c.lower for c in cs], [c.upper - c.rating for c in cs]]
        ax.errorbar([c.rating for c in cs], ys, xerr=err, fmt="o", capsize=3, label=label)
    ax.set_yticks(range(len(order))[::-1], order, fontsize=8)
    ax.axvline(INIT, color="grey", lw=1, ls="--")
    ax.set_xlabel("Bradley–Terry rating (95% bootstrap interval)")
    ax.set_title(f"{report.overall.battles} battles, {report.overall.resamples} bootstrap resamples", fontsize=9)
    if len(boards) > 1:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="x")
    return save_figure(fig, png)


# --------------------------------------------------------------------------- which pair the arena asks next


def pair_weights(names: Sequence[str], battles: Sequence[dict[str, Any]]) -> np.ndarray:
    """Sampling weights over the pairs (i < j, row-major) of `names`: more where a pair has few battles and
    where the current ratings leave its outcome most uncertain (p near 1/2), so votes go where they teach
    the ratings most."""
    k = len(names)
    idx = {n: i for i, n in enumerate(names)}
    iu = np.triu_indices(k, 1)
    pair_of = {(int(i), int(j)): p for p, (i, j) in enumerate(zip(*iu))}
    games, wins = np.zeros(len(pair_of)), np.zeros(len(pair_of))
    for b in battles:
        if b["model_a"] in idx and b["model_b"] in idx:
            i, j, s = idx[b["model_a"]], idx[b["model_b"]], score_of(b["winner"])
            if i > j:
                i, j, s = j, i, 1.0 - s
            games[pair_of[i, j]] += 1
            wins[pair_of[i, j]] += s
    # A prior worth about one drawn battle per contestant keeps a handful of votes from looking decisive.
    theta = fit_bt(k, np.stack(iu, 1), wins, games, prior=1.0)
    p = 1 / (1 + np.exp(theta[iu[1]] - theta[iu[0]]))
    return 4 * p * (1 - p) / np.sqrt(1 + games)
