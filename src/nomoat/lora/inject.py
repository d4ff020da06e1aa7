"""Putting adapters on a model and taking them off: injection, activation and weights, merge/unmerge.

Functions here find and replace modules by name; they know nothing of files (see `nomoat.adapters`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import nn

from nomoat.errors import NomoatError
from nomoat.lora.layer import LoraConfig, LoRALinear, RowPlan
from nomoat.lora.tensors import check_lora_pair, lora_modules_of


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, mod in model.named_modules():
        if isinstance(mod, LoRALinear):
            yield name, mod


def _target_modules(model: nn.Module, targets: list[str]) -> list[tuple[str, nn.Module]]:
    found = []
    for name, mod in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in targets and ".layers." in f".{name}":
            found.append((name, mod))
    return found


def _wrap(model: nn.Module, mod_name: str) -> LoRALinear:
    """The module at `mod_name` as a LoRALinear, wrapping it in place if it is not one yet."""
    mod = model.get_submodule(mod_name)
    if isinstance(mod, LoRALinear):
        return mod
    parent_name, _, leaf = mod_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    # A fused block keeps its fused base matmul: it routes this part's slice through the wrapper's add_delta.
    wrapper = LoRALinear(mod)
    wrapper.plan = _row_plan(model)
    setattr(parent, leaf, wrapper)
    return wrapper


def _row_plan(model: nn.Module) -> RowPlan:
    plan = model.__dict__.get("_row_plan")
    if plan is None:
        plan = RowPlan()
        model.__dict__["_row_plan"] = plan  # a plain attribute: not a submodule, not in the state dict
    return plan


def add_adapter(model: nn.Module, cfg: LoraConfig, name: str = "default", init: bool = True) -> list[str]:
    """Attach a fresh adapter to every target projection; returns the wrapped module names."""
    wrapped = []
    for mod_name, _ in _target_modules(model, cfg.targets):
        mod = _wrap(model, mod_name)
        mod.add(name, cfg.rank_for(mod_name), cfg.scale_for(mod_name), cfg.dropout, init=init)
        wrapped.append(mod_name)
    if not wrapped:
        raise NomoatError(f"no modules named {cfg.targets} in the model")
    return wrapped


def remove_adapter(model: nn.Module, name: str) -> None:
    for _, mod in lora_modules(model):
        if name in mod.lora_A:
            mod.remove(name)


def adapter_names(model: nn.Module) -> list[str]:
    names: list[str] = []
    for _, mod in lora_modules(model):
        names.extend(n for n in mod.lora_A if n not in names)
    return names


def set_active(model: nn.Module, weights: dict[str, float]) -> None:
    """Activate exactly these adapters with these weights (unmerged); {} runs the bare base."""
    known = adapter_names(model)
    for n in weights:
        if n not in known:
            raise NomoatError(f"adapter {n!r} is not loaded (loaded: {', '.join(known) or 'none'})")
    for _, mod in lora_modules(model):
        mod.active = [n for n in weights if n in mod.lora_A]
        for n in mod.active:
            if n in mod.merged:
                raise NomoatError(f"adapter {n!r} is merged; unmerge it before changing its weight")
            mod.weights[n] = float(weights[n])
    _row_plan(model).changed()


def check_loaded(model: nn.Module, names: Iterable[str]) -> None:
    known = adapter_names(model)
    for n in names:
        if n not in known:
            raise NomoatError(f"adapter {n!r} is not loaded (loaded: {', '.join(known) or 'none'})")


def set_row_adapters(model: nn.Module, per_row: Sequence[dict[str, float]] | None, check: bool = True) -> None:
    """Give each row of the next batch its own adapter stack (name -> weight; {} for the bare base), or
    None to go back to the model-wide active adapters. Rows that share an adapter are computed together.
    Constant time in the model's size (one plan shared by its LoRA layers): an engine calls it every step,
    with `check=False` for stacks it checked when the request came in."""
    groups: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    if per_row is not None:
        rows: dict[str, tuple[list[int], list[float]]] = {}
        for i, stack in enumerate(per_row):
            for n, w in stack.items():
                rows.setdefault(n, ([], []))
                rows[n][0].append(i)
                rows[n][1].append(float(w))
        if check:
            check_loaded(model, rows)
        groups = {n: (torch.tensor(idx), torch.tensor(ws).view(-1, 1, 1)) for n, (idx, ws) in rows.items()}
    plan = model.__dict__.get("_row_plan")
    if plan is not None:
        plan.groups = groups


def active_weights(model: nn.Module) -> dict[str, float]:
    """The active adapters and their weights, {} when the bare base runs."""
    out: dict[str, float] = {}
    for _, mod in lora_modules(model):
        for n in mod.active:
            out.setdefault(n, mod.weights[n])
    return out


def lora_parameters(model: nn.Module, name: str = "default") -> list[nn.Parameter]:
    params = []
    for _, mod in lora_modules(model):
        if name in mod.lora_A:
            params += [mod.lora_A[name], mod.lora_B[name]]
    return params


def mark_trainable(model: nn.Module, name: str = "default") -> int:
    """Freeze everything except one adapter's A and B; returns the trainable parameter count."""
    model.requires_grad_(False)
    params = lora_parameters(model, name)
    for p in params:
        p.requires_grad_(True)
    return sum(p.numel() for p in params)


def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """{module path: (A, B)} flattened as '<module>.lora_A.weight' / '<module>.lora_B.weight'."""
    out = {}
    for mod_name, mod in lora_modules(model):
        if name in mod.lora_A:
            out[f"{mod_name}.lora_A.weight"] = mod.lora_A[name].detach()
            out[f"{mod_name}.lora_B.weight"] = mod.lora_B[name].detach()
    return out


def load_adapter_weights(model: nn.Module, tensors: dict[str, torch.Tensor], scales: dict[str, float],
                         name: str = "default", dropout: float = 0.0) -> None:
    """Attach an adapter from '<module>.lora_A.weight' / '.lora_B.weight' tensors and per-module scales.

    Every shape is checked before anything is attached, so a bad file leaves the model untouched.
    """
    plan = []
    for mod_name in lora_modules_of(tensors, "adapter"):
        try:
            mod = model.get_submodule(mod_name)
        except AttributeError:
            raise NomoatError(f"adapter targets {mod_name!r}, which the model does not have") from None
        base = mod.base if isinstance(mod, LoRALinear) else mod
        A, B = tensors[f"{mod_name}.lora_A.weight"], tensors[f"{mod_name}.lora_B.weight"]
        check_lora_pair(mod_name, A, B, (base.out_features, base.in_features), "adapter")
        plan.append((mod_name, A, B))
    for mod_name, A, B in plan:
        mod = _wrap(model, mod_name)
        mod.add(name, A.shape[0], scales[mod_name], dropout, init=False)
        with torch.no_grad():
            mod.lora_A[name].copy_(A.float())
            mod.lora_B[name].copy_(B.float())
    _row_plan(model).changed()


def merge_adapters(model: nn.Module, names: Iterable[str] | None = None) -> None:
    for _, mod in lora_modules(model):
        for n in (names if names is not None else list(mod.active)):
            if n in mod.lora_A:
                mod.merge(n)


def unmerge_adapters(model: nn.Module, names: Iterable[str] | None = None) -> None:
    for _, mod in lora_modules(model):
        for n in (names if names is not None else list(mod.merged)):
            mod.unmerge(n)


def strip_lora(model: nn.Module) -> None:
    """Replace every LoRALinear by its base (after merging, to export a plain model)."""
    for mod_name, mod in list(lora_modules(model)):
        parent_name, _, leaf = mod_name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, mod.base)
