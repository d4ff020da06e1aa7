"""Benchmark `nomoat serve` on the default model: time to first token and tokens/s with 1 and 4 concurrent
streaming clients, and the server's memory with 1 vs 5 adapters loaded.

    python bench/bench_serve.py [--threads 2] [--max-tokens 48]

Speed: a real `nomoat serve` process on loopback with a random rank-8 all-linear adapter, driven by streaming
httpx clients. Memory: RSS (after malloc_trim) of an in-process server holding the base alone, then 1, then 5
such adapters, each measured after serving a request per model id. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

from nomoat.formats.peft import write_peft_dir
from nomoat.lora import LoraConfig
from nomoat.runtime.loading import open_checkpoint

PROMPTS = ["Write a short story about a lighthouse keeper.", "Explain how a bicycle works.",
           "Describe a day at the beach.", "Give advice to a new gardener."]


def make_adapters(out: Path, n: int, rank: int = 8) -> list[Path]:
    """Random rank-`rank` LoRA adapters on every linear layer of the default model (PEFT directories)."""
    cfg = open_checkpoint(None).config()
    h, f, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    shapes = {"self_attn.q_proj": (h, q), "self_attn.k_proj": (h, kv), "self_attn.v_proj": (h, kv),
              "self_attn.o_proj": (q, h), "mlp.gate_proj": (h, f), "mlp.up_proj": (h, f), "mlp.down_proj": (f, h)}
    paths = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        tensors = {}
        for layer in range(cfg.num_hidden_layers):
            for mod, (fin, fout) in shapes.items():
                key = f"model.layers.{layer}.{mod}"
                tensors[f"{key}.lora_A.weight"] = torch.randn(rank, fin, generator=g) / fin ** 0.5
                tensors[f"{key}.lora_B.weight"] = 0.01 * torch.randn(fout, rank, generator=g)
        paths.append(write_peft_dir(out / f"a{i}", LoraConfig(r=rank, alpha=2 * rank), tensors, "smollm2", {}))
    return paths


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, adapters: list[Path], threads: int, extra: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = ["serve", "--port", str(self.port), "--threads", str(threads), *extra]
        for i, p in enumerate(adapters):
            args += ["--adapter", f"a{i}={p}"]
        self.proc = subprocess.Popen([sys.executable, "-c", "from nomoat.cli import main; main()", *args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server did not start: {self.proc.stderr.read() if self.proc.stderr else ''}")
            try:
                if httpx.get(self.url + "/health").status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.3)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def one_stream(url: str, model: str, prompt: str, max_tokens: int) -> dict[str, float]:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = None
    tokens = 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            msg = json.loads(line[6:])
            if msg.get("usage"):
                tokens = msg["usage"]["completion_tokens"]
            elif first is None and msg["choices"][0]["delta"].get("content"):
                first = time.perf_counter()
    end = time.perf_counter()
    first = first or end
    return {"ttft": first - t0, "tokens": tokens, "seconds": end - t0,
            "tps": (tokens - 1) / (end - first) if end > first and tokens > 1 else 0.0}


def run_clients(url: str, models: list[str], max_tokens: int) -> tuple[list[dict[str, float]], float]:
    results: list[dict[str, float]] = [{}] * len(models)

    def work(i: int) -> None:
        results[i] = one_stream(url, models[i], PROMPTS[i % len(PROMPTS)], max_tokens)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(models))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--max-tokens", type=int, default=48)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(Path(tmp), 5)
        size = sum(f.stat().st_size for f in adapters[0].iterdir()) / 2**20
        print(f"default model, server --threads {a.threads}, greedy, max_tokens {a.max_tokens}, "
              f"adapters rank 8 all-linear ({size:.1f} MiB each on disk), "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores\n")
        rows = []
        srv = Server(adapters[:2], a.threads)
        mixed4 = ["smollm2", "a0", "a1", "smollm2"]
        try:
            for m in ("smollm2", "a0"):  # warm-up
                one_stream(srv.url, m, "Hi", 4)
            for label, models in [("1 client, base", ["smollm2"]), ("1 client, adapter", ["a0"]),
                                  ("4 clients, base", ["smollm2"] * 4), ("8 clients, base", ["smollm2"] * 8),
                                  ("4 clients, base + 2 adapters", mixed4),
                                  ("8 clients, base + 2 adapters", mixed4 * 2),
                                  ("4 clients, all adapter a0", ["a0"] * 4)]:
                res, wall = run_clients(srv.url, models, a.max_tokens)
                total = sum(r["tokens"] for r in res)
                rows.append((label, sum(r["ttft"] for r in res) / len(res), max(r["ttft"] for r in res),
                             sum(r["tps"] for r in res) / len(res), total / wall, total))
        finally:
            srv.close()
        print(f"{'clients':32} {'TTFT mean s':>11} {'TTFT max s':>10} {'tok/s/client':>12} {'tok/s total':>11} "
              f"{'tokens':>6} {'x 1 client':>10}")
        one = rows[0][4]
        for r in rows:
            print(f"{r[0]:32} {r[1]:11.2f} {r[2]:10.2f} {r[3]:12.1f} {r[4]:11.1f} {r[5]:6d} {r[4] / one:10.2f}")
        by = {r[0]: r for r in rows}
        print(f"a row with an adapter costs {100 * (by['1 client, base'][3] / by['1 client, adapter'][3] - 1):+.0f}% "
              f"per token alone, {100 * (by['4 clients, base'][4] / by['4 clients, all adapter a0'][4] - 1):+.0f}% "
              "in a batch of 4")
        print()
        memory(adapters, a.threads)


def rss_mib() -> float:
    """This process's resident memory after returning freed heap pages to the system."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def memory(adapters: list[Path], threads: int) -> None:
    """RSS of an in-process server with the base alone, 1 adapter and 5 adapters, each after serving requests."""
    from nomoat.adapters import load_adapter
    from nomoat.lora import adapter_names
    from nomoat.runtime.loading import load
    from nomoat.serve import create_app, make_server

    lm = load(None, quant="auto", threads=threads)
    rows = []
    for n in (0, 1, 5):
        loaded = len(adapter_names(lm.model))
        for i in range(loaded, n):
            load_adapter(lm, adapters[i], name=f"a{i}", activate=False)
        names = {f"a{i}": 1.0 for i in range(n)}
        port = free_port()
        server = make_server(create_app(lm, "smollm2", names), port=port)
        t = threading.Thread(target=server.run, daemon=True)
        t.start()
        while not server.started:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}"
        for m in ["smollm2", *names] + (["+".join(names)] if n > 1 else []):
            one_stream(url, m, "Hi", 8)
        server.should_exit = True
        t.join()
        adapter_mib = sum(p.numel() * p.element_size() for name, p in lm.model.named_parameters()
                          if ".lora_" in name) / 2**20
        rows.append((n, rss_mib(), adapter_mib))
    print(f"{'adapters loaded':16} {'RSS MiB':>8} {'adapter tensors MiB':>20}")
    for n, rss, size in rows:
        print(f"{n:<16} {rss:8.0f} {size:20.1f}")
    print(f"1 -> 5 adapters: +{rows[2][1] - rows[1][1]:.0f} MiB RSS for +{rows[2][2] - rows[1][2]:.0f} MiB of adapter "
          f"weights (the base alone: {rows[0][1]:.0f} MiB)")


if __name__ == "__main__":
    main()
