"""The `nomoat` command line: one thin module per command group; each command parses its options, calls
one library function, and prints. Nothing in nomoat imports this package."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from nomoat import __version__  # importing nomoat bounds OpenMP's idle spinning before torch loads
from nomoat.cli import adapter, catalog, demo, dpo, eval, judge, ratings, run, serve, train
from nomoat.cli.common import err
from nomoat.errors import NomoatError

app = typer.Typer(
    name="nomoat",
    help="Run, fine-tune, quantize, share and evaluate open LLaMA-family models on a CPU.\n\n"
         "With no --model, commands use the embedded default model, SmolLM2-135M-Instruct.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        print(f"nomoat {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    pass


for _group in (run, train, dpo, eval, judge, ratings, adapter, catalog, serve, demo):
    _group.register(app)


def main() -> None:
    try:
        app()
    except NomoatError as e:
        err.print(f"[bold red]error:[/bold red] {e}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
