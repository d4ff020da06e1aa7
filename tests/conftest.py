"""Shared fixtures: the real default model (loaded once), its transformers reference, and a tiny random model.

`make_tiny_lm` is a plain function so that any test can build a deterministic tiny LLaMA with a real
byte-level BPE tokenizer and a ChatML template, in milliseconds, with no model file.
"""

from __future__ import annotations

import json
import math
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from nomoat.errors import NomoatError
from nomoat.formats.hf import config_to_hf
from nomoat.formats.tokenizer import Tokenizer
from nomoat.model import LlamaForCausalLM
from nomoat.model.config import LlamaConfig
from nomoat.runtime.loading import LoadedModel, build_model, default_model_path, load

# SmolLM2's layout: <|endoftext|> 0, <|im_start|> 1 (BOS), <|im_end|> 2 (EOS and padding).
# The test machines' few cores are shared: with more threads than free cores, OpenMP's spinning workers
# make every matmul several times slower, so tests run on one thread unless told otherwise.
torch.set_num_threads(int(os.environ.get("NOMOAT_TEST_THREADS", "1")))

TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_VOCAB = 300
_TINY_CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps in the sun.",
    "Hello world! Hello there, how are you today? I am fine, thank you.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
    "One, two, three: 1 2 3 and 12345 and 3.14159. Numbers are fun.",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nParis.<|im_end|>\n",
    "A tiny model for tests, with a tiny tokenizer trained in the test session.",
] * 4


@lru_cache(maxsize=1)
def _tiny_tokenizer_json() -> str:
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=TINY_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(_TINY_CORPUS, trainer)
    assert tk.get_vocab_size() == TINY_VOCAB, "the corpus is too small for the requested vocabulary"
    return tk.to_str()


def make_tiny_tokenizer() -> Tokenizer:
    """A fresh byte-level BPE tokenizer (300 tokens) with ChatML specials and template."""
    tk = HFTokenizer.from_str(_tiny_tokenizer_json())
    return Tokenizer(tk, bos_id=1, eos_id=2, pad_id=2, add_bos=False, chat_template=CHATML)


def tiny_config(tie: bool = True, **overrides: Any) -> LlamaConfig:
    fields: dict[str, Any] = dict(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
        max_position_embeddings=512, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2,
        name="tiny-llama")
    fields.update(overrides)
    return LlamaConfig(**fields)


def make_tiny_lm(seed: int = 0, tie: bool = True, **overrides: Any) -> LoadedModel:
    """A deterministic tiny random LLaMA (2 layers, hidden 64, 4 heads, 2 KV heads, vocab 300).

    `overrides` are LlamaConfig fields (e.g. num_key_value_heads=4, max_position_embeddings=64,
    rope_scaling={...}). Weights come from a private generator seeded with `seed`, scaled so the
    logits are neither flat nor one-hot; norm weights are jittered around 1 so that mixing them up is
    visible. The model is built like `nomoat.runtime.loading.load` builds it (eval mode, no gradients).
    """
    cfg = tiny_config(tie, **overrides)
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    tensors = {}
    for name, shape in sorted(shapes.items()):
        if tie and name == "lm_head.weight":
            continue
        if len(shape) == 1:
            t = 1 + 0.1 * torch.randn(shape, generator=g)
        elif name in ("model.embed_tokens.weight", "lm_head.weight"):
            t = 0.25 * torch.randn(shape, generator=g)
        else:
            t = torch.randn(shape, generator=g) / math.sqrt(shape[1])
        tensors[name] = t
    model = build_model(cfg, tensors)
    return LoadedModel(model=model, tokenizer=make_tiny_tokenizer(), config=cfg, source=Path("tiny-llama"),
                       source_format="memory", load_seconds=0.0,
                       weight_types=dict.fromkeys(shapes, "float32"))


def hf_twin(lm: LoadedModel):
    """The same weights in transformers' LlamaForCausalLM (float32, eager build, no file)."""
    import transformers

    hf_cfg = transformers.LlamaConfig(**config_to_hf(lm.config))
    hf = transformers.LlamaForCausalLM(hf_cfg).float().eval()
    sd = {k: v.float() for k, v in lm.model.state_dict().items()}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    if lm.config.tie_word_embeddings:
        hf.tie_weights()
    return hf


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative error ||a - ref|| / ||ref||, in float64."""
    a, ref = a.double(), ref.double()
    return ((a - ref).norm() / ref.norm()).item()


@pytest.fixture
def tiny_model():
    """Factory: `tiny_model(seed=0, tie=True, **config_overrides)` -> LoadedModel."""
    return make_tiny_lm


@pytest.fixture(scope="session")
def default_model_file() -> Path:
    try:
        return default_model_path()
    except NomoatError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def default_lm(default_model_file: Path) -> LoadedModel:
    """The embedded default model (SmolLM2-135M-Instruct Q4_1), loaded once per session."""
    return load(default_model_file)


def _fingerprint(lm: LoadedModel) -> tuple:
    """Module layout, a strided sample of every weight, and the tokenizer's stop set: cheap to take."""
    with torch.no_grad():
        sample = torch.stack([p.detach().reshape(-1)[::997].sum(dtype=torch.float64)
                              for p in lm.model.state_dict().values()])
    layout = tuple((n, type(m).__name__) for n, m in lm.model.named_modules())
    return layout, sample, lm.tokenizer.stop_ids, lm.model.training


@pytest.fixture(autouse=True)
def _default_lm_unchanged(request):
    """The session's `default_lm` is shared: fail the test that leaves it modified (LoRA left in, merged
    weights, a changed tokenizer), rather than a later test that trips over it."""
    if "default_lm" not in request.fixturenames:
        yield
        return
    lm = request.getfixturevalue("default_lm")
    before = _fingerprint(lm)
    yield
    after = _fingerprint(lm)
    assert before[0] == after[0] and torch.equal(before[1], after[1]) and before[2:] == after[2:], (
        f"{request.node.nodeid} left the shared default_lm modified; restore it, or load a private copy")


@pytest.fixture(scope="session")
def hf_ref(default_model_file: Path):
    """transformers' own GGUF loading of the default model: (model, tokenizer), float32."""
    transformers = pytest.importorskip("transformers")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    d, name = str(default_model_file.parent), default_model_file.name
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=name)
    return model, tok


def gguf_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's `LlamaModel.permute` of q/k rows (HF order -> GGUF order)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2)
            .reshape(w.shape))


def write_tiny_gguf(lm: LoadedModel, path: Path, arch: str = "llama",
                    extra: dict[str, np.ndarray] | None = None, linear_type: str | None = None,
                    embed_type: str | None = None) -> Path:
    """Write a (tiny) model as an F32 GGUF the way llama.cpp's converter lays it out (plus `extra` tensors);
    `linear_type` / `embed_type` (e.g. "Q4_1", "Q8_0") quantize the layers' linear weights / the embedding
    with gguf's own quantizer."""
    import gguf

    from nomoat.model.registry import LLAMA

    cfg, tok = lm.config, lm.tokenizer
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(cfg.name)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([tok.token(i) for i in range(tok.vocab_size)])
    specials = {t.content for t in tok.tk.get_added_tokens_decoder().values() if t.special}
    w.add_token_types([3 if tok.token(i) in specials else 1 for i in range(tok.vocab_size)])
    merges = json.loads(tok.tk.to_str())["model"]["merges"]
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(tok.bos_id)
    w.add_eos_token_id(tok.eos_id)
    w.add_pad_token_id(tok.pad_id)
    w.add_add_bos_token(tok.add_bos)
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)
    for name, t in lm.model.state_dict().items():
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        a = t.float().numpy()
        if name.endswith("q_proj.weight"):
            a = gguf_permute(a, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            a = gguf_permute(a, cfg.num_key_value_heads)
        qtype = embed_type if name == "model.embed_tokens.weight" else linear_type if LLAMA.is_linear(name) else None
        if qtype:
            kind = gguf.GGMLQuantizationType[qtype]
            w.add_tensor(LLAMA.hf_to_gguf_name(name), gguf.quants.quantize(np.ascontiguousarray(a), kind),
                         raw_dtype=kind)
            continue
        w.add_tensor(LLAMA.hf_to_gguf_name(name), np.ascontiguousarray(a))
    for name, a in (extra or {}).items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
