"""Content digests (sha256), torch-free: how the catalog and lineage records name exact content.

A file's digest is its sha256; a directory's is the sha256 of `sha256sum`-style lines for its files
("<sha256>  <relative path>", sorted by path). An adapter's digest covers only the files that define it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from nomoat.errors import NomoatError

PEFT_CORE_FILES = ("adapter_config.json", "adapter_model.safetensors")  # what defines a PEFT adapter


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def manifest_digest(files: Sequence[tuple[str, str]]) -> str:
    """sha256 of `sha256sum`-style lines ("<sha256>  <relative path>"), sorted by path: a directory's digest."""
    lines = "".join(f"{sha}  {rel}\n" for rel, sha in sorted(files))
    return hashlib.sha256(lines.encode()).hexdigest()


def adapter_digest(path: str | Path) -> str:
    """An adapter's content digest: a GGUF adapter's sha256, or for a PEFT directory the manifest digest of
    adapter_config.json and adapter_model.safetensors (side files such as logs do not change it)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    missing = [n for n in PEFT_CORE_FILES if not (path / n).is_file()]
    if missing:
        raise NomoatError(f"{path}: not an adapter directory (no {missing[0]})")
    return manifest_digest([(n, sha256_file(path / n)) for n in PEFT_CORE_FILES])
