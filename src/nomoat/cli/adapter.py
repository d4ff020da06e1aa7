"""`nomoat adapter ...`: inspect, convert, combine and merge adapters."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from nomoat.cli.common import ForceOpt, ModelOpt, ThreadsOpt, adapter_ref_path, adapter_refs, err, print_rows, status

adapter_app = typer.Typer(help="Inspect, convert, combine and merge adapter files (paths or catalog names; the "
                          "catalog itself is `nomoat adapters`).", no_args_is_help=True)


def _model_cfg(model: str | None, needed: bool):
    """The base model's config, read from its header only (GGUF adapters need shapes and head counts)."""
    from nomoat.runtime.loading import open_checkpoint

    return open_checkpoint(model).config() if needed else None


def _specs(items: list[str]) -> list[tuple[Path, float]]:
    from nomoat.adapters import AdapterSpec

    return [(sp.path, sp.weight) for sp in map(AdapterSpec.parse, items)]


@adapter_app.command("info")
def adapter_info(path: Annotated[Path, typer.Argument(callback=adapter_ref_path, help="Adapter: PEFT directory, "
                                                       "llama.cpp GGUF adapter or catalog name.")],
                 model: ModelOpt = None) -> None:
    """Method, rank, alpha, targets, parameter count, size, ratio to the base, base fingerprint, provenance."""
    from nomoat.api import describe_adapter

    print_rows(describe_adapter(path, model))


@adapter_app.command("combine")
def adapter_combine(
    sources: Annotated[list[str], typer.Argument(callback=adapter_refs, help="Adapters (PEFT directory, .gguf or "
                                                 "catalog name), each with an optional :WEIGHT.")],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Output PEFT directory (or .gguf file).")],
    how: Annotated[str, typer.Option("--how", help="concat (exact, rank r1+r2), linear or ties (SVD to "
                                     "--rank, error reported).")] = "concat",
    rank: Annotated[int | None, typer.Option("--rank", "-r", help="Rank for linear/ties (default: the "
                                             "largest input rank).")] = None,
    density: Annotated[float, typer.Option(help="Share of each update TIES keeps.")] = 0.2,
    model: ModelOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Combine adapters trained on different bases.")] = False,
) -> None:
    """Combine adapters into one: concat is exact; linear and ties approximate at a chosen rank."""
    from nomoat.adapters import combine_files

    specs = _specs(sources)
    needs_cfg = out_path.suffix == ".gguf" or any(p.suffix == ".gguf" for p, _ in specs)
    report = combine_files(specs, out_path, how, rank, density, _model_cfg(model, needs_cfg), force)
    ranks = sorted({int(m["rank"]) for m in report.modules.values()})
    rows = [("method", how), ("modules", str(len(report.modules))), ("rank", ", ".join(map(str, ranks))),
            ("relative error", f"mean {report.mean_rel_error:.2e}, max {report.max_rel_error:.2e}, "
                               f"overall {report.total_rel_error:.2e}")]
    if how == "ties":
        vs = [m["ties_vs_sum"] for m in report.modules.values()]
        rows.append(("TIES vs plain sum", f"mean {sum(vs) / len(vs):.2e}"))
    print_rows(rows)
    err.print(f"wrote {out_path}")


@adapter_app.command("merge")
def adapter_merge(
    adapter: Annotated[list[str], typer.Option("--adapter", "-a", callback=adapter_refs, help="Adapter (path or "
                                               "catalog name), optionally :WEIGHT; repeat to merge several.")],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Hugging Face directory, or a .gguf file.")],
    gguf_type: Annotated[str, typer.Option("--type", help="f32, f16, bf16 (directory); f32, f16, q8_0, q4_0, "
                                           "q4_1 (GGUF).")] = "f16",
    model: ModelOpt = None,
    force: ForceOpt = False,
    threads: ThreadsOpt = None,
) -> None:
    """Fold adapters into the base weights and write the merged model (HF directory or GGUF)."""
    from nomoat.adapters import merge_files
    from nomoat.runtime.loading import load

    specs = _specs(adapter)
    with status("loading model..."):
        lm = load(model, threads=threads, quant="none")
    with status(f"merging and writing {out_path}..."):
        _, kept = merge_files(lm, specs, out_path, gguf_type, force=force)
    err.print(f"wrote {out_path}; {100 * kept:.0f}% of the adapters' update survives --type {gguf_type}")
    if kept < 0.5:
        err.print(f"[bold yellow]warning:[/bold yellow] storing the merged weights as {gguf_type} erases most of the "
                  "update (a base already on a 4-bit grid snaps back to it); keep the adapter unmerged (nomoat "
                  "adapter convert --to gguf, then llama.cpp --lora) or merge to --type q8_0 / f16", soft_wrap=True)


@adapter_app.command("convert")
def adapter_convert(
    src: Annotated[Path, typer.Argument(callback=adapter_ref_path, help="Adapter: PEFT directory, .gguf file or "
                                        "catalog name.")],
    to: Annotated[str, typer.Option("--to", help="gguf (llama.cpp LoRA adapter) or peft.")],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Output .gguf file or PEFT directory.")],
    gguf_type: Annotated[str, typer.Option("--type", help="GGUF tensor type: f32, f16 or q8_0.")] = "f32",
    model: ModelOpt = None,
) -> None:
    """Convert an adapter between PEFT and llama.cpp's GGUF LoRA format, keeping every module's scale."""
    from nomoat.adapters import convert_adapter

    convert_adapter(src, to, out_path, _model_cfg(model, True), dtype=gguf_type)
    err.print(f"wrote {out_path}")


def register(app: typer.Typer) -> None:
    app.add_typer(adapter_app, name="adapter")
