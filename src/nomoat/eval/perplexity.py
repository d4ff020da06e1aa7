"""Perplexity: the model's mean next-token loss on plain text (every token) or on instruction data's
response tokens, and the loss-summing loop that training's validation shares."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from nomoat.data import Batches, Example, build_dataset, load_examples
from nomoat.errors import NomoatError
from nomoat.model import IGNORE_INDEX, causal_lm_loss


@torch.no_grad()
def loss_sum(model, rows, batches: Batches, batch_size: int,
             progress: Callable[[int], None] | None = None) -> tuple[float, int]:
    """(summed next-token loss, number of loss tokens) over rows, in eval mode."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for b in range(0, len(rows), batch_size):
        batch = batches.collate(rows[b:b + batch_size])
        n = int((batch.labels[:, 1:] != IGNORE_INDEX).sum())
        if n:
            h = model.hidden_states(batch.input_ids)
            total += float(causal_lm_loss(model, h, batch.labels, reduction="sum"))
            count += n
        if progress:
            progress(len(rows[b:b + batch_size]))
    model.train(was)
    return total, count


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
    total, count = loss_sum(lm.model, rows, Batches(lm.tokenizer.pad_id), batch_size, progress)
    loss = total / max(count, 1)
    return PerplexityResult(math.exp(loss), loss, count)
