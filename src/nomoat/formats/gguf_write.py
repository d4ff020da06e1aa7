"""Writing a LLaMA model as a llama.cpp GGUF file: tensor names, q/k permutation, metadata, tokenizer.

Tensors are streamed: all tensor infos are declared up front (their byte sizes follow from shape and
type), then each tensor is converted, quantized with ``gguf.quants`` and written before the next is
touched, so peak memory is the model plus one tensor. The file is written to a temp name and renamed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nomoat import __version__
from nomoat.errors import NomoatError
from nomoat.formats.gguf_read import qk_permute_rows
from nomoat.model.config import LlamaConfig
from nomoat.model.registry import architecture

FTYPES = ("f32", "f16", "q8_0", "q4_0", "q4_1")
_FILE_TYPE = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7}  # llama.cpp's LlamaFileType
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6
# tokenizer.ggml.pre names for the split regexes nomoat.formats.tokenizer knows (llama.cpp's canonical names).
_PRE_NAMES = {"llama-bpe": "llama3", "qwen2": "qwen2"}


def tensor_type(gguf_name: str, shape: tuple[int, ...], ftype: str) -> Any:
    """The GGML type a tensor is stored as: norms and 1-D tensors F32; embeddings/output at least Q8_0
    under a 4-bit ftype (the tied head reads them); rows not a multiple of 32 fall back to F16."""
    import gguf

    T = gguf.GGMLQuantizationType
    if len(shape) == 1 or ftype == "f32":
        return T.F32
    want = {"f16": T.F16, "q8_0": T.Q8_0, "q4_0": T.Q4_0, "q4_1": T.Q4_1}[ftype]
    if want in (T.Q4_0, T.Q4_1) and gguf_name in ("token_embd.weight", "output.weight"):
        want = T.Q8_0
    if want != T.F16 and shape[-1] % 32:
        want = T.F16
    return want


def _nbytes(shape: tuple[int, ...], qtype: Any) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(shape) // block * size


def _pre_name(tj: dict[str, Any]) -> str:
    from nomoat.formats.tokenizer import _SPLITS

    text = json.dumps(tj.get("pre_tokenizer") or {})
    for name, key in _PRE_NAMES.items():
        if json.dumps(_SPLITS[key])[1:-1] in text:
            return name
    if '"Digits"' in text and '"individual_digits": true' in text:
        return "smollm"  # gpt2's regex with every digit split first (nomoat.formats.tokenizer._DIGIT_SPLIT_PRE)
    return "default"


def tokenizer_gguf_metadata(tokenizer: Any, vocab_size: int, carried: Mapping[str, Any] | None = None
                            ) -> dict[str, Any]:
    """``tokenizer.ggml.*`` values (key suffix -> value) for a nomoat Tokenizer.

    `carried` (the source GGUF's tokenizer metadata) is reused as is; otherwise tokens, types and
    merges come from the wrapped ``tokenizers.Tokenizer`` (its tokenizer.json).
    """
    tok = tokenizer
    if carried and carried.get("tokens"):
        meta = {k: v for k, v in carried.items() if v is not None}
    else:
        tj = json.loads(tok.tk.to_str())
        model = tj.get("model") or {}
        if model.get("type") != "BPE":
            raise NomoatError(f"tokenizer model {model.get('type')!r} cannot be written to GGUF (only BPE)")
        text = json.dumps([tj.get("pre_tokenizer"), tj.get("decoder")])
        if '"ByteLevel"' in text:
            kind, pre = "gpt2", _pre_name(tj)
        elif model.get("byte_fallback"):
            kind, pre = "llama", "default"
        else:
            raise NomoatError("tokenizer is neither byte-level BPE nor byte-fallback BPE; cannot write it to GGUF")
        n = tok.vocab_size
        added = tok.tk.get_added_tokens_decoder()
        tokens, types = [], []
        for i in range(n):
            t = tok.token(i)
            if t is None:
                tokens.append(f"[PAD{i}]")
                types.append(TOKEN_UNUSED)
            elif i in added:
                tokens.append(t)
                types.append(TOKEN_CONTROL if added[i].special else TOKEN_USER_DEFINED)
            elif kind == "llama" and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
                tokens.append(t)
                types.append(TOKEN_BYTE)
            else:
                tokens.append(t)
                types.append(TOKEN_NORMAL)
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
        meta = {"model": kind, "pre": pre, "tokens": tokens, "token_type": types, "merges": merges}
        unk = model.get("unk_token")
        if isinstance(unk, str) and tok.tk.token_to_id(unk) is not None:
            meta["unknown_token_id"] = tok.tk.token_to_id(unk)
            types[meta["unknown_token_id"]] = TOKEN_UNKNOWN
        if kind == "llama":
            meta["scores"] = [-float(i) for i in range(n)]  # sentencepiece vocabularies are in score order
            meta["add_space_prefix"] = '"Prepend"' in json.dumps(tj.get("normalizer") or {})
        for key, value in (("bos_token_id", tok.bos_id), ("eos_token_id", tok.eos_id),
                           ("padding_token_id", tok.pad_id)):
            if value is not None:
                meta[key] = value
        meta["add_bos_token"] = bool(tok.add_bos)
        meta["add_eos_token"] = bool(tok.add_eos)
    if tok.chat_template:
        meta["chat_template"] = tok.chat_template
    tokens = list(meta["tokens"])
    if len(tokens) > vocab_size:
        raise NomoatError(f"tokenizer has {len(tokens)} tokens, more than the model's vocab_size {vocab_size}")
    if len(tokens) < vocab_size:  # llama.cpp wants one token per embedding row
        extra = vocab_size - len(tokens)
        tokens += [f"[PAD{i}]" for i in range(len(tokens), vocab_size)]
        meta["token_type"] = list(meta.get("token_type") or [TOKEN_NORMAL] * len(meta["tokens"])) + \
            [TOKEN_UNUSED] * extra
        if meta.get("scores"):
            meta["scores"] = list(meta["scores"]) + [-1e9] * extra
    meta["tokens"] = tokens
    return meta


def _add_tokenizer(w: Any, meta: Mapping[str, Any]) -> None:
    w.add_tokenizer_model(str(meta.get("model", "gpt2")))
    if meta.get("pre"):
        w.add_tokenizer_pre(str(meta["pre"]))
    w.add_token_list(list(meta["tokens"]))
    if meta.get("token_type"):
        w.add_token_types([int(t) for t in meta["token_type"]])
    if meta.get("scores"):
        w.add_token_scores([float(s) for s in meta["scores"]])
    if meta.get("merges"):
        w.add_token_merges(list(meta["merges"]))
    setters = {"bos_token_id": w.add_bos_token_id, "eos_token_id": w.add_eos_token_id,
               "eot_token_id": w.add_eot_token_id, "eom_token_id": w.add_eom_token_id,
               "unknown_token_id": w.add_unk_token_id, "padding_token_id": w.add_pad_token_id}
    for key, setter in setters.items():
        if meta.get(key) is not None:
            setter(int(meta[key]))
    for key, setter in (("add_bos_token", w.add_add_bos_token), ("add_eos_token", w.add_add_eos_token),
                        ("add_space_prefix", w.add_add_space_prefix)):
        if meta.get(key) is not None:
            setter(bool(meta[key]))
    if meta.get("chat_template"):
        w.add_chat_template(str(meta["chat_template"]))


def _rope_freq_factors(cfg: LlamaConfig) -> np.ndarray | None:
    """llama3-style scaling as llama.cpp stores it: one divisor per rotary frequency (rope_freqs.weight)."""
    from nomoat.model.llama import rope_inv_freq

    rs = cfg.rope_scaling or {}
    kind = rs.get("rope_type", rs.get("type"))
    if kind != "llama3" and cfg.extra.get("rope_freq_factors") is None:
        return None
    scaled = dataclasses.replace(cfg, rope_scaling=None if kind == "linear" else cfg.rope_scaling)
    plain = dataclasses.replace(cfg, rope_scaling=None, extra={})
    return (rope_inv_freq(plain) / rope_inv_freq(scaled)).numpy().astype(np.float32)

@contextmanager
def atomic_gguf_writer(path: Path, arch: str = "llama") -> Iterator[Any]:
    """A gguf.GGUFWriter on a temp file that replaces `path` only once fully written."""
    import gguf

    tmp = path.with_name(f".{path.name}.tmp")
    w = gguf.GGUFWriter(str(tmp), arch)
    try:
        yield w
        w.close()
        os.replace(tmp, path)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise


def write_gguf_model(path: str | Path, cfg: LlamaConfig, tensors: Mapping[str, torch.Tensor], tokenizer: Any,
                     ftype: str = "f16", tokenizer_metadata: Mapping[str, Any] | None = None,
                     meta: Mapping[str, Any] | None = None) -> Path:
    """Write a full LLaMA model as GGUF (llama.cpp's names, q/k permutation, llama.* and tokenizer keys).

    Args:
        tensors: float tensors by Hugging Face name; read one at a time while writing.
        tokenizer: a nomoat Tokenizer.
        ftype: f32, f16, q8_0, q4_0 or q4_1 (norms stay F32).
        tokenizer_metadata: the source GGUF's tokenizer metadata, carried over unchanged when given.
        meta: extra provenance, stored as the JSON string ``nomoat.meta``.
    """
    import gguf

    path = Path(path)
    if ftype not in FTYPES:
        raise NomoatError(f"GGUF type {ftype!r} is not one of {', '.join(FTYPES)}")
    arch = architecture("llama")
    shapes = arch.tensor_shapes(cfg)
    for name, shape in shapes.items():
        t = tensors.get(name)
        if t is None:
            raise NomoatError(f"{path}: tensor {name} is missing from the model")
        if tuple(t.shape) != shape:
            raise NomoatError(f"{path}: tensor {name} has shape {tuple(t.shape)}, the config implies {shape}")
    rs = cfg.rope_scaling or {}
    rope_kind = rs.get("rope_type", rs.get("type"))
    if rope_kind not in (None, "default", "linear", "llama3"):
        raise NomoatError(f"{path}: rope_scaling type {rope_kind!r} cannot be written to GGUF")
    tok_meta = tokenizer_gguf_metadata(tokenizer, cfg.vocab_size, tokenizer_metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_gguf_writer(path) as w:
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(cfg.name or path.stem)
        w.add_file_type(_FILE_TYPE[ftype])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_vocab_size(cfg.vocab_size)
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_block_count(cfg.num_hidden_layers)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(cfg.num_attention_heads)
        w.add_head_count_kv(cfg.num_key_value_heads)
        w.add_rope_dimension_count(cfg.head_dim)
        if cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads:
            w.add_key_length(cfg.head_dim)
            w.add_value_length(cfg.head_dim)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        if rope_kind == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(rs["factor"]))
        _add_tokenizer(w, tok_meta)
        w.add_string("nomoat.version", __version__)
        if meta:
            w.add_string("nomoat.meta", json.dumps(dict(meta), sort_keys=True, default=str))
        plan: list[tuple[str, str | None, Any]] = []  # (gguf name, hf name or None for rope_freqs, type)
        factors = _rope_freq_factors(cfg)
        if factors is not None:
            w.add_tensor_info("rope_freqs.weight", factors.shape, np.dtype(np.float32), factors.nbytes)
            plan.append(("rope_freqs.weight", None, gguf.GGMLQuantizationType.F32))
        for name, shape in shapes.items():
            gname = arch.hf_to_gguf_name(name)
            if gname is None:
                raise NomoatError(f"{path}: tensor {name} has no GGUF name")
            qtype = tensor_type(gname, shape, ftype)
            np_dtype = np.float16 if qtype == gguf.GGMLQuantizationType.F16 else np.float32
            is_float = qtype in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32)
            w.add_tensor_info(gname, shape, np.dtype(np_dtype), _nbytes(shape, qtype),
                              raw_dtype=None if is_float else qtype)
            plan.append((gname, name, qtype))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for _, name, qtype in plan:
            if name is None:
                w.write_tensor_data(factors)
                continue
            t = tensors[name].detach().float()
            if not torch.isfinite(t).all():
                raise NomoatError(f"{path}: tensor {name} has NaN or inf values")
            heads = arch.qk_heads(name, cfg)
            if heads is not None:
                t = t[qk_permute_rows(t.shape[0], heads)]
            a = np.ascontiguousarray(t.numpy())
            if qtype == gguf.GGMLQuantizationType.F16:
                a = a.astype(np.float16)
            elif qtype != gguf.GGMLQuantizationType.F32:
                a = gguf.quants.quantize(a, qtype)
            w.write_tensor_data(a)
    return path
