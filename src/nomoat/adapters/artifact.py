"""The adapter as a shareable artifact: base fingerprint, provenance, and the one read/write dispatch over
PEFT directories and llama.cpp GGUF adapters; loading onto a model, stacking, inspecting, combining files."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nomoat.digests import adapter_digest
from nomoat.errors import NomoatError
from nomoat.formats.gguf_adapter import read_gguf_adapter, write_gguf_adapter
from nomoat.formats.peft import read_peft_dir, write_peft_dir
from nomoat.lora import LoraConfig, active_weights, adapter_names, adapter_state_dict, load_adapter_weights, set_active
from nomoat.lora.combine import CombineReport, combine, combined_config
from nomoat.model.config import LlamaConfig

FINGERPRINT_VERSION = "fp1"


def fingerprint_tensors(items) -> str:
    """Hash of (name, shape, float32 bytes) for every weight, in name order.

    Float32 values are hashed, not the file's bytes, so a GGUF and its float32 HF
    export have the same fingerprint when their weights are bit-identical.
    """
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(items, key=lambda kv: kv[0]):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(np.ascontiguousarray(t.detach().float().numpy()).tobytes())
    return f"{FINGERPRINT_VERSION}:{h.hexdigest()}"


def _cache_file() -> Path:
    return Path(os.environ.get("NOMOAT_CACHE", Path.home() / ".cache" / "nomoat")) / "fingerprints.json"


def base_fingerprint(lm) -> str:
    """Fingerprint of a loaded model's base weights (from its checkpoint; cached by path, size and mtime)."""
    if lm.fingerprint:
        return lm.fingerprint
    lm.fingerprint = checkpoint_fingerprint(lm.checkpoint, Path(lm.source), lm.config)
    return lm.fingerprint


def checkpoint_fingerprint(ckpt, source: Path, cfg: LlamaConfig | None = None, cache: bool = True) -> str:
    """`base_fingerprint` of a checkpoint opened but not loaded (GGUF file or HF directory); same cache
    (`cache=False` for a file about to move, such as one staged into the catalog)."""
    src = Path(source)
    st = src.stat()
    key = f"{src.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    table: dict[str, str] = {}
    try:
        table = json.loads(_cache_file().read_text()) if cache else {}
    except (OSError, json.JSONDecodeError):
        pass
    fp = table.get(key)
    if fp is None:
        cfg = cfg or ckpt.config()
        names = [n for n in ckpt.hf_names() if not (cfg.tie_word_embeddings and n == "lm_head.weight")]
        fp = fingerprint_tensors((n, ckpt.load_float(n, cfg)) for n in names)
        if not cache:
            return fp
        table[key] = fp
        try:
            path = _cache_file()
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(table))
            os.replace(tmp, path)
        except OSError:
            pass
    return fp


def parent_record(path: str | Path, relation: str, weight: float | None = None) -> dict[str, Any]:
    """How an adapter or a merged model names a parent in its provenance (`meta["parents"]`): the relation
    (finetune-on, dpo-on, combine, merge), where it was read from, and its content digest, by which the
    catalog links the two whatever the paths become."""
    rec: dict[str, Any] = {"relation": relation, "path": str(Path(path).resolve()), "digest": adapter_digest(path)}
    if weight is not None:
        rec["weight"] = weight
    return rec


def adapter_name_for(path: str | Path) -> str:
    """A default adapter name from its path: the file or directory name without a .gguf suffix, with
    characters a module parameter name cannot hold ('.') replaced ('adapter.v2' -> 'adapter_v2')."""
    p = Path(path)
    stem = p.stem if p.suffix == ".gguf" else p.name
    return re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_") or "adapter"


@dataclass
class AdapterSpec:
    """An adapter as named on the command line: `[NAME=]PATH[:WEIGHT]`."""

    path: Path
    weight: float = 1.0
    name: str = ""

    @classmethod
    def parse(cls, text: str, named: bool = False) -> AdapterSpec:
        """`PATH[:WEIGHT]`, or with `named` also `NAME=PATH[:WEIGHT]`; refuses a missing path."""
        name = ""
        if named:
            head, sep, rest = text.partition("=")
            if sep and head and "/" not in head:
                name, text = head, rest
        path, weight = text, 1.0
        head, sep, tail = text.rpartition(":")
        if sep and head:
            try:
                weight = float(tail)
                path = head
            except ValueError:
                pass
        if not path:
            raise NomoatError(f"--adapter {text!r}: no path given")
        if not math.isfinite(weight):
            raise NomoatError(f"--adapter {text!r}: the weight must be a finite number")
        if name and not re.fullmatch(r"[A-Za-z0-9_:-]+", name):
            raise NomoatError(f"--adapter {text!r}: the name {name!r} may use only letters, digits, '-', '_' and ':'")
        p = Path(path)
        if not p.exists():
            raise NomoatError(f"{p}: no such adapter")
        return cls(p, weight, name or adapter_name_for(p))


# ---- files: the one dispatch over PEFT directories and GGUF adapters ----
def read_adapter(path: str | Path, model_cfg: LlamaConfig | None = None
                 ) -> tuple[LoraConfig, dict[str, torch.Tensor], dict[str, float], dict[str, Any]]:
    """A PEFT directory or a GGUF LoRA adapter (which needs the base model's config)."""
    path = Path(path)
    if not path.exists():
        raise NomoatError(f"{path}: no such adapter")
    if path.is_file():
        if path.suffix != ".gguf":
            raise NomoatError(f"{path}: an adapter is a PEFT directory or a .gguf file")
        if model_cfg is None:
            raise NomoatError(f"{path}: reading a GGUF adapter needs the base model (--model)")
        return read_gguf_adapter(path, model_cfg)
    return read_peft_dir(path)


def write_adapter(out: str | Path, cfg: LoraConfig, tensors: dict[str, torch.Tensor], scales: dict[str, float],
                  meta: dict[str, Any], model_cfg: LlamaConfig | None = None, dtype: str = "f32") -> Path:
    """`out` ending in .gguf: a llama.cpp adapter (needs `model_cfg`); anything else: a PEFT directory."""
    out = Path(out)
    if out.suffix == ".gguf":
        if model_cfg is None:
            raise NomoatError(f"{out}: writing a GGUF adapter needs the base model (--model)")
        return write_gguf_adapter(out, cfg, tensors, scales, model_cfg, meta, dtype=dtype)
    base = str(meta.get("base_model_name_or_path") or meta.get("base_name") or "")
    return write_peft_dir(out, cfg, tensors, base, meta)


def combine_files(sources: Sequence[tuple[str | Path, float]], out: str | Path, how: str, rank: int | None = None,
                  density: float = 0.2, model_cfg: LlamaConfig | None = None, force: bool = False
                  ) -> CombineReport:
    """Read adapters, combine them, write the result (PEFT directory, or GGUF when `out` ends in .gguf)."""
    read = [(Path(p), w, read_adapter(p, model_cfg)) for p, w in sources]
    prints = {m.get("base_fingerprint") for _, _, (_, _, _, m) in read} - {None}
    if len(prints) > 1 and not force:
        raise NomoatError(f"adapters were trained on different bases ({', '.join(sorted(prints))}); "
                          "pass --force to combine them anyway")
    tensors, scales, report = combine([(t, s, w) for _, w, (_, t, s, _) in read], how, rank, density)
    first = read[0][2][3]
    meta: dict[str, Any] = {k: first[k] for k in ("base_name", "base_source", "base_model_name_or_path")
                            if first.get(k)}
    if len(prints) == 1:
        meta["base_fingerprint"] = next(iter(prints))
    meta["combined_from"] = [{"path": str(p), "weight": w, "base_fingerprint": m.get("base_fingerprint")}
                             for p, w, (_, _, _, m) in read]
    meta["parents"] = [parent_record(p, "combine", w) for p, w, _ in read]
    meta["combine"] = {k: v for k, v in report.as_dict().items() if k != "modules"}
    write_adapter(out, combined_config(tensors, scales), tensors, scales, meta, model_cfg)
    return report


def convert_adapter(src: str | Path, to: str, out: str | Path, model_cfg: LlamaConfig, dtype: str = "f32") -> Path:
    """PEFT directory <-> llama.cpp GGUF adapter, scales and nomoat metadata preserved."""
    if to not in ("gguf", "peft"):
        raise NomoatError(f"--to {to!r} is not supported (supported: gguf, peft)")
    out = Path(out)
    if (out.suffix == ".gguf") != (to == "gguf"):
        raise NomoatError(f"--out {out}: a GGUF adapter must end in .gguf and a PEFT directory must not")
    cfg, tensors, scales, meta = read_adapter(src, model_cfg)
    return write_adapter(out, cfg, tensors, scales, meta, model_cfg, dtype=dtype)


def save_adapter(model: torch.nn.Module, out: str | Path, cfg: LoraConfig, base_name: str,
                 meta: dict[str, Any], name: str = "default", extra_files: dict[str, bytes] | None = None) -> Path:
    tensors = adapter_state_dict(model, name)
    return write_peft_dir(out, cfg, tensors, base_name, meta, extra_files=extra_files)


def load_adapter(lm, path: str | Path, name: str | None = None, weight: float = 1.0, force: bool = False,
                 activate: bool = True) -> str:
    """Attach a PEFT adapter directory to a loaded model (unmerged); returns its name.

    The adapter's recorded base fingerprint must match the loaded base unless `force`.
    """
    path = Path(path)
    cfg, tensors, scales, meta = read_adapter(path, lm.config)
    want = meta.get("base_fingerprint")
    if want and not force:
        have = base_fingerprint(lm)
        if want != have:
            raise NomoatError(
                f"{path}: adapter was trained on base {meta.get('base_name', '?')} ({want}), but the loaded "
                f"model is {lm.name} ({have}); pass --force to apply it anyway")
    name = name or adapter_name_for(path)
    existing = adapter_names(lm.model)
    base, i = name, 2
    while name in existing:
        name, i = f"{base}-{i}", i + 1
    current = active_weights(lm.model)
    load_adapter_weights(lm.model, tensors, scales, name=name, dropout=0.0)
    if activate:
        current[name] = weight
    set_active(lm.model, current)  # a new adapter is switched off unless `activate`
    return name


def adapter_info(path: str | Path, model_cfg=None) -> dict[str, Any]:
    """What an adapter is: method, rank, alpha, targets, sizes, provenance.

    A llama.cpp GGUF adapter needs the base's config (`model_cfg`) to map its tensors.
    """
    path = Path(path)
    cfg, tensors, scales, meta = read_adapter(path, model_cfg)
    size = path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    n_params = sum(t.numel() for t in tensors.values())
    return {"path": str(path), "method": "LoRA" + (" (rsLoRA)" if cfg.rslora else ""), "rank": cfg.r,
            "alpha": cfg.alpha, "targets": cfg.targets, "modules": len(scales), "parameters": n_params,
            "bytes": size, "meta": meta}
