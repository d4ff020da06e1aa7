"""Quantized linear layers for CPU: int4 group-wise and int8 per-channel weight-only layers, the GGUF-block
layers of the native kernels, and `W8A8Linear` (int8 weights and int8 activations) for training a frozen base.

Both layers run torch's weight-only kernels with bf16 activations, the only fast path on this kind
of CPU (``_weight_int4pack_mm_for_cpu`` is ~25x and ``_weight_int8pack_mm`` ~15x slower with fp32
activations; fp16 is slower still). The kernels demand scales of the activation dtype, so scales
and zeros are stored in bf16 (8 significant bits). Measured on torch 2.13: both kernels dequantize
the weight in fp32 from those bf16 scales, accumulate in fp32 and round the output to bf16, so
``dequantize()`` returns exactly the fp32 weight the kernel multiplies by.

Layers are frozen (no parameters). Gradients flow to the input: the backward pass rebuilds the
weight a few columns at a time from the packed codes, never holding a float copy of the whole matrix.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nomoat import kernels
from nomoat.errors import NomoatError

__all__ = ["Int4Linear", "Int8Linear", "W8A8Linear", "Q4Linear", "Q8Linear", "Q8Embedding", "q4_blocks_to_codes",
           "q8_0_blocks_to_codes", "quantize_linears"]

_BF16 = torch.bfloat16
# (header bytes, bytes per 32-element block): fp16 d [+ fp16 m] then 16 bytes of nibbles.
_Q4_BLOCKS = {"Q4_0": (2, 18), "Q4_1": (4, 20)}
_GROUP_SIZES = (32, 64, 128)
# Rebuild at most this many weight elements at once in backward (8 MiB of bf16).
_CHUNK_ELEMS = 1 << 22


def q4_blocks_to_codes(raw: np.ndarray, qtype: str) -> tuple[Tensor, Tensor, Tensor]:
    """Split GGUF Q4_0/Q4_1 blocks into (codes uint8 0..15, scale f32, offset f32), one scale per 32.

    ``codes * scale + offset`` (group-wise, in fp32) equals ``gguf.quants.dequantize``: the product
    of an fp16 scale and a 4-bit code is exact in fp32, so only the add rounds, as in gguf.
    """
    if qtype not in _Q4_BLOCKS:
        raise NomoatError(f"q4_blocks_to_codes: unsupported quant type {qtype!r} (expected Q4_0 or Q4_1)")
    header, block_bytes = _Q4_BLOCKS[qtype]
    if raw.ndim != 2 or raw.dtype != np.uint8 or raw.shape[1] % block_bytes:
        raise NomoatError(
            f"q4_blocks_to_codes: expected a uint8 (rows, k*{block_bytes}) array of {qtype} blocks, "
            f"got {raw.dtype} {tuple(raw.shape)}"
        )
    rows, n_blocks = raw.shape[0], raw.shape[1] // block_bytes
    blocks = raw.reshape(rows, n_blocks, block_bytes)
    halves = np.ascontiguousarray(blocks[..., :header]).view(np.float16).astype(np.float32)
    qs = blocks[..., header:]
    # GGUF nibble order: byte j holds element j (low nibble) and element j + 16 (high nibble).
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(rows, n_blocks * 32)
    scale = halves[..., 0]
    offset = halves[..., 1] if qtype == "Q4_1" else -8.0 * scale  # Q4_0: d * (q - 8)
    return torch.from_numpy(codes), torch.from_numpy(scale), torch.from_numpy(np.ascontiguousarray(offset))


def q8_0_blocks_to_codes(raw: np.ndarray) -> tuple[Tensor, Tensor]:
    """Split GGUF Q8_0 blocks (fp16 d, then 32 int8) into (codes int8 (rows, k), scales fp16 (rows, k/32));
    ``codes * scale`` in fp32 is exactly ``gguf.quants.dequantize`` (an fp16 times an int8 is exact)."""
    if raw.ndim != 2 or raw.dtype != np.uint8 or raw.shape[1] % 34:
        raise NomoatError(f"q8_0_blocks_to_codes: expected a uint8 (rows, k*34) array of Q8_0 blocks, "
                          f"got {raw.dtype} {tuple(raw.shape)}")
    rows, n_blocks = raw.shape[0], raw.shape[1] // 34
    blocks = raw.reshape(rows, n_blocks, 34)
    scales = np.ascontiguousarray(blocks[..., :2]).view(np.float16).reshape(rows, n_blocks)
    codes = np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(rows, n_blocks * 32)
    return torch.from_numpy(codes), torch.from_numpy(scales.copy())


class Q8Embedding(nn.Module):
    """A token embedding kept in its Q8_0 blocks: a lookup gathers the rows' int8 codes and block scales and
    dequantizes just those rows, exactly as gguf does, so the table costs 8.5 bits a weight, not 16 or 32.

    Buffers: ``codes`` int8 (vocab, hidden), ``scales`` fp16 (vocab, hidden/32).
    """

    def __init__(self, codes: Tensor, scales: Tensor, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = codes.shape
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)
        self.out_dtype = dtype

    @property
    def weight_dtype_name(self) -> str:
        return "q8_0"

    def forward(self, ids: Tensor) -> Tensor:
        c = self.codes[ids].float()
        s = self.scales[ids].float()
        return (c.view(*c.shape[:-1], -1, 32) * s.unsqueeze(-1)).view(c.shape).to(self.out_dtype)

    def dequantize(self, rows: slice = slice(None)) -> Tensor:
        """fp32 (rows, hidden) of the table, exactly as gguf dequantizes it."""
        c, s = self.codes[rows].float(), self.scales[rows].float()
        return (c.view(c.shape[0], -1, 32) * s.unsqueeze(-1)).view(c.shape)


@functools.cache
def _int4_layout() -> tuple[int, bool]:
    """How torch packs int4 weights on this CPU: (rows per block, split halves vs adjacent pairs).

    The packed layout depends on the CPU capability torch dispatches to (AVX512 puts rows j and j+32
    of each 64-row block in one byte, AVX2 rows j and j+16 of 32, others adjacent rows), so find it by
    packing a probe rather than trusting the capability string.
    """
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (80, 64), generator=gen, dtype=torch.int32)  # full blocks + a tail
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    for layout in ((64, True), (32, True), (64, False), (32, False), (16, False)):
        if torch.equal(_unpack_int4(packed, 80, 64, 0, 64, layout), codes.to(torch.uint8)):
            return layout
    raise NomoatError(
        f"int4: unrecognised torch int4 weight packing on CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()} (torch {torch.__version__}); use q8 instead"
    )


def _unpack_int4(packed: Tensor, n: int, k: int, k0: int, k1: int, layout: tuple[int, bool]) -> Tensor:
    """Codes (n, k1-k0) uint8 for input columns k0..k1 of a weight packed by torch for CPU."""
    block, split = layout
    flat = packed.reshape(-1)
    n_full = n // block * block
    kc = k1 - k0
    parts = []
    if n_full:
        b = flat[: n_full * k // 2].view(n_full // block, k, block // 2)[:, k0:k1]
        if split:  # low nibble = row j, high nibble = row j + block/2
            rows = torch.cat([b & 0x0F, b >> 4], dim=-1)
        else:  # low nibble = row 2j, high nibble = row 2j + 1
            rows = torch.stack([b & 0x0F, b >> 4], dim=-1).reshape(n_full // block, kc, block)
        parts.append(rows.permute(0, 2, 1).reshape(n_full, kc))
    if n > n_full:  # tail blocks of 16/32/48 rows always use adjacent pairs
        t = flat[n_full * k // 2 :].view(k, (n - n_full) // 2)[k0:k1]
        parts.append(torch.stack([t & 0x0F, t >> 4], dim=-1).reshape(kc, n - n_full).t())
    return torch.cat(parts) if len(parts) > 1 else parts[0].contiguous()


def _column_chunks(n_rows: int, n_cols: int, align: int) -> list[tuple[int, int]]:
    """Column ranges (multiples of ``align``) small enough to rebuild n_rows x range weights at once."""
    step = max(align, _CHUNK_ELEMS // max(n_rows, 1) // align * align)
    return [(k0, min(n_cols, k0 + step)) for k0 in range(0, n_cols, step)]


class _QuantMatmul(torch.autograd.Function):
    """y = x @ W.T through a quantized layer's kernel (`_matmul`); backward gives grad_x only (`_grad_input`: W is
    frozen). Used by the weight-only layers and `W8A8Linear`."""

    @staticmethod
    def forward(ctx, x: Tensor, layer: _QuantLinear) -> Tensor:  # type: ignore[override]
        ctx.layer = layer
        return layer._matmul(x)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, None]:  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None
        return ctx.layer._grad_input(grad_out), None


class _DequantMatmul(torch.autograd.Function):
    """y = x @ W.T in fp32 over the dequantized weights; backward rebuilds W rather than keeping it, so
    training holds no float copy of the frozen base between forward and backward."""

    @staticmethod
    def forward(ctx, x: Tensor, layer: _QuantLinear) -> Tensor:  # type: ignore[override]
        ctx.layer = layer
        return F.linear(x, layer.dequantize())

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, None]:  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad_out @ ctx.layer.dequantize(), None


class _QuantLinear(nn.Module):
    """Shared forward: flatten, cast to bf16, run the kernel, cast back, add bias.

    With `float_rows` > 0, inputs of at least that many rows (a long prompt, a training batch) are
    multiplied in fp32 by the dequantized weights instead: on CPUs without hardware BF16 that is faster
    than the kernel's emulated bf16, and exact to the same weights. `set_float_matmul_rows` sets it.
    """

    in_features: int
    out_features: int
    bias: Tensor | None
    float_rows: int = 0

    def _matmul(self, x: Tensor) -> Tensor:  # (M, in) bf16 contiguous -> (M, out) bf16
        raise NotImplementedError

    def _grad_input(self, grad_out: Tensor) -> Tensor:  # (M, out) -> (M, in) bf16
        raise NotImplementedError

    def dequantize(self) -> Tensor:
        raise NotImplementedError

    def _rows(self, x: Tensor) -> Tensor:
        """x as (rows, in_features), after checking it is a float input of the right width."""
        if not x.is_floating_point() or x.shape[-1] != self.in_features:
            raise NomoatError(
                f"{type(self).__name__}: expected a float input with last dim {self.in_features}, "
                f"got {x.dtype} {tuple(x.shape)}"
            )
        return x.reshape(-1, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = self._rows(x)
        if self.float_rows and x2.shape[0] >= self.float_rows:
            xf = x2.float()
            y = _DequantMatmul.apply(xf, self) if torch.is_grad_enabled() and xf.requires_grad else \
                F.linear(xf, self.dequantize())
        elif torch.is_grad_enabled() and x2.requires_grad:
            y = _QuantMatmul.apply(x2.to(_BF16).contiguous(), self)
        else:
            y = self._matmul(x2.to(_BF16).contiguous())
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def _set_bias(self, bias: Tensor | None) -> None:
        if bias is not None:
            if bias.shape != (self.out_features,):
                raise NomoatError(f"{type(self).__name__}: bias shape {tuple(bias.shape)} != ({self.out_features},)")
            self.bias = bias.detach().to(torch.float32).clone()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"weight={self.weight_dtype_name}, bias={self.bias is not None}"
        )

    @property
    def weight_dtype_name(self) -> str:
        raise NotImplementedError


class Int4Linear(_QuantLinear):
    """Int4 weight-only linear, asymmetric per group of ``group_size`` inputs: w = (q - 8) * s + z.

    Buffers: ``qweight`` uint8 (out, in/2) in torch's CPU packing (machine-specific layout: a
    state_dict is only portable between CPUs that pack alike), ``scales_and_zeros`` bf16
    (in/group, out, 2) as the kernel wants it, optional fp32 ``bias``.
    """

    def __init__(self, in_features: int, out_features: int, group_size: int = 32, bias: bool = False):
        super().__init__()
        if group_size not in _GROUP_SIZES or in_features % group_size:
            raise NomoatError(
                f"Int4Linear: group_size {group_size} must be one of {_GROUP_SIZES} "
                f"and divide in_features {in_features}"
            )
        if out_features % 16 or out_features <= 0:
            raise NomoatError(f"Int4Linear: out_features {out_features} must be a positive multiple of 16")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        # Placeholders (empty: never touched, so free) until from_float/from_codes or load_state_dict fill them.
        self.register_buffer("qweight", torch.empty(out_features, in_features // 2, dtype=torch.uint8))
        sz = torch.empty(in_features // group_size, out_features, 2, dtype=_BF16)
        self.register_buffer("scales_and_zeros", sz)
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @property
    def weight_dtype_name(self) -> str:
        return f"int4 g{self.group_size}"

    @classmethod
    def from_float(cls, weight: Tensor, bias: Tensor | None = None, group_size: int = 32) -> Int4Linear:
        """Min/max asymmetric quantization of a float (out, in) weight."""
        out_f, in_f = weight.shape
        layer = cls(in_f, out_f, group_size, bias=bias is not None)
        w = weight.detach().to(torch.float32).reshape(out_f, in_f // group_size, group_size)
        lo, hi = w.amin(-1), w.amax(-1)
        s, z = _int4_scale_zero(((hi - lo) / 15), lo)
        # Round against the bf16 scale/zero the kernel will use, so codes are optimal for them.
        s_div = torch.where(s == 0, torch.ones_like(s), s)
        q = torch.round((w - z.float()[..., None]) / s_div.float()[..., None] + 8).clamp_(0, 15)
        layer._load(q.to(torch.uint8).reshape(out_f, in_f), s, z)
        layer._set_bias(bias)
        return layer

    @classmethod
    def from_codes(
        cls, codes: Tensor, scale: Tensor, offset: Tensor, bias: Tensor | None = None, group_size: int = 32
    ) -> Int4Linear:
        """From codes 0..15 with per-group fp32 ``scale``/``offset`` (w = codes * scale + offset),
        e.g. GGUF Q4_0/Q4_1 via :func:`q4_blocks_to_codes`. Only the bf16 rounding of scale and
        zero is lost (see ``_int4_scale_zero``)."""
        out_f, in_f = codes.shape
        layer = cls(in_f, out_f, group_size, bias=bias is not None)  # validates group_size first
        if scale.shape != offset.shape or scale.shape != (out_f, in_f // group_size):
            raise NomoatError(
                f"Int4Linear.from_codes: codes {tuple(codes.shape)} with group_size {group_size} need "
                f"scale/offset of shape ({out_f}, {in_f // group_size}), got {tuple(scale.shape)} "
                f"and {tuple(offset.shape)}"
            )
        if codes.numel() and not (int(codes.min()) >= 0 and int(codes.max()) <= 15):
            raise NomoatError("Int4Linear.from_codes: codes must lie in 0..15")
        s, z = _int4_scale_zero(scale.to(torch.float32), offset.to(torch.float32))
        layer._load(codes.to(torch.uint8), s, z)
        layer._set_bias(bias)
        return layer

    def _load(self, codes: Tensor, s: Tensor, z: Tensor) -> None:
        """Pack codes (out, in) uint8 and bf16 s, z (out, in/group) into the kernel's buffers."""
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
        self.qweight = packed
        self.scales_and_zeros = torch.stack([s, z], dim=-1).transpose(0, 1).contiguous()
        _int4_layout()  # fail at build time, not in backward, if we cannot read the packing

    def _matmul(self, x: Tensor) -> Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.qweight, self.group_size, self.scales_and_zeros)

    def _dequant_columns(self, k0: int, k1: int) -> Tensor:
        """fp32 weight[:, k0:k1] exactly as the kernel forms it (k0, k1 multiples of group_size)."""
        g, n = self.group_size, self.out_features
        codes = _unpack_int4(self.qweight, n, self.in_features, k0, k1, _int4_layout())
        sz = self.scales_and_zeros[k0 // g : k1 // g].float().transpose(0, 1)  # (out, groups, 2)
        # (q - 8) * s is exact in fp32, so z + (q - 8) * s rounds once, like the kernel's fma.
        w = codes.view(n, -1, g).float().sub_(8)
        torch.addcmul(sz[..., 1:], w, sz[..., :1], out=w)
        return w.view(n, k1 - k0)

    def dequantize(self) -> Tensor:
        """fp32 (out, in) weight the kernel multiplies by."""
        return self._dequant_columns(0, self.in_features)

    def _grad_input(self, grad_out: Tensor) -> Tensor:
        g = grad_out.to(_BF16)
        out = torch.empty(g.shape[0], self.in_features, dtype=_BF16)
        for k0, k1 in _column_chunks(self.out_features, self.in_features, self.group_size):
            out[:, k0:k1] = g @ self._dequant_columns(k0, k1).to(_BF16)
        return out


def _int4_scale_zero(scale: Tensor, offset: Tensor) -> tuple[Tensor, Tensor]:
    """bf16 (s, z) for the kernel's w = (q - 8) * s + z given w = q * scale + offset.

    bf16 keeps 8 significant bits, so each of s and z is off by at most 2^-8 of itself and a weight
    by at most 2^-8 * (8|scale| + |offset + 8 scale|). Rounding z from the exact centre (rather than
    from the rounded s) keeps the scale error multiplied by |q - 8| <= 8 instead of q <= 15.
    """
    return scale.to(_BF16), (offset + 8 * scale).to(_BF16)


class Int8Linear(_QuantLinear):
    """Int8 weight-only linear, symmetric per output channel: w = q * s, q in -127..127.

    Buffers: ``qweight`` int8 (out, in), ``scales`` bf16 (out,), optional fp32 ``bias``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.zeros(out_features, dtype=_BF16))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @property
    def weight_dtype_name(self) -> str:
        return "int8"

    @classmethod
    def from_float(cls, weight: Tensor, bias: Tensor | None = None) -> Int8Linear:
        """Absmax per-row quantization of a float (out, in) weight."""
        out_f, in_f = weight.shape
        layer = cls(in_f, out_f, bias=bias is not None)
        w = weight.detach().to(torch.float32)
        s = (w.abs().amax(dim=1) / 127).to(_BF16)  # the kernel wants bf16 scales with bf16 activations
        s_div = torch.where(s == 0, torch.ones_like(s), s).float()
        layer.qweight = torch.round(w / s_div[:, None]).clamp_(-127, 127).to(torch.int8)
        layer.scales = s
        layer._set_bias(bias)
        return layer

    @classmethod
    def from_rows(cls, rows: Callable[[slice], Tensor], out_features: int, in_features: int,
                  chunk: int = 1024) -> Int8Linear:
        """As `from_float`, from a function giving the float weight a block of rows at a time (so a large
        table, such as a tied output head, is never held in float whole)."""
        layer = cls(in_features, out_features)
        for r0 in range(0, out_features, chunk):
            part = cls.from_float(rows(slice(r0, min(out_features, r0 + chunk))))
            layer.qweight[r0:r0 + part.out_features] = part.qweight
            layer.scales[r0:r0 + part.out_features] = part.scales
        return layer

    def _matmul(self, x: Tensor) -> Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, self.qweight, self.scales)

    def dequantize(self) -> Tensor:
        """fp32 (out, in) weight the kernel multiplies by (q * s is exact in fp32)."""
        return self.qweight.float() * self.scales.float()[:, None]

    def _grad_input(self, grad_out: Tensor) -> Tensor:
        # Scale the weight, not grad_out: N*K work per step instead of M*N (large for the LM head).
        g = grad_out.to(_BF16)
        s = self.scales.float()[:, None]
        out = torch.empty(g.shape[0], self.in_features, dtype=_BF16)
        for k0, k1 in _column_chunks(self.out_features, self.in_features, 64):
            out[:, k0:k1] = g @ (self.qweight[:, k0:k1].float() * s).to(_BF16)
        return out


def _int8_rows(x: Tensor, qmax: int = 127) -> tuple[Tensor, Tensor]:
    """A float (M, K) matrix as int8 codes in [-qmax, qmax] and per-row scales (M, 1): x ~= q * s (absmax)."""
    s = x.abs().amax(dim=1, keepdim=True).div_(qmax).clamp_(min=1e-30)  # an all-zero row keeps zero codes
    return (x / s).round_().to(torch.int8), s


@functools.cache
def int8_weight_max() -> int:
    """The largest weight code `torch._int_mm` multiplies exactly here: 127 with VNNI; 63 where the GEMM
    sums pairs of u8 x s8 products in saturating int16 (AVX2 and AVX-512 without VNNI: oneDNN shifts the
    activations to u8, and 2 x 255 x 127 overflows, so weights keep 7 bits); 0: no exact int8 GEMM."""
    g = torch.Generator().manual_seed(0)
    for qmax in (127, 63):
        ok = True
        for m, k, n in ((1, 128, 16), (33, 256, 48)):
            a = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
            b = torch.randint(-qmax, qmax + 1, (k, n), dtype=torch.int8, generator=g)
            top, edge = torch.full((m, k), 127, dtype=torch.int8), torch.full((k, n), qmax, dtype=torch.int8)
            try:
                ok = ok and all(torch.equal(torch._int_mm(x, w), x.int() @ w.int())
                                for x, w in ((a, b), (top, edge), (-top, -edge), (top, -edge)))
            except (RuntimeError, AttributeError):
                return 0
        if ok:
            return qmax
    return 0


class W8A8Linear(_QuantLinear):
    """A frozen linear in int8 (symmetric per output row) whose products run in int8: the input is rounded to
    int8 per row (per token) on the fly and multiplied by `torch._int_mm`; in backward the output gradient,
    scaled by the weight's row scales, is rounded per row the same way and multiplied by the same codes.

    For training LoRA over a frozen base on CPUs without fast bf16: an int8 GEMM (VNNI, or AVX2) runs at
    ~4x (2x) a float32 one, and the base's forward and input-gradient products are most of a LoRA step.
    Both roundings keep ~8 bits per value, with a scale per token, as bf16 keeps ~8 significant bits per
    value; the LoRA factors, their products and gradients stay float32. The product is accumulated in
    int32, exactly.

    Buffers: ``qweight`` int8 (out, in), ``scales`` float32 (out,), optional float32 ``bias``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.zeros(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    qmax: int = 127  # the weight codes' bound (`int8_weight_max`)

    @property
    def weight_dtype_name(self) -> str:
        return "int8 (int8 activations)" if self.qmax == 127 else f"int8 codes within +-{self.qmax} (int8 activations)"

    @classmethod
    def from_float(cls, weight: Tensor, bias: Tensor | None = None) -> W8A8Linear:
        """Absmax per output row, in the code range this machine's int8 GEMM multiplies exactly."""
        out_f, in_f = weight.shape
        layer = cls(in_f, out_f, bias=bias is not None)
        qmax = int8_weight_max()
        if not qmax:
            raise NomoatError("W8A8Linear: torch has no exact int8 GEMM on this machine (use --dtype float32)")
        q, s = _int8_rows(weight.detach().float(), qmax)
        layer.qweight, layer.scales, layer.qmax = q, s.view(-1), qmax
        layer._set_bias(bias)
        return layer

    def dequantize(self) -> Tensor:
        return self.qweight.float() * self.scales[:, None]

    def _matmul(self, x: Tensor) -> Tensor:  # (M, in) float32 -> (M, out) float32
        if kernels.library() is not None and x.stride(1) == 1:  # the same codes and sums, fewer passes
            q, s = kernels.int8_rows(x, 127)
            return kernels.int8_rescale(torch._int_mm(q, self.qweight.t()), s, self.scales)
        q, s = _int8_rows(x)
        return torch.mul(torch._int_mm(q, self.qweight.t()), self.scales).mul_(s)

    def _grad_input(self, grad_out: Tensor) -> Tensor:  # (M, out) -> (M, in) float32
        # Fold the weight's row scales into the gradient first, so the int8 codes multiply as they are.
        g = grad_out.float()
        if kernels.library() is not None and g.stride(1) == 1:
            q, s = kernels.int8_rows(g, 127, self.scales)
            return kernels.int8_rescale(torch._int_mm(q, self.qweight), s)
        q, s = _int8_rows(g * self.scales)
        return torch.mul(torch._int_mm(q, self.qweight), s)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = self._rows(x).float()
        y = _QuantMatmul.apply(x2, self) if torch.is_grad_enabled() and x2.requires_grad else self._matmul(x2)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*lead, self.out_features)


class _NativeLinear(_QuantLinear):
    """A layer kept in a GGUF block format and run by nomoat's native kernels (`nomoat.kernels`), which
    quantize the activations to int8 per block of 32 as llama.cpp does. Inference layers: gradients flow
    to the input through the dequantized weights."""

    def _native(self, x: Tensor) -> Tensor:  # (M, in) float32 contiguous -> (M, out) float32
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = self._rows(x).float()
        if torch.is_grad_enabled() and x2.requires_grad:
            y = _DequantMatmul.apply(x2, self)
        else:
            # Prompts too: the kernel reads each weight once per 8 rows and is as fast here as a float GEMM
            # over dequantized weights, without their float copies (~50 MiB of peak memory).
            y = self._native(x2.contiguous())
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)


class Q4Linear(_NativeLinear):
    """GGUF Q4_0/Q4_1 weights as the file holds them: w = q * d + m per block of 32 (Q4_0: m = -8d).

    Buffers: ``nib`` uint8 (out, in/2), blocks of 16 bytes with element j in the low nibble of byte j and
    element j + 16 in its high nibble; ``d``, ``m`` fp16 (out, in/32). ``in_features`` is a multiple of 64.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        if in_features % 64 or in_features <= 0 or out_features <= 0:
            raise NomoatError(f"Q4Linear: in_features {in_features} must be a positive multiple of 64")
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("nib", torch.empty(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("d", torch.empty(out_features, in_features // 32, dtype=torch.float16))
        self.register_buffer("m", torch.empty(out_features, in_features // 32, dtype=torch.float16))
        self.register_buffer("bias", None)

    @property
    def weight_dtype_name(self) -> str:
        return "q4 (native)"

    @classmethod
    def from_blocks(cls, raw: np.ndarray, qtype: str) -> Q4Linear:
        """From a (rows, blocks * bytes) uint8 array of GGUF Q4_0/Q4_1 blocks, bytes kept as they are."""
        if qtype not in _Q4_BLOCKS:
            raise NomoatError(f"Q4Linear: unsupported quant type {qtype!r} (expected Q4_0 or Q4_1)")
        header, block_bytes = _Q4_BLOCKS[qtype]
        if raw.ndim != 2 or raw.dtype != np.uint8 or raw.shape[1] % block_bytes:
            raise NomoatError(f"Q4Linear: expected a uint8 (rows, k*{block_bytes}) array of {qtype} blocks, "
                              f"got {raw.dtype} {tuple(raw.shape)}")
        rows, n_blocks = raw.shape[0], raw.shape[1] // block_bytes
        layer = cls(n_blocks * 32, rows)
        blocks = raw.reshape(rows, n_blocks, block_bytes)
        halves = np.ascontiguousarray(blocks[..., :header]).view(np.float16)
        d = halves[..., 0]
        m = halves[..., 1] if qtype == "Q4_1" else (d.astype(np.float32) * -8).astype(np.float16)  # exact: x8
        if not (np.isfinite(d).all() and np.isfinite(m).all()):
            raise NomoatError("Q4Linear: non-finite block scale")
        layer.nib = torch.from_numpy(np.ascontiguousarray(blocks[..., header:]).reshape(rows, n_blocks * 16))
        layer.d = torch.from_numpy(np.ascontiguousarray(d))
        layer.m = torch.from_numpy(np.ascontiguousarray(m))
        return layer

    def _native(self, x: Tensor) -> Tensor:
        return kernels.q4_matmul(x, self.nib, self.d, self.m)

    def dequantize(self) -> Tensor:
        """fp32 (out, in) weight, exactly as gguf dequantizes the blocks."""
        n, g = self.out_features, self.in_features // 32
        b = self.nib.view(n, g, 16)
        codes = torch.cat([b & 0x0F, b >> 4], dim=-1).float()
        return (codes * self.d.float()[..., None] + self.m.float()[..., None]).view(n, self.in_features)


class Q8Linear(_NativeLinear):
    """GGUF Q8_0 weights as the file holds them: w = q * d per block of 32.

    Buffers: ``codes`` int8 (out, in), ``scales`` fp16 (out, in/32); a tied output head shares them with
    its `Q8Embedding` (no second copy of the largest table).
    """

    def __init__(self, codes: Tensor, scales: Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = codes.shape
        if self.in_features % 64:
            raise NomoatError(f"Q8Linear: in_features {self.in_features} must be a multiple of 64")
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", None)

    @property
    def weight_dtype_name(self) -> str:
        return "q8_0 (native)"

    def _native(self, x: Tensor) -> Tensor:
        return kernels.q8_matmul(x, self.codes, self.scales)

    def dequantize(self) -> Tensor:
        c, s = self.codes.float(), self.scales.float()
        return (c.view(c.shape[0], -1, 32) * s.unsqueeze(-1)).view(c.shape)


def quantize_linears(
    module: nn.Module, mode: str, group_size: int = 32, skip: Callable[[str], bool] | None = None
) -> int:
    """Replace every nn.Linear under ``module`` (by qualified name, unless ``skip(name)``) in place
    with Int4Linear ("q4") or Int8Linear ("q8"); return how many were replaced."""
    if mode not in ("q4", "q8"):
        raise NomoatError(f"quantize_linears: unknown mode {mode!r} (expected 'q4' or 'q8')")
    done: dict[int, nn.Module] = {}  # a Linear shared by several parents is quantized once
    targets = [
        (name, m)
        for name, m in module.named_modules(remove_duplicate=False)
        if isinstance(m, nn.Linear) and name and not (skip is not None and skip(name))
    ]
    for name, lin in targets:
        if id(lin) not in done:
            try:
                if mode == "q4":
                    done[id(lin)] = Int4Linear.from_float(lin.weight, lin.bias, group_size)
                else:
                    done[id(lin)] = Int8Linear.from_float(lin.weight, lin.bias)
            except NomoatError as e:
                raise NomoatError(f"quantize_linears: layer {name!r}: {e}") from e
        parent_name, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent_name), child, done[id(lin)])
    return len(done)


def set_float_matmul_rows(module: nn.Module, rows: int) -> int:
    """Give every quantized layer under `module` (fused ones included) the row count from which it
    multiplies in fp32 by its dequantized weights (0: always the kernel); returns how many were set."""
    n = 0
    for m in module.modules():
        for layer in (m, getattr(m, "fused", None)):
            if isinstance(layer, _QuantLinear):
                layer.float_rows = rows
                n += 1
    return n


def fuse_rows(layers: list[nn.Module]) -> nn.Module | None:
    """One quantized layer computing the concatenated outputs of `layers` (same input), or None.

    Used to run q/k/v and gate/up as one kernel call when decoding. Int4 packing works in blocks of
    64 output rows, so blocks concatenate as they are when every part has a multiple of 64 rows.
    """
    if not layers or len({type(m) for m in layers}) != 1 or any(getattr(m, "bias", None) is not None for m in layers):
        return None
    first = layers[0]
    if len({m.in_features for m in layers}) != 1:
        return None
    out = sum(m.out_features for m in layers)
    if isinstance(first, Int4Linear):
        if len({m.group_size for m in layers}) != 1 or any(m.out_features % 64 for m in layers):
            return None
        fused = Int4Linear(first.in_features, out, first.group_size)
        fused.qweight = torch.cat([m.qweight for m in layers])
        fused.scales_and_zeros = torch.cat([m.scales_and_zeros for m in layers], dim=1).contiguous()
    elif isinstance(first, Q4Linear):
        fused = Q4Linear(first.in_features, out)
        fused.nib = torch.cat([m.nib for m in layers])
        fused.d, fused.m = torch.cat([m.d for m in layers]), torch.cat([m.m for m in layers])
        start = 0
        for m in layers:  # the parts keep working on row slices of the fused buffers
            m.nib, m.d, m.m = (t[start:start + m.out_features] for t in (fused.nib, fused.d, fused.m))
            start += m.out_features
        return fused
    elif isinstance(first, Int8Linear):
        fused = Int8Linear(first.in_features, out)
        fused.qweight = torch.cat([m.qweight for m in layers])
        fused.scales = torch.cat([m.scales for m in layers])
    else:
        return None
    # The parts keep working on row slices of the fused weights (contiguous views): no second copy.
    start = 0
    for m in layers:
        m.qweight = fused.qweight[start:start + m.out_features]
        start += m.out_features
    return fused
