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


def test_native_layer_forward_and_backward():
    """Any number of rows runs the kernel (int8 activation rounding only); gradients flow through the blocks."""
    layer = random_layers(64, 128, 3)[1]
    x = torch.randn(100, 128)
    y = layer(x)
    exact = x @ layer.dequantize().T
    assert float((y - exact).abs().max() / exact.abs().max()) < 2e-2
    assert torch.allclose(y.double(), reference_q4(x, layer), rtol=1e-5, atol=1e-5)
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


def _steps_both_ways(m, ids, prompt, kv_dtype=torch.float32):
    """Per step, from the same cache: (fused step's logits, model's own step's logits, whether fused served)."""
    cache = KVCache(m.config, 1, len(ids) + 1, dtype=kv_dtype)
    fast, out, served = m.fast_decode, [], []

    def spy(*a):
        served.append(fast(*a))
        return served[-1]

    with torch.inference_mode():
        m(torch.tensor([ids[:prompt]]), cache=cache)
        for t in ids[prompt:]:
            twin = KVCache(m.config, 1, len(ids) + 1, dtype=kv_dtype)
            twin.k.copy_(cache.k), twin.v.copy_(cache.v)
            twin.pos = cache.pos
            m.fast_decode = None
            own = m(torch.tensor([[t]]), cache=twin)[0, -1]
            m.fast_decode = spy
            fused = m(torch.tensor([[t]]), cache=cache)[0, -1]
            m.fast_decode = fast
            assert cache.pos == twin.pos
            out.append((fused, own, served[-1] is not None))
    return out


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16])
def test_fused_step_equals_the_models_own_step(tiny_q4, kv_dtype):
    """Step by step from the same cache, the fused step and the model's own (torch ops around the same
    kernels) agree to float rounding. Activations are rounded to int8 codes, so a ~1e-7 difference
    (summation order, the exp polynomial) can flip one code in a rare step: those steps differ by that
    code's weight, a few hundredths here, never more."""
    m = tiny_q4.model
    assert m.fast_decode is not None
    assert isinstance(m.lm_head, Q8Linear) and isinstance(m.model.layers[1].mlp.down_proj, Q4Linear)
    assert m.kv_dtype == torch.float16  # what generate and the server use with the fused step
    ids = torch.randint(0, m.config.vocab_size, (90,), generator=torch.Generator().manual_seed(0)).tolist()
    steps = _steps_both_ways(m, ids, 10, kv_dtype)
    assert all(served for _, _, served in steps)
    diffs = [float((fused - own).abs().max()) for fused, own, _ in steps]
    exact = sum(d < 1e-4 for d in diffs)
    assert exact >= 0.9 * len(diffs), diffs
    assert max(diffs) < 0.3, diffs


def _with_adapters(m, names=("a", "b")):
    from nomoat.lora.inject import add_adapter
    from nomoat.lora.layer import LoraConfig

    gen = torch.Generator().manual_seed(7)
    for i, n in enumerate(names):
        add_adapter(m, LoraConfig(r=4 + 4 * i, alpha=8, targets=["q_proj", "v_proj", "o_proj", "down_proj", "up_proj"]),
                    name=n)
        for mod in m.modules():
            if hasattr(mod, "lora_B") and n in mod.lora_B:
                with torch.no_grad():
                    mod.lora_B[n].copy_(torch.randn(mod.lora_B[n].shape, generator=gen) * 0.3)
                    mod.lora_A[n].copy_(torch.randn(mod.lora_A[n].shape, generator=gen) * 0.3)


def _strip(m):
    from nomoat.lora.inject import strip_lora

    strip_lora(m)


def test_fused_step_runs_adapters_like_the_model(tiny_q4):
    """Active adapters (two stacked, weighted) run inside the fused step and give the model's own step's logits;
    changing the weights is seen at the next step; without adapters the result is the base again."""
    from nomoat.lora.inject import set_active

    m = tiny_q4.model
    ids = list(range(3, 40))
    base = [f for f, _, _ in _steps_both_ways(m, ids, 5)]
    _with_adapters(m)
    try:
        for weights in ({"a": 1.0}, {"a": 0.7, "b": -1.3}):
            set_active(m, weights)
            steps = _steps_both_ways(m, ids, 5)
            assert all(s for _, _, s in steps)  # the fused step served every step
            diffs = [float((f - o).abs().max()) for f, o, _ in steps]
            assert sum(d < 1e-4 for d in diffs) >= 0.9 * len(diffs) and max(diffs) < 0.3, diffs
            assert float((steps[0][0] - base[0]).abs().max()) > 0.05  # the adapters do change the output
    finally:
        _strip(m)
    assert all(torch.equal(f, b) for (f, _, _), b in zip(_steps_both_ways(m, ids, 5), base))


def test_fused_batch_rows_with_their_own_adapter_stacks(tiny_q4):
    """Continuous batching with a different stack on every row (none, a, b, a + b): each row equals that
    sequence decoded alone with its stack active."""
    from nomoat.lora.inject import set_active, set_row_adapters
    from nomoat.model.llama import SlotCache

    m = tiny_q4.model
    stacks = [{}, {"a": 1.0}, {"b": 0.5}, {"a": 1.0, "b": -1.0}]
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, m.config.vocab_size, (n,), generator=gen).tolist() for n in (4, 11, 7, 15)]
    steps = torch.randint(0, m.config.vocab_size, (4, 8), generator=gen)
    _with_adapters(m)
    try:
        alone = []
        with torch.inference_mode():
            for p, nxt, stack in zip(prompts, steps, stacks):
                set_active(m, stack)
                cache = KVCache(m.config, 1, 64)
                m(torch.tensor([p]), cache=cache)
                alone.append(torch.cat([m(t.view(1, 1), cache=cache)[0, -1:] for t in nxt]))
            set_active(m, {})
            slots = SlotCache(m.config, slots=4, capacity=16)
            for row, p in enumerate(prompts):
                cache = KVCache(m.config, 1, 64)
                set_row_adapters(m, [stacks[row]])
                m(torch.tensor([p]), cache=cache)
                slots.load(row, cache, len(p))
            set_row_adapters(m, stacks)
            served = []
            real = m.fast_decode
            m.fast_decode = lambda *a: served.append(real(*a)) or served[-1]
            try:
                batched = torch.stack([m(steps[:, i:i + 1], cache=slots)[:, -1] for i in range(steps.shape[1])], 1)
            finally:
                m.fast_decode = real
                set_row_adapters(m, None)
        assert served and all(h is not None for h in served)
        for row in range(4):
            assert torch.equal(batched[row], alone[row]), row
    finally:
        _strip(m)


def test_switched_off_by_environment(tmp_path):
    code = ("from nomoat.runtime.loading import load; from nomoat.quant import Int4Linear; lm = load(quant='auto');"
            "assert isinstance(lm.model.model.layers[0].mlp.down_proj, Int4Linear);"
            "assert lm.model.fast_decode is None;"
            "assert not lm.cpu.native_kernels; print(lm.cpu.reasons['native kernels'])")
    env = {**os.environ, "NOMOAT_NATIVE": "0"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "NOMOAT_NATIVE=0" in run.stdout, run.stderr[-2000:]


def test_fused_batch_equals_each_sequence_alone(tiny_q4):
    """Continuous batching through the fused step: rows at different positions in a slot cache give what each
    sequence gives alone in its own cache (the same arithmetic row by row: equal to the bit)."""
    from nomoat.model.llama import SlotCache

    m = tiny_q4.model
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, m.config.vocab_size, (n,), generator=gen).tolist() for n in (5, 17, 9)]
    steps = torch.randint(0, m.config.vocab_size, (3, 12), generator=gen)
    alone = []
    with torch.inference_mode():
        for p, nxt in zip(prompts, steps):
            cache = KVCache(m.config, 1, 64)
            m(torch.tensor([p]), cache=cache)
            alone.append(torch.cat([m(t.view(1, 1), cache=cache)[0, -1:] for t in nxt]))
        slots = SlotCache(m.config, slots=4, capacity=8, dtype=torch.float32)  # grows while stepping
        for row, p in enumerate(prompts):
            cache = KVCache(m.config, 1, 64)
            m(torch.tensor([p]), cache=cache)
            slots.load(row, cache, len(p))
        served = []
        real = m.fast_decode
        m.fast_decode = lambda *a: served.append(real(*a)) or served[-1]
        try:
            batched = torch.stack([m(steps[:, i:i + 1], cache=slots)[:, -1] for i in range(steps.shape[1])], dim=1)
        finally:
            m.fast_decode = real
    assert len(served) == steps.shape[1] and all(h is not None for h in served)  # the fused step ran each time
    assert slots.capacity >= 17 + 12
    for row in range(3):
        assert torch.equal(batched[row], alone[row]), row


@pytest.mark.parametrize("env, why", [({"PATH": "/nonexistent"}, "no C compiler"),
                                      ({"CC": "false", "PATH": "/nonexistent"}, "the C build failed")])
def test_without_a_working_compiler_torch_kernels_run(tmp_path, env, why):
    """No compiler, or one that fails: nothing is left half-built, `info`'s reason says why, and the model
    loads and generates on torch's kernels."""
    import shutil

    cc = {"CC": shutil.which("false")} if "CC" in env else {}
    code = ("from nomoat.runtime.loading import load; from nomoat.quant import Int4Linear; import torch;"
            "lm = load(quant='auto');"
            "assert isinstance(lm.model.model.layers[0].mlp.down_proj, Int4Linear);"
            "print(lm.cpu.reasons['native kernels']);"
            "print(lm.model(torch.tensor([[1, 2, 3]])).shape)")
    run = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env, **cc,
                                                             "NOMOAT_KERNEL_CACHE": str(tmp_path / "k")},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and why in run.stdout, run.stderr[-2000:]
    assert not any((tmp_path / "k").rglob("*.so"))


def test_fused_step_sees_adapter_factors_edited_in_place(tiny_q4):
    """An in-place edit of the factors (an optimizer step, a copy_) is seen at the next step, not the stale copy."""
    from nomoat.lora.inject import set_active

    m = tiny_q4.model
    ids = list(range(5, 25))
    _with_adapters(m, ("a",))
    try:
        set_active(m, {"a": 1.0})
        before = _steps_both_ways(m, ids, 4)
        with torch.no_grad():
            for mod in m.modules():
                if hasattr(mod, "lora_B") and "a" in mod.lora_B:
                    mod.lora_B["a"].mul_(-2.0)
        after = _steps_both_ways(m, ids, 4)
        assert all(s for _, _, s in after)
        assert float((after[0][0] - before[0][0]).abs().max()) > 0.05
        diffs = [float((f - o).abs().max()) for f, o, _ in after]
        assert sum(d < 1e-4 for d in diffs) >= 0.9 * len(diffs) and max(diffs) < 0.3, diffs
    finally:
        _strip(m)
