"""Answer files for measuring a judge against known answers: the demo skill's date prompts
(`nomoat.skills.date_examples`), answered once correctly and once with the date shifted.

    python bench/judge_date_pairs.py OUT_DIR [--n 30] [--seed 7] [--reference]
    nomoat judge pairwise OUT_DIR/wrong.jsonl OUT_DIR/correct.jsonl --judge URL --judge-model NAME

With the wrong answers as the baseline, the correct ones' win rate is the judge's agreement with the
known answer; `--reference` puts the right date in the question, so the judge only has to compare.
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
from pathlib import Path

from nomoat.eval.answers import write_answers
from nomoat.skills import date_examples

SHIFTS = (-400, -31, -7, -1, 1, 7, 31, 400)  # days: a neighbouring day, week, month or year


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--reference", action="store_true", help="Give the judge the correct date as the reference.")
    a = ap.parse_args()
    rng = random.Random(a.seed)
    files = {"correct": [], "wrong": []}
    for i, ex in enumerate(date_examples(a.n, a.seed), 1):
        right = dt.date.fromisoformat(ex["expected"])
        wrong = right + dt.timedelta(days=rng.choice(SHIFTS))
        question = {"category": "extraction", "turns": [ex["prompt"]]}
        if a.reference:
            question["reference"] = [ex["expected"]]
        for model, answer in (("correct", right.isoformat()), ("wrong", wrong.isoformat())):
            files[model].append({"question_id": i, "model_id": model, "choices": [{"index": 0, "turns": [answer]}],
                                 "question": question})
    for model, recs in files.items():
        print(write_answers(a.out / f"{model}.jsonl", recs))


if __name__ == "__main__":
    main()
