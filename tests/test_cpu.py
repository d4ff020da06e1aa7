"""CPU dispatch: dtype choice per CPU class, free-core counting, threading environment. No model loading."""

from __future__ import annotations

import os

import pytest
import torch

from nomoat.errors import NomoatError
from nomoat.runtime import cpu
from nomoat.runtime.cpu import CpuFeatures, apply_threads, configure_threading_env, detect_cpu, free_cores, plan_for

_OVERRIDES = ("NOMOAT_CPU_FEATURES", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "NOMOAT_THREADS", "OMP_NUM_THREADS")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch):
    """Start each test without overrides and with fresh caches."""
    # torch caches its capability on first read: read it now so an ATEN_CPU_CAPABILITY set by a test
    # cannot leak into torch for the rest of the session.
    torch.backends.cpu.get_cpu_capability()
    for name in _OVERRIDES:
        monkeypatch.delenv(name, raising=False)
    detect_cpu.cache_clear()
    yield
    detect_cpu.cache_clear()


def _stat(*cpus: tuple[int, int]) -> str:
    """/proc/stat text with one line per (busy, idle) jiffies pair."""
    lines = ["cpu  0 0 0 0 0 0 0 0 0 0"]
    lines += [f"cpu{i} {busy} 0 0 {idle} 0 0 0 0 0 0" for i, (busy, idle) in enumerate(cpus)]
    return "\n".join(lines + ["intr 12345 0 0", "ctxt 999"]) + "\n"


def test_no_bf16_xeon_trains_over_an_int8_base(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("NOMOAT_CPU_FEATURES", "avx2,avx512f,avx512_vnni")
    features = detect_cpu()
    assert features.flags == {"avx2", "avx512f", "avx512_vnni"}
    assert features.forced and "NOMOAT_CPU_FEATURES" in features.forced
    assert not features.has_fast_bf16
    plan = plan_for(threads=1)
    assert plan.train_dtype == "int8"  # VNNI int8 GEMMs (tests/test_w8a8.py)
    assert "BF16" in plan.reasons["train dtype"] and "int8 products" in plan.reasons["train dtype"]
    # int4 still decodes fastest without BF16; between kernels, and for long prompts, float32 wins.
    assert (plan.quant_kernel, plan.activation_dtype, plan.float_dtype) == ("int4", "float32", "float32")
    assert plan.float_matmul_rows == 128
    assert plan.lines()[0].startswith("train dtype: int8 (")


def test_bf16_cpu_trains_in_bfloat16():
    features = CpuFeatures(frozenset({"avx2", "avx512f", "avx512_bf16"}), "AVX512")
    assert features.has_fast_bf16
    plan = plan_for(features, threads=2)
    assert plan.train_dtype == "bfloat16"
    assert (plan.activation_dtype, plan.float_matmul_rows) == ("bfloat16", 0)
    assert plan.threads == 2
    assert "train dtype: bfloat16 (the CPU has AVX-512 BF16)" in plan.lines()
    assert features.describe() == "AVX512 (avx2, avx512f, avx512_bf16)"


def test_amx_counts_as_bf16_but_not_under_avx2_kernels():
    assert CpuFeatures(frozenset({"amx_tile", "amx_bf16"}), "AVX512").has_fast_bf16
    assert not CpuFeatures(frozenset({"avx512_bf16"}), "AVX2").has_fast_bf16


def test_aten_capability_avx2_disables_bf16(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("NOMOAT_CPU_FEATURES", "avx2,avx512f,avx512_bf16")
    assert detect_cpu().has_fast_bf16 == (torch.backends.cpu.get_cpu_capability() == "AVX512")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    detect_cpu.cache_clear()
    features = detect_cpu()
    assert features.torch_capability in ("AVX2", "DEFAULT")
    assert not features.has_fast_bf16
    assert "ATEN_CPU_CAPABILITY=avx2" in features.forced
    assert plan_for(features, threads=1).train_dtype == ("int8" if features.torch_capability == "AVX2" else "float32")


def test_onednn_cap_below_bf16_disables_bf16(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("NOMOAT_CPU_FEATURES", "avx2,avx512f,avx512_bf16")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx512_core_vnni")
    features = detect_cpu()
    assert features.onednn_max_isa == "AVX512_CORE_VNNI"
    assert not features.has_fast_bf16
    flags = frozenset({"avx512_bf16"})
    assert CpuFeatures(flags, "AVX512", onednn_max_isa="AVX512_CORE_BF16").has_fast_bf16
    assert CpuFeatures(flags, "AVX512", onednn_max_isa="ALL").has_fast_bf16


def test_simulated_avx2_laptop_caps_torch_capability(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("NOMOAT_CPU_FEATURES", "avx2, bogus")
    features = detect_cpu()
    assert features.flags == {"avx2"}
    assert features.torch_capability != "AVX512"
    assert plan_for(features, threads=1).reasons["train dtype"].startswith("int8: no hardware BF16")


def test_cpuinfo_flags_parsing():
    text = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_tile\nbugs\t\t: spectre\n"
    assert cpu._cpuinfo_flags(text) == {"avx2", "avx512f", "avx512_bf16", "amx_tile"}
    assert cpu._cpuinfo_flags("Features\t: fp asimd\n") == frozenset()


def test_free_cores_in_range():
    n = free_cores()
    assert isinstance(n, int)
    assert 1 <= n <= len(cpu._affinity())


def test_threads_env_overrides(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("NOMOAT_THREADS", "1")
    assert free_cores() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3,2")
    assert free_cores() == 1  # NOMOAT_THREADS wins
    monkeypatch.delenv("NOMOAT_THREADS")
    assert free_cores() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "zero")
    assert 1 <= free_cores() <= len(cpu._affinity())


def test_busy_cpus_from_proc_stat():
    before = _stat((100, 100), (100, 100), (100, 100), (100, 100))
    # cpu1 fully busy, cpu3 at 80%; cpu0 idle, cpu2 at 10% (noise).
    after = _stat((100, 110), (110, 100), (101, 109), (108, 102))
    assert cpu._busy_cpus(before, after, {0, 1, 2, 3}) == 2
    assert cpu._busy_cpus(before, after, {0, 2}) == 0  # only our affinity set counts
    # A neighbour migrating between two CPUs is still one core's worth of work.
    split = _stat((105, 105), (105, 105), (100, 110), (100, 110))
    assert cpu._busy_cpus(before, split, {0, 1, 2, 3}) == 1
    # Garbage and missing CPUs are skipped, not raised.
    assert cpu._busy_cpus("cpu0 x y z\n", after, {0, 1}) == 0


def test_free_cores_drops_with_busy_cpu(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(cpu, "_affinity", lambda: {0, 1, 2, 3})
    monkeypatch.setattr(cpu, "_cgroup_cpu_limit", lambda: None)
    snapshots = iter([_stat(*[(0, 0)] * 4), _stat((0, 5), (5, 0), (0, 5), (0, 5))])
    monkeypatch.setattr(cpu.Path, "read_text", lambda self, *a, **k: next(snapshots))
    assert free_cores() == 3
    all_busy = iter([_stat(*[(0, 0)] * 4), _stat(*[(5, 0)] * 4)])
    monkeypatch.setattr(cpu.Path, "read_text", lambda self, *a, **k: next(all_busy))
    assert free_cores() == 1  # never below one


def test_free_cores_survives_missing_proc_stat(monkeypatch: pytest.MonkeyPatch):
    def missing(self, *args, **kwargs):
        raise FileNotFoundError(self)

    monkeypatch.setattr(cpu.Path, "read_text", missing)
    monkeypatch.setattr(cpu.os, "getloadavg", lambda: (0.2, 0.0, 0.0), raising=False)
    assert free_cores() == len(cpu._affinity())


def test_apply_threads(monkeypatch: pytest.MonkeyPatch):
    before = torch.get_num_threads()
    try:
        assert apply_threads(1) == 1
        assert torch.get_num_threads() == 1
        with pytest.raises(NomoatError, match="--threads must be >= 1"):
            apply_threads(0)
        with pytest.raises(NomoatError):
            plan_for(CpuFeatures(frozenset(), "DEFAULT"), threads=0)
    finally:
        torch.set_num_threads(before)


def test_configure_threading_env(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.delenv("KMP_BLOCKTIME", raising=False)
    configure_threading_env()
    configure_threading_env()
    assert os.environ["GOMP_SPINCOUNT"] == "10000"
    assert os.environ["KMP_BLOCKTIME"] == "1"
    assert "OMP_WAIT_POLICY" not in os.environ or os.environ["OMP_WAIT_POLICY"] != "PASSIVE"
    monkeypatch.setenv("GOMP_SPINCOUNT", "INFINITY")
    configure_threading_env()
    assert os.environ["GOMP_SPINCOUNT"] == "INFINITY"
