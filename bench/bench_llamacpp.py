"""nomoat vs llama.cpp on the same GGUF: prompt and decode tokens/s and peak RSS, 1 and 2 threads.

llama.cpp is measured through llama-cpp-python, which compiles llama.cpp from source (~6 min on
2 cores). Install it into a separate environment so the project's own stays lean:

    python3 -m venv ../bench-venv && ../bench-venv/bin/pip install llama-cpp-python numpy
    python bench/bench_llamacpp.py --llama-python ../bench-venv/bin/python

Each measurement runs in its own subprocess, so its peak RSS is its own. Same token ids for both
(a ~512-token prompt, then 128 greedy tokens with end-of-sequence ignored). Not a test: timings
vary by ~10% between runs on shared machines; compare the ratios of one run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from busy import busy  # noqa: E402

PROMPT_TOKENS = 512
DECODE_TOKENS = 128

NOMOAT_SIDE = r"""
import json, resource, sys, time, torch
threads, n_prompt, n_decode, quant = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
t0 = time.perf_counter()
from nomoat.runtime.loading import load
from nomoat.model import KVCache
lm = load(quant=quant, threads=None if threads == "auto" else int(threads))  # auto: nomoat's own choice
load_s = time.perf_counter() - t0
g = torch.Generator().manual_seed(0)
ids = torch.randint(100, 40000, (1, n_prompt), generator=g)
m = lm.model
from nomoat.runtime.generate import PREFILL_CHUNK
def run():
    cache = KVCache(m.config, 1, n_prompt + n_decode + 1, dtype=m.kv_dtype)  # as `generate` does
    with torch.inference_mode():
        t = time.perf_counter()
        for s in range(0, n_prompt, PREFILL_CHUNK):  # as `generate` does
            logits = m(ids[:, s:s + PREFILL_CHUNK], cache=cache, last_only=True)
        tp = time.perf_counter() - t
        tok = logits[:, -1].argmax(-1, keepdim=True)
        t = time.perf_counter()
        for _ in range(n_decode):
            tok = m(tok, cache=cache)[:, -1].argmax(-1, keepdim=True)
        td = time.perf_counter() - t
    return n_prompt / tp, n_decode / td
cold = run()  # warm-up: first-call allocations and kernel dispatch
first_s = load_s + n_prompt / cold[0]  # process start to the first token, cold
p, d = zip(*(run() for _ in range(3)))
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"load_s": load_s, "first_s": first_s, "prompt_tps": sorted(p)[1], "decode_tps": sorted(d)[1],
                  "rss_mib": rss, "threads": lm.cpu.threads}))
"""

LLAMA_SIDE = r"""
import json, resource, sys, time
threads, n_prompt, n_decode, path, fa = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
import os, random
threads = os.cpu_count() if threads == "auto" else int(threads)  # auto: llama.cpp's own default
t0 = time.perf_counter()
from llama_cpp import Llama
llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=n_prompt + n_decode + 8,
            n_batch=512, flash_attn=fa == "1", verbose=False)
load_s = time.perf_counter() - t0
rnd = random.Random(0)
ids = [rnd.randrange(100, 40000) for _ in range(n_prompt)]
def run():
    llm.reset()
    t = time.perf_counter()
    llm.eval(ids)
    tp = time.perf_counter() - t
    tok = llm.sample(temp=0.0)
    t = time.perf_counter()
    for _ in range(n_decode):
        llm.eval([tok])
        tok = llm.sample(temp=0.0)
    td = time.perf_counter() - t
    return n_prompt / tp, n_decode / td
cold = run()
first_s = load_s + n_prompt / cold[0]
p, d = zip(*(run() for _ in range(3)))
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"load_s": load_s, "first_s": first_s, "prompt_tps": sorted(p)[1], "decode_tps": sorted(d)[1],
                  "rss_mib": rss}))
"""


def side(python: str, code: str, *args: str) -> dict:
    r = subprocess.run([python, "-c", code, *args], capture_output=True, text=True, timeout=1200)
    if r.returncode:
        raise SystemExit(f"side failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    from nomoat.runtime.loading import default_model_path

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-python", default="../bench-venv/bin/python",
                    help="a Python with llama-cpp-python installed")
    ap.add_argument("--threads", default="1,2", help="comma-separated; 'auto' lets each tool choose")
    ap.add_argument("--busy", type=int, default=0, help="run beside this many CPU-bound processes")
    ap.add_argument("--quant", default="auto", help="nomoat's --quant (auto keeps the file's Q4 blocks)")
    ap.add_argument("--flash-attn", action="store_true",
                    help="run llama.cpp with flash attention (measured here: faster prompts, slower decoding)")
    a = ap.parse_args()
    path = str(default_model_path())
    rows = []
    with busy(a.busy):
        for t in a.threads.split(","):
            ours = side(sys.executable, NOMOAT_SIDE, t, str(PROMPT_TOKENS), str(DECODE_TOKENS), a.quant)
            ref = side(a.llama_python, LLAMA_SIDE, t, str(PROMPT_TOKENS), str(DECODE_TOKENS), path,
                       "1" if a.flash_attn else "0")
            rows.append((t if t != "auto" else f"auto({ours['threads']})", ours, ref))
    print(f"model: {path}\nllama.cpp flash attention: {'on' if a.flash_attn else 'off'}\n"
          f"prompt {PROMPT_TOKENS} tokens, decode {DECODE_TOKENS} tokens greedy, median of 3"
          + (f", beside {a.busy} CPU-bound process(es)" if a.busy else "") + "\n")
    print(f"{'threads':>7} {'metric':<14} {'nomoat':>10} {'llama.cpp':>10} {'ratio':>7}")
    for t, ours, ref in rows:
        for key, label, better_high in (("prompt_tps", "prompt tok/s", True), ("decode_tps", "decode tok/s", True),
                                        ("load_s", "load s", False), ("first_s", "to 1st token s", False),
                                        ("rss_mib", "peak RSS MiB", False)):
            ratio = ours[key] / ref[key]
            print(f"{t:>7} {label:<14} {ours[key]:>10.2f} {ref[key]:>10.2f} {ratio:>6.2f}x"
                  + ("" if better_high else f" (lower is better; difference {ours[key] - ref[key]:+.2f})"))


if __name__ == "__main__":
    main()
