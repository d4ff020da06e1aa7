"""Hugging Face checkpoint directories: config.json, (sharded) safetensors, tokenizer files."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nomoat.config import LlamaConfig
from nomoat.errors import NomoatError

SHARD_BYTES = 2 << 30


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NomoatError(f"{path}: not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NomoatError(f"{path}: invalid JSON ({e})") from None


class HFModelDir:
    """A LLaMA-family checkpoint directory; tensors are memory-mapped from safetensors."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not (self.path / "config.json").exists():
            raise NomoatError(f"{self.path}: no config.json (not a Hugging Face model directory)")
        self.raw_config = read_json(self.path / "config.json")
        index = self.path / "model.safetensors.index.json"
        self.files: dict[str, Path] = {}
        if index.exists():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise NomoatError(f"{index}: no weight_map")
            for name, fname in weight_map.items():
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
        cfg = LlamaConfig.from_hf_dict(self.raw_config, str(self.path / "config.json"))
        if not cfg.name:
            cfg.name = self.path.name
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
        return {n: n for n in self.files}

    def load_float(self, name: str, cfg: LlamaConfig | None = None) -> torch.Tensor:
        path = self.files.get(name)
        if path is None:
            raise NomoatError(f"{self.path}: tensor {name} is missing")
        try:
            with safe_open(str(path), framework="pt") as f:
                return f.get_tensor(name).float()
        except Exception as e:
            raise NomoatError(f"{path}: cannot read tensor {name} ({e})") from None

    def shape(self, name: str) -> tuple[int, ...]:
        with safe_open(str(self.files[name]), framework="pt") as f:
            return tuple(f.get_slice(name).get_shape())

    def qtype(self, name: str) -> str:
        with safe_open(str(self.files[name]), framework="pt") as f:
            return str(f.get_slice(name).get_dtype())


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
        hf = cfg.to_hf_dict()
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
