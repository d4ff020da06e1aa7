"""Each CPU dispatch branch, forced by environment, runs the path the plan names and agrees with the reference."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_lm

from nomoat.api import convert_to_hf
from nomoat.quant import Int4Linear, Int8Linear, set_float_matmul_rows
from nomoat.runtime.cpu import detect_cpu, plan_for
from nomoat.runtime.loading import load
from nomoat.train.sft import TrainConfig

NO_BF16 = "avx2,avx512f,avx512_vnni"  # a Xeon without BF16
BF16 = "avx2,avx512f,avx512_vnni,avx512_bf16"


@pytest.fixture(autouse=True)
def _fresh_detection():
    detect_cpu.cache_clear()
    yield
    detect_cpu.cache_clear()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("cls", [Int4Linear, Int8Linear])
def test_float_matmul_path_equals_the_kernels_weights(cls) -> None:
    g = torch.Generator().manual_seed(1)
    layer = cls.from_float(torch.randn(128, 64, generator=g) / 8)
    x = torch.randn(200, 64, generator=g)
    ref = x @ layer.dequantize().T  # the weights the kernel multiplies by
    kernel = layer(x)
    assert set_float_matmul_rows(layer, 128) == 1
    floated = layer(x)
    assert _rel(floated, ref) < 1e-6  # the same weights, fp32 throughout
    assert _rel(kernel, ref) < 1e-2  # bf16 activations and output
    assert _rel(layer(x[:10]), kernel[:10]) < 1e-3  # fewer rows than the threshold: still the kernel
    # Gradients flow to the input through either path.
    xg = x.clone().requires_grad_(True)
    layer(xg).sum().backward()
    assert torch.allclose(xg.grad, layer.dequantize().sum(0).expand_as(x), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return convert_to_hf(make_tiny_lm(), tmp_path_factory.mktemp("m") / "tiny")


def _logits(lm) -> torch.Tensor:
    ids = torch.randint(3, 290, (1, 160), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        return lm.model(ids).float()


def test_load_follows_the_plan_on_both_cpu_classes(tiny_dir, monkeypatch) -> None:
    monkeypatch.setenv("NOMOAT_CPU_FEATURES", NO_BF16)
    slow = load(tiny_dir, quant="q4", threads=1)
    assert (slow.cpu.activation_dtype, slow.cpu.float_matmul_rows) == ("float32", 128)
    assert slow.model.dtype == torch.float32
    rows = {m.float_rows for m in slow.model.modules() if isinstance(m, Int4Linear | Int8Linear)}
    assert rows == {slow.cpu.float_matmul_rows}
    detect_cpu.cache_clear()
    monkeypatch.setenv("NOMOAT_CPU_FEATURES", BF16)
    if not detect_cpu().has_fast_bf16:
        pytest.skip(f"torch runs {detect_cpu().torch_capability} kernels here: no BF16 branch to force")
    fast = load(tiny_dir, quant="q4", threads=1)
    assert (fast.cpu.activation_dtype, fast.cpu.float_matmul_rows) == ("bfloat16", 0)
    assert fast.model.dtype == torch.bfloat16
    a, b = _logits(slow), _logits(fast)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert _rel(a, b) < 3e-2, _rel(a, b)  # same int4 weights; only activation precision differs
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9


def test_training_dtype_follows_the_plan(monkeypatch) -> None:
    monkeypatch.setenv("NOMOAT_CPU_FEATURES", NO_BF16)
    cfg = TrainConfig(data="d.jsonl", out="o")
    assert cfg.base_dtype() == "int8"  # no BF16: the base's products in int8 (tests/test_w8a8.py)
    assert TrainConfig(data="d.jsonl", out="o", dtype="bfloat16").base_dtype() == "bfloat16"  # --dtype wins
    detect_cpu.cache_clear()
    monkeypatch.setenv("NOMOAT_CPU_FEATURES", BF16)
    assert cfg.base_dtype() == ("bfloat16" if plan_for(threads=1).train_dtype == "bfloat16" else "int8")
    monkeypatch.setenv("NOMOAT_CPU_FEATURES", "avx2")
    detect_cpu.cache_clear()
    assert cfg.base_dtype() == "int8"
