"""`nomoat models ...` and `nomoat adapters ...`: the local catalog (add, list, show, export, rm).

`nomoat adapter ...` (singular) works on adapter files: info, convert, combine, merge.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from nomoat.cli.common import err, out, print_rows, status

models_app = typer.Typer(help="The catalog's models: add, list, show, export, rm. `default` (the embedded model) "
                         "is always there. Names work wherever a path does: --model NAME[:TAG].",
                         no_args_is_help=True)
adapters_app = typer.Typer(help="The catalog's adapters: add, list, show, export, rm, with lineage and results. "
                           "Names work wherever a path does: --adapter NAME[:TAG][:WEIGHT]. Working on adapter "
                           "files: `nomoat adapter`.", no_args_is_help=True)

NameOpt = Annotated[str | None, typer.Option("--name", "-n", help="NAME[:TAG] to file it under (default: its "
                                             "file or directory name; the tag defaults to latest).")]
ReplaceOpt = Annotated[bool, typer.Option("--replace", help="Move NAME:TAG if it already names something else.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
RefArg = Annotated[str, typer.Argument(help="NAME or NAME:TAG.")]


def _table(t: Any) -> None:
    """Aligned columns, never wrapped or cut (names and paths stay copyable; a pipe gets the same lines)."""
    import sys

    if not t.rows:
        err.print("(none)")
        return
    widths = [max(len(c), *(len(r[i]) for r in t.rows)) for i, c in enumerate(t.columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(t.columns, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in t.rows]
    sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()


def _shown(s: Any, as_json: bool) -> None:
    if as_json:
        out.print_json(json.dumps(s.data, default=str))
        return
    print_rows(s.rows)
    out.print("\n[bold]lineage[/bold]")
    for line in s.lineage:
        out.print(f"  {escape(line)}", soft_wrap=True, highlight=False)
    if s.results:
        out.print("\n[bold]results[/bold]")
        t = Table(box=None, pad_edge=False, header_style="bold")
        for c in ("kind", "metric", "value", "data", "note", "when"):
            t.add_column(c)
        for r in s.results:
            t.add_row(*(escape(v) for v in r))
        out.print(t, soft_wrap=True)
    out.print("\n[bold]files[/bold]")
    for path, sha, size in s.files:
        out.print(f"  {sha}  {escape(path)} ({size:,} bytes)", soft_wrap=True, highlight=False)


def _notes(lines: list[str]) -> None:
    for line in lines:
        err.print(f"[yellow]note:[/yellow] {escape(line)}", soft_wrap=True, highlight=False)


# ---- models ----
@models_app.command("add")
def models_add(path: Annotated[Path, typer.Argument(help="A .gguf file or a Hugging Face model directory.")],
               name: NameOpt = None, replace: ReplaceOpt = False) -> None:
    """Store a model (hashed, verified on every use) and name it."""
    from nomoat.catalog.ingest import add_model

    with status(f"hashing and storing {path}..."):
        rep = add_model(path, name, replace)
    _notes(rep.notes)
    a = rep.artifact
    err.print(f"{'added' if rep.new else 'named'} model [bold]{escape(', '.join(a.names))}[/bold] "
              f"({a.format}, {a.fingerprint})", soft_wrap=True, highlight=False)


@models_app.command("list")
def models_list(as_json: JsonOpt = False) -> None:
    """Every model: name, format, parameters, weight types, size, adapters on it, fingerprint."""
    from nomoat.catalog import Catalog
    from nomoat.catalog.views import model_table

    t = model_table(Catalog(), _default_row())
    if as_json:
        out.print_json(json.dumps(t.data, default=str))
    else:
        _table(t)


def _default_row() -> tuple[str, str] | None:
    from nomoat.errors import NomoatError
    from nomoat.runtime.loading import default_model_path

    try:
        return str(default_model_path()), ""
    except NomoatError:
        return None


@models_app.command("show")
def models_show(ref: RefArg, as_json: JsonOpt = False) -> None:
    """A model's shape, weights, license, hub id, the adapters that sit on it, lineage, files and hashes."""
    from nomoat.catalog import Catalog
    from nomoat.catalog.views import show_model

    _shown(show_model(Catalog(), ref), as_json)


@models_app.command("rm")
def models_rm(ref: RefArg) -> None:
    """Remove a name; with its last name the files go. Adapters on it stay (and say so)."""
    from nomoat.catalog import Catalog
    from nomoat.catalog.views import remove

    _removed(remove(Catalog(), "model", ref), ref)


def _removed(r: Any, ref: str) -> None:
    for w in r.warnings:
        err.print(f"[bold yellow]warning:[/bold yellow] {escape(w)}", soft_wrap=True, highlight=False)
    err.print(f"removed {escape(ref)}" + (" and its files" if r.files_deleted else
                                          f" (its content stays, named {', '.join(r.remaining)})"),
              soft_wrap=True, highlight=False)


@models_app.command("export")
def models_export(
    ref: RefArg,
    out_path: Annotated[Path, typer.Option("--out", "-o", help="A .gguf file, or a Hugging Face directory.")],
    to: Annotated[str | None, typer.Option("--to", help="gguf or hf (default: from --out).")] = None,
    ftype: Annotated[str | None, typer.Option("--type", help="Convert the weights: f32, f16, q8_0, q4_0, q4_1 "
                                              "(GGUF) or f32, f16, bf16 (HF); default: copy as stored.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace --out if it exists.")] = False,
) -> None:
    """Write a model (or `default`) back out: its stored files as they are, or converted."""
    from nomoat.catalog.export import export_model

    with status(f"writing {out_path}..."):
        rep = export_model(ref, out_path, to, ftype, force)
    _notes(rep.notes)
    err.print(f"wrote {escape(str(rep.out))}", soft_wrap=True)


# ---- adapters ----
@adapters_app.command("add")
def adapters_add(
    path: Annotated[Path, typer.Argument(help="A PEFT adapter directory or a GGUF adapter.")],
    name: NameOpt = None,
    for_: Annotated[str | None, typer.Option("--for", help="The catalog model it is for (needed when the adapter "
                                             "records no base fingerprint nor a known base id).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Store it even if its base is not in the catalog or is "
                                        "not the --for model.")] = False,
    replace: ReplaceOpt = False,
) -> None:
    """Store an adapter under its base, with its provenance and parents; refused (with the reason) if the base
    is not in the catalog."""
    from nomoat.catalog.ingest import add_adapter

    with status(f"checking and storing {path}..."):
        rep = add_adapter(path, name, for_, force, replace)
    _notes(rep.notes)
    a = rep.artifact
    err.print(f"{'added' if rep.new else 'named'} adapter [bold]{escape(', '.join(a.names))}[/bold] "
              f"(base {escape(str(a.info.get('base_name') or a.fingerprint))}, rank {a.info.get('rank')})",
              soft_wrap=True, highlight=False)


@adapters_app.command("list")
def adapters_list(
    for_: Annotated[str | None, typer.Option("--for", help="Only the adapters of this model.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Every adapter: name, base, rank, size, created, latest metrics, parent."""
    from nomoat.catalog import Catalog
    from nomoat.catalog.views import adapter_table

    t = adapter_table(Catalog(), for_)
    if as_json:
        out.print_json(json.dumps(t.data, default=str))
    else:
        _table(t)


@adapters_app.command("show")
def adapters_show(ref: RefArg, as_json: JsonOpt = False) -> None:
    """Provenance, lineage (parents and derived adapters), results, files and hashes. A removed adapter is
    still shown by its former name or digest."""
    from nomoat.catalog import Catalog
    from nomoat.catalog.views import show_adapter

    _shown(show_adapter(Catalog(), ref), as_json)


@adapters_app.command("export")
def adapters_export(
    ref: RefArg,
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Directory to write.")],
    gguf_type: Annotated[str | None, typer.Option("--type", help="GGUF adapter tensors: f32, f16 or q8_0 "
                                                  "(default: f32, or a stored GGUF as it is).")] = None,
    license: Annotated[str | None, typer.Option("--license", help="License for the model card (default: the "
                                                "base's).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Write into a non-empty --out.")] = False,
) -> None:
    """PEFT files + GGUF adapter + model card (README.md) + Ollama Modelfile: ready to upload or hand over."""
    from nomoat.catalog.export import export_adapter

    with status(f"writing {out_path}..."):
        rep = export_adapter(ref, out_path, gguf_type, license, force)
    _notes(rep.notes)
    err.print(f"wrote {escape(str(rep.out))}: {', '.join(p.name for p in rep.files)}", soft_wrap=True)


@adapters_app.command("rm")
def adapters_rm(ref: RefArg) -> None:
    """Remove a name; with its last name the files go. Adapters derived from it keep their lineage."""
    from nomoat.catalog import Catalog
    from nomoat.catalog.views import remove

    _removed(remove(Catalog(), "adapter", ref), ref)


# ---- the hooks training commands use: --register NAME ----
def check_register(name: str | None, lm: Any) -> None:
    """Before training: fail now if `--register NAME` could not succeed afterwards."""
    if name is None:
        return
    from nomoat.adapters import base_fingerprint
    from nomoat.catalog.ingest import check_register as check

    check(name, base_fingerprint(lm))


def register_output(out_dir: str | Path, name: str | None) -> None:
    """After training: add the adapter just written to the catalog under NAME."""
    if name is None:
        return
    from nomoat.catalog.ingest import register_trained

    rep = register_trained(out_dir, name)
    err.print(f"registered [bold]{escape(', '.join(rep.artifact.names))}[/bold] in the catalog", soft_wrap=True,
              highlight=False)


# ---- --record: results attached to what was measured ----
def record_targets(adapters: list[str] | None) -> list[Path]:
    """The adapter paths of an --adapter list (`[NAME=]PATH[:WEIGHT]`, names already resolved), each checked
    to be in the catalog before a long run starts."""
    from nomoat.adapters import AdapterSpec
    from nomoat.catalog import Catalog
    from nomoat.catalog.records import adapter_artifacts

    paths = [AdapterSpec.parse(a, named=True).path for a in adapters or ()]
    adapter_artifacts(paths, Catalog())
    return paths


def record_scores(kind: str, metric: str, model: str | Path, adapters: list[Path], base: float | None,
                  adapted: float | None, data: Path | None = None, detail: dict[str, Any] | None = None) -> None:
    """Attach a run's scores: `adapted` to the adapters (a stack is marked as such), `base` to the model."""
    from nomoat.catalog import Catalog
    from nomoat.catalog.records import record_result
    from nomoat.digests import sha256_file

    cat = Catalog()
    info = dict(detail or {})
    if data is not None and Path(data).is_file():
        info.update(data=str(Path(data).resolve()), data_sha256=sha256_file(data))
    lines: list[str] = []
    if adapted is not None and adapters:
        lines += record_result(kind, metric, adapted, model, adapters, {**info, "base_score": base}, cat)
    if base is not None:
        lines += record_result(kind, metric, base, model, [], info, cat)
    for line in lines:
        err.print(escape(line), soft_wrap=True, highlight=False)


def judged_targets(answer_files: list[Path]) -> dict[str, tuple[str | None, list[Path]]]:
    """model_id -> (model path, adapter paths) from each answer file's provenance (`nomoat answer` writes it),
    every adapter checked to be in the catalog before judging starts."""
    from nomoat.catalog import Catalog
    from nomoat.catalog.records import adapter_artifacts
    from nomoat.errors import NomoatError
    from nomoat.eval.answers import load_answers

    out: dict[str, tuple[str | None, list[Path]]] = {}
    for f in answer_files:
        a = load_answers(f)
        rec = next(iter(a.answers.values())).record
        adapters = [Path(x["path"]) for x in rec.get("adapters") or [] if isinstance(x, dict) and x.get("path")]
        if not adapters and not rec.get("model"):
            raise NomoatError(f"--record: {f} does not say which model answered (no nomoat provenance)")
        adapter_artifacts(adapters, Catalog(), f"--record ({f})")
        out[a.model_id] = (rec.get("model"), adapters)
    return out


def record_judgments(report: Any, targets: dict[str, tuple[str | None, list[Path]]], verdicts: Path) -> None:
    """Attach each compared model's adjusted win rate (pairwise) or mean grade (single)."""
    import math

    from nomoat.catalog import Catalog
    from nomoat.catalog.records import record_result

    cat, lines = Catalog(), []
    for s in report.pairwise:
        model, adapters = targets.get(s.model_2, (None, []))
        if not math.isnan(s.overall.adjusted):
            detail = {"vs": s.model_1, "judge": s.judge, "ci": list(s.overall.ci), "wins": s.overall.wins,
                      "ties": s.overall.ties, "losses": s.overall.losses, "data": str(verdicts.resolve())}
            lines += record_result("judge", f"win rate vs {s.model_1}", s.overall.adjusted, model, adapters,
                                   detail, cat)
    for s in report.single:
        model, adapters = targets.get(s.model, (None, []))
        if not math.isnan(s.mean):
            lines += record_result("judge", "judge grade", s.mean, model, adapters,
                                   {"judge": s.judge, "ci": list(s.ci), "data": str(verdicts.resolve())}, cat)
    for line in lines:
        err.print(escape(line), soft_wrap=True, highlight=False)


def register(app: typer.Typer) -> None:
    app.add_typer(models_app, name="models")
    app.add_typer(adapters_app, name="adapters")
