"""The architecture's one-way imports, checked on the source: a forbidden import fails here, not in review.

formats -> model (+ lora, quant) -> runtime -> serve / cli; data -> train -> adapters -> catalog; eval uses the
runtime.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "nomoat"

# package (or module) -> nomoat packages it must not import
FORBIDDEN = {
    "model": ("formats", "runtime", "lora", "quant", "kernels", "adapters", "data", "train", "eval", "serve", "cli",
              "api", "catalog"),
    # The native kernels know arrays and pointers only: no model, no file format.
    "kernels": ("formats", "runtime", "lora", "quant", "model", "adapters", "data", "train", "eval", "serve", "cli",
                "api", "catalog"),
    "lora": ("formats", "runtime", "adapters", "train", "eval", "serve", "cli", "api", "catalog"),
    "quant": ("formats", "runtime", "lora", "adapters", "train", "eval", "serve", "cli", "api", "catalog"),
    "formats": ("runtime", "adapters", "train", "eval", "serve", "cli", "api", "catalog"),
    "data": ("runtime", "adapters", "train", "eval", "serve", "cli", "api", "catalog"),
    "eval": ("train", "serve", "cli", "catalog"),
    "runtime": ("train", "serve", "cli", "eval", "catalog"),
    "adapters": ("train", "serve", "eval", "cli", "runtime", "catalog"),
    "serve": ("train", "cli"),
    "train": ("serve", "cli", "catalog"),  # training commands register their output from the cli
    # ... -> adapters -> catalog: the catalog reads models and adapters (through runtime, adapters, formats);
    # it never trains, serves or measures. serve may import it (serve --catalog).
    "catalog": ("train", "serve", "eval", "cli", "api"),
}
# Modules that hold no file I/O: they may not open files or import the file-format libraries.
NO_IO = ("lora", "quant")
IO_MODULES = ("safetensors", "gguf", "pathlib", "shutil", "tempfile", "nomoat.formats")


def _modules(pkg: str) -> list[Path]:
    p = SRC / pkg
    return sorted(p.rglob("*.py")) if p.is_dir() else [p.with_suffix(".py")]


def _imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
            out += [f"{node.module}.{a.name}" for a in node.names]
    return out


def _nomoat_target(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if parts[0] == "nomoat" and len(parts) > 1 else None


@pytest.mark.parametrize("pkg", sorted(FORBIDDEN))
def test_no_import_runs_the_wrong_way(pkg: str) -> None:
    bad = [f"{path.relative_to(SRC)} imports {name}" for path in _modules(pkg) for name in _imports(path)
           if _nomoat_target(name) in FORBIDDEN[pkg]]
    assert not bad, bad


def test_nothing_imports_the_cli() -> None:
    bad = [f"{path.relative_to(SRC)} imports {name}" for path in SRC.rglob("*.py")
           if path.relative_to(SRC).parts[0] != "cli" for name in _imports(path) if _nomoat_target(name) == "cli"]
    assert not bad, bad


@pytest.mark.parametrize("pkg", NO_IO)
def test_lora_and_quant_do_no_file_io(pkg: str) -> None:
    bad = []
    for path in _modules(pkg):
        tree = ast.parse(path.read_text(), str(path))
        bad += [f"{path.relative_to(SRC)} imports {n}" for n in _imports(path)
                if any(n == m or n.startswith(m + ".") for m in IO_MODULES)]
        bad += [f"{path.relative_to(SRC)}:{node.lineno} calls open()" for node in ast.walk(tree)
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "open"]
    assert not bad, bad


def test_the_rules_catch_a_violation(tmp_path) -> None:
    """The checker itself: an upward import written to a file is found."""
    f = tmp_path / "bad.py"
    f.write_text("from nomoat.train.sft import finetune\nimport nomoat.cli\n")
    assert [_nomoat_target(n) for n in _imports(f)] == ["train", "train", "cli"]
