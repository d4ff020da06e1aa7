"""The preference loop on the default model: SFT, blind battles voted by a rule, DPO on the votes, ratings.

Run (about 5 minutes on 2 cores):  python examples/preference_loop.py [--out preference-loop] [--threads 2]

The preference, a format the base model mostly lacks and a program can check: asked to convert a date to
ISO 8601 "with the date only", the answer is a date in YYYY-MM-DD form and nothing else (the base mostly
answers with a sentence around it).

1. SFT: `nomoat finetune` for a few steps on date examples, deliberately short, so the adapter (`sft`)
   answers in that form more often than the base but far from always.
2. Battles: `nomoat serve --adapter sft=... --arena arena.sqlite`; each battle asks both sides one date
   prompt through the arena's HTTP API and a stated rule stands in for the human voter: the side whose answer
   is in that form wins; both is a tie, neither is "both bad".
3. `nomoat dpo --data arena.sqlite --on sft --combine`: the decided votes become chosen / rejected pairs;
   the policy is base + sft + a new LoRA, the reference base + sft; the result (`aligned`) holds both.
4. Held-out battles among the base, `sft` and `aligned` on prompts no step above saw, voted by the same rule,
   then `nomoat ratings`: each contestant's share of answers in that form on those prompts, and Bradley-Terry
   ratings with 95% intervals before (round 1) and after (both rounds).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from nomoat.skills import date_examples

RULE = "the side whose answer is a YYYY-MM-DD date and nothing else wins; both: tie; neither: both bad"


def run(cmd: list[str], log: Path | None = None) -> None:
    """A nomoat command, echoed; its output goes to the terminal (or `log`)."""
    print("$ " + " ".join(cmd), flush=True)
    with open(log, "w") if log else open(os.devnull, "w") as sink:
        proc = subprocess.run(cmd, stdout=sink if log else None, stderr=subprocess.STDOUT if log else None)
    if proc.returncode:
        sys.exit(f"failed: {' '.join(cmd)}" + (f" (see {log})" if log else ""))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`nomoat serve` with an arena, for the duration of a `with` block."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.port = free_port()
        self.cmd = ["nomoat", "serve", "--port", str(self.port), *args]
        self.log = log

    def __enter__(self) -> httpx.Client:
        print("$ " + " ".join(self.cmd), flush=True)
        self.proc = subprocess.Popen(self.cmd, stdout=open(self.log, "w"), stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{self.port}"
        for _ in range(600):
            if self.proc.poll() is not None:
                sys.exit(f"the server stopped; see {self.log}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    return httpx.Client(base_url=url, timeout=600)
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        sys.exit(f"the server did not start; see {self.log}")

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def right(answer: str, expected: str) -> bool:
    """The rule's test: a date in ISO 8601 form and nothing else (`expected` shows what a right one is)."""
    return re.fullmatch(r"\d{4}-\d{2}-\d{2}", answer.strip()) is not None


def battle(client: httpx.Client, prompt: str, expected: str, max_tokens: int) -> dict:
    """One battle through the arena API, voted by the rule; returns who fought, what they said and the vote."""
    r = client.post("/arena/api/battles", json={"prompt": prompt, "stream": False, "max_tokens": max_tokens})
    r.raise_for_status()
    b = r.json()
    ok_a, ok_b = right(b["answer_a"], expected), right(b["answer_b"], expected)
    vote = "tie" if ok_a and ok_b else "a" if ok_a else "b" if ok_b else "bothbad"
    v = client.post(f"/arena/api/battles/{b['battle_id']}/vote", json={"winner": vote})
    v.raise_for_status()
    seen = v.json()
    return {"vote": vote, seen["model_a"]: ok_a, seen["model_b"]: ok_b}


def battles(client: httpx.Client, records: list[dict], max_tokens: int, parallel: int) -> list[dict]:
    with ThreadPoolExecutor(parallel) as pool:  # the server batches concurrent battles into one decoding batch
        return list(pool.map(lambda r: battle(client, r["prompt"], r["expected"], max_tokens), records))


def rates(results: list[dict]) -> dict[str, tuple[int, int]]:
    out: dict[str, list[int]] = {}
    for r in results:
        for name, ok in r.items():
            if name != "vote":
                out.setdefault(name, [0, 0])
                out[name][0] += ok
                out[name][1] += 1
    return {k: (v[0], v[1]) for k, v in out.items()}


def ratings(db: Path, json_path: Path) -> dict:
    run(["nomoat", "ratings", str(db), "--json", str(json_path), "--bootstrap", "200"],
        log=json_path.with_suffix(".txt"))
    report = json.loads(json_path.read_text())
    return {c["name"]: c for c in report["contestants"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("preference-loop"))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--sft-steps", type=int, default=4, help="kept short: the SFT adapter should still often "
                   "miss the format, leaving DPO something to do")
    p.add_argument("--round1", type=int, default=96, help="battles between the base and sft")
    p.add_argument("--round2", type=int, default=60, help="held-out battles among base, sft and aligned")
    p.add_argument("--parallel", type=int, default=8, help="battles in flight at once")
    args = p.parse_args()
    t_all = time.perf_counter()
    out = args.out.resolve()
    if out.exists() and any(out.iterdir()):
        sys.exit(f"{out} is not empty; give another --out")
    out.mkdir(parents=True, exist_ok=True)
    threads = ["--threads", str(args.threads)] if args.threads else []
    max_tokens = 20  # a date in the form is 7 tokens; longer answers break the rule anyway

    # Disjoint prompt sets: SFT examples, round-1 battles, held-out battles.
    held = date_examples(args.round2, 2)
    seen = {r["prompt"] for r in held}
    r1 = [r for r in date_examples(args.round1 + args.round2, 1) if r["prompt"] not in seen][:args.round1]
    seen |= {r["prompt"] for r in r1}
    sft_rows = [r for r in date_examples(400, 0) if r["prompt"] not in seen][:200]
    (out / "sft.jsonl").write_text("".join(json.dumps({"instruction": r["prompt"], "output": r["expected"]}) + "\n"
                                           for r in sft_rows))
    db = out / "arena.sqlite"

    print(f"\n== 1. a short SFT ({args.sft_steps} steps)", flush=True)
    run(["nomoat", "finetune", "--data", str(out / "sft.jsonl"), "--out", str(out / "sft"), "--max-steps",
         str(args.sft_steps), "--lr", "5e-4", *threads])

    print(f"\n== 2. {args.round1} battles, base vs sft; the voter's rule: {RULE}", flush=True)
    t0 = time.perf_counter()
    with Server(["--adapter", f"sft={out / 'sft'}", "--arena", str(db), "--arena-max-tokens", str(max_tokens),
                 "--arena-votes-per-minute", "100000", *threads], out / "server1.log") as client:
        round1 = battles(client, r1, max_tokens, args.parallel)
    votes = {v: sum(r["vote"] == v for r in round1) for v in ("a", "b", "tie", "bothbad")}
    print(f"votes: {votes} ({time.perf_counter() - t0:.0f} s); answers keeping the rule: "
          + ", ".join(f"{k} {a}/{n}" for k, (a, n) in sorted(rates(round1).items())), flush=True)
    before = ratings(db, out / "ratings-before.json")

    print("\n== 3. DPO on the decided votes, on top of sft", flush=True)
    run(["nomoat", "dpo", "--data", str(db), "--on", str(out / "sft"), "--combine", "--out", str(out / "aligned"),
         "--batch-size", "4", "--lr", "2e-4", *threads])

    print(f"\n== 4. {args.round2} held-out battles among base, sft and aligned", flush=True)
    t0 = time.perf_counter()
    with Server(["--adapter", f"sft={out / 'sft'}", "--adapter", f"aligned={out / 'aligned'}", "--arena", str(db),
                 "--arena-models", "smollm2,sft,aligned", "--arena-max-tokens", str(max_tokens),
                 "--arena-votes-per-minute", "100000", *threads], out / "server2.log") as client:
        round2 = battles(client, held, max_tokens, args.parallel)
    print(f"({time.perf_counter() - t0:.0f} s)")
    after = ratings(db, out / "ratings-after.json")

    held_rates = rates(round2)
    print(f"\nheld-out prompts, share of answers that keep the rule ({RULE.split(';')[0]}):")
    for name in ("smollm2", "sft", "aligned"):
        a, n = held_rates.get(name, (0, 0))
        print(f"  {name:8} {a:3}/{n:<3} {100 * a / max(n, 1):5.1f}%")
    print("\nratings (Bradley-Terry, 95% interval):     before (round 1)        after (both rounds)")
    for name in ("smollm2", "sft", "aligned"):
        b, a = before.get(name), after.get(name)
        fmt = lambda c: f"{c['rating']:6.0f} [{c['lower']:.0f}, {c['upper']:.0f}]" if c else "      -"  # noqa: E731
        print(f"  {name:8} {fmt(b):>30} {fmt(a):>28}")
    total = time.perf_counter() - t_all
    summary = {"held_out_right": held_rates, "ratings_before": before, "ratings_after": after,
               "round1_votes": votes, "wall_seconds": round(total)}
    (out / "loop_result.json").write_text(json.dumps(summary, indent=1))
    print(f"\nwhole loop {total / 60:.1f} min; files in {out} (arena.sqlite, sft/, aligned/, ratings-*.json, logs)")


if __name__ == "__main__":
    main()
