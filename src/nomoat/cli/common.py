"""What every command shares: the consoles, option types, and printing of speed figures."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

out = Console()
err = Console(stderr=True)



# ---- names wherever a path works: every --model / --adapter value passes through these (nomoat.catalog.resolve)
def model_ref(value: str | None) -> str | None:
    """A --model value as a path: an existing path as given, `default`, or a catalog model's verified files."""
    if value is None:
        return None
    from nomoat.catalog import resolve_model

    return resolve_model(value)


def adapter_refs(values: list[str] | None) -> list[str] | None:
    """--adapter values (`[NAME=]PATH_OR_NAME[:WEIGHT]`) with catalog names replaced by verified paths."""
    if not values:
        return values
    from nomoat.catalog import resolve_adapter

    return [resolve_adapter(v) for v in values]


def named_adapter_refs(values: list[str] | None) -> list[str] | None:
    """As `adapter_refs`, for commands that serve adapters by name: `dates:v1` is served as `dates:v1`."""
    if not values:
        return values
    from nomoat.catalog import resolve_adapter

    return [resolve_adapter(v, named=True) for v in values]


def adapter_ref_path(value: Path | None) -> Path | None:
    """One adapter argument (PATH or NAME[:TAG]) as a path."""
    if value is None:
        return None
    from nomoat.catalog import resolve_adapter

    return Path(resolve_adapter(str(value)))


ModelOpt = Annotated[str | None, typer.Option("--model", "-m", callback=model_ref, help="GGUF file, Hugging Face "
                                              "model directory, or catalog name (default: the embedded "
                                              "SmolLM2-135M-Instruct, also named `default`).")]
ThreadsOpt = Annotated[int | None, typer.Option("--threads", "-t", help="CPU threads (default: the cores not "
                                                "busy with other work).")]
DtypeOpt = Annotated[str | None, typer.Option("--dtype", help="Float weights' dtype: float32 or bfloat16 "
                                              "(default: chosen for this CPU; `nomoat info` says which).")]
AdapterOpt = Annotated[list[str] | None, typer.Option(
    "--adapter", "-a", callback=adapter_refs, help="LoRA adapter (PEFT directory, GGUF adapter or catalog "
    "NAME[:TAG]), optionally with :WEIGHT; repeat to stack several.")]
QuantOpt = Annotated[str, typer.Option("--quant", "-q", help="Weights: auto (keep a quantized file in 4/8 bits "
                                       "on int4/int8 kernels), q4, q8, or none (float).")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Apply adapters even if trained on a different base.")]
RegisterOpt = Annotated[str | None, typer.Option("--register", help="Add the adapter to the catalog as NAME[:TAG] "
                                                 "when training ends (its base must be in the catalog: checked "
                                                 "before training starts).")]


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
           if cpu else "") + f" | kernels: {kernels_line(lm)}[/dim]", soft_wrap=True)


def kernels_line(lm) -> str:
    """Which kernels ran the weights: nomoat's native build (and which), or torch's."""
    from nomoat import kernels

    if lm.model.fast_decode is not None or (lm.cpu and lm.cpu.native_kernels and lm.quant != "none"):
        return "native " + kernels.status().removeprefix("on (").split(",")[0]
    return "torch" + ("" if lm.quant != "none" else " (float weights)")


def status(message: str, quiet: bool = False):
    """A spinner on stderr while something slow runs (nothing when `quiet` or not on a terminal)."""
    import contextlib

    return contextlib.nullcontext() if quiet or not err.is_terminal else err.status(message)
