"""Hugging Face PEFT LoRA directories: adapter_config.json + adapter_model.safetensors.

nomoat's own metadata rides in the safetensors header (key ``nomoat``) and in a side
file, ``nomoat_adapter.json``, which PEFT ignores.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from nomoat.errors import NomoatError
from nomoat.formats.hf import read_json
from nomoat.lora import ALL_LINEAR, LoraConfig

PEFT_PREFIX = "base_model.model."
META_FILE = "nomoat_adapter.json"
_KEY = re.compile(r"^(?:base_model\.model\.)?(.+?)\.(lora_[AB])(?:\.[A-Za-z0-9_]+)?\.weight$")


def peft_config_dict(cfg: LoraConfig, base_name: str) -> dict[str, Any]:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": sorted(cfg.targets),
        "use_rslora": cfg.rslora,
        "rank_pattern": dict(cfg.rank_pattern),
        "alpha_pattern": dict(cfg.alpha_pattern),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "use_dora": False,
        "revision": None,
    }


def atomic_write(path: Path, data: bytes) -> None:
    """Write a file so that readers see the old or the new content, never half of it."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_peft_dir(out: str | Path, cfg: LoraConfig, tensors: dict[str, torch.Tensor], base_name: str,
                   meta: dict[str, Any], extra_files: dict[str, bytes] | None = None) -> Path:
    """Write the adapter files (each atomically); `tensors` use the model's module paths.

    Other files in `out` (a run's checkpoint, logs) are left alone.
    """
    from safetensors.torch import save

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    peft = {PEFT_PREFIX + k: v.detach().float().contiguous() for k, v in tensors.items()}
    atomic_write(out / "adapter_model.safetensors",
                 save(peft, metadata={"format": "pt", "nomoat": json.dumps(meta, sort_keys=True)}))
    atomic_write(out / "adapter_config.json", json.dumps(peft_config_dict(cfg, base_name), indent=2).encode())
    atomic_write(out / META_FILE, json.dumps(meta, indent=2, sort_keys=True).encode())
    for name, data in (extra_files or {}).items():
        atomic_write(out / name, data)
    return out


def _targets_from_config(raw: Any, tensors_modules: list[str], source: str) -> list[str]:
    leaves = sorted({m.rsplit(".", 1)[-1] for m in tensors_modules})
    unknown = [t for t in leaves if t not in ALL_LINEAR]
    if unknown:
        raise NomoatError(f"{source}: adapter targets {unknown}, which nomoat's LLaMA model does not have "
                          f"(supported: {', '.join(ALL_LINEAR)})")
    return leaves


def read_peft_dir(path: str | Path) -> tuple[LoraConfig, dict[str, torch.Tensor], dict[str, float], dict[str, Any]]:
    """(config, tensors keyed '<module>.lora_A.weight', per-module scale, nomoat metadata)."""
    path = Path(path)
    cfg_path = path / "adapter_config.json"
    if not path.is_dir():
        raise NomoatError(f"{path}: not an adapter directory")
    raw = read_json(cfg_path)
    src = str(cfg_path)
    if raw.get("peft_type", "LORA") != "LORA":
        raise NomoatError(f"{src}: peft_type {raw.get('peft_type')!r} is not supported (only LORA)")
    for key, bad in (("use_dora", True), ("bias", "all"), ("bias", "lora_only")):
        if raw.get(key) == bad:
            raise NomoatError(f"{src}: {key} = {bad!r} is not supported")
    if raw.get("modules_to_save"):
        raise NomoatError(f"{src}: modules_to_save {raw['modules_to_save']} (full embedding/head copies) "
                          "is not supported")
    if raw.get("fan_in_fan_out"):
        raise NomoatError(f"{src}: fan_in_fan_out adapters are not for LLaMA linears")
    st = path / "adapter_model.safetensors"
    if not st.exists():
        if (path / "adapter_model.bin").exists():
            raise NomoatError(f"{path}: adapter_model.bin is pickle, which nomoat never loads; "
                              "re-save it with safetensors")
        raise NomoatError(f"{path}: no adapter_model.safetensors")
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(st), framework="pt") as f:
            header_meta = f.metadata() or {}
            for key in f.keys():
                m = _KEY.match(key)
                if not m:
                    raise NomoatError(f"{st}: unexpected tensor {key!r}")
                dtype = f.get_slice(key).get_dtype()
                if dtype not in ("F32", "F16", "BF16", "F64"):
                    raise NomoatError(f"{st}: tensor {key} is stored as {dtype}, not a float type")
                tensors[f"{m.group(1)}.{m.group(2)}.weight"] = f.get_tensor(key).float()
    except NomoatError:
        raise
    except Exception as e:
        raise NomoatError(f"{st}: not a valid safetensors file ({e})") from None
    modules = sorted({k.rsplit(".", 2)[0] for k in tensors})
    for mod in modules:
        a, b = tensors.get(f"{mod}.lora_A.weight"), tensors.get(f"{mod}.lora_B.weight")
        if a is None or b is None:
            raise NomoatError(f"{st}: {mod} has lora_A or lora_B missing")
    try:
        cfg = LoraConfig(r=int(raw.get("r", 8)), alpha=float(raw.get("lora_alpha", 8)),  # PEFT's default
                         dropout=float(raw.get("lora_dropout") or 0.0),
                         targets=_targets_from_config(raw.get("target_modules"), modules, src),
                         rslora=bool(raw.get("use_rslora", False)),
                         rank_pattern=dict(raw.get("rank_pattern") or {}),
                         alpha_pattern=dict(raw.get("alpha_pattern") or {}))
    except (TypeError, ValueError) as e:
        raise NomoatError(f"{src}: bad value ({e})") from None
    scales = {}
    for mod in modules:
        r = tensors[f"{mod}.lora_A.weight"].shape[0]
        if r != cfg.rank_for(mod):
            raise NomoatError(f"{st}: {mod} has rank {r}, the config says {cfg.rank_for(mod)}")
        scales[mod] = cfg.scale_for(mod)
    meta: dict[str, Any] = {}
    side = path / META_FILE
    if side.exists():
        meta = read_json(side)
    elif "nomoat" in header_meta:
        try:
            meta = json.loads(header_meta["nomoat"])
        except json.JSONDecodeError:
            meta = {}
    meta.setdefault("base_model_name_or_path", raw.get("base_model_name_or_path"))
    return cfg, tensors, scales, meta
