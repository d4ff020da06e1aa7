"""The LoRA module replacement: y = W x + sum_i w_i * s_i * B_i A_i dropout(x), and its config.

A `LoRALinear` wraps any frozen base projection (float `nn.Linear` or a quantized
linear) and can hold several named adapters at once, each with its own weight, so
adapters stack and switch without reloading the base. Parameter names follow
PEFT's module tree (``...q_proj.lora_A.<name>.weight``), so PEFT files map one to one.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nomoat.errors import NomoatError
from nomoat.model.registry import LLAMA

MAX_SCALE = 1e4
TARGET_ALIASES = LLAMA.aliases
ALL_LINEAR = LLAMA.linear_leaves


def resolve_targets(spec: str | Iterable[str]) -> list[str]:
    """`"q,v"`, `["q_proj", "v_proj"]` or `"all-linear"` -> module short names."""
    # "q,v" may come as one string or inside a list (the CLI's --targets); split on commas either way.
    items = [s.strip() for part in ([spec] if isinstance(spec, str) else spec) for s in part.split(",")]
    out: list[str] = []
    for s in items:
        if s in ("all-linear", "all"):
            names: Iterable[str] = ALL_LINEAR
        elif s in TARGET_ALIASES:
            names = [TARGET_ALIASES[s]]
        elif s in ALL_LINEAR:
            names = [s]
        else:
            raise NomoatError(f"unknown target module {s!r} (use q, k, v, o, gate, up, down, or all-linear)")
        out.extend(n for n in names if n not in out)
    if not out:
        raise NomoatError("no target modules given")
    return out


@dataclass
class LoraConfig:
    """An adapter's shape: rank, alpha, targets; per-module overrides as in PEFT."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(ALL_LINEAR))
    rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r <= 0:
            raise NomoatError(f"LoRA rank must be a positive integer, got {self.r!r}")
        if not 0 <= self.dropout < 1:
            raise NomoatError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        self.targets = resolve_targets(self.targets)
        # An update scaled past MAX_SCALE (or by NaN) is a damaged file, not a training choice.
        for name, v in [("alpha", self.alpha), *((f"alpha_pattern[{k!r}]", a) for k, a in self.alpha_pattern.items())]:
            if not isinstance(v, int | float) or not math.isfinite(v) or abs(v) > MAX_SCALE:
                raise NomoatError(f"LoRA {name} = {v!r} is not a finite number of sane size (|alpha| <= {MAX_SCALE:g})")
        for name, pattern in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            for key, v in pattern.items():
                try:
                    re.compile(key)
                except re.error as e:
                    raise NomoatError(f"LoRA {name} key {key!r} is not a valid regular expression ({e})") from None
                if name == "rank_pattern" and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
                    raise NomoatError(f"LoRA rank_pattern[{key!r}] = {v!r} is not a positive integer")

    @staticmethod
    def _match(pattern: dict[str, Any], name: str) -> Any:
        # PEFT matches pattern keys as a regex against the end of the module name.
        for key, value in pattern.items():
            if re.match(rf"(.*\.)?({key})$", name):
                return value
        return None

    def rank_for(self, name: str) -> int:
        r = self._match(self.rank_pattern, name)
        return int(r) if r is not None else self.r

    def alpha_for(self, name: str) -> float:
        a = self._match(self.alpha_pattern, name)
        return float(a) if a is not None else float(self.alpha)

    def scale_for(self, name: str) -> float:
        r, a = self.rank_for(name), self.alpha_for(name)
        return a / math.sqrt(r) if self.rslora else a / r

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _LowRankAdd(torch.autograd.Function):
    """y + s * (x @ A.T) @ B.T as one pass over y (`addmm`), with a backward whose products take the operand
    layouts CPU GEMMs run fastest for a rank-r update: measured at 1024 x 576 -> 1536, r 8, the gradient of B
    as (h.T @ g).T takes 0.36 ms where autograd's g.T @ h takes 1.28, and g @ B with B stored (r, out) 0.37 ms
    where autograd's 0.91; the forward's add and scaling in `addmm` 0.34 ms where three ops take 0.95."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, y: torch.Tensor,  # type: ignore[override]
                s: float) -> torch.Tensor:
        h = (A @ x.t()).t()  # (M, r); A @ x.T is the faster order of the same product
        ctx.save_for_backward(x, A, B, h)
        ctx.s = s
        return torch.addmm(y, h, B.t(), alpha=s)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        x, A, B, h = ctx.saved_tensors
        s = ctx.s
        need_x, need_a, need_b, need_y, _ = ctx.needs_input_grad
        gh = (g @ B.t().contiguous().t()).mul_(s) if need_x or need_a else None
        grad_b = (h.t() @ g).mul_(s).t().contiguous() if need_b else None
        grad_a = gh.t() @ x if need_a else None
        grad_x = gh @ A if need_x else None
        return grad_x, grad_a, grad_b, g if need_y else None, None


class RowPlan:
    """Which rows of the next batch run which adapters, shared by every LoRALinear of one model so the
    engine sets it once per step: adapter -> (row indices, per-row weights [n, 1, 1]); None: use `active`."""

    groups: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    # Bumped on every change to the model's adapters (add, remove, merge, activation, weights), so a consumer
    # that copies their state (the native decoding step) knows when to copy again.
    version: int = 0

    def changed(self) -> None:
        self.version += 1


class LoRALinear(nn.Module):
    """A frozen base projection plus any number of named low-rank updates."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.in_features: int = base.in_features
        self.out_features: int = base.out_features
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.scales: dict[str, float] = {}
        self.weights: dict[str, float] = {}  # the user's per-adapter multiplier
        self.dropouts: dict[str, float] = {}
        self.active: list[str] = []
        self.merged: dict[str, float] = {}  # adapter -> effective scale folded into base.weight
        self.plan: RowPlan | None = None  # per-row adapters (`inject.set_row_adapters`); when set, replace `active`

    def add(self, name: str, r: int, scale: float, dropout: float = 0.0, init: bool = True,
            dtype: torch.dtype = torch.float32) -> None:
        if name in self.lora_A:
            raise NomoatError(f"adapter {name!r} is already loaded")
        if r > min(self.in_features, self.out_features):
            raise NomoatError(f"LoRA rank {r} exceeds the layer's size {self.out_features}x{self.in_features}")
        A = torch.zeros(r, self.in_features, dtype=dtype)
        B = torch.zeros(self.out_features, r, dtype=dtype)
        if init:
            # PEFT's default: A Kaiming-uniform, B zero, so step 0 is exactly the base model.
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        self.lora_A[name] = nn.Parameter(A)
        self.lora_B[name] = nn.Parameter(B)
        self.scales[name] = scale
        self.weights[name] = 1.0
        self.dropouts[name] = dropout
        self.active.append(name)
        self._changed()

    def remove(self, name: str) -> None:
        if name in self.merged:
            self.unmerge(name)
        del self.lora_A[name], self.lora_B[name]
        for d in (self.scales, self.weights, self.dropouts):
            d.pop(name, None)
        if name in self.active:
            self.active.remove(name)
        self._changed()

    def _changed(self) -> None:
        if self.plan is not None:
            self.plan.changed()

    def delta(self, name: str) -> torch.Tensor:
        """The full update s * w * B @ A for one adapter (float32, [out, in])."""
        A, B = self.lora_A[name].float(), self.lora_B[name].float()
        return (B @ A) * (self.scales[name] * self.weights[name])

    def merge(self, name: str) -> None:
        w = getattr(self.base, "weight", None)
        if not isinstance(w, torch.Tensor) or not w.is_floating_point():
            raise NomoatError("cannot merge into a quantized base; merge on a float model and quantize after")
        if name in self.merged:
            return
        with torch.no_grad():
            w += self.delta(name).to(w.dtype)
        self.merged[name] = self.scales[name] * self.weights[name]
        self._changed()

    def unmerge(self, name: str) -> None:
        if name not in self.merged:
            return
        w = self.base.weight
        A, B = self.lora_A[name].float(), self.lora_B[name].float()
        with torch.no_grad():
            w -= ((B @ A) * self.merged.pop(name)).to(w.dtype)
        self._changed()

    def _forward_rows(self, x: torch.Tensor, y: torch.Tensor,
                      groups: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Each adapter's low-rank product over just the rows that use it (gathered, then added back), so rows
        with different stacks share one pass through the base weights."""
        for name, (idx, w) in groups.items():
            if name not in self.lora_A:
                continue  # this adapter does not target this layer
            if name in self.merged:
                raise NomoatError(f"adapter {name!r} is merged into the base; unmerge it to run it on some rows")
            whole = idx.numel() == x.shape[0]
            h, A, B = self._operands(name, x if whole else x.index_select(0, idx))
            d = F.linear(F.linear(h, A), B).mul(w.to(h.dtype) * self.scales[name]).to(y.dtype)
            y = y + d if whole else y.index_add(0, idx, d)
        return y

    def _operands(self, name: str, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input, A, B) in the dtype the update runs in. Training with low-precision activations (a bf16 base)
        runs it in their dtype rather than keep a float32 copy of every input for backward (A, B and their
        gradients stay float32). Inference runs it in float32: a rank-r product is a small GEMM, and small
        bf16 GEMMs are ~4x slower than float32 ones on CPUs (42 vs 10 us measured for 1x576 @ 576x8 @ 8x1536)."""
        A, B = self.lora_A[name], self.lora_B[name]
        if h.dtype == A.dtype:
            return h, A, B
        if torch.is_grad_enabled() and A.requires_grad:
            return h, A.to(h.dtype), B.to(h.dtype)
        return h.to(A.dtype), A, B

    def add_delta(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """`y` (the base projection of `x`) plus the active adapters' low-rank updates."""
        groups = self.plan.groups if self.plan is not None else None
        if groups is not None:
            return self._forward_rows(x, y, groups)
        for name in self.active:
            if name in self.merged:
                continue
            p = self.dropouts[name]
            h, A, B = self._operands(name, F.dropout(x, p, self.training) if p and self.training else x)
            s = self.scales[name] * self.weights[name]
            if A.requires_grad and torch.is_grad_enabled() and h.dtype == y.dtype == A.dtype:  # training
                lead = y.shape[:-1]
                y = _LowRankAdd.apply(h.reshape(-1, h.shape[-1]), A, B, y.reshape(-1, y.shape[-1]), s).view(*lead, -1)
            else:
                y = y + F.linear(F.linear(h, A), B).mul(s).to(y.dtype)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_delta(x, self.base(x))
