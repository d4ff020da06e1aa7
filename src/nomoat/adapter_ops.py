"""Adapter arithmetic and merging: concat / linear / TIES combinations, folding into the base, export.

An adapter here is ``(tensors, scales, weight)``: '<module>.lora_A.weight' [r, in] and
'<module>.lora_B.weight' [out, r] tensors, the per-module scale s, and the user's weight w; its update
to a module is ``w * s * B @ A``. Combined adapters fold every scale into B and carry scale 1.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nomoat.config import LlamaConfig
from nomoat.errors import NomoatError
from nomoat.formats.gguf_adapter import lora_config_for, lora_modules_of, read_gguf_adapter, write_gguf_adapter
from nomoat.formats.peft import read_peft_dir, write_peft_dir
from nomoat.lora import LoraConfig, LoRALinear, merge_adapters

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
            if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
                raise NomoatError(f"{src}: {mod} has A{tuple(A.shape)} B{tuple(B.shape)}, not [r, in] / [out, r]")
            shape = (B.shape[0], A.shape[1])
            if dims.setdefault(mod, shape) != shape:
                raise NomoatError(f"{src}: {mod} is {shape[0]}x{shape[1]} but another adapter has it "
                                  f"{dims[mod][0]}x{dims[mod][1]}: adapters for different base models")
            if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
                raise NomoatError(f"{src}: {mod} has NaN or inf values")
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


# ---- files ----
def read_adapter(path: str | Path, model_cfg: LlamaConfig | None = None
                 ) -> tuple[LoraConfig, dict[str, torch.Tensor], dict[str, float], dict[str, Any]]:
    """A PEFT directory or a GGUF LoRA adapter (which needs the base model's config)."""
    path = Path(path)
    if not path.exists():
        raise NomoatError(f"{path}: no such adapter")
    if path.is_file():
        if path.suffix != ".gguf":
            raise NomoatError(f"{path}: an adapter is a PEFT directory or a .gguf file")
        if model_cfg is None:
            raise NomoatError(f"{path}: reading a GGUF adapter needs the base model (--model)")
        return read_gguf_adapter(path, model_cfg)
    return read_peft_dir(path)


def write_adapter(out: str | Path, cfg: LoraConfig, tensors: dict[str, torch.Tensor], scales: dict[str, float],
                  meta: dict[str, Any], model_cfg: LlamaConfig | None = None, dtype: str = "f32") -> Path:
    """`out` ending in .gguf: a llama.cpp adapter (needs `model_cfg`); anything else: a PEFT directory."""
    out = Path(out)
    if out.suffix == ".gguf":
        if model_cfg is None:
            raise NomoatError(f"{out}: writing a GGUF adapter needs the base model (--model)")
        return write_gguf_adapter(out, cfg, tensors, scales, model_cfg, meta, dtype=dtype)
    base = str(meta.get("base_name") or meta.get("base_model_name_or_path") or "")
    return write_peft_dir(out, cfg, tensors, base, meta)


def combine_files(sources: Sequence[tuple[str | Path, float]], out: str | Path, how: str, rank: int | None = None,
                  density: float = 0.2, model_cfg: LlamaConfig | None = None, force: bool = False
                  ) -> CombineReport:
    """Read adapters, combine them, write the result (PEFT directory, or GGUF when `out` ends in .gguf)."""
    read = [(Path(p), w, read_adapter(p, model_cfg)) for p, w in sources]
    prints = {m.get("base_fingerprint") for _, _, (_, _, _, m) in read} - {None}
    if len(prints) > 1 and not force:
        raise NomoatError(f"adapters were trained on different bases ({', '.join(sorted(prints))}); "
                          "pass --force to combine them anyway")
    tensors, scales, report = combine([(t, s, w) for _, w, (_, t, s, _) in read], how, rank, density)
    first = read[0][2][3]
    meta: dict[str, Any] = {k: first[k] for k in ("base_name", "base_source", "base_model_name_or_path")
                            if first.get(k)}
    if len(prints) == 1:
        meta["base_fingerprint"] = next(iter(prints))
    meta["combined_from"] = [{"path": str(p), "weight": w, "base_fingerprint": m.get("base_fingerprint")}
                             for p, w, (_, _, _, m) in read]
    meta["combine"] = {k: v for k, v in report.as_dict().items() if k != "modules"}
    write_adapter(out, combined_config(tensors, scales), tensors, scales, meta, model_cfg)
    return report


def convert_adapter(src: str | Path, to: str, out: str | Path, model_cfg: LlamaConfig, dtype: str = "f32") -> Path:
    """PEFT directory <-> llama.cpp GGUF adapter, scales and nomoat metadata preserved."""
    if to not in ("gguf", "peft"):
        raise NomoatError(f"--to {to!r} is not supported (supported: gguf, peft)")
    out = Path(out)
    if (out.suffix == ".gguf") != (to == "gguf"):
        raise NomoatError(f"--out {out}: a GGUF adapter must end in .gguf and a PEFT directory must not")
    cfg, tensors, scales, meta = read_adapter(src, model_cfg)
    return write_adapter(out, cfg, tensors, scales, meta, model_cfg, dtype=dtype)


# ---- merging into the base ----
def merge_to_model(lm: Any, adapters: Sequence[tuple[str | Path, float]] = (), force: bool = False) -> Any:
    """Load these adapters (path, weight) onto `lm` and fold every active adapter into the base weights,
    in place (``lora.merge``: W += w * s * B @ A); `lora.unmerge_adapters` takes them out again."""
    from nomoat.adapters import load_adapter

    for path, weight in adapters:
        load_adapter(lm, path, weight=weight, force=force)
    merge_adapters(lm.model)
    return lm


def model_tensors(model: torch.nn.Module, cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    """The weights the model computes with, by HF name (merged adapters included, quantized layers
    dequantized); refuses while an active adapter is still unmerged."""
    from nomoat.formats.gguf_write import model_tensor_shapes

    out: dict[str, torch.Tensor] = {}
    for name in model_tensor_shapes(cfg):
        mod = model.get_submodule(name.removesuffix(".weight"))
        if isinstance(mod, LoRALinear):
            pending = [n for n in mod.active if n not in mod.merged]
            if pending:
                raise NomoatError(f"adapter {pending[0]!r} is active but not merged; merge it before exporting")
            mod = mod.base
        deq = getattr(mod, "dequantize", None)
        out[name] = deq().float() if callable(deq) else mod.weight.detach()
    return out


def _check_type(out: Path, ftype: str) -> None:
    from nomoat.formats.gguf_write import FTYPES

    if out.suffix == ".gguf" and ftype not in FTYPES:
        raise NomoatError(f"--type {ftype!r} is not a GGUF type ({', '.join(FTYPES)})")
    if out.suffix != ".gguf" and ftype not in HF_TYPES:
        raise NomoatError(f"--type {ftype!r} is for GGUF output; a Hugging Face directory takes "
                          f"{', '.join(HF_TYPES)}")


def export_model(lm: Any, out: str | Path, ftype: str = "f16", meta: dict[str, Any] | None = None) -> Path:
    """Write the model as GGUF (`out` ends in .gguf; ftype f32/f16/q8_0/q4_0/q4_1) or an HF directory
    (ftype f32/f16/bf16). A GGUF source's tokenizer metadata is carried over unchanged."""
    from nomoat.formats.gguf_read import GGUFModelFile
    from nomoat.formats.gguf_write import write_gguf_model
    from nomoat.formats.hf import write_hf_dir

    out = Path(out)
    _check_type(out, ftype)
    if out.suffix == ".gguf":
        carried = lm.checkpoint.tokenizer_metadata() if isinstance(lm.checkpoint, GGUFModelFile) else None
        tensors = model_tensors(lm.model, lm.config)
        return write_gguf_model(out, lm.config, tensors, lm.tokenizer, ftype, carried, meta)
    dtypes = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
    tensors = model_tensors(lm.model, lm.config)
    extra = {"nomoat": json.dumps(meta, sort_keys=True, default=str)} if meta else None
    return write_hf_dir(out, lm.config, tensors, lm.tokenizer, dtype=dtypes[ftype], metadata=extra)


def _round_trip(w: torch.Tensor, gguf_name: str, ftype: str) -> torch.Tensor:
    """`w` as it reads back after being stored as `ftype` (GGUF types, or the HF dtypes)."""
    import gguf

    from nomoat.formats.gguf_write import tensor_type

    if ftype in HF_TYPES:
        dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[ftype]
        return w.to(dtype).float()
    qtype = tensor_type(gguf_name, tuple(w.shape), ftype)
    if qtype == gguf.GGMLQuantizationType.F16:
        return w.half().float()
    q = gguf.quants.quantize(w.numpy(), qtype)
    return torch.from_numpy(gguf.quants.dequantize(q, qtype).reshape(w.shape).astype("float32"))


@torch.no_grad()
def update_retention(lm: Any, ftype: str) -> float:
    """Share of the merged adapters' update that survives storing the merged weights as `ftype`:
    <stored(W + D) - W, D> / ||D||^2 over every merged module (1: all of it; 0: none).

    Merging into weights that already sit on a 4-bit grid (a Q4 base, or QLoRA) and re-quantizing to
    the same grid snaps most entries back to where they were, erasing an update far smaller than the
    quantization step; this measures that before anyone ships the file.
    """
    from nomoat.formats.gguf_read import hf_to_gguf_name
    from nomoat.lora import lora_modules

    num = den = 0.0
    for name, mod in lora_modules(lm.model):
        if not mod.merged:
            continue
        merged = mod.base.weight.detach().float()
        delta = sum((mod.lora_B[n].float() @ mod.lora_A[n].float()) * s for n, s in mod.merged.items())
        kept = _round_trip(merged, hf_to_gguf_name(f"{name}.weight") or "", ftype) - (merged - delta)
        num += float((kept.double() * delta.double()).sum())
        den += float(delta.double().square().sum())
    return num / den if den else 1.0


def merge_files(lm: Any, adapters: Sequence[tuple[str | Path, float]], out: str | Path, ftype: str = "f16",
                force: bool = False) -> tuple[Path, float]:
    """Merge adapters into `lm` and export the merged model; provenance goes into the file's metadata.

    Returns the written path and the share of the update that survived `ftype` (see update_retention).
    """
    from nomoat.adapters import base_fingerprint

    if not adapters:
        raise NomoatError("merge: give at least one --adapter")
    _check_type(Path(out), ftype)
    merge_to_model(lm, adapters, force=force)
    meta: dict[str, Any] = {"base_name": lm.name,
                            "merged_adapters": [{"path": str(p), "weight": w} for p, w in adapters]}
    try:
        meta["base_fingerprint"] = base_fingerprint(lm)
    except (OSError, AttributeError, NomoatError):
        pass  # an in-memory model has no checkpoint to fingerprint
    retention = update_retention(lm, ftype)
    meta["update_retention"] = round(retention, 4)
    return export_model(lm, out, ftype, meta), retention
