"""Generated, checkable skills for the demo: instruction data the base model cannot do yet."""

from __future__ import annotations

import json
import random
from pathlib import Path

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
DAYS_IN = [31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]
INSTRUCTION = "Convert the date to ISO 8601 (YYYY-MM-DD). Answer with the date only."


def _spelled(rng: random.Random, y: int, m: int, d: int) -> str:
    month = MONTHS[m - 1]
    style = rng.randrange(4)
    if style == 0:
        return f"{month} {d}, {y}"
    if style == 1:
        return f"{d} {month} {y}"
    if style == 2:
        return f"{month[:3]} {d}, {y}"
    suffix = "th" if 11 <= d <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(d % 10, "th")
    return f"the {d}{suffix} of {month}, {y}"


def date_examples(n: int, seed: int) -> list[dict[str, str]]:
    """`n` records {"prompt", "expected"}: a spelled-out date -> YYYY-MM-DD."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        y, m = rng.randint(1900, 2099), rng.randint(1, 12)
        d = rng.randint(1, DAYS_IN[m - 1] if m != 2 else 28)
        out.append({"prompt": f"{INSTRUCTION}\nDate: {_spelled(rng, y, m, d)}", "expected": f"{y:04d}-{m:02d}-{d:02d}"})
    return out


def write_skill_data(directory: Path, n_train: int = 800, n_test: int = 60, seed: int = 0) -> tuple[Path, Path]:
    """Write train.jsonl (Alpaca format) and test.jsonl ({"prompt", "expected"}); disjoint by prompt."""
    directory.mkdir(parents=True, exist_ok=True)
    test = date_examples(n_test, seed + 1)
    held = {r["prompt"] for r in test}
    train = [r for r in date_examples(n_train + n_test, seed) if r["prompt"] not in held][:n_train]
    train_path, test_path = directory / "train.jsonl", directory / "test.jsonl"
    train_path.write_text("".join(json.dumps({"instruction": r["prompt"], "output": r["expected"]}) + "\n"
                                  for r in train))
    test_path.write_text("".join(json.dumps(r) + "\n" for r in test))
    return train_path, test_path
