"""Benchmark the arena: votes per second a real `nomoat serve --arena` sustains on the default model, alone and
while battles stream, and the time to rate 10k battles of 10 contestants with 100 bootstrap resamples (beside
one scikit-learn logistic-regression fit, the reference method).

    python bench/bench_arena.py [--threads 2] [--voters 20] [--seconds 10] [--streams 2]

Votes go through the HTTP API from `--voters` concurrent clients onto battles created beforehand; every vote is
fsynced to SQLite (WAL) before it is acknowledged. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import math
import os
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import Server, make_adapters  # noqa: E402

from nomoat.eval.ratings import rate  # noqa: E402


def simulated_battles(n: int, k: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    strength = rng.normal(1000, 150, k)
    out = []
    for _ in range(n):
        i, j = rng.choice(k, 2, replace=False)
        p = 1 / (1 + 10 ** ((strength[j] - strength[i]) / 400))
        u = rng.random()
        w = "tie" if abs(u - p) < 0.05 else "model_a" if u < p else "model_b"
        out.append({"model_a": f"m{i}", "model_b": f"m{j}", "winner": w})
    return out


def bench_ratings() -> None:
    battles = simulated_battles(10_000, 10)
    t0 = time.perf_counter()
    board = rate(battles, resamples=100)
    ours = time.perf_counter() - t0
    line = f"ratings, 10k battles, 10 contestants, 100 bootstrap resamples: {ours:.3f} s"
    try:
        from sklearn.linear_model import LogisticRegression

        names = sorted({b["model_a"] for b in battles} | {b["model_b"] for b in battles})
        idx = {n: i for i, n in enumerate(names)}
        X = np.zeros((2 * len(battles), len(names)))
        Y = np.zeros(2 * len(battles))
        for r, b in enumerate(battles):
            for s in (2 * r, 2 * r + 1):
                X[s, idx[b["model_a"]]], X[s, idx[b["model_b"]]] = math.log(10), -math.log(10)
            Y[2 * r], Y[2 * r + 1] = {"model_a": (1, 1), "model_b": (0, 0)}.get(b["winner"], (1, 0))
        t0 = time.perf_counter()
        fit = LogisticRegression(fit_intercept=False, C=np.inf, tol=1e-6, max_iter=1000).fit(X, Y)
        one = time.perf_counter() - t0
        ref = {n: 400 * fit.coef_[0][i] + 1000 for n, i in idx.items()}
        diff = max(abs(c.rating - ref[c.name]) for c in board.contestants)
        line += (f"; one scikit-learn fit {one:.3f} s (x101 for point + bootstrap: {101 * one:.1f} s, "
                 f"{101 * one / ours:.0f}x ours); largest rating difference {diff:.3f}")
    except ImportError:
        pass
    print(line)


def vote_rate(url: str, bids: list[str], voters: int, seconds: float) -> tuple[int, float]:
    accepted = 0
    lock = threading.Lock()
    stop = time.monotonic() + seconds
    it = iter(bids)

    def voter(k: int) -> None:
        nonlocal accepted
        with httpx.Client(base_url=url, timeout=60) as c:
            while time.monotonic() < stop:
                with lock:
                    bid = next(it, None)
                if bid is None:
                    return
                r = c.post(f"/arena/api/battles/{bid}/vote", json={"winner": "tie"},
                           headers={"X-Arena-Voter": f"v{k}"})
                if r.status_code == 200:
                    with lock:
                        accepted += 1

    t0 = time.perf_counter()
    ts = [threading.Thread(target=voter, args=(k,)) for k in range(voters)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return accepted, time.perf_counter() - t0


def streaming_battles(url: str, stop: threading.Event, counts: list[int]) -> None:
    with httpx.Client(base_url=url, timeout=600) as c:
        while not stop.is_set():
            with c.stream("POST", "/arena/api/battles", json={"prompt": "Tell me a story about a boat.",
                                                              "max_tokens": 64}) as r:
                for line in r.iter_lines():
                    if '"delta"' in line:
                        counts[0] += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--voters", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--streams", type=int, default=2, help="battles streaming at once during the second run")
    ap.add_argument("--battles", type=int, default=800, help="battles created beforehand for each run's votes")
    a = ap.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores\n")
    bench_ratings()
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "arena.sqlite"
        adapters = make_adapters(Path(tmp), 1)
        srv = Server(adapters, a.threads, ("--arena", str(db), "--arena-votes-per-minute", "1000000"))
        try:
            with httpx.Client(base_url=srv.url, timeout=120) as c:
                bids = [c.post("/arena/api/battles", json={"prompt": "Hi", "stream": False, "max_tokens": 1}).json()[
                    "battle_id"] for _ in range(2 * a.battles)]
            n, sec = vote_rate(srv.url, bids[:a.battles], a.voters, a.seconds)
            print(f"votes, {a.voters} voters, nothing else running: {n} in {sec:.1f} s = {n / sec:.0f} votes/s")
            stop, counts = threading.Event(), [0]
            streams = [threading.Thread(target=streaming_battles, args=(srv.url, stop, counts))
                       for _ in range(a.streams)]
            for t in streams:
                t.start()
            time.sleep(2)
            c0, t0 = counts[0], time.perf_counter()
            n, sec = vote_rate(srv.url, bids[a.battles:], a.voters, a.seconds)
            pieces = (counts[0] - c0) / (time.perf_counter() - t0)
            stop.set()
            for t in streams:
                t.join()
            print(f"votes, {a.voters} voters, {a.streams} battles streaming ({pieces:.1f} text pieces/s across "
                  f"both sides): {n} in {sec:.1f} s = {n / sec:.0f} votes/s")
        finally:
            srv.close()
        with sqlite3.connect(db) as con:
            print(f"database: {con.execute('SELECT COUNT(winner) FROM battles').fetchone()[0]} votes stored")


if __name__ == "__main__":
    main()
