"""Folding adapters into the base and exporting the merged model, with what survives the stored type."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from nomoat.adapters.artifact import base_fingerprint, load_adapter, parent_record
from nomoat.errors import NomoatError
from nomoat.formats.export import check_type, export_model, stored_round_trip
from nomoat.lora import lora_modules, merge_adapters
from nomoat.model.registry import architecture


def merge_to_model(lm: Any, adapters: Sequence[tuple[str | Path, float]] = (), force: bool = False) -> Any:
    """Load these adapters (path, weight) onto `lm` and fold every active adapter into the base weights,
    in place (``lora.merge``: W += w * s * B @ A); `lora.unmerge_adapters` takes them out again."""
    for path, weight in adapters:
        load_adapter(lm, path, weight=weight, force=force)
    merge_adapters(lm.model)
    return lm


@torch.no_grad()
def update_retention(lm: Any, ftype: str) -> float:
    """Share of the merged adapters' update that survives storing the merged weights as `ftype`:
    <stored(W + D) - W, D> / ||D||^2 over every merged module (1: all of it; 0: none).

    Merging into weights that already sit on a 4-bit grid (a Q4 base, or QLoRA) and re-quantizing to
    the same grid snaps most entries back to where they were, erasing an update far smaller than the
    quantization step; this measures that before anyone ships the file.
    """
    num = den = 0.0
    for name, mod in lora_modules(lm.model):
        if not mod.merged:
            continue
        merged = mod.base.weight.detach().float()
        delta = sum((mod.lora_B[n].float() @ mod.lora_A[n].float()) * s for n, s in mod.merged.items())
        gguf_name = architecture("llama").hf_to_gguf_name(f"{name}.weight") or ""
        kept = stored_round_trip(merged, gguf_name, ftype) - (merged - delta)
        num += float((kept.double() * delta.double()).sum())
        den += float(delta.double().square().sum())
    return num / den if den else 1.0


def merge_files(lm: Any, adapters: Sequence[tuple[str | Path, float]], out: str | Path, ftype: str = "f16",
                force: bool = False) -> tuple[Path, float]:
    """Merge adapters into `lm` and export the merged model; provenance goes into the file's metadata.

    Returns the written path and the share of the update that survived `ftype` (see update_retention).
    """
    if not adapters:
        raise NomoatError("merge: give at least one --adapter")
    check_type(Path(out), ftype)
    merge_to_model(lm, adapters, force=force)
    meta: dict[str, Any] = {"base_name": lm.name,
                            "merged_adapters": [{"path": str(p), "weight": w} for p, w in adapters],
                            "parents": [parent_record(p, "merge", w) for p, w in adapters]}
    try:
        meta["base_fingerprint"] = base_fingerprint(lm)
    except (OSError, AttributeError, NomoatError):
        pass  # an in-memory model has no checkpoint to fingerprint
    retention = update_retention(lm, ftype)
    meta["update_retention"] = round(retention, 4)
    return export_model(lm, out, ftype, meta), retention
