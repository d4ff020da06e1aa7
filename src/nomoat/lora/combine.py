"""Adapter arithmetic: concat / linear / TIES combinations of low-rank updates.

An adapter here is ``(tensors, scales, weight)``: '<module>.lora_A.weight' [r, in] and
'<module>.lora_B.weight' [out, r] tensors, the per-module scale s, and the user's weight w; its update
to a module is ``w * s * B @ A``. Combined adapters fold every scale into B and carry scale 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from nomoat.errors import NomoatError
from nomoat.lora.layer import LoraConfig
from nomoat.lora.tensors import check_lora_pair, lora_config_for, lora_modules_of

HOWS = ("concat", "linear", "ties")
HF_TYPES = ("f32", "f16", "bf16")
Adapter = tuple[dict[str, torch.Tensor], dict[str, float], float]


@dataclass
class CombineReport:
    """What a combination did per module: its rank and the relative Frobenius error ||D - BA|| / ||D||."""

    how: str
    rank: int | None
    density: float | None
    modules: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def mean_rel_error(self) -> float:
        errs = [m["rel_error"] for m in self.modules.values()]
        return sum(errs) / len(errs) if errs else 0.0

    @property
    def max_rel_error(self) -> float:
        return max((m["rel_error"] for m in self.modules.values()), default=0.0)

    @property
    def total_rel_error(self) -> float:
        """Error over all modules together: sqrt(sum ||D - BA||^2) / sqrt(sum ||D||^2)."""
        num = sum((m["rel_error"] * m["norm"]) ** 2 for m in self.modules.values())
        den = sum(m["norm"] ** 2 for m in self.modules.values())
        return math.sqrt(num / den) if den else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"how": self.how, "rank": self.rank, "density": self.density,
                "mean_rel_error": self.mean_rel_error, "max_rel_error": self.max_rel_error,
                "total_rel_error": self.total_rel_error, "modules": self.modules}


def _collect(adapters: Sequence[Adapter]) -> dict[str, list[tuple[torch.Tensor, torch.Tensor, float]]]:
    """module -> [(A, B, w * s)] over the adapters that touch it, checked for shape and value sanity."""
    if not adapters:
        raise NomoatError("combine: no adapters given")
    per: dict[str, list[tuple[torch.Tensor, torch.Tensor, float]]] = {}
    dims: dict[str, tuple[int, int]] = {}
    for i, (tensors, scales, weight) in enumerate(adapters):
        src = f"adapter {i + 1}"
        if not math.isfinite(weight):
            raise NomoatError(f"combine: {src} has weight {weight}")
        for mod in lora_modules_of(tensors, src):
            A, B = tensors[f"{mod}.lora_A.weight"].float(), tensors[f"{mod}.lora_B.weight"].float()
            shape = (B.shape[0], A.shape[1]) if A.ndim == 2 and B.ndim == 2 else None
            if shape is not None and dims.setdefault(mod, shape) != shape:
                raise NomoatError(f"{src}: {mod} is {shape[0]}x{shape[1]} but another adapter has it "
                                  f"{dims[mod][0]}x{dims[mod][1]}: adapters for different base models")
            check_lora_pair(mod, A, B, shape or (0, 0), src)
            s = scales.get(mod)
            if s is None or not math.isfinite(s):
                raise NomoatError(f"{src}: no finite scale for {mod}")
            per.setdefault(mod, []).append((A, B, float(weight) * float(s)))
    return per


def _factor(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Rank-k factors B = U sqrt(S), A = sqrt(S) Vh and the relative error of dropping the rest."""
    root = S[:k].sqrt()
    total = float(S.square().sum())
    err = math.sqrt(float(S[k:].square().sum()) / total) if total > 0 else 0.0
    return (root[:, None] * Vh[:k]).float(), (U[:, :k] * root).float(), err


def _linear(parts: list[tuple[torch.Tensor, torch.Tensor, float]], k: int
            ) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """SVD of sum_i c_i B_i A_i through QR of the stacked factors: O((out + in) R^2), never out x in."""
    Bc = torch.cat([B.double() * c for _, B, c in parts], dim=1)  # [out, R]
    Ac = torch.cat([A.double() for A, _, _ in parts], dim=0)  # [R, in]
    Qb, Rb = torch.linalg.qr(Bc)
    Qa, Ra = torch.linalg.qr(Ac.T)
    U, S, Vh = torch.linalg.svd(Rb @ Ra.T, full_matrices=False)
    A, B, err = _factor(Qb @ U, S, Vh @ Qa.T, min(k, S.numel()))
    return A, B, err, float(S.square().sum().sqrt())


def _ties(parts: list[tuple[torch.Tensor, torch.Tensor, float]], k: int, density: float
          ) -> tuple[torch.Tensor, torch.Tensor, float, float, float]:
    """TIES (Yadav et al. 2023, as PEFT's `ties`): trim each weighted delta to its top `density` by
    magnitude, elect the sign of the summed trimmed deltas, average the entries that agree with it."""
    deltas = torch.stack([(B @ A) * c for A, B, c in parts])  # [n, out, in]
    flat = deltas.flatten(1).abs()
    keep = max(1, math.ceil(density * flat.shape[1]))
    thresh = flat.topk(keep, dim=1).values[:, -1:]
    trimmed = deltas * (flat >= thresh).view_as(deltas)
    sign = torch.sign(trimmed.sum(0))
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    merged = (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)
    U, S, Vh = torch.linalg.svd(merged, full_matrices=False)  # float32: the dense SVD is the cost here
    A, B, err = _factor(U, S.double(), Vh, min(k, S.numel()))
    exact = deltas.sum(0)
    vs_sum = float((merged - exact).norm() / exact.norm()) if exact.norm() > 0 else 0.0
    return A, B, err, float(S.double().square().sum().sqrt()), vs_sum


def combine(adapters: Sequence[Adapter], how: str, rank: int | None = None, density: float = 0.2
            ) -> tuple[dict[str, torch.Tensor], dict[str, float], CombineReport]:
    """Combine weighted adapters into one.

    Args:
        adapters: (tensors, scales, weight) each; a module missing from an adapter contributes nothing.
        how: ``concat`` (exact: rank sum r_i, equal to running all of them), ``linear`` (sum of the
            weighted updates re-factored to `rank` by SVD) or ``ties`` (trim, elect sign, disjoint mean,
            then SVD to `rank`).
        rank: target rank for linear/ties (default: the largest input rank of each module).
        density: share of each update's entries TIES keeps.

    Returns:
        (tensors, per-module scales, report with each module's relative error).
    """
    if how not in HOWS:
        raise NomoatError(f"--how {how!r} is not one of {', '.join(HOWS)}")
    if rank is not None and rank <= 0:
        raise NomoatError(f"--rank must be a positive integer, got {rank}")
    if how == "ties" and not 0 < density <= 1:
        raise NomoatError(f"--density must be in (0, 1], got {density}")
    per = _collect(adapters)
    tensors: dict[str, torch.Tensor] = {}
    scales: dict[str, float] = {}
    report = CombineReport(how, rank, density if how == "ties" else None)
    for mod, parts in per.items():
        out_f, in_f = parts[0][1].shape[0], parts[0][0].shape[1]
        k = rank or max(A.shape[0] for A, _, _ in parts)
        if how == "concat":
            total = sum(A.shape[0] for A, _, _ in parts)
            if total > min(out_f, in_f):
                raise NomoatError(f"concat: {mod} would have rank {total}, more than its {out_f}x{in_f} allows; "
                                  "use --how linear --rank N")
            same = all(c == parts[0][2] for _, _, c in parts)
            A = torch.cat([A for A, _, _ in parts], dim=0)
            B = torch.cat([B if same else B * c for _, B, c in parts], dim=1)
            scales[mod] = parts[0][2] if same else 1.0
            entry = {"rank": float(total), "rel_error": 0.0, "norm": float((B @ A).norm() * abs(scales[mod]))}
        elif how == "linear":
            A, B, err, norm = _linear(parts, k)
            scales[mod] = 1.0
            entry = {"rank": float(A.shape[0]), "rel_error": err, "norm": norm}
        else:
            A, B, err, norm, vs_sum = _ties(parts, k, density)
            scales[mod] = 1.0
            entry = {"rank": float(A.shape[0]), "rel_error": err, "norm": norm, "ties_vs_sum": vs_sum}
        tensors[f"{mod}.lora_A.weight"] = A.contiguous()
        tensors[f"{mod}.lora_B.weight"] = B.contiguous()
        report.modules[mod] = entry
    return tensors, scales, report


def combined_config(tensors: dict[str, torch.Tensor], scales: dict[str, float]) -> LoraConfig:
    """A PEFT-expressible config (rank_pattern / alpha_pattern as needed) for combined tensors."""
    ranks = {m: int(tensors[f"{m}.lora_A.weight"].shape[0]) for m in scales}
    return lora_config_for(ranks, scales)
