"""Benchmark the catalog: time to list N adapters (1,000 by default), and the time and memory to hot-load one
adapter into a running `nomoat serve --catalog` (over HTTP, and by `adapters add` picked up by the watcher).

    python bench/bench_catalog.py [--adapters 1000] [--threads 2] [--rank 8]

Everything happens in a temporary NOMOAT_HOME. The listing's adapters are tiny (rank 1, one module) on a tiny
base, since only the index is read; the hot-load uses the default model (SmolLM2-135M) and a rank-`--rank`
all-linear adapter, as a user would. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def random_adapter(lm, out: Path, rank: int, targets: str, seed: int) -> Path:
    import torch

    from nomoat.adapters import base_fingerprint
    from nomoat.formats.peft import write_peft_dir
    from nomoat.lora import LoraConfig, adapter_state_dict, add_adapter, lora_modules, remove_adapter, strip_lora

    cfg = LoraConfig(r=rank, alpha=2 * rank, targets=targets)
    g = torch.Generator().manual_seed(seed)
    add_adapter(lm.model, cfg, name="b")
    for _, mod in lora_modules(lm.model):
        if "b" in mod.lora_B:
            with torch.no_grad():
                mod.lora_B["b"].copy_(0.02 * torch.randn(mod.lora_B["b"].shape, generator=g))
    tensors = adapter_state_dict(lm.model, "b")
    remove_adapter(lm.model, "b")
    strip_lora(lm.model)
    return write_peft_dir(out, cfg, tensors, lm.base_model_id, {"base_fingerprint": base_fingerprint(lm),
                                                                "base_name": lm.name})


def bench_listing(root: Path, n: int) -> dict[str, float]:
    from conftest import make_tiny_lm

    from nomoat.api import convert_to_hf
    from nomoat.catalog import Catalog
    from nomoat.catalog.ingest import add_adapter, add_model
    from nomoat.catalog.views import adapter_table
    from nomoat.runtime.loading import load

    hf = convert_to_hf(make_tiny_lm(seed=1), root / "tiny-hf")
    add_model(hf, "tiny")
    lm = load(hf)
    t0 = time.perf_counter()
    for i in range(n):
        p = random_adapter(lm, root / "src" / f"a{i}", 1, "q", i)
        add_adapter(p, f"a{i}:v1")
    add_s = time.perf_counter() - t0
    cat = Catalog()
    t0 = time.perf_counter()
    rows = adapter_table(cat).rows
    table_s = time.perf_counter() - t0
    assert len(rows) == n, len(rows)
    env = {**os.environ}
    cli = []
    for _ in range(3):
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", "from nomoat.cli import main; main()", "adapters", "list"],
                             env=env, capture_output=True, text=True, check=True).stdout
        cli.append(time.perf_counter() - t0)
        assert out.count("\n") == n + 1
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import nomoat.cli"], env=env, check=True)
    startup = time.perf_counter() - t0
    return {"adapters": n, "add all (s)": add_s, "add one (ms)": 1000 * add_s / n, "list in-process (ms)":
            1000 * table_s, "nomoat adapters list (s, best of 3)": min(cli),
            "of which python + CLI import (s)": startup}


def bench_hot_load(root: Path, threads: int, rank: int) -> dict[str, float]:
    from bench_serve import free_port

    from nomoat.catalog import Catalog
    from nomoat.catalog.ingest import add_adapter
    from nomoat.runtime.loading import load

    lm = load()  # the default model
    first = random_adapter(lm, root / "hot1", rank, "all-linear", 1)
    second = random_adapter(lm, root / "hot2", rank, "all-linear", 2)
    size = sum(f.stat().st_size for f in first.iterdir()) / 2**20
    del lm
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-c", "from nomoat.cli import main; main()", "serve", "--catalog",
                             "--port", str(port), "--threads", str(threads), "--api-key", "k"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    h = {"Authorization": "Bearer k"}
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server did not start: {proc.stderr.read() if proc.stderr else ''}")
            try:
                if httpx.get(url + "/health", headers=h).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        body = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
        httpx.post(url + "/v1/chat/completions", json=body, headers=h, timeout=120)  # warm up
        before = rss_mib(proc.pid)
        t0 = time.perf_counter()
        r = httpx.post(url + "/v1/adapters", json={"path": str(first), "name": "hot"}, headers=h, timeout=120)
        post_s = time.perf_counter() - t0
        assert r.status_code == 201, r.text
        body["model"] = "hot"
        t0 = time.perf_counter()
        assert httpx.post(url + "/v1/chat/completions", json=body, headers=h, timeout=120).status_code == 200
        first_request_s = time.perf_counter() - t0
        after = rss_mib(proc.pid)
        t0 = time.perf_counter()
        add_adapter(second, "watched:v1", cat=Catalog())
        added_s = time.perf_counter() - t0
        while "watched:v1" not in [m["id"] for m in httpx.get(url + "/v1/models", headers=h).json()["data"]]:
            time.sleep(0.02)
        seen_s = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(60)
    return {"adapter (MiB on disk)": size, "POST /v1/adapters (ms)": 1000 * post_s,
            "first request on it (ms, 8 tokens)": 1000 * first_request_s,
            "server RSS before (MiB)": before, "server RSS after (MiB)": after, "RSS growth (MiB)": after - before,
            "adapters add (ms)": 1000 * added_s, "add -> listed by the watcher (ms)": 1000 * seen_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapters", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--skip-hot-load", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        os.environ["NOMOAT_HOME"] = str(root / "home")
        os.environ["NOMOAT_CACHE"] = str(root / "cache")
        import torch

        torch.set_num_threads(args.threads)
        rows = bench_listing(root / "listing", args.adapters)
        if not args.skip_hot_load:
            os.environ["NOMOAT_HOME"] = str(root / "home2")
            rows.update(bench_hot_load(root / "hot", args.threads, args.rank))
    width = max(len(k) for k in rows)
    print(f"{'measure':<{width}}  value")
    for k, v in rows.items():
        print(f"{k:<{width}}  {v:.3f}" if isinstance(v, float) else f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()
