"""Whole-model export, written once: the weights a loaded model computes with, as GGUF or an HF directory.

Merged adapters are included and quantized layers dequantized; an active, unmerged adapter is refused
(merge it first), so an export never carries LoRA wrapper keys.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from nomoat.errors import NomoatError
from nomoat.formats.gguf_read import GGUFModelFile
from nomoat.formats.gguf_write import FTYPES, tensor_type, write_gguf_model
from nomoat.formats.hf import write_hf_dir
from nomoat.lora import LoRALinear
from nomoat.model.config import LlamaConfig
from nomoat.model.registry import architecture

HF_TYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def model_tensors(model: torch.nn.Module, cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    """The weights the model computes with, by HF name (merged adapters included, quantized layers
    dequantized); refuses while an active adapter is still unmerged."""
    out: dict[str, torch.Tensor] = {}
    for name in architecture("llama").tensor_shapes(cfg):
        mod = model.get_submodule(name.removesuffix(".weight"))
        if isinstance(mod, LoRALinear):
            pending = [n for n in mod.active if n not in mod.merged]
            if pending:
                raise NomoatError(f"adapter {pending[0]!r} is active but not merged; merge it before exporting")
            mod = mod.base
        deq = getattr(mod, "dequantize", None)
        out[name] = deq().float() if callable(deq) else mod.weight.detach()
    return out


def check_type(out: Path, ftype: str) -> None:
    """`ftype` must suit the output: a GGUF type for .gguf, an HF dtype for a directory."""
    if out.suffix == ".gguf" and ftype not in FTYPES:
        raise NomoatError(f"--type {ftype!r} is not a GGUF type ({', '.join(FTYPES)})")
    if out.suffix != ".gguf" and ftype not in HF_TYPES:
        raise NomoatError(f"--type {ftype!r} is for GGUF output; a Hugging Face directory takes "
                          f"{', '.join(HF_TYPES)}")


def export_model(lm: Any, out: str | Path, ftype: str = "f16", meta: dict[str, Any] | None = None) -> Path:
    """Write the model as GGUF (`out` ends in .gguf; ftype f32/f16/q8_0/q4_0/q4_1) or an HF directory
    (ftype f32/f16/bf16). A GGUF source's tokenizer metadata is carried over unchanged."""
    out = Path(out)
    check_type(out, ftype)
    if out.suffix == ".gguf":
        carried = lm.checkpoint.tokenizer_metadata() if isinstance(lm.checkpoint, GGUFModelFile) else None
        tensors = model_tensors(lm.model, lm.config)
        return write_gguf_model(out, lm.config, tensors, lm.tokenizer, ftype, carried, meta)
    tensors = model_tensors(lm.model, lm.config)
    extra = {"nomoat": json.dumps(meta, sort_keys=True, default=str)} if meta else None
    return write_hf_dir(out, lm.config, tensors, lm.tokenizer, dtype=HF_TYPES[ftype], metadata=extra)


def stored_round_trip(w: torch.Tensor, gguf_name: str, ftype: str) -> torch.Tensor:
    """`w` as it reads back after being stored as `ftype` (GGUF types, or the HF dtypes)."""
    import gguf

    if ftype in HF_TYPES:
        return w.to(HF_TYPES[ftype]).float()
    qtype = tensor_type(gguf_name, tuple(w.shape), ftype)
    if qtype == gguf.GGMLQuantizationType.F16:
        return w.half().float()
    q = gguf.quants.quantize(w.numpy(), qtype)
    return torch.from_numpy(gguf.quants.dequantize(q, qtype).reshape(w.shape).astype("float32"))


def recorded_meta(ckpt: Any) -> dict[str, Any]:
    """The provenance `export_model` wrote into a model file (`nomoat.meta` in a GGUF, the safetensors
    header's `nomoat` key in an HF directory), or {} when there is none."""
    from safetensors import safe_open

    if isinstance(ckpt, GGUFModelFile):
        raw = ckpt.get("nomoat.meta")
    else:
        first = next(iter(sorted(set(ckpt.files.values()))), None)
        try:
            with safe_open(str(first), framework="pt") as f:
                raw = (f.metadata() or {}).get("nomoat")
        except Exception:  # unreadable headers are the loader's to report; provenance is optional
            raw = None
    try:
        meta = json.loads(raw) if isinstance(raw, str) else {}
    except json.JSONDecodeError:
        return {}
    return meta if isinstance(meta, dict) else {}
