"""Time single matmuls at SmolLM2 shapes: fp32/bf16 F.linear vs Int8Linear and Int4Linear (g32).

Run: PYTHONPATH=src python bench/bench_kernels.py. Medians on random data at 2 threads; GB/s counts the
weight bytes read (codes + scales), GFLOP/s = 2*M*N*K / time. Not a test: numbers vary ~10% run to run.
The same weight is reused call after call, so matrices that fit in cache (all but 49152x576) show cache,
not memory, bandwidth at M=1; at M=512 the kernels are compute-bound and GFLOP/s is the figure to read.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from nomoat.quant import Int4Linear, Int8Linear

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)]  # (out, in)
MS = (1, 512)


def median_ms(fn: Callable[[], object], budget_s: float = 0.4, max_reps: int = 200) -> float:
    """Median wall time of fn() in ms, after warm-up, within about budget_s."""
    for _ in range(2):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < 3 or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def bench_shape(n: int, k: int) -> None:
    """Print one row per (M, kind) for an (n out x k in) weight."""
    w32 = torch.randn(n, k) * 0.05
    w16 = w32.bfloat16()
    q8, q4 = Int8Linear.from_float(w32), Int4Linear.from_float(w32, group_size=32)
    kinds = {  # name: (weight bytes read, activation dtype, call)
        "fp32": (4 * n * k, torch.float32, lambda x: F.linear(x, w32)),
        "bf16": (2 * n * k, torch.bfloat16, lambda x: F.linear(x, w16)),
        "int8": (n * k + 2 * n, torch.bfloat16, q8),
        "int4 g32": (n * k // 2 + 4 * n * (k // 32), torch.bfloat16, q4),
    }
    for m in MS:
        for name, (nbytes, dtype, call) in kinds.items():
            x = torch.randn(m, k).to(dtype)
            ms = median_ms(lambda call=call, x=x: call(x))
            gflops = 2 * m * n * k / ms / 1e6
            print(f"{f'{n}x{k}':>17} {m:>4} {name:>10} {ms:9.3f} {nbytes / ms / 1e6:7.1f} {gflops:8.1f}")


def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    cap = torch.backends.cpu.get_cpu_capability()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cap}")
    print(f"{'shape (out x in)':>17} {'M':>4} {'kind':>10} {'ms':>9} {'GB/s':>7} {'GFLOP/s':>8}")
    with torch.inference_mode():
        for n, k in SHAPES:
            bench_shape(n, k)


if __name__ == "__main__":
    main()
