"""LLaMA-family decoder: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU.

Module and parameter names follow Hugging Face's LlamaForCausalLM
(``model.layers.N.self_attn.q_proj.weight`` ...) so that state dicts and PEFT
adapter keys map one to one without renaming.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from nomoat.model.config import LlamaConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, device=device))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 as the reference does (bf16 variance loses too much), with torch's fused
        # kernel: one op instead of six on the per-token path.
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def rope_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    rs = cfg.rope_scaling or {}
    kind = rs.get("rope_type", rs.get("type"))
    if kind == "llama3":
        factor = float(rs["factor"])
        low, high = float(rs.get("low_freq_factor", 1.0)), float(rs.get("high_freq_factor", 4.0))
        old_ctx = float(rs.get("original_max_position_embeddings", 8192))
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    elif kind == "linear":
        inv_freq = inv_freq / float(rs["factor"])
    factors = cfg.extra.get("rope_freq_factors")
    if factors is not None:  # GGUF stores llama3 scaling as one divisor per frequency
        inv_freq = inv_freq / torch.tensor(factors, dtype=torch.float32)
    return inv_freq


class Rotary(nn.Module):
    """cos/sin tables, grown on demand so long-context models cost nothing up front."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self._cos = torch.empty(0)
        self._sin = torch.empty(0)

    def tables(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cos.shape[0] < n:
            size = max(n, 2 * self._cos.shape[0], 256)
            t = torch.arange(size, dtype=torch.float32)
            freqs = torch.outer(t, self.inv_freq.float())
            emb = torch.cat((freqs, freqs), dim=-1)
            self._cos, self._sin = emb.cos(), emb.sin()
        return self._cos, self._sin


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class KVCache:
    """Preallocated keys and values for every layer: [layers, batch, kv_heads, max_len, head_dim]."""

    def __init__(self, cfg: LlamaConfig, batch: int, max_len: int, dtype: torch.dtype = torch.float32):
        # float32 by default whatever the weights: the cache is small next to them for these models.
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype)
        self.v = torch.zeros(shape, dtype=dtype)
        self.max_len = max_len
        self.pos = 0

    def reset(self) -> None:
        self.pos = 0


class SlotCache:
    """Keys and values for continuous batching: one row (slot) per running sequence, each at its own length.

    Rows [0, n) are in use, n given by the batch fed; the engine keeps live rows packed at the front.
    Layout [layers, slots, kv_heads, capacity, head_dim]; the capacity grows (doubling) as sequences do,
    so memory follows the longest running sequence rather than the model's context.
    """

    def __init__(self, cfg: LlamaConfig, slots: int, capacity: int = 256, dtype: torch.dtype = torch.float32):
        self.cfg, self.slots, self.dtype = cfg, slots, dtype
        self.lens = torch.zeros(slots, dtype=torch.long)
        self._alloc(capacity)

    def _alloc(self, capacity: int) -> None:
        shape = (self.cfg.num_hidden_layers, self.slots, self.cfg.num_key_value_heads, capacity, self.cfg.head_dim)
        self.k = torch.zeros(shape, dtype=self.dtype)
        self.v = torch.zeros(shape, dtype=self.dtype)
        self.capacity = capacity

    def ensure(self, length: int) -> None:
        """Room for `length` positions in every row (a bigger buffer, old contents kept)."""
        if length <= self.capacity:
            return
        cap = min(max(length, 2 * self.capacity), max(length, self.cfg.max_position_embeddings))
        old_k, old_v, old_cap = self.k, self.v, self.capacity
        self._alloc(cap)
        self.k[..., :old_cap, :] = old_k
        self.v[..., :old_cap, :] = old_v

    def shrink(self, capacity: int = 256) -> None:
        """Drop every row and go back to a small buffer (when nothing runs)."""
        self.lens.zero_()
        if self.capacity > capacity:
            self._alloc(capacity)

    def load(self, row: int, cache: KVCache, length: int) -> None:
        """Put a sequence prefilled in its own cache (batch 1) into `row`."""
        self.ensure(length)
        self.k[:, row, :, :length] = cache.k[:, 0, :, :length]
        self.v[:, row, :, :length] = cache.v[:, 0, :, :length]
        self.lens[row] = length

    def move(self, src: int, dst: int) -> None:
        """Copy row `src` into row `dst` (to keep live rows packed when one leaves)."""
        n = int(self.lens[src])
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self.lens[dst] = n


class FusableBlock(nn.Module):
    """A block whose parallel projections (q/k/v, gate/up) may also run as one fused layer.

    The fused layer is an inference-only alias of the same weights, set at load time by
    `fuse_projections`; it is kept out of the module tree (no state_dict keys, invisible to LoRA
    targeting). A part wrapped in a LoRA keeps the fused base: the fused output's slice for that part
    goes through the wrapper's `add_delta`, which adds the low-rank update. Replacing a part's weights
    in any other way must call `set_fused(None)`, so the block falls back to its separate layers.
    """

    fused: nn.Module | None

    def parts(self) -> tuple[nn.Module, ...]:
        raise NotImplementedError

    def set_fused(self, fused: nn.Module | None) -> None:
        object.__setattr__(self, "fused", fused)  # a plain attribute, not a registered submodule

    def fused_parts(self, x: torch.Tensor, sizes: tuple[int, ...]) -> list[torch.Tensor]:
        """Each part's output from one fused matmul, with any adapter on a part added (`add_delta`)."""
        assert self.fused is not None
        outs = self.fused(x).split(sizes, dim=-1)
        return [p.add_delta(x, o) if hasattr(p, "add_delta") else o for p, o in zip(self.parts(), outs)]


def fuse_projections(model: nn.Module, fuse: Callable[[list[nn.Module]], nn.Module | None]) -> int:
    """Give every attention its q/k/v and every MLP its gate/up as one layer, where `fuse` can."""
    n = 0
    for m in model.modules():
        if isinstance(m, FusableBlock):
            fused = fuse(list(m.parts()))
            if fused is not None:
                m.set_fused(fused)
                n += 1
    return n


class Attention(FusableBlock):
    def __init__(self, cfg: LlamaConfig, device=None) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        h = cfg.hidden_size
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=False, device=device)
        self.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=False, device=device)
        self.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=False, device=device)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=False, device=device)
        self.set_fused(None)

    def parts(self) -> tuple[nn.Module, ...]:
        return self.q_proj, self.k_proj, self.v_proj

    def forward(self, x, cos, sin, mask, cache: KVCache | None, layer: int) -> torch.Tensor:
        B, T, _ = x.shape
        nq, nkv = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        if self.fused is not None:
            q, k, v = self.fused_parts(x, (nq, nkv, nkv))
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        # Rotate q and k in one go: [B, heads + kv_heads, T, D].
        qk = torch.cat((q.reshape(B, T, self.n_heads, self.head_dim), k.reshape(B, T, self.n_kv, self.head_dim)),
                       dim=2).transpose(1, 2)
        qk = (qk * cos + rotate_half(qk) * sin).to(x.dtype)
        q, k = qk.split((self.n_heads, self.n_kv), dim=1)
        v = v.reshape(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        out_dtype = x.dtype
        if isinstance(cache, SlotCache):
            # One new token per row, each row at its own length: write it there, attend over the keys up to
            # the longest row, with the mask hiding what lies past each row's own length.
            rows = torch.arange(B)
            cache.k[layer, rows, :, cache.lens[:B]] = k[:, :, 0].to(cache.dtype)
            cache.v[layer, rows, :, cache.lens[:B]] = v[:, :, 0].to(cache.dtype)
            S = mask.shape[-1]
            k, v = cache.k[layer, :B, :, :S].float(), cache.v[layer, :B, :, :S].float()
            qg = q.to(k.dtype).view(B, self.n_kv, self.n_heads // self.n_kv, self.head_dim)
            out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask).view(B, self.n_heads, 1, self.head_dim)
            return self.o_proj(out.transpose(1, 2).reshape(B, 1, -1).to(out_dtype))
        if cache is not None:
            p = cache.pos
            cache.k[layer, :, :, p:p + T] = k
            cache.v[layer, :, :, p:p + T] = v
            # SDPA's float32 CPU path is the faster one (and a no-op copy for a float32 cache).
            k = cache.k[layer, :, :, :p + T].float()
            v = cache.v[layer, :, :, :p + T].float()
            q = q.float()
        rep = self.n_heads // self.n_kv
        if T == 1 and cache is not None:
            # One new token: the `rep` query heads sharing a KV head become `rep` rows attending to
            # the same keys, with no causal mask needed. Several times faster than repeating K/V.
            qg = q.view(B, self.n_kv, rep, self.head_dim)
            out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask).view(B, self.n_heads, 1, self.head_dim)
        elif rep > 1 and (mask is not None or cache is not None):
            # SDPA's enable_gqa takes a slow path with explicit masks; repeating K/V is cheap here.
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                                 enable_gqa=rep > 1)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1).to(out_dtype))


class MLP(FusableBlock):
    def __init__(self, cfg: LlamaConfig, device=None) -> None:
        super().__init__()
        h, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(h, f, bias=False, device=device)
        self.up_proj = nn.Linear(h, f, bias=False, device=device)
        self.down_proj = nn.Linear(f, h, bias=False, device=device)
        self.set_fused(None)

    def parts(self) -> tuple[nn.Module, ...]:
        return self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None:
            gate, up = self.fused_parts(x, (self.gate_proj.out_features, self.up_proj.out_features))
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        if not torch.is_grad_enabled():  # inference: reuse the gate's buffer (less peak memory on long prompts)
            return self.down_proj(F.silu(gate, inplace=True).mul_(up))
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig, device=None) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, device)
        self.mlp = MLP(cfg, device)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device)

    def forward(self, x, cos, sin, mask, cache, layer):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg: LlamaConfig, device=None) -> None:
        super().__init__()
        # On the meta device (loading), hand Embedding its storage: its random init there would go through
        # torch's reference ops and import torch._dynamo (~1.4 s per load). Linear's init does not.
        table = torch.empty(cfg.vocab_size, cfg.hidden_size, device="meta") if str(device) == "meta" else None
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, device=device, _weight=table)
        self.layers = nn.ModuleList(DecoderLayer(cfg, device) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: LlamaConfig, device: torch.device | str | None = None) -> None:
        """device="meta" builds the module tree without allocating or initialising weights."""
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg, device)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, device=device)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = Rotary(cfg)
        self.gradient_checkpointing = False
        # A faster one-token step for a single sequence, set by the loader when it has one: called as
        # fast_decode(model, input_ids, cache) -> final hidden states, or None when it cannot serve this
        # call (an adapter attached, another cache kind), and the step below runs instead.
        self.fast_decode: Callable | None = None
        # What decoding caches keys and values in (generate and the batching engine ask the model).
        self.kv_dtype = torch.float32

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Final normed hidden states [B, T, H].

        attention_mask: [B, S] bool, True where a key is a real token, S = tokens in
        the cache after this call (or T without a cache). Padding goes on the left
        for generation, on the right for training. Without a cache it may also be a
        whole pattern [B, T, T], True where query t sees key s (e.g. two completions
        packed after one shared prompt); every query must see at least one key.
        """
        B, T = input_ids.shape
        if isinstance(cache, SlotCache):
            return self._slot_step(input_ids, cache)
        if (self.fast_decode is not None and T == 1 and B == 1 and cache is not None and position_ids is None
                and attention_mask is None and not torch.is_grad_enabled()):
            h = self.fast_decode(self, input_ids, cache)
            if h is not None:
                return h
        past = cache.pos if cache is not None else 0
        if cache is not None and past + T > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} tokens, asked for {past + T}")
        if position_ids is None:
            position_ids = torch.arange(past, past + T).expand(B, T)
        cos_t, sin_t = self.rotary.tables(int(position_ids.max()) + 1)
        cos = cos_t[position_ids].unsqueeze(1)
        sin = sin_t[position_ids].unsqueeze(1)
        mask = None
        if attention_mask is not None and attention_mask.dim() == 3:
            if cache is not None:
                raise ValueError("a [B, T, T] attention pattern cannot be used with a KV cache")
            mask = attention_mask.bool().unsqueeze(1)  # [B, 1, T, T]
        elif attention_mask is not None or (cache is not None and T > 1):
            S = past + T
            q_idx = torch.arange(past, S).view(T, 1)
            allowed = torch.arange(S).view(1, S) <= q_idx
            if attention_mask is not None:
                allowed = allowed & attention_mask[:, None, :S].bool()
                # A padding query would see no key at all; let it see itself to avoid NaN.
                allowed = allowed | (torch.arange(S).view(1, S) == q_idx)
                mask = allowed.unsqueeze(1)
            else:
                mask = allowed.view(1, 1, T, S)
        x = self.embed(input_ids)
        for i, layer in enumerate(self.model.layers):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, mask, cache, i, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache, i)
        if cache is not None:
            cache.pos += T
        return self.model.norm(x)

    def _slot_step(self, input_ids: torch.Tensor, cache: SlotCache) -> torch.Tensor:
        """One decoding step for rows 0..B-1 of a slot cache, each at its own position."""
        B, T = input_ids.shape
        if T != 1:
            raise ValueError("a slot cache takes one token per row; prefill into a KVCache and load it")
        if self.fast_decode is not None and not torch.is_grad_enabled():
            h = self.fast_decode(self, input_ids, cache)
            if h is not None:
                return h
        lens = cache.lens[:B]
        S = int(lens.max()) + 1
        cache.ensure(S)
        cos_t, sin_t = self.rotary.tables(S)
        pos = lens.view(B, 1)
        cos, sin = cos_t[pos].unsqueeze(1), sin_t[pos].unsqueeze(1)
        mask = (torch.arange(S).view(1, S) <= lens.view(B, 1)).view(B, 1, 1, S)
        x = self.embed(input_ids)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, mask, cache, i)
        cache.lens[:B] += 1
        return self.model.norm(x)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | SlotCache | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        h = self.hidden_states(input_ids, position_ids, attention_mask, cache)
        if last_only:
            h = h[:, -1:]
        return self.lm_head(h)
