"""The seeded fuzz corpus (tests/fuzz_corpus.py) against `info`, `generate`, `adapter info`, adapter loading and
`finetune --max-steps 1`, in a pool of worker processes under an address-space limit.

Passing means: no traceback (every refusal is a NomoatError, printed as one line), no signal, no hang, no
refusal by `info` of a file `generate` accepts, and no accepted file whose output differs from the pristine
file's where the damage is detectable by construction (`strict` cases: same generated text and bit-identical
logits, else refused); where the mutation may make a valid different file (`lenient`), finite logits.
NOMOAT_FUZZ_SCALE scales the random flips and cuts; NOMOAT_FUZZ_WORKERS sets the pool size.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import make_tiny_lm, write_tiny_gguf
from fuzz_corpus import ADAPTER_TARGETS, MODEL_TARGETS, corpus, describe, pristine_paths

CASE_SECONDS = 60  # a hang; a case normally takes 0.02-0.5 s
EXTRA_ADDRESS_SPACE = 2 << 30  # what a worker may map beyond its size once warmed up
FUZZ = Path(__file__).with_name("fuzz_corpus.py")


def prepare(root: Path) -> Path:
    """The pristine files: the tiny model as F32 and Q4_0 GGUF and as an HF directory, a PEFT adapter trained
    on nothing (random, with its base's fingerprint), its GGUF twin, and alpaca training data."""
    from test_adapter_ops import random_adapter

    from nomoat.adapters import base_fingerprint, convert_adapter
    from nomoat.api import convert_to_hf
    from nomoat.formats.export import export_model
    from nomoat.formats.peft import write_peft_dir
    from nomoat.lora import LoraConfig
    from nomoat.runtime.loading import load

    p = pristine_paths(root)
    lm = make_tiny_lm(seed=0)
    write_tiny_gguf(lm, p["gguf"])
    export_model(lm, p["q4"], "q4_0")
    convert_to_hf(lm, p["hf"])
    cfg = LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"])
    tensors, _ = random_adapter(cfg, lm.config, seed=1, b_std=0.5)
    base = load(p["hf"], threads=1)
    meta = {"base_fingerprint": base_fingerprint(base), "base_name": "tiny-llama", "steps": 1}
    write_peft_dir(p["peft"], cfg, tensors, "tiny-llama", meta)
    convert_adapter(p["peft"], "gguf", p["agguf"], lm.config)
    p["data"].write_text("".join(json.dumps({"instruction": f"Say {w} twice.", "output": f"{w} {w}"}) + "\n"
                                 for w in ("one", "two", "red", "blue", "cat", "dog", "sun", "sea", "up", "down")))
    return root


class Pool:
    """Worker processes (tests/fuzz_corpus.py worker), each running cases one at a time in-process; a case past
    CASE_SECONDS is a hang (the worker is killed and replaced), a worker that dies takes its case with it."""

    def __init__(self, root: Path, n: int, env: dict[str, str]) -> None:
        self.root, self.env, self.sel = root, env, selectors.DefaultSelector()
        self.idle: list[subprocess.Popen] = []
        self.busy: dict[subprocess.Popen, tuple[int, float]] = {}
        self.logs = root / "workers.log"
        self.address_space = 0
        for _ in range(n):
            self._spawn()

    def _spawn(self) -> None:
        with open(self.logs, "a") as log:
            proc = subprocess.Popen([sys.executable, str(FUZZ), "worker", str(self.root), str(EXTRA_ADDRESS_SPACE)],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, bufsize=1,
                                    env=self.env, cwd=self.root)
        ready = proc.stdout.readline()  # imports and warm-up happen before the first case is timed
        assert ready, f"a fuzz worker failed to start; see {self.logs}:\n{self.logs.read_text()[-3000:]}"
        self.address_space = json.loads(ready)["address_space"]
        self.sel.register(proc.stdout, selectors.EVENT_READ, proc)
        self.idle.append(proc)

    def _retire(self, proc: subprocess.Popen) -> int:
        self.sel.unregister(proc.stdout)
        if proc.poll() is None:
            proc.kill()
        return proc.wait()

    def run(self, ids: list[int]) -> dict[int, dict]:
        results: dict[int, dict] = {}
        todo = list(reversed(ids))
        while todo or self.busy:
            while todo and self.idle:
                proc = self.idle.pop()
                i = todo.pop()
                proc.stdin.write(f"{i}\n")
                proc.stdin.flush()
                self.busy[proc] = (i, time.monotonic())
            for key, _ in self.sel.select(timeout=1.0):
                proc = key.data
                line = proc.stdout.readline()
                i, _ = self.busy.pop(proc)
                if line:
                    results[i] = json.loads(line)
                    self.idle.append(proc)
                else:  # the worker died: a signal (SIGSEGV, SIGABRT from a native library) or an exit
                    results[i] = {"id": i, "died": self._retire(proc)}
                    self._spawn()
            now = time.monotonic()
            for proc, (i, start) in list(self.busy.items()):
                if now - start > CASE_SECONDS:
                    del self.busy[proc]
                    self._retire(proc)
                    results[i] = {"id": i, "hang": round(now - start, 1)}
                    self._spawn()
        return results

    def close(self) -> None:
        for proc in self.idle + list(self.busy):
            proc.stdin.close()
            self._retire(proc)


def _one_line(run: dict) -> bool:
    lines = run["err"].strip().splitlines()
    return len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in run["err"]


def failure(case: dict, res: dict, ref: dict) -> str | None:
    """Why a result fails the corpus's criteria, or None."""
    if "hang" in res:
        return f"hang ({res['hang']} s)"
    if "died" in res:
        return f"worker died (exit status {res['died']}: a signal when negative)"
    if "harness" in res:
        return "harness error: " + res["harness"].strip().splitlines()[-1]
    runs = res["runs"]
    for name, run in runs.items():
        if run["exc"]:
            return f"{name}: traceback: {run['exc'].strip().splitlines()[-1]}"
        if run["code"] != 0 and not _one_line(run):
            return f"{name}: exit {run['code']} without a one-line error: {run['err'][-300:]!r}"
    if case["target"] == "data":
        return None
    raw = runs["raw"]
    if runs["info"]["code"] != 0 and raw["code"] == 0:
        return f"info refused what generate accepts: {runs['info']['err'].strip()}"
    if raw["code"] != 0:
        return None
    lg = res.get("logits", {})
    if "exc" in lg:
        return "Python API: traceback: " + lg["exc"].strip().splitlines()[-1]
    if "api_error" in lg:
        return f"the CLI accepted it, the Python API refused: {lg['api_error']}"
    if not lg.get("finite"):
        return "accepted, and the logits are not finite"
    if case["kind"] == "strict":
        same = lg["digest"] == ref["logits"]["digest"] and all(
            runs[n]["out"] == ref["runs"][n]["out"] for n in runs if n != "info" and runs[n]["code"] == 0)
        if not same:
            return "accepted, and the output differs from the pristine file's"
    return None


@pytest.fixture(scope="module")
def fuzz_run(tmp_path_factory):
    root = prepare(tmp_path_factory.mktemp("fuzz"))
    scale = float(os.environ.get("NOMOAT_FUZZ_SCALE", "1"))
    cases = corpus(root, scale=scale)
    (root / "cases.json").write_text(json.dumps(cases))
    n = int(os.environ.get("NOMOAT_FUZZ_WORKERS", "0")) or max(1, min(4, os.cpu_count() or 1))
    env = {**os.environ, "NOMOAT_HOME": str(root / "home"), "NOMOAT_CACHE": str(root / "cache"),
           "NOMOAT_THREADS": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(FUZZ.parent), os.environ.get("PYTHONPATH", "")])}
    t0 = time.monotonic()
    pool = Pool(root, n, env)
    try:
        results = pool.run([c["id"] for c in cases])
    finally:
        pool.close()
    return root, cases, results, time.monotonic() - t0, n, pool.address_space


def test_fuzz_corpus(fuzz_run) -> None:
    root, cases, results, seconds, workers, address_space = fuzz_run
    refs = {c["target"]: results[c["id"]] for c in cases if c["op"] == "pristine"}
    for target in (*MODEL_TARGETS, *ADAPTER_TARGETS):
        ref = refs[target]
        assert ref["runs"]["raw"]["code"] == 0 and ref["logits"].get("finite"), (target, ref)
    failures = [(c, why) for c in cases if (why := failure(c, results[c["id"]], refs[c["target"]]))]
    outcome = Counter(
        (c["kind"], "accepted" if all(r["code"] == 0 for r in results[c["id"]].get("runs", {}).values()) else "refused")
        for c in cases)
    summary = (f"fuzz corpus: {len(cases)} cases ({dict(Counter(c['target'] for c in cases))}), {workers} workers, "
               f"{seconds:.0f} s, address space limit {address_space / 2**30:.1f} GiB per worker; outcomes "
               f"{dict(sorted(outcome.items()))}; failures: {len(failures)}")
    print(summary)
    (root / "results.json").write_text(json.dumps(results))
    (root / "summary.txt").write_text(summary + "\n" + "\n".join(f"{describe(c)}: {w}" for c, w in failures))
    assert not failures, summary + "\n" + "\n".join(f"{describe(c)}: {why}" for c, why in failures[:40]) + \
        f"\n(reproduce one: python tests/fuzz_corpus.py run {root} ID)"


def test_corpus_is_seeded_and_large(fuzz_run) -> None:
    root, cases, *_ = fuzz_run
    assert len(cases) >= 3000
    again = corpus(root, scale=float(os.environ.get("NOMOAT_FUZZ_SCALE", "1")))
    assert json.dumps(again) == (root / "cases.json").read_text()
