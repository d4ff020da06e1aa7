"""Hugging Face checkpoint directories: config.json, (sharded) safetensors, tokenizer files."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nomoat.errors import NomoatError
from nomoat.formats.gguf_read import check_weight
from nomoat.model.config import LlamaConfig
from nomoat.model.registry import ARCHITECTURES, Architecture, architecture

SHARD_BYTES = 2 << 30
_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"key {k!r} appears twice")  # json would keep the last one silently
        out[k] = v
    return out


def read_json(path: Path) -> dict:
    """A JSON object from a file; invalid JSON, duplicate keys and anything but an object are one line."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_no_duplicates)
    except FileNotFoundError:
        raise NomoatError(f"{path}: not found") from None
    except IsADirectoryError:
        raise NomoatError(f"{path}: is a directory, not a JSON file") from None
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise NomoatError(f"{path}: invalid JSON ({' '.join(str(e).split())[:200]})") from None
    if not isinstance(obj, dict):
        raise NomoatError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


_NULLABLE = {"num_key_value_heads", "head_dim"}  # null means "derive it", as in transformers' LlamaConfig
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")


def _field(d: dict[str, Any], key: str, kind: type, default: Any = None, required: bool = False) -> Any:
    """A config.json value of the right JSON type (an int may be written 64 or 64.0; no strings, no bools)."""
    if key not in d or (d[key] is None and key in _NULLABLE):
        if required:
            raise KeyError(key)
        return default
    v = d[key]
    if kind is bool:
        ok = isinstance(v, bool)
    elif kind is int:
        ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and float(v).is_integer()
    else:
        ok = isinstance(v, int | float) and not isinstance(v, bool)
    if not ok:
        what = {int: "an integer", float: "a number", bool: "true or false"}[kind]
        raise ValueError(f"{key} = {json.dumps(v)} is not {what}")
    return kind(v)


def config_arch(d: dict[str, Any], source: str = "config.json") -> Architecture:
    """The registry entry a config.json names (model_type, else its architectures), or an error."""
    archs = d.get("architectures") or []
    mtype = d.get("model_type")
    arch = next((a for a in ARCHITECTURES.values() if mtype == a.name or any(c in a.hf_classes for c in archs)
                 or (mtype is None and not archs)), None)
    if arch is None:
        raise NomoatError(f"{source}: model_type {mtype!r} is not supported (supported: {', '.join(ARCHITECTURES)})")
    return arch


def config_from_hf(d: dict[str, Any], source: str = "config.json") -> LlamaConfig:
    """A model config from a Hugging Face config.json's fields."""
    config_arch(d, source)
    # What nomoat's LLaMA computes: a config asking for anything else must not load as if it did not.
    for key, allowed in (("hidden_act", ("silu", "swish")), ("attention_bias", (False,)), ("mlp_bias", (False,))):
        v = d.get(key)
        if v is not None and not any(v == a and type(v) is type(a) for a in allowed):
            raise NomoatError(f"{source}: {key} = {json.dumps(v)} is not supported (nomoat's LLaMA has "
                              f"{key} = {json.dumps(allowed[0])})")
    try:
        heads = _field(d, "num_attention_heads", int, required=True)
        return LlamaConfig(
            vocab_size=_field(d, "vocab_size", int, required=True),
            hidden_size=_field(d, "hidden_size", int, required=True),
            intermediate_size=_field(d, "intermediate_size", int, required=True),
            num_hidden_layers=_field(d, "num_hidden_layers", int, required=True),
            num_attention_heads=heads,
            num_key_value_heads=_field(d, "num_key_value_heads", int, heads),
            head_dim=_field(d, "head_dim", int, 0),
            rms_norm_eps=_field(d, "rms_norm_eps", float, 1e-6),
            rope_theta=_field(d, "rope_theta", float, 10000.0),
            rope_scaling=d.get("rope_scaling"),
            max_position_embeddings=_field(d, "max_position_embeddings", int, 2048),
            tie_word_embeddings=_field(d, "tie_word_embeddings", bool, False),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            name=str(d.get("_name_or_path") or ""),
        )
    except KeyError as e:
        raise NomoatError(f"{source}: missing field {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise NomoatError(f"{source}: bad value ({e})") from None


def config_to_hf(cfg: LlamaConfig) -> dict[str, Any]:
    """A Hugging Face config.json (LlamaForCausalLM) for a model config."""
    d: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": dict(cfg.rope_scaling) if cfg.rope_scaling else None,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }
    if cfg.bos_token_id is not None:
        d["bos_token_id"] = cfg.bos_token_id
    if cfg.eos_token_id is not None:
        d["eos_token_id"] = cfg.eos_token_id
    return d


class HFModelDir:
    """A LLaMA-family checkpoint directory; tensors are memory-mapped from safetensors."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not (self.path / "config.json").exists():
            raise NomoatError(f"{self.path}: no config.json (not a Hugging Face model directory)")
        self.raw_config = read_json(self.path / "config.json")
        self.arch = config_arch(self.raw_config, str(self.path / "config.json")).name
        self._names: dict[str, str] | None = None
        self._handles: dict[Path, object] = {}
        index = self.path / "model.safetensors.index.json"
        self.files: dict[str, Path] = {}
        if index.exists():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise NomoatError(f"{index}: no weight_map")
            for name, fname in weight_map.items():
                if not isinstance(fname, str) or not fname.endswith(".safetensors"):
                    raise NomoatError(f"{index}: {name} is in {fname!r}; nomoat reads only .safetensors shards "
                                      "(pickle files can run code)")
                if not (self.path / fname).is_file():
                    raise NomoatError(f"{index}: shard {fname} (for {name}) is missing")
                self.files[name] = self.path / fname
        else:
            single = self.path / "model.safetensors"
            if not single.exists():
                if any(self.path.glob("*.bin")):
                    raise NomoatError(f"{self.path}: only pickle (.bin) weights found; nomoat reads "
                                      "safetensors only, since loading pickle can run code")
                raise NomoatError(f"{self.path}: no model.safetensors or model.safetensors.index.json")
            for name in self._keys(single):
                self.files[name] = single

    @staticmethod
    def _keys(path: Path) -> list[str]:
        try:
            with safe_open(str(path), framework="pt") as f:
                return list(f.keys())
        except FileNotFoundError:
            raise NomoatError(f"{path}: not found") from None
        except Exception as e:
            raise NomoatError(f"{path}: not a valid safetensors file ({e})") from None

    def config(self) -> LlamaConfig:
        src = str(self.path / "config.json")
        cfg = config_from_hf(self.raw_config, src)
        if not cfg.name:
            cfg.name = self.path.name
        # The layer count against the tensors, before anything is sized by it.
        layers = {int(m.group(1)) for m in map(_LAYER.match, self.files) if m}
        if layers != set(range(cfg.num_hidden_layers)):
            raise NomoatError(f"{src}: num_hidden_layers = {cfg.num_hidden_layers}, but the weights hold "
                              f"{len(layers)} layers (model.layers.0 .. {max(layers, default=-1)}): layers missing "
                              "or extra")
        return cfg

    def eos_ids(self) -> list[int]:
        ids: list[int] = []
        gen = self.path / "generation_config.json"
        for src in ([read_json(gen)] if gen.exists() else []) + [self.raw_config]:
            e = src.get("eos_token_id")
            for i in (e if isinstance(e, list) else [e]):
                if isinstance(i, int) and i not in ids:
                    ids.append(i)
        return ids

    def hf_names(self) -> dict[str, str]:
        """Every weight by its (HF) name; a tensor the architecture does not have is an error."""
        if self._names is None:
            known = set(architecture(self.arch).tensor_shapes(self.config())) | {"lm_head.weight"}
            # Old exports carry RoPE's inverse frequencies as a buffer; they are recomputed from the config.
            unknown = sorted(n for n in self.files if n not in known and not n.endswith("rotary_emb.inv_freq"))
            if unknown:
                raise NomoatError(f"{self.path}: tensor {unknown[0]} is not part of a {self.arch} model"
                                  + (f" ({len(unknown)} such tensors)" if len(unknown) > 1 else ""))
            names = {n: n for n in self.files if n in known}
            for n in names:  # from the header: integer weights would load as garbage through .float()
                dtype = self.qtype(n)
                if dtype not in FLOAT_DTYPES:
                    raise NomoatError(f"{self.files[n]}: tensor {n} is stored as {dtype}, not a float type")
            self._names = names
        return self._names

    def _open(self, path: Path):
        """One open (memory map) per shard for the whole load, not one per tensor: a 500 MB file mapped
        for each of its 270 tensors reserves 137 GiB of address space and fails under `ulimit -v`."""
        handle = self._handles.get(path)
        if handle is None:
            try:
                handle = self._handles[path] = safe_open(str(path), framework="pt")
            except FileNotFoundError:
                raise NomoatError(f"{path}: not found (named in the shard index)") from None
            except Exception as e:
                raise NomoatError(f"{path}: not a valid safetensors file ({e})") from None
        return handle

    def load_float(self, name: str, cfg: LlamaConfig | None = None) -> torch.Tensor:
        path = self.files.get(name)
        if path is None:
            raise NomoatError(f"{self.path}: tensor {name} is missing")
        f = self._open(path)
        try:
            w = f.get_tensor(name).float()
        except Exception as e:
            raise NomoatError(f"{path}: cannot read tensor {name} ({e})") from None
        return check_weight(w, f"{path}: tensor {name}")

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open(self.files[name]).get_slice(name).get_shape())

    def qtype(self, name: str) -> str:
        return str(self._open(self.files[name]).get_slice(name).get_dtype())


def _shards(tensors: dict[str, torch.Tensor]) -> Iterator[dict[str, torch.Tensor]]:
    shard: dict[str, torch.Tensor] = {}
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > SHARD_BYTES:
            yield shard
            shard, size = {}, 0
        shard[name] = t
        size += nbytes
    if shard:
        yield shard


def write_hf_dir(out: str | Path, cfg: LlamaConfig, tensors: dict[str, torch.Tensor], tokenizer=None,
                 dtype: torch.dtype = torch.float32, metadata: dict[str, str] | None = None) -> Path:
    """Write a checkpoint directory atomically: built in a temp dir, renamed into place."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise NomoatError(f"{out}: exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        hf = config_to_hf(cfg)
        hf["torch_dtype"] = str(dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}
        (tmp / "generation_config.json").write_text(json.dumps({k: v for k, v in gen.items() if v is not None}))
        prepared = {n: t.detach().to(dtype).contiguous() for n, t in tensors.items()
                    if not (cfg.tie_word_embeddings and n == "lm_head.weight")}
        shards = list(_shards(prepared))
        meta = {"format": "pt", **(metadata or {})}
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata=meta)
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata=meta)
                weight_map.update(dict.fromkeys(shard, fname))
            total = sum(t.numel() * t.element_size() for t in prepared.values())
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        if tokenizer is not None:
            tokenizer.save_hf(tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
