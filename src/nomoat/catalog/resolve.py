"""Names wherever a path works: the one place a `--model` or `--adapter` value becomes a path.

A path that exists wins over a name; `default` is the embedded model; anything else is looked up in the
catalog and its files are checked against their recorded sha256 before the path is handed out. An
unknown name that is no path either is a one-line error listing the closest names.
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path

from nomoat.catalog.names import DEFAULT_MODEL, parse_ref
from nomoat.catalog.store import Artifact, Catalog
from nomoat.errors import NomoatError


def _close(cat: Catalog, kind: str, text: str) -> str:
    names = cat.names(kind) + ([DEFAULT_MODEL] if kind == "model" else [])
    short = sorted({n.split(":")[0] for n in names})
    close = difflib.get_close_matches(text, sorted(set(names) | set(short)), n=4, cutoff=0.5)
    if close:
        return f"; close: {', '.join(close)}"
    if names:
        shown = names[:8]
        return f"; the catalog has: {', '.join(shown)}{', ...' if len(names) > 8 else ''}"
    return f"; the catalog ({cat.home}) has no {kind}s yet"


def _lookup(cat: Catalog, kind: str, text: str, what: str) -> Artifact:
    ref = parse_ref(text)
    art = cat.find(kind, ref) if ref is not None else None
    if art is None:
        raise NomoatError(f"{what} {text}: no such file or directory, and no {kind} of that name in the catalog"
                          + _close(cat, kind, text))
    return art


def lookup_model(cat: Catalog, text: str, what: str = "--model") -> Artifact:
    """The catalog model a name points at (a clear error with close names when none)."""
    return _lookup(cat, "model", text, what)


def lookup_adapter(cat: Catalog, text: str, what: str = "--adapter") -> Artifact:
    """The catalog adapter a name points at (a clear error with close names when none)."""
    return _lookup(cat, "adapter", text, what)


def resolve_model(text: str | None, what: str = "--model", cat: Catalog | None = None) -> str | None:
    """A model path for a `--model` value: an existing path as given, `default`, or a catalog name."""
    if text is None or Path(text).exists() or (parse_ref(text) is None and text != DEFAULT_MODEL):
        return text  # a path (or nothing a catalog could name): the loader reports what is wrong with it
    if text == DEFAULT_MODEL:
        from nomoat.runtime.loading import default_model_path

        return str(default_model_path())
    cat = cat or Catalog()
    return str(cat.verified_path(lookup_model(cat, text, what)))


def _is_weight(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def resolve_adapter(text: str, named: bool = False, what: str = "--adapter", cat: Catalog | None = None) -> str:
    """An `--adapter` value (`[NAME=]PATH_OR_NAME[:WEIGHT]`) with a catalog name replaced by its path.

    With `named` (commands that serve adapters under names), an adapter given by catalog name alone is
    named after it: `dates:v1` becomes `dates:v1=<path>`.
    """
    prefix, body = "", text
    head, sep, rest = text.partition("=")
    if sep and head and "/" not in head and "\\" not in head:
        prefix, body = f"{head}=", rest
    if Path(body).exists():
        return text
    ref_text, weight = body, ""
    h, sep, t = body.rpartition(":")
    if sep and h and _is_weight(t):
        ref_text, weight = h, f":{t}"
    if Path(ref_text).exists() or parse_ref(ref_text) is None:
        return text  # a path (or nothing the catalog could name): AdapterSpec reports what is wrong
    cat = cat or Catalog()
    art = lookup_adapter(cat, ref_text, what)
    path = cat.verified_path(art)
    if named and not prefix:
        prefix = ref_text.replace(".", "_") + "="  # a module name cannot hold '.'
    return f"{prefix}{path}{weight}"


def artifact_for_path(path: str | Path, kind: str, cat: Catalog | None = None) -> Artifact | None:
    """The live catalog artifact whose content is at `path` (a stored entry, or the same content elsewhere)."""
    from nomoat.digests import adapter_digest, sha256_file

    cat = cat or Catalog()
    if not cat.exists:
        return None
    p = Path(path).resolve()
    entries = (cat.home / "entries").resolve()
    if p.is_relative_to(entries):
        art = cat.get(p.relative_to(entries).parts[0])
    elif kind == "adapter":
        art = cat.get(adapter_digest(p))
    elif p.is_file():
        art = cat.get(sha256_file(p))
    else:
        from nomoat.catalog.ingest import content_digest

        art = cat.get(content_digest(p, "model"))
    return art if art is not None and art.removed is None and art.kind == kind else None
