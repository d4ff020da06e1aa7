"""The foundation, LoRA and llama.cpp benches on this CPU as it is, and with the instruction set forced lower.

Run: python bench/bench_cpu_classes.py [--classes native,avx2] [--benches foundation,lora,llamacpp]
                                       [--llama-python .venv/bin/python] [--lora-steps 3]

Users' machines differ from this one: many have no AVX-512 BF16 (bf16 matmuls are emulated there and
several times slower) and laptops often have no AVX-512 at all. Each class runs every bench with:
- native: the machine as it is.
- avx2: torch's own kernels limited to AVX2 (`ATEN_CPU_CAPABILITY=avx2`) and oneDNN's matmuls to AVX2
  (`ONEDNN_MAX_CPU_ISA=AVX2`), nomoat's CPU detection told the same (`NOMOAT_CPU_FEATURES=avx2`) and its
  native kernels built for AVX2 (`NOMOAT_NATIVE_ISA=avx2`): an AVX2-only laptop as far as PyTorch can be
  made to behave like one.
- avx512-nobf16: oneDNN capped below BF16 (`AVX512_CORE_VNNI`) and detection without bf16 flags: the
  matmul side of a Xeon without BF16 (torch's own AVX-512 kernels still run natively).
llama.cpp picks its instruction set when compiled: it keeps its native build in every class unless
`--llama-python-avx2 PY` names a Python whose llama-cpp-python was built for AVX2 only, as an AVX2 laptop's
would be; the avx2 class then runs that one. Such a build:
  python -m venv /tmp/llama-avx2 && CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON
  -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=OFF" /tmp/llama-avx2/bin/pip install --no-binary :all: llama-cpp-python

The CPU's flags and what nomoat chooses for each class are printed first. Each bench prints its own table;
all output is also written to bench/results/cpu_classes-<date>.txt. Run on a quiet machine: nothing else
should run beside it (2-core machines are noisy by about 10% even then).
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CLASSES = {
    "native": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "NOMOAT_CPU_FEATURES": "avx2",
             "NOMOAT_NATIVE_ISA": "avx2"},
    "avx512-nobf16": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI",
                      "NOMOAT_CPU_FEATURES": "avx2,avx512f,avx512_vnni"},
}
PROBE = r"""
import torch
from nomoat.runtime.cpu import detect_cpu, plan_for
f = detect_cpu()
print("cpu:", f.describe(), "| torch kernels:", torch.backends.cpu.get_cpu_capability())
for line in plan_for(f).lines():
    print("  " + line)
a = torch.randn(512, 576); b = torch.randn(1536, 576)
import time
for dt in (torch.float32, torch.bfloat16):
    x, w = a.to(dt), b.to(dt)
    torch.nn.functional.linear(x, w)
    t = time.perf_counter(); n = 20
    for _ in range(n):
        torch.nn.functional.linear(x, w)
    s = (time.perf_counter() - t) / n
    name = str(dt).removeprefix("torch.")
    print(f"  {name:9} matmul 512x576 @ 576x1536: {2 * 512 * 576 * 1536 / s / 1e9:6.1f} GFLOP/s")
"""


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    flags = set(next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []))
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "?")
    keep = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "avx_vnni")
    return f"{model}; {', '.join(f for f in keep if f in flags)}; {os.cpu_count()} CPUs"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", default="native,avx2", help=f"comma-separated, of {', '.join(CLASSES)}")
    ap.add_argument("--benches", default="foundation,lora,llamacpp")
    ap.add_argument("--llama-python", default=sys.executable, help="a Python with llama-cpp-python")
    ap.add_argument("--llama-python-avx2", help="a Python with llama-cpp-python built for AVX2 only (avx2 class)")
    ap.add_argument("--lora-steps", default="3")
    ap.add_argument("--threads", default="2")
    a = ap.parse_args()
    commands = {
        "foundation": [sys.executable, str(HERE / "bench_foundation.py"), "--threads", a.threads, "--repeats", "1"],
        "lora": [sys.executable, str(HERE / "bench_lora.py"), "--threads", a.threads, "--steps", a.lora_steps,
                 "--warmup", "1", "--only", "nomoat-default", "nomoat-bf16", "nomoat-int8", "nomoat-fp32",
                 "nomoat-qlora", "peft"],
        "llamacpp": [sys.executable, str(HERE / "bench_llamacpp.py"), "--llama-python", a.llama_python,
                     "--threads", "1," + a.threads],
    }
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    log = out_dir / f"cpu_classes-{datetime.datetime.now():%Y%m%d-%H%M}.txt"
    with open(log, "w") as f:
        def emit(text: str) -> None:
            print(text, flush=True)
            f.write(text + "\n")
            f.flush()

        emit(f"CPU: {cpu_flags()}")
        for cls in a.classes.split(","):
            env = {**os.environ, **CLASSES[cls]}
            emit(f"\n######## class {cls}: {' '.join(f'{k}={v}' for k, v in CLASSES[cls].items()) or '(as is)'}")
            probe = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True)
            emit((probe.stdout + probe.stderr).rstrip())
            for name in a.benches.split(","):
                cmd = list(commands[name])
                if name == "llamacpp" and cls == "avx2" and a.llama_python_avx2:
                    cmd[cmd.index("--llama-python") + 1] = a.llama_python_avx2
                emit(f"\n=== {cls} / {name}: {' '.join(cmd[1:])}")
                res = subprocess.run(cmd, env=env, capture_output=True, text=True)
                failed = f"\n(exit {res.returncode}) {res.stderr[-2000:]}" if res.returncode else ""
                emit(res.stdout.rstrip() + failed)
    print(f"\nwritten to {log}")


if __name__ == "__main__":
    main()
