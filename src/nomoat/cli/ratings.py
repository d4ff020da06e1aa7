"""`nomoat ratings`: Bradley–Terry leaderboard from arena votes, judge verdicts and battle files."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from nomoat.cli.common import err, out


def ratings(
    inputs: Annotated[list[Path], typer.Argument(help="Arena databases (nomoat serve --arena), judge verdict files "
                                                 "(nomoat judge) and battle JSONL files in Chatbot Arena's "
                                                 "cleaned-battle layout; all are rated together.",
                                                 show_default=False)],
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the ratings (per contestant: rating, lower, "
                                                  "upper, battles) and win rates as JSON.")] = None,
    png: Annotated[Path | None, typer.Option("--png", help="Plot of ratings with intervals (default: beside the "
                                             "first input, NAME.ratings.png).")] = None,
    export: Annotated[Path | None, typer.Option("--export", help="Write every battle read as JSONL in the "
                                                "cleaned-battle layout (humans and judges in one file).")] = None,
    anchor: Annotated[str | None, typer.Option("--anchor", help="Contestant fixed at 1000 (default: the mean "
                                               "contestant is at 1000).")] = None,
    bootstrap: Annotated[int, typer.Option("--bootstrap", help="Bootstrap resamples for the 95% intervals.")] = 100,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap.")] = 0,
    rater: Annotated[str | None, typer.Option("--rater", help="Rate one rater's battles only: 'human' or "
                                              "'judge NAME'.")] = None,
) -> None:
    """Rate contestants by Bradley–Terry maximum likelihood (400 points = 10x the odds; a tie is half a win), with
    bootstrap 95% intervals, ranks that separate only non-overlapping intervals, and the agreement of people and
    judges where both decided the same comparison."""
    from nomoat.api import rate_battles

    res = rate_battles(inputs, resamples=bootstrap, seed=seed, anchor=anchor, png=png, json_out=json_out,
                       export=export, rater=rater)
    rep = res.report
    boards = [("all", rep.overall)] + list(rep.by_rater.items())
    table = Table(title=f"{res.battles} battles, {bootstrap} bootstrap resamples"
                        + (f", anchored at {anchor}" if anchor else ""), title_justify="left")
    for col in ("rank", "model", "rating", "95% CI", "battles", "win rate"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for label, _ in boards[1:]:
        table.add_column(escape(label), justify="right")
    others = [{c.name: c for c in b.contestants} for _, b in boards[1:]]
    for c in rep.overall.contestants:
        extra = [f"{o[c.name].rating:.0f}" if c.name in o else "-" for o in others]
        table.add_row(str(c.rank), escape(c.name), f"{c.rating:.0f}", f"{c.lower:.0f} – {c.upper:.0f}",
                      str(c.battles), f"{100 * c.wins / c.battles:.0f}%", *extra)
    out.print(table, width=None if out.is_terminal else 160)  # piped output keeps whole rows
    names = [c.name for c in rep.overall.contestants]
    if len(names) <= 12:
        wr = rep.overall.win_rates
        matrix = Table(title="row's win rate against column (ties count half; battles in brackets)",
                       title_justify="left")
        matrix.add_column("")
        for n in names:
            matrix.add_column(escape(n), justify="right")
        for a in names:
            matrix.add_row(escape(a), *(f"{100 * wr[a][b][0]:.0f}% ({wr[a][b][1]})" if b in wr.get(a, {}) else "-"
                                        for b in names))
        out.print(matrix, width=None if out.is_terminal else 160)
    for g in rep.agreements:
        def pct(x: float) -> str:
            return "n/a" if math.isnan(x) else f"{100 * x:.0f}%"

        out.print(f"agreement {escape(g.a)} vs {escape(g.b)}: {pct(g.with_ties)} with ties, {pct(g.without_ties)} "
                  f"without ties, over {g.comparisons} shared comparisons", highlight=False, soft_wrap=True)
    err.print(f"[dim]fitted in {res.seconds:.2f} s[/dim]")
    for what, path in (("plot", res.png), ("json", res.json), ("battles", res.export)):
        if path:
            err.print(f"{what}: {escape(str(path))}", soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command()(ratings)
