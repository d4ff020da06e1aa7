"""The model's shape: sizes, heads, RoPE, vocabulary. Reading it from files is `nomoat.formats`' job."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from nomoat.errors import NomoatError


@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int = 0
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    name: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "head_dim"):
            v = getattr(self, f)
            if not isinstance(v, int) or v <= 0 or v > 1 << 24:
                raise NomoatError(f"model config: {f} = {v!r} is not a sane positive integer")
        if self.num_attention_heads % self.num_key_value_heads:
            raise NomoatError(
                f"model config: num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise NomoatError(f"model config: head_dim {self.head_dim} is odd (rotary embeddings need pairs)")
        for f, low, high in (("rope_theta", 1.0, 1e12), ("rms_norm_eps", 1e-12, 0.1)):
            v = getattr(self, f)
            if not isinstance(v, int | float) or not math.isfinite(v) or not low <= v <= high:
                raise NomoatError(f"model config: {f} = {v!r} is outside [{low:g}, {high:g}]")
        if not isinstance(self.max_position_embeddings, int) or not 0 < self.max_position_embeddings <= 1 << 24:
            raise NomoatError(f"model config: max_position_embeddings = {self.max_position_embeddings!r} is not a "
                              "sane positive integer")
        self._check_rope_scaling()
        for f in ("bos_token_id", "eos_token_id"):
            v = getattr(self, f)
            ids = v if isinstance(v, list) else [v]
            if v is not None and not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.vocab_size
                                         for i in ids):
                raise NomoatError(f"model config: {f} = {v!r} is not a token id (0..{self.vocab_size - 1})")

    def _check_rope_scaling(self) -> None:
        rs = self.rope_scaling
        if rs is None:
            return
        if not isinstance(rs, dict):
            raise NomoatError(f"model config: rope_scaling = {rs!r} is not an object")
        kind = rs.get("rope_type", rs.get("type"))
        if kind in (None, "default"):
            return
        if kind not in ("linear", "llama3"):
            raise NomoatError(f"model config: rope_scaling type {kind!r} is not supported (linear, llama3)")
        for key in ("factor",) + (("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
                                   if kind == "llama3" else ()):
            v = rs.get(key)
            if key == "factor" and v is None:
                raise NomoatError(f"model config: rope_scaling {kind} needs a 'factor'")
            if v is not None and (not isinstance(v, int | float) or not math.isfinite(v) or v <= 0):
                raise NomoatError(f"model config: rope_scaling.{key} = {v!r} is not a positive number")
        if kind == "llama3" and rs.get("low_freq_factor", 1.0) >= rs.get("high_freq_factor", 4.0):
            raise NomoatError("model config: rope_scaling low_freq_factor must be below high_freq_factor")

    def num_parameters(self) -> int:
        h, f, L = self.hidden_size, self.intermediate_size, self.num_hidden_layers
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        per_layer = h * q + 2 * h * kv + q * h + 3 * h * f + 2 * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + L * per_layer + h + head

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
