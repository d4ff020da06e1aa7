"""`nomoat demo`: the main job on the embedded default model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from nomoat.cli.common import ThreadsOpt, err, out
from nomoat.cli.train import run_with_progress


def demo(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Where the data and the adapter go.")]
    = Path("nomoat-demo"),
    steps: Annotated[int, typer.Option(help="Optimizer steps of fine-tuning.")] = 60,
    threads: ThreadsOpt = None,
) -> None:
    """The main job: teach the default model a new skill with LoRA and measure it before and after."""
    from nomoat.demo import run_demo

    run_demo(out_dir, steps=steps, threads=threads, console=out, err_console=err, run_training=run_with_progress)


def register(app: typer.Typer) -> None:
    app.command()(demo)
