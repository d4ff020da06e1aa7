"""Adapter tensors as plain data: '<module>.lora_A.weight' [r, in] and '<module>.lora_B.weight' [out, r].

One place checks a module's pair (shapes against the layer, rank, finite values), whatever file or
operation it came from, and one function rebuilds a PEFT-expressible config for per-module ranks and scales.
"""

from __future__ import annotations

import math
from collections import Counter

import torch

from nomoat.errors import NomoatError
from nomoat.lora.layer import LoraConfig

MAX_ABS = 1e4  # LoRA factors are O(1); anything this large overflows the update to inf in float32


def lora_modules_of(tensors: dict[str, torch.Tensor], source: str) -> list[str]:
    """Module paths of '<module>.lora_A.weight' / '.lora_B.weight' tensors, each with both halves."""
    mods: list[str] = []
    for key in tensors:
        if not key.endswith((".lora_A.weight", ".lora_B.weight")):
            raise NomoatError(f"{source}: unexpected tensor {key!r} (expected <module>.lora_A/.lora_B.weight)")
        mod = key.rsplit(".", 2)[0]
        if mod not in mods:
            mods.append(mod)
    for mod in mods:
        if f"{mod}.lora_A.weight" not in tensors or f"{mod}.lora_B.weight" not in tensors:
            raise NomoatError(f"{source}: {mod} has lora_A or lora_B missing")
    return mods


def check_lora_shapes(mod: str, a_shape: tuple[int, ...], b_shape: tuple[int, ...],
                      layer: tuple[int, int] | None, source: str) -> int:
    """Validate one module's A [r, in] and B [out, r] shapes against the layer (out, in); returns r.

    Takes shapes, not tensors, so a file's header can be checked before its data is read.
    """
    if layer is None:
        raise NomoatError(f"{source}: adapter targets {mod!r}, which the model does not have")
    out_f, in_f = layer
    if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[1] != in_f or b_shape[0] != out_f \
            or a_shape[0] != b_shape[1]:
        raise NomoatError(f"{source}: {mod} has A{list(a_shape)} B{list(b_shape)}, the layer is {out_f}x{in_f}")
    r = int(a_shape[0])
    if not 0 < r <= min(in_f, out_f):
        raise NomoatError(f"{source}: {mod} has rank {r}, more than the layer's {out_f}x{in_f} allows")
    return r


def check_lora_pair(mod: str, A: torch.Tensor, B: torch.Tensor, layer: tuple[int, int] | None,
                    source: str) -> int:
    """Validate one module's A and B (shapes against the layer (out, in), finite values); returns r."""
    r = check_lora_shapes(mod, tuple(A.shape), tuple(B.shape), layer, source)
    if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
        raise NomoatError(f"{source}: {mod} has NaN or inf values")
    peak = max(float(A.abs().max()), float(B.abs().max()))
    if peak > MAX_ABS:
        raise NomoatError(f"{source}: {mod} has values up to {peak:.3g} (LoRA factors stay far below {MAX_ABS:g}: "
                          "a damaged file)")
    return r


def common_pair(ranks: dict[str, int], scales: dict[str, float]) -> tuple[int, float]:
    """The most common (rank, scale) pair; ties go to the smaller rank, then the smaller scale."""
    counts = Counter((ranks[m], float(scales[m])) for m in ranks)
    return min(counts, key=lambda p: (-counts[p], p[0], p[1]))


def lora_config_for(ranks: dict[str, int], scales: dict[str, float], dropout: float = 0.0) -> LoraConfig:
    """A plain (non-rsLoRA) config whose rank_for/scale_for reproduce these per-module ranks and scales.

    The most common (rank, scale) becomes r and alpha; other modules get rank_pattern / alpha_pattern
    entries keyed by their full module path.
    """
    if not ranks:
        raise NomoatError("adapter has no modules")
    r0, s0 = common_pair(ranks, scales)
    alpha = s0 * r0
    rank_pattern = {m: r for m, r in ranks.items() if r != r0}
    alpha_pattern = {m: scales[m] * r for m, r in ranks.items()
                     if not math.isclose(alpha / r, scales[m], rel_tol=1e-12, abs_tol=0.0)}
    targets = sorted({m.rsplit(".", 1)[-1] for m in ranks})
    return LoraConfig(r=r0, alpha=alpha, dropout=dropout, targets=targets, rank_pattern=rank_pattern,
                      alpha_pattern=alpha_pattern)


