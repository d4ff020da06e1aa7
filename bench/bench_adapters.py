"""Adapters on the default model: sizes, merge/export times, combination error, merge-then-quantize cost.

Run: OMP_NUM_THREADS=1 PYTHONPATH=src python bench/bench_adapters.py [--steps 30] [--random] [--out DIR]

1. Two adapters at the `nomoat finetune` defaults (r=8, alpha=16, all-linear), trained for --steps steps
   each on two generated skills (dates -> ISO 8601; two-number addition), or random (--random).
2. Adapter sizes (PEFT safetensors, GGUF f32/f16/q8_0) and their ratio to the base file and fp32 base.
3. Time to merge one adapter into the float base and to export (GGUF f16/q8_0/q4_0, HF f32 directory).
4. Relative error ||D - BA|| / ||D|| (all modules together) of `linear` and `ties` at ranks 4, 8, 16.
5. Quality cost of merge-then-quantize: loss/perplexity on held-out answers and exact-match accuracy of the
   date skill, for the adapter kept unmerged over a quantized base vs merged and then quantized.
Not a test; one run on a shared 2-core machine, numbers vary ~10%.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch

from nomoat.adapters import load_adapter, merge_to_model, update_retention
from nomoat.eval import load_task, perplexity, task_accuracy
from nomoat.formats.export import export_model
from nomoat.formats.gguf_adapter import write_gguf_adapter
from nomoat.formats.peft import read_peft_dir
from nomoat.lora.combine import combine
from nomoat.runtime.loading import default_model_path, load
from nomoat.skills import write_skill_data


def _mib(n: float) -> str:
    return f"{n / 2**20:8.2f} MiB"


def _size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size


def write_sum_data(directory: Path, n_train: int = 800, n_test: int = 60, seed: int = 0) -> Path:
    rng = random.Random(seed)
    rows = []
    for _ in range(n_train):
        a, b = rng.randint(10, 999), rng.randint(10, 999)
        rows.append({"instruction": f"Add the numbers. Answer with the number only.\n{a} + {b}", "output": str(a + b)})
    path = directory / "sum.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_adapter(data: Path, out: Path, steps: int, seed: int) -> Path:
    from nomoat.train.sft import TrainConfig, finetune

    lm = load(dtype="bfloat16")
    cfg = TrainConfig(data=str(data), out=str(out), max_steps=steps, batch_size=8, lr=5e-4, seq_len=128,
                      eval_every=10**6, save_every=10**6, val_fraction=0.0, seed=seed)
    t = time.perf_counter()
    finetune(lm, cfg, overwrite=True)
    print(f"trained {out.name}: {steps} steps in {time.perf_counter() - t:.0f} s")
    return out


def random_adapter(out: Path, seed: int) -> Path:
    from nomoat.adapters import base_fingerprint
    from nomoat.formats.peft import write_peft_dir
    from nomoat.lora import LoraConfig, adapter_state_dict, add_adapter, lora_modules

    lm = load()
    cfg = LoraConfig(r=8, alpha=16)
    add_adapter(lm.model, cfg, "r")
    g = torch.Generator().manual_seed(seed)
    for _, m in lora_modules(lm.model):
        with torch.no_grad():
            m.lora_B["r"].normal_(0, 0.01, generator=g)
    return write_peft_dir(out, cfg, adapter_state_dict(lm.model, "r"), lm.name,
                          {"base_fingerprint": base_fingerprint(lm), "base_name": lm.name})


def timed(fn):
    t = time.perf_counter()
    r = fn()
    return r, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--random", action="store_true", help="random adapters instead of trained ones")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--eval-records", type=int, default=30)
    ap.add_argument("--reuse", action="store_true", help="reuse adapters A and B already in --out")
    args = ap.parse_args()
    work = args.out or Path(tempfile.mkdtemp(prefix="bench-adapters-"))
    work.mkdir(parents=True, exist_ok=True)
    base_file = default_model_path()
    train_dates, test_dates = write_skill_data(work / "data")
    train_sum = write_sum_data(work / "data")
    val = work / "data" / "val_dates.jsonl"  # held-out date answers as instruction data, for perplexity
    val.write_text("".join(json.dumps({"instruction": r["prompt"], "output": r["expected"]}) + "\n"
                           for r in map(json.loads, test_dates.read_text().splitlines())))
    print(f"threads {torch.get_num_threads()} | work dir {work}")

    # 1. adapters
    if args.reuse and (work / "A" / "adapter_model.safetensors").exists() and (work / "B").exists():
        a, b = work / "A", work / "B"
        print(f"reusing adapters {a} and {b}")
    elif args.random:
        a, b = random_adapter(work / "A", 1), random_adapter(work / "B", 2)
    else:
        a = train_adapter(train_dates, work / "A", args.steps, 1)
        b = train_adapter(train_sum, work / "B", args.steps, 2)

    # 2. sizes
    lm = load()
    cfg_a, t_a, s_a, meta_a = read_peft_dir(a)
    n_params = sum(t.numel() for t in t_a.values())
    base_bytes, fp32_bytes = base_file.stat().st_size, lm.config.num_parameters() * 4
    print(f"\n## sizes (r={cfg_a.r}, alpha={cfg_a.alpha:g}, {', '.join(cfg_a.targets)}; {n_params:,} parameters, "
          f"{100 * n_params / lm.config.num_parameters():.2f}% of {lm.config.num_parameters() / 1e6:.0f} M)")
    print(f"{'file':28s} {'size':>12s} {'/ base GGUF':>12s} {'/ fp32 base':>12s}")
    rows = [("PEFT adapter_model (fp32)", (a / "adapter_model.safetensors").stat().st_size)]
    for dt in ("f32", "f16", "q8_0"):
        p = write_gguf_adapter(work / f"A-{dt}.gguf", cfg_a, t_a, s_a, lm.config, meta_a, dtype=dt)
        rows.append((f"GGUF adapter {dt}", p.stat().st_size))
    rows += [("base GGUF (Q4_1/Q8_0)", base_bytes), ("base fp32", fp32_bytes)]
    for name, n in rows:
        print(f"{name:28s} {_mib(n):>12s} {100 * n / base_bytes:11.2f}% {100 * n / fp32_bytes:11.2f}%")

    # 3. merge and export times
    print("\n## merge and export (default model, one adapter)")
    _, dt_merge = timed(lambda: merge_to_model(lm, [(a, 1.0)]))
    print(f"{'merge into float base':28s} {dt_merge:7.2f} s")
    for kind, ftype in (("gguf", "f16"), ("gguf", "q8_0"), ("gguf", "q4_0"), ("gguf", "q4_1"), ("hf", "f32")):
        out = work / (f"merged-{ftype}.gguf" if kind == "gguf" else "merged-hf")
        shutil.rmtree(out, ignore_errors=True)  # a directory left by an earlier --reuse run
        p, dt = timed(lambda out=out, ftype=ftype: export_model(lm, out, ftype))
        print(f"{'export ' + kind + ' ' + ftype:28s} {dt:7.2f} s  {_mib(_size(p))}")
    lm = None  # free the merged model before the next loads

    # 4. combination error
    _, t_b, s_b, _ = read_peft_dir(b)
    print("\n## combining A + B (weights 1, 1): relative error of the combined update, all modules")
    print(f"{'how':8s} {'rank':>5s} {'overall':>10s} {'mean':>10s} {'max':>10s} {'vs sum':>10s} {'time':>8s}")
    (_, _, rep), dt = timed(lambda: combine([(t_a, s_a, 1.0), (t_b, s_b, 1.0)], "concat"))
    print(f"{'concat':8s} {16:5d} {rep.total_rel_error:10.2e} {rep.mean_rel_error:10.2e} {rep.max_rel_error:10.2e} "
          f"{'-':>10s} {dt:7.1f}s")
    for how in ("linear", "ties"):
        for rank in (4, 8, 16):
            (_, _, rep), dt = timed(lambda how=how, rank=rank: combine([(t_a, s_a, 1.0), (t_b, s_b, 1.0)], how,
                                                                       rank=rank))
            vs = [m["ties_vs_sum"] for m in rep.modules.values()] if how == "ties" else []
            vs_txt = f"{sum(vs) / len(vs):10.2e}" if vs else f"{'-':>10s}"
            print(f"{how:8s} {rank:5d} {rep.total_rel_error:10.2e} {rep.mean_rel_error:10.2e} "
                  f"{rep.max_rel_error:10.2e} {vs_txt} {dt:7.1f}s")

    # 5. merge-then-quantize vs unmerged adapter over the same quantized base
    records = load_task(test_dates)[: args.eval_records]
    print(f"\n## merge-then-quantize cost (adapter A, date skill: loss on {len(load_task(test_dates))} held-out "
          f"answers, exact match on {len(records)})")
    print(f"{'variant':44s} {'loss':>8s} {'ppl':>8s} {'accuracy':>9s} {'update kept':>12s}")

    def score(label: str, model_path: Path | None, adapter: Path | None, kept: float | None = None) -> None:
        lm = load(model_path)
        if adapter is not None:
            load_adapter(lm, adapter, force=True)  # a re-quantized base has another fingerprint
        ppl = perplexity(lm, val, seq_len=256, batch_size=8)
        acc = task_accuracy(lm, records, "exact-match", max_new_tokens=16)
        kept_txt = f"{100 * kept:11.1f}%" if kept is not None else f"{'-':>12s}"
        print(f"{label:44s} {ppl.loss:8.4f} {ppl.perplexity:8.3f} {100 * acc.accuracy:8.1f}% {kept_txt}")

    merged = merge_to_model(load(), [(a, 1.0)])
    kept = {f: update_retention(merged, f) for f in ("f16", "q8_0", "q4_0", "q4_1")}
    merged = None

    score("base Q4_1, no adapter", None, None)
    score("base Q4_1 + A unmerged (trained on this)", None, a)
    score("merged (float) -> HF f32", work / "merged-hf", None)
    base_lm = load()
    for ftype in ("q8_0", "q4_0", "q4_1"):
        qbase = export_model(base_lm, work / f"base-{ftype}.gguf", ftype)
        score(f"base -> {ftype} + A unmerged", qbase, a)
        score(f"merged -> {ftype}", work / f"merged-{ftype}.gguf", None, kept[ftype])
    if args.out is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
