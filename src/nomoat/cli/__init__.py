"""The `nomoat` command line: one thin module per command group; each command parses its options, calls
one library function, and prints. Nothing in nomoat imports this package."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.markup import escape

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


def one_line(message: str, limit: int = 1000) -> str:
    """A message as one printable line: values read from a damaged file may hold line breaks, control
    characters or megabytes; they are escaped and cut in the middle."""
    text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in message)
    return text if len(text) <= limit else f"{text[:limit * 2 // 3]} ... {text[-limit // 4:]}"


def main() -> None:
    try:
        app()
    except NomoatError as e:
        # Escaped for rich too: a '[' in a file's value must not be read as markup.
        err.print(f"[bold red]error:[/bold red] {escape(one_line(str(e)))}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
