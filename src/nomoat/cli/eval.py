"""`nomoat eval`: perplexity and task accuracy, base and adapted side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from nomoat import defaults
from nomoat.cli.common import (
    AdapterOpt,
    DtypeOpt,
    ForceOpt,
    ModelOpt,
    QuantOpt,
    ThreadsOpt,
    out,
    status,
)


def eval_cmd(
    data: Annotated[Path, typer.Option("--data", "-d", help="exact-match / contains: JSONL task records "
                                       '{"prompt": ..., "expected": ...} (the prompt goes through the chat '
                                       "template). perplexity: a plain text file (every token counts) or "
                                       "instruction data as for finetune (response tokens count).")],
    metric: Annotated[str, typer.Option(help="exact-match (case, surrounding spaces and a final period "
                                        "ignored), contains, or perplexity.")] = "exact-match",
    model: ModelOpt = None,
    adapter: AdapterOpt = None,
    force: ForceOpt = False,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n")] = 64,
    batch_size: int = 16,
    seq_len: int = 1024,
    show: Annotated[int, typer.Option(help="Print this many example answers.")] = 3,
    threads: ThreadsOpt = None,
    dtype: DtypeOpt = None,
    quant: QuantOpt = defaults.QUANT,
    record: Annotated[bool, typer.Option("--record", help="Attach the scores to the catalog: the adapted score to "
                                         "the adapters, the base score to the model (when in the catalog).")]
    = False,
) -> None:
    """Score a model, and with --adapter the base and the adapted model side by side."""
    from nomoat.api import load_with_adapters
    from nomoat.errors import NomoatError
    from nomoat.eval import METRICS, load_task, perplexity, task_accuracy
    from nomoat.lora import active_weights, set_active

    if metric not in METRICS:
        raise NomoatError(f"--metric {metric!r} is not one of {', '.join(METRICS)}")
    records = load_task(data) if metric != "perplexity" else None
    if record:
        from nomoat.cli.catalog import record_targets

        stack = record_targets(adapter)  # before the run: every adapter must be in the catalog
    with status("loading model..."):
        lm = load_with_adapters(model, adapter or (), force=force, dtype=dtype, threads=threads, quant=quant)
    weights = active_weights(lm.model)
    variants = [("base", {})] + ([("adapted", weights)] if weights else [])
    table = Table(title=f"{metric} on {data.name} (weights: {lm.quant})")
    table.add_column("model")
    results = {}
    for label, w in variants:
        set_active(lm.model, w)
        with status(f"evaluating {label}..."):
            if metric == "perplexity":
                results[label] = perplexity(lm, data, seq_len=seq_len)
            else:
                results[label] = task_accuracy(lm, records, metric, max_new_tokens, batch_size)
    if metric == "perplexity":
        for c in ("perplexity", "loss", "tokens"):
            table.add_column(c, justify="right")
        for label, r in results.items():
            table.add_row(label, f"{r.perplexity:.3f}", f"{r.loss:.4f}", str(r.tokens))
    else:
        table.add_column("accuracy", justify="right")
        table.add_column("correct", justify="right")
        for label, r in results.items():
            table.add_row(label, f"{100 * r.accuracy:.1f}%", f"{r.correct}/{r.total}")
        for i, rec in enumerate(records[:show]):
            out.print(f"[dim]{rec.source}[/dim] expected [bold]{rec.expected}[/bold]; " +
                      "; ".join(f"{label}: {r.answers[i]!r}" for label, r in results.items()), soft_wrap=True)
    out.print(table)
    if record:
        from nomoat.cli.catalog import record_scores

        value = {label: r.perplexity if metric == "perplexity" else r.accuracy for label, r in results.items()}
        record_scores("eval", metric, lm.source, stack, value.get("base"), value.get("adapted"), data,
                      {"quant": lm.quant})


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_cmd)
