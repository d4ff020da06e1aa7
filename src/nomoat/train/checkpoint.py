"""Resumable training state in safetensors + JSON (never pickle), written atomically."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import load_file, save_file

from nomoat.errors import NomoatError

CHECKPOINT_DIR = "checkpoint"
C = TypeVar("C")


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors = {}
    for pid, state in sd["state"].items():
        for k, v in state.items():
            tensors[f"{pid}.{k}"] = v if isinstance(v, torch.Tensor) else torch.tensor(v)
    return tensors, {"param_groups": sd["param_groups"]}


def restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: dict[str, Any]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": groups["param_groups"]})


def save_checkpoint(out: Path, adapter: dict[str, torch.Tensor], opt: torch.optim.Optimizer,
                    state: dict[str, Any]) -> Path:
    """Write out/checkpoint as a whole: built beside it, then swapped in with renames."""
    final = out / CHECKPOINT_DIR
    tmp = out / f".{CHECKPOINT_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous() for k, v in adapter.items()}, str(tmp / "adapter.safetensors"))
    opt_t, groups = optimizer_tensors(opt)
    save_file({k: v.contiguous() for k, v in opt_t.items()}, str(tmp / "optimizer.safetensors"))
    save_file({"torch_rng": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
    (tmp / "state.json").write_text(json.dumps({**state, "optimizer": groups}, indent=1))
    old = out / f".{CHECKPOINT_DIR}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


@dataclass
class Checkpoint:
    """A saved training state: trained tensors, optimizer state, torch's RNG, and the run's JSON state."""

    tensors: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]
    rng: torch.Tensor
    state: dict[str, Any]


def load_checkpoint(out: Path) -> Checkpoint:
    """The checkpoint in out/checkpoint (or the previous one, if a crash interrupted the swap)."""
    ck = out / CHECKPOINT_DIR
    if not (ck / "state.json").exists():
        old = out / f".{CHECKPOINT_DIR}.old"  # a crash between the two renames leaves only this one
        if (old / "state.json").exists():
            ck = old
        else:
            raise NomoatError(f"{out}: no checkpoint to resume from ({ck}/state.json missing)")
    try:
        state = json.loads((ck / "state.json").read_text())
        adapter = load_file(str(ck / "adapter.safetensors"))
        opt = load_file(str(ck / "optimizer.safetensors"))
        rng = load_file(str(ck / "rng.safetensors"))["torch_rng"]
    except Exception as e:
        raise NomoatError(f"{ck}: checkpoint is unreadable ({e})") from None
    for key, kind in (("step", int), ("micro", int), ("tokens_seen", int), ("history", list),
                      ("wall_seconds", (int, float)), ("optimizer", dict)):
        if not isinstance(state.get(key) if isinstance(state, dict) else None, kind):
            raise NomoatError(f"{ck}/state.json: field {key!r} is missing or of the wrong type")
    return Checkpoint(adapter, opt, rng, state)


def config_from_saved(cls: type[C], d: Any, source: str) -> C:
    """A run config (dataclass `cls` with a `check()` method) from what a checkpoint's state.json recorded,
    checked field by field."""
    if not isinstance(d, dict):
        raise NomoatError(f"{source}: no run config recorded")
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise NomoatError(f"{source}: unknown config field {unknown[0]!r}")
    try:
        cfg = cls(**d)
        cfg.check()
    except TypeError as e:
        raise NomoatError(f"{source}: bad config ({e})") from None
    except NomoatError as e:
        raise NomoatError(f"{source}: {e}") from None
    return cfg
