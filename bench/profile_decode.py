"""Where a decoding step's time goes on the default model, after a 512-token prompt (128 greedy steps).

    python bench/profile_decode.py [--threads 1]

Times the parts of `model(token, cache)` as `generate` runs it: the embedding lookup, the fused native
step over all layers (`nomoat.kernels`, one call), the output head (Q8_0 native kernel) and the argmax;
then the same step with the fused path switched off (torch ops around the same kernels), with torch's
profiler table of it. `--phases` builds the kernels with -DNM_PROFILE (a separate cached build) and splits the
fused step into its phases (thread 0's wall time, barrier waits included). Not a test: a quiet machine gives
stable figures.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import time

import torch

if "--phases" in sys.argv:  # before nomoat builds or loads its kernels
    os.environ["NOMOAT_NATIVE_CFLAGS"] = "-DNM_PROFILE"

from nomoat import kernels  # noqa: E402
from nomoat.model import KVCache  # noqa: E402
from nomoat.runtime.loading import load  # noqa: E402

PHASES = ["norm + int8 rounding", "q/k/v product", "rotary + KV write", "attention", "o product",
          "residual + norm + rounding", "gate/up product", "SwiGLU + rounding", "down product"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--phases", action="store_true", help="split the fused step (a profiling build)")
    a = ap.parse_args()
    lm = load(quant="auto", threads=a.threads)
    m = lm.model
    ids = torch.randint(100, 40000, (1, 512), generator=torch.Generator().manual_seed(0))
    fused = m.fast_decode
    print(f"threads {a.threads}; fused step: {'on' if fused else 'off'}")

    def prefilled() -> tuple[KVCache, torch.Tensor]:
        cache = KVCache(m.config, 1, 512 + a.steps + 1, dtype=m.kv_dtype)  # as generate keeps it
        logits = m(ids, cache=cache, last_only=True)
        return cache, logits[:, -1].argmax(-1, keepdim=True)

    parts = {"embedding": 0.0, "layers (fused native step)": 0.0, "final norm + head": 0.0, "argmax": 0.0}
    with torch.inference_mode():
        prefilled()  # warm-up
        cache, tok = prefilled()
        t_all = time.perf_counter()
        for _ in range(a.steps):
            t0 = time.perf_counter()
            m.embed(tok)
            t1 = time.perf_counter()
            h = fused(m, tok, cache) if fused else m.model.norm(m.hidden_states(tok, cache=cache))
            t2 = time.perf_counter()
            logits = m.lm_head(h)
            t3 = time.perf_counter()
            tok = logits[:, -1].argmax(-1, keepdim=True)
            t4 = time.perf_counter()
            parts["embedding"] += t1 - t0
            parts["layers (fused native step)"] += t2 - t1 - (t1 - t0)  # the fused call embeds again
            parts["final norm + head"] += t3 - t2
            parts["argmax"] += t4 - t3
        total = time.perf_counter() - t_all
    ms = 1e3 / a.steps
    print(f"step {total * ms:.2f} ms ({a.steps / total:.1f} tok/s)")
    for k, v in parts.items():
        print(f"  {k:<28} {v * ms:6.2f} ms")
    if a.phases:
        buf = (ctypes.c_double * len(PHASES))()
        kernels.library().nm_profile_read(buf)  # the decoding steps' (prompts do not run the fused step)
        print(f"  phases of the fused step ({kernels.status()}):")
        for name, v in zip(PHASES, buf):
            print(f"    {name:<28} {v * ms:6.2f} ms  {100 * v / sum(buf):5.1f} %")

    m.fast_decode = None
    with torch.inference_mode():
        cache, tok = prefilled()
        t = time.perf_counter()
        for _ in range(a.steps):
            tok = m(tok, cache=cache)[:, -1].argmax(-1, keepdim=True)
        eager = time.perf_counter() - t
        print(f"\nwithout the fused step (torch ops around the same kernels): {eager * ms:.2f} ms/step "
              f"({a.steps / eager:.1f} tok/s)")
        from torch.profiler import ProfilerActivity, profile

        cache, tok = prefilled()
        with profile(activities=[ProfilerActivity.CPU]) as p:
            for _ in range(32):
                tok = m(tok, cache=cache)[:, -1].argmax(-1, keepdim=True)
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))
    m.fast_decode = fused


if __name__ == "__main__":
    main()
