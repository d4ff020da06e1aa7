"""nomoat's native kernels: exact against a torch reference of the same arithmetic, on both instruction-set
variants; the fused decoding step equal to the model's own step; fallbacks; the build cache's key."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import make_tiny_lm, write_tiny_gguf

from nomoat import kernels
from nomoat.model import KVCache
from nomoat.quant import Q4Linear, Q8Linear

pytestmark = pytest.mark.skipif(kernels.library() is None, reason=f"native kernels {kernels.status()}")


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the kernels do to activations: int8 codes per block of 32, scale amax/127, round half to even."""
    xb = x.view(x.shape[0], -1, 32)
    d = xb.abs().amax(-1) / 127
    q = torch.round(xb * torch.where(d > 0, 1 / d, torch.zeros_like(d))[..., None])
    return q, d


def reference_q4(x: torch.Tensor, layer: Q4Linear) -> torch.Tensor:
    """sum over blocks of d_w * d_x * (q_w . q_x) + m_w * d_x * sum(q_x), in float64."""
    q, dx = quantize_activations(x)
    n, g = layer.out_features, layer.in_features // 32
    b = layer.nib.view(n, g, 16)
    qw = torch.cat([b & 0x0F, b >> 4], -1).double()
    dots = torch.einsum("rgk,ngk->rng", q.double(), qw)
    return (dots * layer.d.double()[None] * dx.double()[:, None]).sum(-1) + \
        (layer.m.double()[None] * (dx.double() * q.double().sum(-1))[:, None]).sum(-1)


def reference_q8(x: torch.Tensor, layer: Q8Linear) -> torch.Tensor:
    q, dx = quantize_activations(x)
    n = layer.out_features
    dots = torch.einsum("rgk,ngk->rng", q.double(), layer.codes.view(n, -1, 32).double())
    return (dots * layer.scales.double()[None] * dx.double()[:, None]).sum(-1)


def random_layers(n: int, k: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    out = []
    for qtype in ("Q4_0", "Q4_1"):
        raw = gguf.quants.quantize(w, gguf.GGMLQuantizationType[qtype]).reshape(n, -1)
        layer = Q4Linear.from_blocks(raw, qtype)
        want = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype]).reshape(n, k)
        assert np.array_equal(layer.dequantize().numpy(), want)  # the blocks are kept exactly
        out.append(layer)
    raw = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0).reshape(n, -1)
    from nomoat.quant import q8_0_blocks_to_codes

    out.append(Q8Linear(*q8_0_blocks_to_codes(raw)))
    return out


def check_kernels(seed: int = 0) -> None:
    # k=576: four-block steps plus a two-block tail; k=1536: whole steps; n not a multiple of 4 or 16.
    for n, k in ((50, 576), (96, 1536), (37, 64)):
        for layer in random_layers(n, k, seed):
            ref_fn = reference_q4 if isinstance(layer, Q4Linear) else reference_q8
            for rows in (1, 3, 8, 11):
                x = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed + rows)) * 3
                got = layer._native(x.contiguous()).double()
                ref = ref_fn(x, layer)
                err = float((got - ref).abs().max() / ref.abs().max())
                assert err < 2e-6, (type(layer).__name__, n, k, rows, err)


def test_kernels_equal_the_same_arithmetic_in_torch():
    torch.set_num_threads(2)
    check_kernels()


def test_the_avx2_build_equals_it_too(tmp_path):
    """The other instruction-set variant (AVX2: laptops without AVX-512), built fresh in its own cache."""
    code = textwrap.dedent("""
        import sys; sys.path.insert(0, sys.argv[1])
        from nomoat import kernels
        assert kernels.library() is not None, kernels.status()
        assert "avx2" in kernels.status(), kernels.status()
        import test_native; test_native.check_kernels(seed=1)
        print("ok")
    """)
    env = {**os.environ, "NOMOAT_NATIVE_ISA": "avx2", "NOMOAT_KERNEL_CACHE": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr[-2000:]


def test_native_layer_forward_paths_agree():
    """Few rows run the kernel, many rows fp32 over the exact blocks, gradients through the blocks."""
    layer = random_layers(64, 128, 3)[1]
    x = torch.randn(100, 128)
    full = layer(x)  # > NATIVE_MAX_ROWS: float path
    assert torch.allclose(full, x @ layer.dequantize().T, atol=1e-5)
    few = layer(x[:5])
    assert float((few - full[:5]).abs().max() / full[:5].abs().max()) < 2e-2  # int8 activation rounding
    xg = x[:4].clone().requires_grad_(True)
    layer(xg).sum().backward()
    assert torch.allclose(xg.grad, layer.dequantize().sum(0).expand(4, -1), atol=1e-5)


def test_build_cache_key_changes_with_torch_and_source(monkeypatch):
    """A build for another torch, compiler, CPU or source is never loaded: each is part of the file name."""
    first = kernels.build_path()
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    assert kernels.build_path() != first
    monkeypatch.undo()
    monkeypatch.setattr(kernels, "_source", lambda: b"// edited\n" + kernels._SOURCE.read_bytes())
    assert kernels.build_path() != first
    monkeypatch.undo()
    monkeypatch.setattr(kernels, "_cpu_flags", lambda: "another cpu")
    assert kernels.build_path() != first


@pytest.fixture(scope="module")
def tiny_q4(tmp_path_factory):
    from nomoat.runtime.loading import load

    path = write_tiny_gguf(make_tiny_lm(seed=5), tmp_path_factory.mktemp("q4") / "tiny-q4.gguf",
                           linear_type="Q4_1", embed_type="Q8_0")
    lm = load(path, quant="auto")
    # Run the model's own step in float32 too, so the two steps do the same arithmetic.
    for p in lm.model.parameters():
        p.data = p.data.float()
    lm.model.model.embed_tokens.out_dtype = torch.float32
    return lm


def _decode(model, ids: list[int], prompt: int, fused: bool) -> torch.Tensor:
    saved = model.fast_decode
    model.fast_decode = saved if fused else None
    try:
        cache = KVCache(model.config, 1, len(ids) + 1)
        with torch.inference_mode():
            model(torch.tensor([ids[:prompt]]), cache=cache)
            return torch.cat([model(torch.tensor([[t]]), cache=cache)[0, -1:].float() for t in ids[prompt:]])
    finally:
        model.fast_decode = saved


def test_fused_step_equals_the_models_own_step(tiny_q4):
    """Step by step from the same cache, the fused step and the model's own (torch ops around the same
    kernels) agree to float rounding. Activations are rounded to int8 codes, so a ~1e-7 difference
    (summation order, the exp polynomial) can flip one code in a rare step: those steps differ by that
    code's weight, a few hundredths here, never more."""
    m = tiny_q4.model
    assert m.fast_decode is not None
    assert isinstance(m.lm_head, Q8Linear) and isinstance(m.model.layers[1].mlp.down_proj, Q4Linear)
    ids = torch.randint(0, m.config.vocab_size, (90,), generator=torch.Generator().manual_seed(0)).tolist()
    cache = KVCache(m.config, 1, len(ids) + 1)
    fast = m.fast_decode
    diffs = []
    with torch.inference_mode():
        m(torch.tensor([ids[:10]]), cache=cache)
        for t in ids[10:]:
            twin = KVCache(m.config, 1, len(ids) + 1)
            twin.k.copy_(cache.k), twin.v.copy_(cache.v)
            twin.pos = cache.pos
            m.fast_decode = None
            own = m(torch.tensor([[t]]), cache=twin)[0, -1]
            m.fast_decode = fast
            fused = m(torch.tensor([[t]]), cache=cache)[0, -1]
            assert cache.pos == twin.pos
            diffs.append(float((fused - own).abs().max()))
    exact = sum(d < 1e-4 for d in diffs)
    assert exact >= 0.9 * len(diffs), diffs
    assert max(diffs) < 0.3, diffs


def test_fused_step_steps_aside_for_an_adapter(tiny_q4):
    """With a LoRA on the layers the fused step declines and the model's own step (with the adapter) runs;
    once the adapter is gone, it serves again."""
    from nomoat.lora.inject import add_adapter, remove_adapter, strip_lora
    from nomoat.lora.layer import LoraConfig

    m = tiny_q4.model
    ids = list(range(3, 30))
    base = _decode(m, ids, 5, True)
    add_adapter(m, LoraConfig(r=4, alpha=8, targets=["q_proj", "down_proj"]), name="t")
    for mod in m.modules():
        if hasattr(mod, "lora_B"):
            torch.nn.init.normal_(mod.lora_B["t"], std=0.5)
    calls = []
    real = m.fast_decode
    m.fast_decode = lambda *a: calls.append(real(*a)) or calls[-1]
    try:
        with_adapter = _decode(m, ids, 5, True)
        assert all(c is None for c in calls) and calls
        assert torch.allclose(with_adapter, _decode(m, ids, 5, False), atol=1e-5)
        assert not torch.allclose(with_adapter, base, atol=1e-2)
    finally:
        m.fast_decode = real
        remove_adapter(m, "t")
        strip_lora(m)
    assert torch.allclose(_decode(m, ids, 5, True), base, atol=1e-6)


def test_switched_off_by_environment(tmp_path):
    code = ("from nomoat.runtime.loading import load; from nomoat.quant import Int4Linear; lm = load(quant='auto');"
            "assert isinstance(lm.model.model.layers[0].mlp.down_proj, Int4Linear);"
            "assert lm.model.fast_decode is None;"
            "assert not lm.cpu.native_kernels; print(lm.cpu.reasons['native kernels'])")
    env = {**os.environ, "NOMOAT_NATIVE": "0"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "NOMOAT_NATIVE=0" in run.stdout, run.stderr[-2000:]
