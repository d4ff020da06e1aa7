"""What every command shares: the consoles, option types, and printing of speed figures."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

out = Console()
err = Console(stderr=True)

ModelOpt = Annotated[str | None, typer.Option("--model", "-m", help="GGUF file or Hugging Face model "
                                                 "directory (default: the embedded SmolLM2-135M-Instruct).")]
ThreadsOpt = Annotated[int | None, typer.Option("--threads", "-t", help="CPU threads (default: the cores not "
                                                "busy with other work).")]
DtypeOpt = Annotated[str | None, typer.Option("--dtype", help="Float weights' dtype: float32 or bfloat16 "
                                              "(default: chosen for this CPU; `nomoat info` says which).")]
AdapterOpt = Annotated[list[str] | None, typer.Option(
    "--adapter", "-a", help="LoRA adapter (PEFT directory or GGUF adapter), optionally PATH:WEIGHT; repeat to "
    "stack several.")]
QuantOpt = Annotated[str, typer.Option("--quant", "-q", help="Weights: auto (keep a quantized file in 4/8 bits "
                                       "on int4/int8 kernels), q4, q8, or none (float).")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Apply adapters even if trained on a different base.")]


def print_rows(rows: list[tuple[str, str]]) -> None:
    """Aligned `field  value` lines, never wrapped or cut at the terminal's width (paths stay copyable)."""
    width = max((len(k) for k, _ in rows), default=0)
    for k, v in rows:
        out.print(f"[bold]{escape(k):<{width}}[/bold]  {escape(v)}", soft_wrap=True, highlight=False)


def print_stats(lm, st) -> None:
    from nomoat.api import peak_rss_mib

    cpu = lm.cpu
    err.print(
        f"[dim]load {lm.load_seconds:.2f} s | prompt {st.prompt_tokens} tok, {st.prompt_tps:.1f} tok/s | "
        f"generated {st.generated_tokens} tok, {st.decode_tps:.1f} tok/s | "
        f"peak RSS {peak_rss_mib():.0f} MiB | finish: {st.finish_reason}"
        + (f" | {cpu.threads} threads, weights {lm.quant}, {cpu.reasons['threads'].split(': ', 1)[-1]}"
           if cpu else "") + "[/dim]", soft_wrap=True)


def status(message: str, quiet: bool = False):
    """A spinner on stderr while something slow runs (nothing when `quiet` or not on a terminal)."""
    import contextlib

    return contextlib.nullcontext() if quiet or not err.is_terminal else err.status(message)
