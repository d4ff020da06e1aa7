"""CPU capability dispatch: which dtype and kernel each path runs on this CPU, and how many threads.

With AVX-512 BF16 (Zen 4, Sapphire Rapids and later, AMX) bf16 matmuls run ~2.3x faster than fp32. Without
it bf16 is emulated and 3-5x slower, so LoRA training runs its frozen base in int8 there (int8 GEMMs: ~4x
fp32 with VNNI, ~2x with AVX2), or float32 where torch has no int8 GEMM. Quantized files decode on nomoat's
native kernels where they build, else on torch's int4 weight-only kernel.

Threads: OpenMP workers that outnumber the free cores spin against a busy neighbour and can be 10-100x
slower, so the default is the cores free of other work, and idle workers sleep instead of spinning.

This module must not import torch at import time: the CLI imports it first to set threading variables.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from nomoat.errors import NomoatError

log = logging.getLogger(__name__)

# The /proc/cpuinfo flags that decide a path, in the order `describe()` lists them.
RELEVANT_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16")
_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
# torch's ATen dispatch levels on x86, lowest first.
_CAPABILITY_RANK = {"DEFAULT": 0, "AVX2": 1, "AVX512": 2}
# ONEDNN_MAX_CPU_ISA values that stop oneDNN before AVX512_CORE_BF16; anything else (ALL, AMX, ...) leaves it.
_ONEDNN_NO_BF16 = frozenset({"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"})
# A CPU's non-idle share over the sample window above which it counts as a busy core.
_BUSY_SHARE = 0.6
# Shares below this are background noise (kernel threads, timers), not another process's work.
_NOISE_SHARE = 0.15
_SAMPLE_S = 0.05


def configure_threading_env() -> None:
    """Bound how long idle OpenMP workers spin before they sleep; call before torch is imported.

    By default libgomp workers busy-wait ~300k iterations after each parallel region: next to another
    CPU-bound process they steal its core while waiting, and both slow to a crawl (measured 0.3-0.9 tok/s
    with 2 threads vs 4-29 with 1). Sleeping at once (OMP_WAIT_POLICY=PASSIVE) halves decode speed instead
    (measured 32 vs 62 tok/s: a decode step is ~2,000 small parallel regions, each waking the workers). A
    short spin keeps both: 10k iterations (tens of microseconds) span the gap between a step's ops, and
    then the worker yields its core. A user's own setting wins; calling twice is harmless.
    """
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")  # libgomp (PyPI's torch); measured 68.8 tok/s decode
    os.environ.setdefault("KMP_BLOCKTIME", "1")  # Intel OpenMP (MKL builds): the same bound, in ms


@dataclass(frozen=True)
class CpuFeatures:
    """What this CPU, and torch on it, can run fast.

    Attributes:
        flags: The relevant flags from `RELEVANT_FLAGS` the CPU reports (or `NOMOAT_CPU_FEATURES` gives).
        torch_capability: torch's ATen kernel level: "AVX512", "AVX2", "DEFAULT" (or a non-x86 name).
        forced: The environment overrides in effect, e.g. "NOMOAT_CPU_FEATURES=avx2", or None.
        onednn_max_isa: `ONEDNN_MAX_CPU_ISA` if set (upper case); oneDNN runs torch's bf16 matmuls.
    """

    flags: frozenset[str]
    torch_capability: str
    forced: str | None = None
    onednn_max_isa: str | None = None

    @property
    def has_fast_bf16(self) -> bool:
        """True if bf16 matmuls run in hardware: BF16 instructions, AVX-512 kernels, oneDNN not capped."""
        return (
            bool(self.flags & _BF16_FLAGS)
            and self.torch_capability == "AVX512"
            and self.onednn_max_isa not in _ONEDNN_NO_BF16
        )

    @property
    def has_int8_gemm(self) -> bool:
        """True if the CPU multiplies int8 matrices fast (VNNI, or AVX2's maddubs) and oneDNN may use it."""
        return (bool(self.flags & {"avx2", "avx512_vnni", "avx_vnni"}) and self.torch_capability in ("AVX2", "AVX512")
                and self.onednn_max_isa not in ("SSE41", "AVX"))

    def describe(self) -> str:
        """A short line, e.g. "AVX512 (avx2, avx512f, avx512_vnni, avx512_bf16)"."""
        flags = ", ".join(f for f in RELEVANT_FLAGS if f in self.flags) or "no relevant flags"
        text = f"{self.torch_capability} ({flags})"
        if self.onednn_max_isa:
            text += f", oneDNN max ISA {self.onednn_max_isa}"
        if self.forced:
            text += f" [forced: {self.forced}]"
        return text


def _cpuinfo_flags(text: str) -> frozenset[str]:
    """The relevant flags from the first "flags" line of /proc/cpuinfo text (empty if there is none)."""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            return frozenset(value.split()) & frozenset(RELEVANT_FLAGS)
    return frozenset()


def _capped(capability: str, limit: str) -> str:
    """The lower of two x86 ATen levels; a non-x86 `capability` is left alone."""
    if capability not in _CAPABILITY_RANK or limit not in _CAPABILITY_RANK:
        return capability
    return min(capability, limit, key=_CAPABILITY_RANK.__getitem__)


@functools.lru_cache(maxsize=1)
def detect_cpu() -> CpuFeatures:
    """Read the CPU's flags and torch's kernel level, with environment overrides applied.

    Overrides: `NOMOAT_CPU_FEATURES` (comma-separated flags replacing the detected ones, e.g. "avx2,avx512f"
    simulates a Xeon without BF16), `ATEN_CPU_CAPABILITY` (caps torch's level) and `ONEDNN_MAX_CPU_ISA`.
    Cached; tests call `detect_cpu.cache_clear()` after changing the environment.

    Returns:
        The features; flags are empty off Linux, where only torch's level is known.
    """
    import torch

    capability = torch.backends.cpu.get_cpu_capability().upper()
    forced: list[str] = []

    override = os.environ.get("NOMOAT_CPU_FEATURES")
    if override is not None:
        given = {f.strip().lower() for f in override.split(",") if f.strip()}
        unknown = given - set(RELEVANT_FLAGS)
        if unknown:
            log.warning("NOMOAT_CPU_FEATURES: ignoring unknown flags %s", ", ".join(sorted(unknown)))
        flags = frozenset(given - unknown)
        # The level torch would pick on the simulated CPU.
        if "avx512f" not in flags:
            capability = _capped(capability, "AVX2" if "avx2" in flags else "DEFAULT")
        forced.append(f"NOMOAT_CPU_FEATURES={override}")
    elif sys.platform.startswith("linux"):
        try:
            flags = _cpuinfo_flags(Path("/proc/cpuinfo").read_text(errors="replace"))
        except OSError:
            flags = frozenset()
    else:
        flags = frozenset()

    # torch reads ATEN_CPU_CAPABILITY once, at first dispatch; apply it here too in case that came earlier.
    aten = os.environ.get("ATEN_CPU_CAPABILITY")
    if aten:
        capability = _capped(capability, aten.strip().upper())
        forced.append(f"ATEN_CPU_CAPABILITY={aten}")

    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper() or None
    if onednn:
        forced.append(f"ONEDNN_MAX_CPU_ISA={onednn}")

    return CpuFeatures(flags, capability, "; ".join(forced) or None, onednn)


@dataclass(frozen=True)
class CpuPlan:
    """The dtype, kernel and thread count each path runs with on this CPU.

    Attributes:
        train_dtype: The frozen base's dtype for LoRA training: "bfloat16" with hardware BF16; else "int8"
            (`quant.W8A8Linear`: int8 weights and activations) where torch has an int8 GEMM; else "float32".
        quant_kernel: What `--quant auto` runs a Q4 GGUF on: always "int4" (best decode on both CPU classes).
        activation_dtype: A quantized model's activations between its kernels (norms, attention, embedding):
            "bfloat16" with hardware BF16, else "float32" (the kernels themselves always take bf16).
        float_matmul_rows: From this many rows (prompt tokens, training batch tokens) a quantized layer
            multiplies fp32 activations by its dequantized weights instead of calling the int4/int8 kernel;
            0: never (with hardware BF16 the kernel is as fast).
        float_dtype: dtype for unquantized inference: "float32".
        threads: Intra-op threads.
        native_kernels: Whether GGUF Q4/Q8_0 weights run on nomoat's native kernels (`nomoat.kernels`,
            built for this CPU on first use) rather than torch's int4/int8 ones, for inference.
        reasons: Path name -> "value: why", one line each.
    """

    train_dtype: str
    quant_kernel: str
    activation_dtype: str
    float_dtype: str
    threads: int
    float_matmul_rows: int = 0
    reasons: dict[str, str] = field(default_factory=dict)
    native_kernels: bool = False

    def lines(self) -> list[str]:
        """Lines like "train dtype: bfloat16 (the CPU has AVX-512 BF16)" for `nomoat info` and logs."""
        out = []
        for name, reason in self.reasons.items():
            value, _, why = reason.partition(": ")
            out.append(f"{name}: {value} ({why})" if why else f"{name}: {value}")
        return out


def _bf16_why(features: CpuFeatures) -> str:
    """Why bf16 is or is not fast here, as a clause."""
    if features.has_fast_bf16:
        return "the CPU has AMX BF16" if "amx_bf16" in features.flags else "the CPU has AVX-512 BF16"
    if not features.flags & _BF16_FLAGS:
        return "no hardware BF16 (bf16 would be emulated, ~3x slower)"
    if features.torch_capability != "AVX512":
        return f"the CPU has BF16 but torch runs {features.torch_capability} kernels (bf16 would be emulated)"
    return f"the CPU has BF16 but oneDNN is capped at {features.onednn_max_isa} (bf16 would be emulated)"


def train_dtype_for(features: CpuFeatures | None = None) -> tuple[str, str]:
    """(dtype, why) of the frozen base for LoRA training on a CPU (`detect_cpu()` if None)."""
    from nomoat.quant import int8_weight_max

    features = detect_cpu() if features is None else features
    bf16_why = _bf16_why(features)
    if features.has_fast_bf16:
        return "bfloat16", bf16_why
    qmax = int8_weight_max() if features.has_int8_gemm else 0
    if qmax:
        bits = "" if qmax == 127 else " (weights in 7 bits: this GEMM sums pairs of products in 16 bits)"
        return "int8", (f"{bf16_why}; int8 products (int8 weights, activations rounded per token) run ~4x float32 "
                        f"with VNNI, ~2x with AVX2{bits}")
    return "float32", f"{bf16_why}; no int8 GEMM here"


def plan_for(features: CpuFeatures | None = None, threads: int | None = None, native: bool = True) -> CpuPlan:
    """Choose each path's dtype, kernel and thread count for a CPU.

    Args:
        features: The CPU; `detect_cpu()` if None.
        threads: Thread count; `default_threads()` if None.
        native: Whether the native kernels may be wanted (loads, and on a new machine builds, them); False
            for work that never runs them (training, float models).

    Returns:
        The plan, with a one-line reason per choice.

    Raises:
        NomoatError: If `threads` is less than 1.
    """
    features = detect_cpu() if features is None else features
    if threads is None:
        threads, threads_why = default_threads(), _threads_source()
    else:
        threads, threads_why = _checked(threads), "set explicitly"
    from nomoat import kernels

    fast = features.has_fast_bf16
    train_dtype, train_why = train_dtype_for(features)
    # Measured on a Xeon without BF16: int4 decode 40.7 tok/s vs float32 24.2 and int8 28.4, so int4 wins
    # even with emulated bf16 activations; with hardware BF16 it wins by more.
    kernel_why = "fastest decode on CPUs with and without BF16"
    if fast:
        act, act_why = "bfloat16", "hardware BF16; the int4/int8 kernels take bf16 inputs anyway"
        rows, rows_why = 0, "never: the int4 kernel is as fast as float32 for prompts here"
    else:
        # Measured with torch limited to AVX2: between the kernels, float32 decodes 13% faster than
        # emulated bf16; for 128+ rows fp32 over dequantized weights beats the kernel (2.2 vs 2.7 ms at
        # 128 rows, 5.7 vs 8.8 ms at 512), below it loses (1.6 vs 1.2 ms at 64).
        act, act_why = "float32", "no hardware BF16: bf16 between the kernels would be emulated"
        rows, rows_why = 128, "float32 over dequantized weights from 128 rows (prompts, training): faster here"
    float_why = "full precision for unquantized weights"

    wanted, native = native, native and kernels.library() is not None
    reasons = {
        "train dtype": f"{train_dtype}: {train_why}",
        "quant kernel": ("native q4/q8_0 (the file's blocks, int8 activations as in llama.cpp); torch int4 for QLoRA "
                         "training" if native else f"int4: {kernel_why}"),
        "activation dtype": (f"float32 on the native kernels; {act} on torch's int4/int8 (QLoRA training): {act_why}"
                             if native else f"{act}: {act_why}"),
        "float matmul rows": f"{rows or 'never'}: {rows_why.removeprefix('never: ')}",
        "float dtype": f"float32: {float_why}",
        "threads": f"{threads}: {threads_why}",
        "native kernels": (kernels.status().replace(" (", ": ", 1).removesuffix(")") if wanted
                           else "not loaded: this work does not run them"),
    }
    return CpuPlan(train_dtype=train_dtype, quant_kernel="int4", activation_dtype=act, float_dtype="float32",
                   threads=threads, float_matmul_rows=rows, reasons=reasons, native_kernels=native)


def _checked(threads: int) -> int:
    """`threads` if it is at least 1.

    Raises:
        NomoatError: If it is not.
    """
    if threads < 1:
        raise NomoatError("--threads must be >= 1")
    return threads


def _env_threads() -> tuple[int, str] | None:
    """An explicit thread count from NOMOAT_THREADS or OMP_NUM_THREADS, with its source; bad values are ignored."""
    for name in ("NOMOAT_THREADS", "OMP_NUM_THREADS"):
        raw = os.environ.get(name, "").strip()
        if not raw:
            continue
        try:
            n = int(raw.split(",")[0])  # OMP_NUM_THREADS may list nested levels: "4,2"
        except ValueError:
            n = 0
        if n >= 1:
            return n, name
        log.warning("ignoring %s=%r: not a whole number >= 1", name, raw)
    return None


def _affinity() -> set[int]:
    """The CPU ids this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        try:
            return set(os.sched_getaffinity(0))
        except OSError:
            pass
    return set(range(os.cpu_count() or 1))


def _cpu_times(text: str) -> dict[int, tuple[int, int]]:
    """Per-CPU (non-idle, total) jiffies from /proc/stat text; malformed lines are skipped."""
    times: dict[int, tuple[int, int]] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 5 or not parts[0].startswith("cpu") or not parts[0][3:].isdigit():
            continue
        try:
            # user nice system idle iowait irq softirq steal [guest guest_nice]; guest is already in user.
            values = [int(v) for v in parts[1:9]]
        except ValueError:
            continue
        total = sum(values)
        idle = values[3] + (values[4] if len(values) > 4 else 0)
        times[int(parts[0][3:])] = (total - idle, total)
    return times


def _busy_cpus(before: str, after: str, cpus: set[int]) -> int:
    """How many of `cpus` were busy with work between two /proc/stat snapshots.

    Sums the CPUs' non-idle shares rather than counting CPUs over a threshold: the scheduler migrates a
    neighbour between CPUs, splitting one core's worth of work over several. A whole CPU counts once its
    share passes `_BUSY_SHARE`.

    Args:
        before: /proc/stat text at the start of the window.
        after: /proc/stat text at the end.
        cpus: The CPU ids to look at (this process's affinity).

    Returns:
        Busy CPUs, between 0 and len(cpus).
    """
    start, end = _cpu_times(before), _cpu_times(after)
    load = 0.0
    for cpu in cpus & start.keys() & end.keys():
        busy = end[cpu][0] - start[cpu][0]
        total = end[cpu][1] - start[cpu][1]
        if total > 0 and busy >= 0:
            share = min(1.0, busy / total)
            load += share if share >= _NOISE_SHARE else 0.0
    return min(len(cpus), int(load + (1.0 - _BUSY_SHARE)))


def _cgroup_cpu_limit() -> int | None:
    """Whole CPUs allowed by a cgroup quota (docker --cpus), or None if unlimited or unknown."""
    try:
        v2 = Path("/sys/fs/cgroup/cpu.max")
        if v2.exists():
            quota, period = v2.read_text().split()[:2]
        else:
            v1 = Path("/sys/fs/cgroup/cpu")
            quota = (v1 / "cpu.cfs_quota_us").read_text().strip()
            period = (v1 / "cpu.cfs_period_us").read_text().strip()
        if quota in ("max", "-1"):
            return None
        # Round down: threads beyond the quota get throttled mid-region and stall the others.
        return max(1, int(quota) // int(period))
    except (OSError, ValueError, ZeroDivisionError):
        return None


def _measure_busy(cpus: set[int]) -> int:
    """CPUs among `cpus` busy with other work now; 0 when it cannot be measured."""
    stat = Path("/proc/stat")
    try:
        before = stat.read_text()
        time.sleep(_SAMPLE_S)
        return _busy_cpus(before, stat.read_text(), cpus)
    except (OSError, ValueError):
        pass
    if hasattr(os, "getloadavg"):
        try:
            return max(0, int(os.getloadavg()[0]))  # round down: leave the benefit of the doubt to us
        except OSError:
            pass
    return 0


def free_cores() -> int:
    """Cores this process can use without contending with other work; at least 1, never raises.

    An explicit NOMOAT_THREADS, then OMP_NUM_THREADS, wins. Otherwise: the CPUs in our affinity set, minus
    those busy over a ~50 ms /proc/stat sample (load average where there is no /proc/stat), capped by a
    cgroup CPU quota. Call it while this process is idle (before loading), so its own load does not count.
    """
    explicit = _env_threads()
    if explicit is not None:
        return explicit[0]
    cpus = _affinity()
    free = len(cpus) - _measure_busy(cpus)
    limit = _cgroup_cpu_limit()
    if limit is not None:
        free = min(free, limit)
    return max(1, free)


def _threads_source() -> str:
    """Where the default thread count comes from, as a clause."""
    explicit = _env_threads()
    if explicit is not None:
        return f"from {explicit[1]}"
    return f"cores free of other work, of {len(_affinity())} available"


@functools.cache
def default_threads() -> int:
    """`free_cores()`, measured once per process."""
    return free_cores()


def apply_threads(threads: int | None) -> int:
    """Set torch's intra-op thread count.

    Args:
        threads: The count asked for (e.g. `--threads`), or None for `default_threads()`.

    Returns:
        The count set.

    Raises:
        NomoatError: If `threads` is less than 1.
    """
    import torch

    n = default_threads() if threads is None else _checked(threads)
    torch.set_num_threads(n)
    return n
