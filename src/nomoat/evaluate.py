"""Measuring a model: perplexity on text or responses, and exact-match / contains accuracy on tasks."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from nomoat.data import Batches, build_dataset, load_examples
from nomoat.errors import NomoatError
from nomoat.generate import GenerationConfig, generate_batch

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
    from nomoat.api import prompt_ids

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


@dataclass
class PerplexityResult:
    perplexity: float
    loss: float
    tokens: int


@torch.no_grad()
def perplexity(lm, path: str | Path, fmt: str = "auto", seq_len: int = 1024, batch_size: int = 4,
               progress: Callable[[int], None] | None = None) -> PerplexityResult:
    """Perplexity on plain text (every token) or on the response tokens of an instruction set."""
    path = Path(path)
    if not path.exists():
        raise NomoatError(f"{path}: no such file")
    plain = path.suffix.lower() not in (".json", ".jsonl", ".ndjson")
    if plain:  # a plain text file (.txt, .md, ...): every token counts
        from nomoat.data import Example

        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise NomoatError(f"{path}: not UTF-8 text") from None
        if not text.strip():
            raise NomoatError(f"{path}: empty")
        examples = [Example(messages=None, text=text, source=f"{path.name}:1")]
        rows = build_dataset(examples, lm.tokenizer, min(seq_len, lm.config.max_position_embeddings), pack=True)
    else:
        examples = load_examples(path, fmt)
        rows = build_dataset(examples, lm.tokenizer, min(seq_len, lm.config.max_position_embeddings))
    from nomoat.train.sft import loss_sum

    total, count = loss_sum(lm.model, rows, Batches(lm.tokenizer.pad_id), batch_size, progress)
    loss = total / max(count, 1)
    return PerplexityResult(math.exp(loss), loss, count)
