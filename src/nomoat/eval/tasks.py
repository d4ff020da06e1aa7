"""Task accuracy: greedy answers to `{prompt, expected}` records, scored by exact match or containment.

Scoring ignores case, surrounding whitespace and a trailing period (see `normalize`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nomoat.errors import NomoatError
from nomoat.runtime.generate import GenerationConfig, generate_batch
from nomoat.runtime.prompts import prompt_ids

METRICS = ("exact-match", "contains", "perplexity")


@dataclass
class TaskRecord:
    prompt: str
    expected: str
    source: str


def load_task(path: str | Path) -> list[TaskRecord]:
    """`{"prompt", "expected"}` records, one JSON object per line."""
    path = Path(path)
    if not path.exists():
        raise NomoatError(f"{path}: no such file")
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise NomoatError(f"{path}:{i}: invalid JSON ({e.msg})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str) or "expected" not in rec:
            raise NomoatError(f'{path}:{i}: a task record needs "prompt" (string) and "expected"')
        out.append(TaskRecord(rec["prompt"], str(rec["expected"]), f"{path.name}:{i}"))
    if not out:
        raise NomoatError(f"{path}: no records")
    return out


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().strip(".").strip()).lower()


def score(answer: str, expected: str, metric: str) -> bool:
    if metric == "exact-match":
        return normalize(answer) == normalize(expected)
    if metric == "contains":
        return normalize(expected) in normalize(answer)
    raise NomoatError(f"unknown metric {metric!r} (use {', '.join(METRICS)})")


@dataclass
class TaskResult:
    accuracy: float
    correct: int
    total: int
    answers: list[str]


def task_accuracy(lm, records: list[TaskRecord], metric: str = "exact-match", max_new_tokens: int = 64,
                  batch_size: int = 16, progress: Callable[[int], None] | None = None) -> TaskResult:
    """Greedy answers to each prompt (chat template applied), scored against `expected`."""
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    answers: list[str] = []
    # Similar lengths in one batch waste less padding.
    order = sorted(range(len(records)), key=lambda i: len(records[i].prompt))
    by_index: dict[int, str] = {}
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        outs = generate_batch(lm.model, lm.tokenizer, [prompt_ids(lm, records[i].prompt) for i in idx], cfg)
        for i, o in zip(idx, outs):
            by_index[i] = o.text
        if progress:
            progress(len(idx))
    answers = [by_index[i] for i in range(len(records))]
    correct = sum(score(a, r.expected, metric) for a, r in zip(answers, records))
    return TaskResult(correct / len(records), correct, len(records), answers)
