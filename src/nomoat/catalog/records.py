"""Results attached to catalog entries (`--record` on eval and judge; the arena's ratings): what was measured
on which exact content, so that `nomoat adapters list` shows each adapter's scores beside it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nomoat.catalog.resolve import artifact_for_path
from nomoat.catalog.store import Artifact, Catalog
from nomoat.errors import NomoatError


def model_artifact(path: str | Path, cat: Catalog) -> Artifact | None:
    """The catalog entry of a model file (the embedded default gets a row of its own on first use)."""
    from nomoat.runtime.loading import default_model_path

    p = Path(path)
    try:
        is_default = p.resolve() == default_model_path().resolve()
    except NomoatError:
        is_default = False
    if is_default:
        from nomoat.adapters.artifact import checkpoint_fingerprint
        from nomoat.digests import sha256_file
        from nomoat.runtime.loading import open_checkpoint

        return cat.ensure_external("model", sha256_file(p), "gguf", p.resolve(),
                                   checkpoint_fingerprint(open_checkpoint(p), p), {"external": True})
    return artifact_for_path(p, "model", cat)


def adapter_artifacts(paths: Sequence[str | Path], cat: Catalog, what: str = "--record") -> list[Artifact]:
    """The catalog entries of these adapters; a one-line error naming the first that is not in the catalog
    (checked before a long run, so --record cannot fail at the end)."""
    out = []
    for p in paths:
        art = artifact_for_path(p, "adapter", cat)
        if art is None:
            raise NomoatError(f"{what}: the adapter {p} is not in the catalog; add it first (nomoat adapters add "
                              f"{p}) or drop {what}")
        out.append(art)
    return out


def record_result(kind: str, metric: str, value: float, model: str | Path | None,
                  adapters: Sequence[str | Path] = (), detail: dict[str, Any] | None = None,
                  cat: Catalog | None = None) -> list[str]:
    """Attach one measurement: to each adapter of the stack (marked as measured in a stack when several),
    or to the model when there are none. Returns what was recorded where, as lines to print.

    The hook the arena's `ratings --record` calls with each contestant's rating.
    """
    cat = cat or Catalog()
    detail = dict(detail or {})
    if adapters:
        arts = adapter_artifacts(adapters, cat)
        if len(arts) > 1:
            detail["stack"] = [a.label for a in arts]
        for a in arts:
            cat.add_result(a, kind, metric, value, detail)
        return [f"recorded {metric} {value:.4g} on {', '.join(a.label for a in arts)}"]
    if model is None:
        return []
    art = model_artifact(model, cat)
    if art is None:
        return [f"not recorded on the base: {model} is not in the catalog"]
    cat.add_result(art, kind, metric, value, detail)
    return [f"recorded {metric} {value:.4g} on {art.label if art.names else 'default'}"]
