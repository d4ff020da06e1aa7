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


# adapter_config.json keys nomoat reads, with the JSON types PEFT writes them as (null is always allowed).
_CONFIG_TYPES: dict[str, tuple[type, ...]] = {
    "r": (int,), "lora_alpha": (int, float), "lora_dropout": (int, float), "use_rslora": (bool,),
    "use_dora": (bool,), "fan_in_fan_out": (bool,), "rank_pattern": (dict,), "alpha_pattern": (dict,),
    "target_modules": (list, str), "peft_type": (str,), "bias": (str,), "modules_to_save": (list,),
    "layers_to_transform": (list, int), "base_model_name_or_path": (str,)}
_JSON_NAMES = {int: "an integer", float: "a number", bool: "true or false", dict: "an object", list: "a list",
               str: "a string"}
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _check_config(raw: dict[str, Any], modules: list[str], src: str) -> None:
    """Types and values of the adapter's config, and its consistency with the tensors: what PEFT would apply
    differently (other modules or layers, DoRA, biases, transposed weights) is refused, not ignored."""
    for key, kinds in _CONFIG_TYPES.items():
        v = raw.get(key)
        if v is not None and (not isinstance(v, kinds) or (isinstance(v, bool) and bool not in kinds)):
            want = " or ".join(_JSON_NAMES[k] for k in kinds)
            raise NomoatError(f"{src}: {key} = {json.dumps(v)[:60]} is not {want}")
    if raw.get("peft_type", "LORA") != "LORA":
        raise NomoatError(f"{src}: peft_type {raw.get('peft_type')!r} is not supported (only LORA)")
    for key, ok in (("use_dora", False), ("fan_in_fan_out", False), ("bias", "none")):
        if raw.get(key) not in (ok, None):
            raise NomoatError(f"{src}: {key} = {json.dumps(raw[key])} is not supported (only {json.dumps(ok)})")
    if raw.get("modules_to_save"):
        raise NomoatError(f"{src}: modules_to_save {raw['modules_to_save']} (full embedding/head copies) "
                          "is not supported")
    layers = raw.get("layers_to_transform")
    if layers is not None:
        allowed = {layers} if isinstance(layers, int) else set(layers)
        outside = next((m for m in modules if (g := _LAYER.search(m)) and int(g.group(1)) not in allowed), None)
        if outside is not None:
            raise NomoatError(f"{src}: layers_to_transform {layers} leaves out {outside}, which has weights")
    targets = raw.get("target_modules")
    if isinstance(targets, list):
        missed = next((m for m in modules if not any(isinstance(t, str) and (m == t or m.endswith("." + t))
                                                       for t in targets)), None)
    elif isinstance(targets, str) and targets != "all-linear":
        try:
            missed = next((m for m in modules if not re.fullmatch(targets, m)), None)
        except re.error as e:
            raise NomoatError(f"{src}: target_modules {targets!r} is not a valid regular expression ({e})") from None
    else:
        missed = None
    if missed is not None:
        raise NomoatError(f"{src}: target_modules {json.dumps(targets)[:80]} does not cover {missed}, which has "
                          "weights (PEFT would not apply them)")


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
    _check_config(raw, modules, src)

    def get(key: str, default: Any) -> Any:
        return default if raw.get(key) is None else raw[key]

    try:
        cfg = LoraConfig(r=get("r", 8), alpha=float(get("lora_alpha", 8)),  # PEFT's defaults
                         dropout=float(get("lora_dropout", 0.0)),
                         targets=_targets_from_config(raw.get("target_modules"), modules, src),
                         rslora=get("use_rslora", False), rank_pattern=dict(get("rank_pattern", {})),
                         alpha_pattern=dict(get("alpha_pattern", {})))
    except NomoatError as e:
        raise NomoatError(f"{src}: {e}") from None
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
        except (json.JSONDecodeError, RecursionError):
            meta = {}
        meta = meta if isinstance(meta, dict) else {}
    meta.setdefault("base_model_name_or_path", raw.get("base_model_name_or_path"))
    return cfg, tensors, scales, meta
