"""The fused one-token decoding step: every layer of a Q4 model in one native call (`nomoat.kernels`).

Serves the common case of `generate`, `chat` and `eval`: one sequence, no adapter attached, weights
in GGUF Q4 blocks (`Q4Linear`) with fused q/k/v and gate/up. Anything else (an adapter, a batch, a
slot cache) returns None and the model's own step runs; both write the same KV cache, so a sequence
may move between them from one token to the next.
"""

from __future__ import annotations

import torch

from nomoat import kernels
from nomoat.model import KVCache, LlamaForCausalLM
from nomoat.quant import Q4Linear


class FusedDecode:
    """Callable installed as `model.fast_decode`; binds a native decoder to each KV cache it meets."""

    def __init__(self, modules: list[tuple[torch.nn.Module, ...]]) -> None:
        self.modules = modules  # per layer: the modules the native step reads, checked on every call

    @classmethod
    def for_model(cls, model: LlamaForCausalLM) -> FusedDecode | None:
        """The fused step for `model`, or None when its layers are not all fused Q4."""
        cfg = model.config
        if kernels.library() is None or cfg.num_attention_heads % cfg.num_key_value_heads:
            return None
        mods = []
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            parts = (attn.fused, attn.o_proj, mlp.fused, mlp.down_proj)
            if not all(isinstance(p, Q4Linear) for p in parts):
                return None
            mods.append((attn, mlp, *attn.parts(), *parts, *mlp.parts()))
        return cls(mods)

    def _current(self, model: LlamaForCausalLM) -> bool:
        """Whether the layers are still the ones bound (no adapter wrapped around a part, nothing refused)."""
        for layer, mods in zip(model.model.layers, self.modules):
            attn, mlp = layer.self_attn, layer.mlp
            now = (attn, mlp, *attn.parts(), attn.fused, attn.o_proj, mlp.fused, mlp.down_proj, *mlp.parts())
            if any(a is not b for a, b in zip(now, mods)):
                return False
        return True

    def _decoder(self, model: LlamaForCausalLM, cache: KVCache) -> kernels.Decoder | None:
        dec = getattr(cache, "_native_decoder", None)
        if dec is not None:
            return dec
        if cache.k.dtype != torch.float32 or cache.k.shape[1] != 1 or not cache.k.is_contiguous():
            return None
        cfg = model.config
        layers = [kernels.NativeLayer(*((m.nib, m.d, m.m) for m in (mods[-6], mods[-5], mods[-4], mods[-3])),
                                      layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
                  for layer, mods in zip(model.model.layers, self.modules)]
        shape = {"hidden": cfg.hidden_size, "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads,
                 "head_dim": cfg.head_dim, "ffn": cfg.intermediate_size, "eps": cfg.rms_norm_eps}
        dec = kernels.Decoder(layers, shape, cache.k, cache.v, model.model.norm.weight)
        cache._native_decoder = dec
        return dec

    def __call__(self, model: LlamaForCausalLM, input_ids: torch.Tensor, cache) -> torch.Tensor | None:
        if type(cache) is not KVCache or cache.pos + 1 > cache.max_len or not self._current(model):
            return None
        dec = self._decoder(model, cache)
        if dec is None:
            return None
        pos = cache.pos
        cos_t, sin_t = model.rotary.tables(pos + 1)
        x = model.embed(input_ids).reshape(-1).float().contiguous()
        dec.step(x, pos, cos_t[pos], sin_t[pos])
        cache.pos += 1
        return x.view(1, 1, -1).to(model.dtype)
