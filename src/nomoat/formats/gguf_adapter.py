"""llama.cpp's GGUF LoRA adapter format (``general.type = adapter``, ``adapter.type = lora``).

Tensors are ``<base GGUF name>.lora_a`` [r, in] and ``.lora_b`` [out, r] (PEFT's orientation);
lora_b rows of q/k carry llama.cpp's rotary permutation, lora_a is unchanged. llama.cpp applies
``y = W x + (alpha / r_t) * B (A x)`` with one file-wide ``adapter.lora.alpha`` (F32) and the
tensor's own rank r_t, so rsLoRA or per-module rank/alpha cannot be said with alpha alone: every
module's true scale s_t is folded into its lora_b by ``s_t * r_t / alpha``. alpha is chosen so the
most common (rank, scale) pair folds by exactly 1; nomoat's LoRA config rides along in
``nomoat.lora_config`` so reading back restores the original config and lora_b.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nomoat import __version__
from nomoat.errors import NomoatError
from nomoat.formats.gguf_read import GGUFTensor, check_header, parse_gguf, qk_permute_rows, qk_row_order
from nomoat.formats.gguf_write import atomic_gguf_writer
from nomoat.lora import LoraConfig
from nomoat.lora.tensors import check_lora_pair, check_lora_shapes, common_pair, lora_config_for, lora_modules_of
from nomoat.model.config import LlamaConfig
from nomoat.model.registry import architecture

ADAPTER_DTYPES = ("f32", "f16", "q8_0")
_READ_TYPES = {"F32", "F16", "BF16", "Q8_0"}
_FOLD_TOL = 1e-6  # a fold factor this close to 1 is 1: alpha is stored as F32 anyway


def _file_alpha(ranks: dict[str, int], scales: dict[str, float]) -> float:
    r0, s0 = common_pair(ranks, scales)
    alpha = float(np.float32(s0 * r0))
    return alpha if math.isfinite(alpha) and alpha > 0 else float(r0)


def _fold(scale: float, r: int, alpha: float) -> float:
    f = scale * r / alpha
    return 1.0 if abs(f - 1.0) <= _FOLD_TOL else f


def _as_dtype(a: np.ndarray, dtype: str) -> tuple[np.ndarray, Any]:
    import gguf

    T = gguf.GGMLQuantizationType
    if dtype == "q8_0" and a.shape[-1] % 32 == 0:
        return gguf.quants.quantize(a, T.Q8_0), T.Q8_0
    if dtype in ("f16", "q8_0"):  # rows not a multiple of 32 (lora_b of rank < 32): F16, as llama.cpp does
        return a.astype(np.float16), None
    return a, None


def write_gguf_adapter(path: str | Path, cfg: LoraConfig, tensors: dict[str, torch.Tensor],
                       scales: dict[str, float], model_cfg: LlamaConfig, meta: dict[str, Any],
                       dtype: str = "f32") -> Path:
    """Write a llama.cpp LoRA adapter; every module comes out with its exact scale (see the module doc).

    Args:
        tensors: '<module>.lora_A.weight' [r, in] / '<module>.lora_B.weight' [out, r] in HF row order.
        scales: the true per-module scale (alpha / r, alpha / sqrt(r), or anything else).
        model_cfg: the base model's config, for shapes and the q/k permutation.
        meta: nomoat's metadata (base fingerprint, provenance), stored as ``nomoat.*`` keys.
        dtype: f32, f16 or q8_0 (tensors whose rows are not a multiple of 32 fall back to F16).
    """
    import gguf

    path = Path(path)
    if dtype not in ADAPTER_DTYPES:
        raise NomoatError(f"adapter GGUF type {dtype!r} is not one of {', '.join(ADAPTER_DTYPES)}")
    src = str(path)
    arch = architecture("llama")
    mods = lora_modules_of(tensors, src)
    ranks: dict[str, int] = {}
    for mod in mods:
        A, B = tensors[f"{mod}.lora_A.weight"], tensors[f"{mod}.lora_B.weight"]
        ranks[mod] = check_lora_pair(mod, A, B, arch.linear_shape(mod, model_cfg), src)
        s = scales.get(mod)
        if s is None or not math.isfinite(s):
            raise NomoatError(f"{src}: no finite scale for {mod}")
    alpha = _file_alpha(ranks, scales)
    record_cfg = all(cfg.rank_for(m) == ranks[m] and math.isclose(cfg.scale_for(m), scales[m], rel_tol=1e-9)
                     for m in mods)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_gguf_writer(path) as w:
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        w.add_name(str(meta.get("name") or path.stem))
        w.add_file_type({"f32": 0, "f16": 1, "q8_0": 7}[dtype])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        base_name = meta.get("base_name") or meta.get("base_model_name_or_path")
        if base_name:
            w.add_base_model_count(1)
            w.add_base_model_name(0, str(base_name))
        w.add_string("nomoat.version", __version__)
        for key in ("base_fingerprint", "base_name", "base_source"):
            if meta.get(key):
                w.add_string(f"nomoat.{key}", str(meta[key]))
        w.add_string("nomoat.meta", json.dumps(meta, sort_keys=True, default=str))
        if record_cfg:
            w.add_string("nomoat.lora_config", json.dumps(cfg.as_dict(), sort_keys=True))
        for mod in mods:
            A = tensors[f"{mod}.lora_A.weight"].detach().float()
            B = tensors[f"{mod}.lora_B.weight"].detach().float()
            f = _fold(scales[mod], ranks[mod], alpha)
            if f != 1.0:
                B = (B.double() * f).float()
            heads = arch.qk_heads(mod, model_cfg)
            if heads is not None:
                B = B[qk_permute_rows(B.shape[0], heads)]
            name = arch.hf_to_gguf_name(f"{mod}.weight")
            for suffix, t in ((".lora_a", A), (".lora_b", B)):
                data, raw = _as_dtype(np.ascontiguousarray(t.numpy()), dtype)
                w.add_tensor(f"{name}{suffix}", data, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    return path


@dataclass
class _AdapterFile:
    """A GGUF adapter's metadata and tensors, read by the same strict parser as model files (duplicate keys,
    alignment, offsets tiling the data section: an offset moved into another tensor is refused, not read)."""

    fields: dict[str, Any]
    tensors: list[GGUFTensor]


def _contents(reader: _AdapterFile, key: str, path: Path) -> Any:
    return reader.fields.get(key)


def _recorded_config(text: Any, path: Path) -> LoraConfig | None:
    if not isinstance(text, str):
        return None
    try:
        d = json.loads(text)
        return LoraConfig(r=int(d["r"]), alpha=float(d["alpha"]), dropout=float(d.get("dropout", 0.0)),
                          targets=list(d["targets"]), rslora=bool(d.get("rslora", False)),
                          rank_pattern=dict(d.get("rank_pattern") or {}),
                          alpha_pattern=dict(d.get("alpha_pattern") or {}))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, NomoatError):
        return None


def read_gguf_adapter(path: str | Path, model_cfg: LlamaConfig
                      ) -> tuple[LoraConfig, dict[str, torch.Tensor], dict[str, float], dict[str, Any]]:
    """(config, tensors keyed '<module>.lora_A.weight' in HF row order, per-module scale, nomoat metadata).

    Every shape is checked against `model_cfg` from the tensor headers before any data is read.
    """
    import gguf

    path = Path(path)
    reader = _open_adapter(path)
    atype = _contents(reader, "adapter.type", path)
    if atype != "lora":
        raise NomoatError(f"{path}: adapter.type {atype!r} is not supported (only lora)")
    arch_name = _contents(reader, "general.architecture", path)
    if arch_name != "llama":
        raise NomoatError(f"{path}: general.architecture {arch_name!r} does not match the base model (llama)")
    arch = architecture(arch_name)
    alpha = _contents(reader, "adapter.lora.alpha", path)
    if alpha is not None and (type(alpha) not in (int, float) or not math.isfinite(alpha)):
        raise NomoatError(f"{path}: adapter.lora.alpha {alpha!r} is not a finite number")
    size = path.stat().st_size
    found: dict[str, dict[str, Any]] = {}
    for t in reader.tensors:
        if t.name.endswith("_norm.weight"):
            continue  # llama.cpp ignores these too (mergekit writes them)
        base, dot, suffix = t.name.rpartition(".")
        if not dot or suffix not in ("lora_a", "lora_b"):
            raise NomoatError(f"{path}: tensor {t.name} is not a .lora_a or .lora_b tensor")
        hf = arch.gguf_to_hf_name(base)
        mod = hf[: -len(".weight")] if hf else base
        if arch.linear_shape(mod, model_cfg) is None:
            raise NomoatError(f"{path}: tensor {t.name} targets {base}, which the model does not have")
        if t.tensor_type.name not in _READ_TYPES:
            raise NomoatError(f"{path}: tensor {t.name} has unsupported type {t.tensor_type.name}")
        if t.data_offset + t.n_bytes > size:
            raise NomoatError(f"{path}: tensor {t.name} runs past the end of the file (truncated)")
        found.setdefault(mod, {})[suffix] = t
    if not found:
        raise NomoatError(f"{path}: the adapter has no LoRA tensors")
    ranks: dict[str, int] = {}
    for mod, pair in found.items():
        if set(pair) != {"lora_a", "lora_b"}:
            raise NomoatError(f"{path}: {mod} has lora_a or lora_b missing")
        a_shape = tuple(int(s) for s in reversed(pair["lora_a"].shape.tolist()))
        b_shape = tuple(int(s) for s in reversed(pair["lora_b"].shape.tolist()))
        ranks[mod] = check_lora_shapes(mod, a_shape, b_shape, arch.linear_shape(mod, model_cfg), str(path))
    tensors: dict[str, torch.Tensor] = {}
    for mod, pair in found.items():
        for suffix, key in (("lora_a", "lora_A"), ("lora_b", "lora_B")):
            t = pair[suffix]
            arr = np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
            shape = tuple(int(s) for s in reversed(t.shape.tolist()))
            tensors[f"{mod}.{key}.weight"] = torch.from_numpy(arr.reshape(shape))
        B = tensors[f"{mod}.lora_B.weight"]
        heads = arch.qk_heads(mod, model_cfg)
        if heads is not None:
            B = B[qk_row_order(B.shape[0], heads)].contiguous()
        tensors[f"{mod}.lora_B.weight"] = B
        check_lora_pair(mod, tensors[f"{mod}.lora_A.weight"], B, arch.linear_shape(mod, model_cfg), str(path))
    # llama.cpp's semantics: alpha / r per tensor, or 1 when the file has no alpha.
    file_scales = {m: (float(alpha) / r if alpha else 1.0) for m, r in ranks.items()}
    orig = _recorded_config(_contents(reader, "nomoat.lora_config", path), path)
    cfg: LoraConfig | None = None
    leaves = {m.rsplit(".", 1)[-1] for m in ranks}
    if orig is not None and alpha and leaves <= set(orig.targets) \
            and all(orig.rank_for(m) == r for m, r in ranks.items()):
        true_scales = {m: orig.scale_for(m) for m in ranks}
        if math.isclose(_file_alpha(ranks, true_scales), float(alpha), rel_tol=1e-6):
            cfg = orig
            for m, r in ranks.items():  # unfold: restore the adapter's own lora_b
                f = _fold(true_scales[m], r, float(alpha))
                if f != 1.0:
                    key = f"{m}.lora_B.weight"
                    tensors[key] = (tensors[key].double() / f).float()
    if cfg is None:
        cfg = lora_config_for(ranks, file_scales)
    scales = {m: cfg.scale_for(m) for m in ranks}
    return cfg, tensors, scales, _nomoat_meta(reader, path)


def _open_adapter(path: Path) -> _AdapterFile:
    check_header(path)
    fields, tensors = parse_gguf(path)
    reader = _AdapterFile(fields, list(tensors.values()))
    gtype = _contents(reader, "general.type", path)
    if gtype != "adapter":
        raise NomoatError(f"{path}: not a LoRA adapter (general.type = {gtype!r}); a model GGUF goes to --model")
    return reader


def gguf_adapter_meta(path: str | Path) -> dict[str, Any]:
    """nomoat's metadata of a GGUF adapter (base fingerprint, provenance), from its header alone: what a
    catalog needs to find the base before the tensors can be mapped."""
    path = Path(path)
    return _nomoat_meta(_open_adapter(path), path)


def _nomoat_meta(reader: _AdapterFile, path: Path) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    raw_meta = _contents(reader, "nomoat.meta", path)
    if isinstance(raw_meta, str):
        try:
            loaded = json.loads(raw_meta)
            meta = loaded if isinstance(loaded, dict) else {}
        except json.JSONDecodeError:
            meta = {}
    for key in ("base_fingerprint", "base_name", "base_source"):
        v = _contents(reader, f"nomoat.{key}", path)
        if isinstance(v, str):
            meta.setdefault(key, v)
    base = _contents(reader, "general.base_model.0.name", path)
    if isinstance(base, str):
        meta.setdefault("base_model_name_or_path", base)
    return meta
