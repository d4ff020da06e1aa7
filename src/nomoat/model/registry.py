"""Per-architecture facts that code outside the model file needs, decided once per architecture.

Adding an architecture means a model file plus one `Architecture` entry here: its module names, which
of them are linear (and so LoRA targets and quantization candidates), their shapes, the heads
llama.cpp's q/k row permutation runs over, and the tensor names of its GGUF files. The functions that
apply these names to files live in `nomoat.formats`; this module only holds them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from nomoat.errors import NomoatError
from nomoat.model.config import LlamaConfig
from nomoat.model.llama import LlamaForCausalLM


@dataclass(frozen=True)
class Architecture:
    """What the rest of nomoat may know about one model family.

    Attributes:
        name: the GGUF `general.architecture` value and config.json `model_type`.
        hf_classes: config.json `architectures` entries that mean this family.
        model: builds the module tree from a config.
        linear_parents: LoRA-targetable projection leaf -> its parent path inside a block.
        aliases: short target names accepted on the command line (q -> q_proj).
        gguf_block_names: GGUF name inside `blk.N.` -> HF name inside `model.layers.N.`.
        gguf_top_names: GGUF top-level tensor -> HF name.
    """

    name: str
    hf_classes: tuple[str, ...]
    model: Callable[[LlamaConfig], nn.Module]
    linear_parents: dict[str, str]
    aliases: dict[str, str]
    gguf_block_names: dict[str, str]
    gguf_top_names: dict[str, str]

    @property
    def linear_leaves(self) -> tuple[str, ...]:
        return tuple(self.linear_parents)

    def is_linear(self, hf_name: str) -> bool:
        """Whether a weight belongs to a matmul (a projection or the output head), not a norm or table."""
        return hf_name == "lm_head.weight" or hf_name.removesuffix(".weight").rsplit(".", 1)[-1] in self.linear_parents

    def linear_shape(self, module: str, cfg: LlamaConfig) -> tuple[int, int] | None:
        """(out, in) of a LoRA-targetable projection such as ``model.layers.3.self_attn.q_proj``, else None."""
        m = re.fullmatch(r"model\.layers\.(\d+)\.(\w+)\.(\w+)", module)
        if not m or int(m.group(1)) >= cfg.num_hidden_layers or self.linear_parents.get(m.group(3)) != m.group(2):
            return None
        h, f = cfg.hidden_size, cfg.intermediate_size
        q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
                "gate_proj": (f, h), "up_proj": (f, h), "down_proj": (h, f)}[m.group(3)]

    def qk_heads(self, name: str, cfg: LlamaConfig) -> int | None:
        """Heads llama.cpp's rotary row permutation runs over for this module or weight (q: heads,
        k: KV heads), else None."""
        leaf = name.removesuffix(".weight")
        if leaf.endswith("self_attn.q_proj"):
            return cfg.num_attention_heads
        if leaf.endswith("self_attn.k_proj"):
            return cfg.num_key_value_heads
        return None

    def tensor_shapes(self, cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
        """HF name -> shape of every weight the model holds (no lm_head when embeddings are tied)."""
        h, v = cfg.hidden_size, cfg.vocab_size
        out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            out[p + "input_layernorm.weight"] = (h,)
            for leaf, parent in self.linear_parents.items():
                out[f"{p}{parent}.{leaf}.weight"] = self.linear_shape(f"{p}{parent}.{leaf}", cfg)  # type: ignore
            out[p + "post_attention_layernorm.weight"] = (h,)
        out["model.norm.weight"] = (h,)
        if not cfg.tie_word_embeddings:
            out["lm_head.weight"] = (v, h)
        return out

    def gguf_to_hf_name(self, name: str) -> str | None:
        if name in self.gguf_top_names:
            return self.gguf_top_names[name]
        m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
        if m and m.group(2) in self.gguf_block_names:
            return f"model.layers.{m.group(1)}.{self.gguf_block_names[m.group(2)]}.weight"
        return None

    def hf_to_gguf_name(self, name: str) -> str | None:
        for g, h in self.gguf_top_names.items():
            if name == h:
                return g
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", name)
        if m:
            for g, h in self.gguf_block_names.items():
                if h == m.group(2):
                    return f"blk.{m.group(1)}.{g}.weight"
        return None


LLAMA = Architecture(
    name="llama",
    hf_classes=("LlamaForCausalLM",),
    model=LlamaForCausalLM,
    linear_parents={"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
                    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"},
    aliases={"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
             "down": "down_proj"},
    gguf_block_names={"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                      "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                      "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                      "ffn_down": "mlp.down_proj"},
    gguf_top_names={"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                    "output.weight": "lm_head.weight"},
)

ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (LLAMA,)}
# Tensors a GGUF file may carry that are not weights of the module tree (read into the config instead).
GGUF_AUXILIARY = ("rope_freqs.weight",)


def architecture(name: str, source: str = "model") -> Architecture:
    """The registry entry for `name`, or a one-line error naming what is supported."""
    arch = ARCHITECTURES.get(name)
    if arch is None:
        raise NomoatError(f"{source}: architecture {name!r} is not supported (supported: "
                          f"{', '.join(ARCHITECTURES)})")
    return arch
