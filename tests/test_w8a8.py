"""int8 training base (`quant.W8A8Linear`, `--dtype int8`): its products equal the int8 arithmetic they stand for,
stay close to float, and a LoRA step over it learns like one over the float base."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_lm, rel_err

from nomoat import kernels
from nomoat.api import convert_to_hf
from nomoat.errors import NomoatError
from nomoat.lora import LoraConfig, add_adapter, mark_trainable
from nomoat.quant import W8A8Linear, int8_weight_max
from nomoat.runtime.cpu import detect_cpu, plan_for
from nomoat.runtime.loading import load
from nomoat.train.loop import base_weights
from nomoat.train.sft import TrainConfig

pytestmark = pytest.mark.skipif(not int8_weight_max(), reason="torch has no int8 GEMM on this machine")


def _rows_ref(x: torch.Tensor, qmax: int = 127) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric codes in [-qmax, qmax] and scales, written out in float64."""
    s = x.double().abs().amax(1, keepdim=True) / qmax
    return torch.round(x.double() / s).clamp(-qmax, qmax), s


@pytest.mark.parametrize("rows", [1, 7, 130])
def test_products_equal_the_int8_arithmetic(rows: int) -> None:
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 80, generator=g) / 9
    layer = W8A8Linear.from_float(w)
    qw, sw = _rows_ref(w, int8_weight_max())
    assert torch.equal(layer.qweight.double(), qw) and torch.allclose(layer.scales.double(), sw.view(-1))
    x = torch.randn(rows, 80, generator=g) * torch.linspace(0.1, 4, 80)  # uneven channels
    qx, sx = _rows_ref(x)
    ref = (qx @ qw.T) * sx * sw.view(1, -1)
    y = layer(x)
    assert rel_err(y, ref) < 1e-6
    assert rel_err(y, x @ w.T) < 3e-2  # ~8 bits per value (7 for the weights without VNNI)
    # Backward: the output gradient times the weight's row scales, rounded per row, times the same codes.
    xg = x.clone().requires_grad_(True)
    gy = torch.randn(rows, 96, generator=g)
    layer(xg).backward(gy)
    qg, sg = _rows_ref(gy * layer.scales)
    assert rel_err(xg.grad, (qg @ qw) * sg) < 1e-6
    assert rel_err(xg.grad, gy @ w) < 3e-2


def test_zero_rows_and_bias_and_shapes() -> None:
    w, b = torch.randn(16, 32), torch.randn(16)
    layer = W8A8Linear.from_float(w, b)
    y = layer(torch.zeros(2, 3, 32))
    assert y.shape == (2, 3, 16) and torch.equal(y, b.expand(2, 3, 16))  # an all-zero row stays exactly zero
    with pytest.raises(NomoatError, match="last dim 32"):
        layer(torch.zeros(2, 31))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return convert_to_hf(make_tiny_lm(), tmp_path_factory.mktemp("m") / "tiny")


def test_int8_load_and_a_lora_step_track_the_float_base(tiny_dir) -> None:
    f32, i8 = load(tiny_dir, dtype="float32", threads=1), load(tiny_dir, dtype="int8", threads=1)
    projections = [n for n, m in i8.model.named_modules() if isinstance(m, W8A8Linear)]
    assert len(projections) == 7 * i8.config.num_hidden_layers and not any("lm_head" in n for n in projections)
    assert base_weights(i8.model) == "int8" and base_weights(f32.model) == "float32"
    name = W8A8Linear.from_float(torch.ones(1, 8)).weight_dtype_name
    assert all(t.endswith(f"-> {name}") for n, t in i8.weight_types.items() if "_proj" in n)
    ids = torch.randint(3, 290, (4, 48), generator=torch.Generator().manual_seed(3))
    grads = []
    for lm in (f32, i8):
        torch.manual_seed(0)
        add_adapter(lm.model, LoraConfig(r=4, alpha=8), "t", init=True)
        mark_trainable(lm.model, "t")
        gen = torch.Generator().manual_seed(1)
        for name, p in lm.model.named_parameters():  # a non-zero B, so A gets a gradient too
            if "lora_B" in name:
                p.data.normal_(0, 0.05, generator=gen)
        logits = lm.model(ids)
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in lm.model.parameters() if p.grad is not None]))
        grads.append(logits.detach())
    g32, l32, g8, l8 = grads
    # ~8 bits per value in each of the 7 products of 2 layers: a few percent in the logits, not more.
    assert rel_err(l8, l32) < 6e-2, rel_err(l8, l32)
    assert torch.nn.functional.cosine_similarity(g8, g32, dim=0) > 0.99
    assert rel_err(g8, g32) < 0.1, rel_err(g8, g32)


def test_int8_refused_with_quantized_weights(tiny_dir) -> None:
    with pytest.raises(NomoatError, match="--dtype int8"):
        load(tiny_dir, dtype="int8", quant="q4", threads=1)
    with pytest.raises(NomoatError, match="float32, bfloat16 or int8"):
        TrainConfig(data="d", out="o", dtype="int4").check()


@pytest.mark.parametrize("flags,expected", [("avx2,avx512f,avx512_vnni", "int8"), ("avx2", "int8"), ("", "float32")])
def test_training_base_follows_the_cpu(flags: str, expected: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOMOAT_CPU_FEATURES", flags)
    detect_cpu.cache_clear()
    try:
        plan = plan_for(threads=1)
        assert plan.train_dtype == expected
        assert plan.reasons["train dtype"].startswith(expected)
        assert TrainConfig(data="d", out="o").base_dtype() == expected
    finally:
        detect_cpu.cache_clear()


def test_finetune_dtype_int8_end_to_end(tiny_dir, tmp_path, monkeypatch, capsys) -> None:
    import json

    from test_bad_input import run_cli

    from nomoat.adapters import load_adapter

    data = tmp_path / "d.jsonl"
    rows = [{"instruction": f"Say {i}.", "output": f"{i} {i} {i}"} for i in range(24)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setenv("NOMOAT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "ad"
    code, _, err = run_cli(["finetune", "--model", str(tiny_dir), "--data", str(data), "--out", str(out), "--dtype",
                            "int8", "--max-steps", "6", "--batch-size", "4", "--seq-len", "32", "--lr", "1e-2"],
                           monkeypatch, capsys)
    assert code in (0, None), err
    log = json.loads((out / "training_log.json").read_text())
    assert log["summary"]["base_dtype"] == "int8"
    losses = [h["loss"] for h in log["history"]]
    assert len(losses) == 6 and losses[-1] < losses[0], losses
    lm = load(tiny_dir, dtype="float32", threads=1)  # the adapter is an ordinary one: it runs on any base
    assert load_adapter(lm, out) == "ad"


def test_training_and_float_loads_leave_the_native_kernels_alone(tiny_dir, monkeypatch) -> None:
    from nomoat import kernels

    def refuse():
        raise AssertionError("the native kernels were loaded for work that never runs them")

    monkeypatch.setattr(kernels, "library", refuse)
    lm = load(tiny_dir, dtype="float32", threads=1)
    assert lm.cpu.reasons["native kernels"].startswith("not loaded") and not lm.cpu.native_kernels
    assert TrainConfig(data="d", out="o").base_dtype() in ("bfloat16", "int8", "float32")


@pytest.mark.skipif(kernels.library() is None, reason="no native kernels here")
@pytest.mark.parametrize("with_col", [False, True])
def test_native_rounding_and_rescaling_equal_the_torch_ops(with_col: bool) -> None:
    from nomoat.quant import _int8_rows

    g = torch.Generator().manual_seed(5)
    x = torch.randn(67, 300, generator=g) * torch.rand(67, 1, generator=g) * 5
    x[3] = 0  # an all-zero row
    x = torch.cat([x, x[:, :7]], 1)[:, :300]  # rows with a stride other than their width
    col = torch.rand(300, generator=g) + 0.5 if with_col else None
    for qmax in (127, 63):
        q, s = kernels.int8_rows(x, qmax, col)
        q_ref, s_ref = _int8_rows(x * col if with_col else x, qmax)
        assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    acc = torch.randint(-2**20, 2**20, (67, 90), dtype=torch.int32, generator=g)
    row, scales = torch.rand(67, 1, generator=g), torch.rand(90, generator=g)
    assert torch.equal(kernels.int8_rescale(acc, row, scales), torch.mul(acc, scales).mul_(row))
    assert torch.equal(kernels.int8_rescale(acc, row), torch.mul(acc, row))
    bad = x.clone()
    bad[5, 9], bad[6, 1] = float("nan"), float("inf")
    _, s = kernels.int8_rows(bad, 127, col)
    assert s[5].isnan() and s[6].isnan() and s[7].isfinite()  # a broken row reaches the product as NaN


def test_without_vnni_weights_keep_7_bits_and_products_stay_exact() -> None:
    """oneDNN's AVX2 int8 GEMM sums pairs of u8 x s8 products in saturating int16: with full int8 weights its
    products are wrong (measured off by up to 25%). Forced to AVX2 in a fresh process, the probe must choose
    codes within +-63 and the layer's products must equal the exact integer arithmetic."""
    import os
    import subprocess
    import sys

    code = """
import torch
from nomoat.quant import W8A8Linear, int8_weight_max
q = int8_weight_max()
w = torch.randn(64, 256) / 8
x = torch.randn(40, 256) * 3
layer = W8A8Linear.from_float(w)
qx = (x.double() / (x.double().abs().amax(1, keepdim=True) / 127)).round()
ref = (qx @ layer.qweight.double().T) * (x.double().abs().amax(1, keepdim=True) / 127) * layer.scales.double()
err = float((layer(x).double() - ref).norm() / ref.norm())
print(q, int(layer.qweight.abs().max()), err)
"""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    qmax, top, err = out.stdout.split()
    assert int(qmax) in (63, 127) and int(top) <= int(qmax) and float(err) < 1e-6, out.stdout
