"""Adapters as shareable artifacts: base fingerprints, saving, loading, stacking and inspecting."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nomoat.errors import NomoatError
from nomoat.formats.peft import read_peft_dir, write_peft_dir
from nomoat.lora import LoraConfig, adapter_names, adapter_state_dict, load_adapter_weights, set_active

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
    if getattr(lm, "_fingerprint", None):
        return lm._fingerprint
    src = Path(lm.source)
    st = src.stat()
    key = f"{src.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    cache = _cache_file()
    table: dict[str, str] = {}
    try:
        table = json.loads(cache.read_text())
    except (OSError, json.JSONDecodeError):
        pass
    fp = table.get(key)
    if fp is None:
        ckpt, cfg = lm.checkpoint, lm.config
        names = [n for n in ckpt.hf_names() if not (cfg.tie_word_embeddings and n == "lm_head.weight")]
        fp = fingerprint_tensors((n, ckpt.load_float(n, cfg)) for n in names)
        table[key] = fp
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp")
            tmp.write_text(json.dumps(table))
            os.replace(tmp, cache)
        except OSError:
            pass
    lm._fingerprint = fp
    return fp


@dataclass
class AdapterSpec:
    """`path[:weight]` as given on the command line."""

    path: Path
    weight: float = 1.0
    name: str = ""

    @classmethod
    def parse(cls, text: str) -> AdapterSpec:
        path, weight = text, 1.0
        head, sep, tail = text.rpartition(":")
        if sep and head:
            try:
                weight = float(tail)
                path = head
            except ValueError:
                pass
        p = Path(path)
        return cls(p, weight, p.name or "adapter")


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
    if path.is_file() and path.suffix == ".gguf":
        from nomoat.formats.gguf_adapter import read_gguf_adapter

        cfg, tensors, scales, meta = read_gguf_adapter(path, lm.config)
    else:
        cfg, tensors, scales, meta = read_peft_dir(path)
    want = meta.get("base_fingerprint")
    if want and not force:
        have = base_fingerprint(lm)
        if want != have:
            raise NomoatError(
                f"{path}: adapter was trained on base {meta.get('base_name', '?')} ({want}), but the loaded "
                f"model is {lm.name} ({have}); pass --force to apply it anyway")
    name = name or path.stem or "adapter"
    existing = adapter_names(lm.model)
    base, i = name, 2
    while name in existing:
        name, i = f"{base}-{i}", i + 1
    load_adapter_weights(lm.model, tensors, scales, name=name, dropout=0.0)
    if activate:
        current = active_weights(lm.model)
        current[name] = weight
        set_active(lm.model, current)
    return name


def active_weights(model: torch.nn.Module) -> dict[str, float]:
    from nomoat.lora import lora_modules

    out: dict[str, float] = {}
    for _, mod in lora_modules(model):
        for n in mod.active:
            out.setdefault(n, mod.weights[n])
    return out


def adapter_info(path: str | Path, model_cfg=None) -> dict[str, Any]:
    """What an adapter is: method, rank, alpha, targets, sizes, provenance.

    A llama.cpp GGUF adapter needs the base's config (`model_cfg`) to map its tensors.
    """
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        from nomoat.formats.gguf_adapter import read_gguf_adapter

        if model_cfg is None:
            raise NomoatError(f"{path}: reading a GGUF adapter needs the base model's config")
        cfg, tensors, scales, meta = read_gguf_adapter(path, model_cfg)
        size = path.stat().st_size
    else:
        cfg, tensors, scales, meta = read_peft_dir(path)
        size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    n_params = sum(t.numel() for t in tensors.values())
    return {"path": str(path), "method": "LoRA" + (" (rsLoRA)" if cfg.rslora else ""), "rank": cfg.r,
            "alpha": cfg.alpha, "targets": cfg.targets, "modules": len(scales), "parameters": n_params,
            "bytes": size, "meta": meta}
