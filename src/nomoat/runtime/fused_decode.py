"""The fused one-token decoding step: every layer of a Q4 model in one native call (`nomoat.kernels`).

Serves `generate`, `chat` and `eval` (one sequence in a `KVCache`) and the server's continuous
batching (many sequences in a `SlotCache`, each at its own position, each with its own adapter stack)
when the weights are GGUF Q4 blocks (`Q4Linear`) with fused q/k/v and gate/up. LoRA adapters on the
projections run inside the step in float32, as `LoRALinear.add_delta` runs them: model-wide active
adapters, or per-row stacks (`lora.set_row_adapters`). Anything else (a merged adapter, another dtype
or layout) returns None and the model's own step runs; both write the same KV cache, so a sequence may
move between them from one token to the next.
"""

from __future__ import annotations

import torch

from nomoat import kernels
from nomoat.lora.layer import LoRALinear
from nomoat.model import KVCache, LlamaForCausalLM
from nomoat.model.llama import SlotCache
from nomoat.quant import Q4Linear

# Positions in FusedDecode._parts of the projections an adapter can wrap, and the step's name for each.
_WRAPPABLE = {0: "q", 1: "k", 2: "v", 4: "o", 6: "down", 7: "gate", 8: "up"}


class FusedDecode:
    """Callable installed as `model.fast_decode`; binds a native decoder to each KV buffer it meets."""

    def __init__(self, model: LlamaForCausalLM, modules: list[tuple[torch.nn.Module, ...]]) -> None:
        self.modules = modules  # per layer: q, k, v, fused qkv, o, fused gate/up, down, gate, up
        # Where each part lives (the owner's dict and key, as _parts reads them), for a check every step that
        # costs dictionary lookups rather than module attribute access.
        self.places = []
        for layer, mods in zip(model.model.layers, modules):
            a, m = layer.self_attn, layer.mlp
            where = [(a._modules, "q_proj"), (a._modules, "k_proj"), (a._modules, "v_proj"), (a.__dict__, "fused"),
                     (a._modules, "o_proj"), (m.__dict__, "fused"), (m._modules, "down_proj"),
                     (m._modules, "gate_proj"), (m._modules, "up_proj")]
            self.places.append([(d, k, bound, i) for i, ((d, k), bound) in enumerate(zip(where, mods))])

    @classmethod
    def for_model(cls, model: LlamaForCausalLM) -> FusedDecode | None:
        """The fused step for `model`, or None when its layers are not all fused Q4."""
        cfg = model.config
        if (kernels.library() is None or cfg.num_attention_heads % cfg.num_key_value_heads or cfg.head_dim % 16
                or cfg.head_dim > 128 or cfg.num_attention_heads // cfg.num_key_value_heads > 64):
            return None
        mods = []
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            mods.append(cls._parts(layer))
            if not all(isinstance(p, Q4Linear) for p in (attn.fused, attn.o_proj, mlp.fused, mlp.down_proj)):
                return None
        return cls(model, mods)

    @staticmethod
    def _parts(layer: torch.nn.Module) -> tuple[torch.nn.Module, ...]:
        attn, mlp = layer.self_attn, layer.mlp
        return (*attn.parts(), attn.fused, attn.o_proj, mlp.fused, mlp.down_proj, *mlp.parts())

    def _wrappers(self, model: LlamaForCausalLM) -> list[list[tuple[str, LoRALinear]]] | None:
        """Per layer, the LoRA wrappers around bound projections (part name, wrapper); None when a layer no
        longer runs as bound (a projection replaced, an adapter merged into a quantized base).

        The answer is kept while the same objects sit in the same places and the adapters' version (bumped by
        every merge) is unchanged: then only the identity checks run, not the wrappers' attribute reads."""
        plan = model.__dict__.get("_row_plan")
        now = [d.get(key) for places in self.places for d, key, _, _ in places]
        version = (id(plan), plan.version if plan is not None else 0)
        last = self.__dict__.get("_last")
        if last is not None and last[0] == version and all(a is b for a, b in zip(now, last[1])):
            return last[2]
        out = self._find_wrappers()
        self._last = (version, now, out)
        return out

    def _find_wrappers(self) -> list[list[tuple[str, LoRALinear]]] | None:
        out = []
        for places in self.places:
            found = []
            for d, key, bound, i in places:
                now = d.get(key)
                if now is bound:
                    continue
                if i not in _WRAPPABLE or not isinstance(now, LoRALinear) or now.base is not bound or now.merged:
                    return None
                found.append((_WRAPPABLE[i], now))
            out.append(found)
        return out

    @staticmethod
    def _bind_loras(dec: kernels.Decoder, wrappers: list[list[tuple[str, LoRALinear]]], rows: int,
                    groups: dict | None) -> dict[str, torch.Tensor]:
        """Give `dec` every update the step adds; returns adapter name -> its per-row weight vector (rows,), which
        the caller fills each step (row stacks) or which stays all ones (model-wide active adapters)."""
        weights: dict[str, torch.Tensor] = {}
        per_layer = []
        for found in wrappers:
            items = []
            for part, mod in found:
                names = list(mod.lora_A) if groups is not None else [n for n in mod.active if n in mod.lora_A]
                for n in names:
                    w = weights.setdefault(n, torch.ones(rows) if groups is None else torch.zeros(rows))
                    scale = mod.scales[n] * (mod.weights[n] if groups is None else 1.0)
                    A = mod.lora_A[n].detach().float().contiguous()
                    Bt = mod.lora_B[n].detach().float().t().contiguous()
                    items.append((A, Bt, w, scale, part))
            per_layer.append(items)
        dec.set_loras(per_layer)
        return weights

    def _prepare_loras(self, model: LlamaForCausalLM, dec: kernels.Decoder, B: int) -> bool:
        """Bind this step's adapters (rebinding only when they changed); False when the step cannot run them."""
        wrappers = self._wrappers(model)
        if wrappers is None:
            return False
        plan = next((mod.plan for found in wrappers for _, mod in found), None)
        groups = plan.groups if plan is not None else None
        # What the bound copies depend on: the adapters' state (the plan's version counts every change made
        # through nomoat.lora) and the factors' in-place edits (tensor versions, e.g. an optimizer step).
        key = (groups is None, plan.version if plan is not None else 0, id(plan))
        if key != dec.lora_key or sum(p._version for p in dec.lora_params) != dec.lora_versions:
            if any(mod.lora_A[n].shape[0] > kernels.MAX_RANK for found in wrappers for _, mod in found
                   for n in mod.lora_A):
                return False
            dec.lora_weights = self._bind_loras(dec, wrappers, dec.k_cache.shape[1], groups)
            dec.lora_params = [p for found in wrappers for _, mod in found
                               for p in (*mod.lora_A.values(), *mod.lora_B.values())]
            dec.lora_versions = sum(p._version for p in dec.lora_params)
            dec.lora_key = key
        if groups is not None:
            for n, w in dec.lora_weights.items():
                w.zero_()
                if n in groups:
                    idx, ws = groups[n]
                    w[idx] = ws.reshape(-1).float()
        if groups is not None and any(n not in dec.lora_weights for n in groups):
            return False  # a row asks for an adapter no layer here knows: let the model's step raise or skip it
        return True

    def _decoder(self, model: LlamaForCausalLM, k: torch.Tensor, v: torch.Tensor, holder) -> kernels.Decoder | None:
        dec = getattr(holder, "_native_decoder", None)
        if dec is not None and dec.bound_to(k):
            return dec
        if k.dtype not in (torch.float32, torch.float16) or not (k.is_contiguous() and v.is_contiguous()):
            return None
        cfg = model.config
        layers = [kernels.NativeLayer(*((m.nib, m.d, m.m) for m in mods[3:7]),
                                      layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
                  for layer, mods in zip(model.model.layers, self.modules)]
        shape = {"hidden": cfg.hidden_size, "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads,
                 "head_dim": cfg.head_dim, "ffn": cfg.intermediate_size, "eps": cfg.rms_norm_eps}
        dec = kernels.Decoder(layers, shape, k, v, model.model.norm.weight)
        holder._native_decoder = dec
        return dec

    def __call__(self, model: LlamaForCausalLM, input_ids: torch.Tensor, cache) -> torch.Tensor | None:
        B = input_ids.shape[0]
        if input_ids.shape[1] != 1 or model.training:  # training-mode dropout belongs to the model's own step
            return None
        if type(cache) is KVCache:
            if B != 1 or cache.k.shape[1] != 1 or cache.pos + 1 > cache.max_len:
                return None
            pos = torch.tensor([cache.pos], dtype=torch.int32)
        elif type(cache) is SlotCache:
            cache.ensure(int(cache.lens[:B].max()) + 1)
            pos = cache.lens[:B].to(torch.int32)
        else:
            return None
        dec = self._decoder(model, cache.k, cache.v, cache)
        if dec is None or not self._prepare_loras(model, dec, B):
            return None
        cos_t, sin_t = model.rotary.tables(int(pos.max()) + 1)
        x = model.embed(input_ids).reshape(B, -1).float().contiguous()
        dec.step(x, pos, cos_t, sin_t)
        if type(cache) is KVCache:
            cache.pos += 1
        else:
            cache.lens[:B] += 1
        return x.view(B, 1, -1).to(model.dtype)
