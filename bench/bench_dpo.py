"""Preference training speed and memory: `nomoat dpo` against TRL's DPOTrainer + PEFT, same model, pairs and threads.

Run: python bench/bench_dpo.py [--threads 2] [--steps 8] [--warmup 2] [--batch 8] [--model PATH]

Every variant trains a LoRA of rank 8 (alpha 16) on all seven linear projections with the sigmoid (DPO) loss,
beta 0.1, batch `--batch` pairs, AdamW at lr 1e-4 with gradient clipping at 1.0, on the same pairs: date prompts
(`nomoat.skills`) through the model's chat template, each with two answers of a few dozen tokens, in TRL's
conversational layout (which `nomoat dpo` reads as it is). Each variant runs in its own fresh process, so
its peak RSS is its own.
- nomoat: the real `nomoat.train.dpo.train_dpo` (base weights in the dtype this CPU trains fastest in, or
  float32): reference log-probabilities computed once before training (counted in "setup"), every pair packed as
  prompt | chosen | rejected in one row.
- TRL: transformers' LlamaForCausalLM loaded from the same GGUF (float32), `trl.DPOTrainer(model, ref_model=None,
  peft_config=...)`, `trainer.train()`: the reference by switching the adapter off at every step. "defaults" keeps
  TRL's gradient checkpointing; "no checkpointing" turns it off; "bf16 autocast" also computes in bfloat16.
pairs/s is the batch's pairs over the optimizer step's wall time (forward, backward, clipping, optimizer), the
median over `--steps` steps after `--warmup`; "setup" is the time from the call to the first step (tokenizing,
and for nomoat the reference pass). The base's fingerprint, which nomoat computes once per model file and keeps
in its cache, is computed before the runs (its float32 pass over every weight would otherwise add ~700 MB to
the first run's peak), as on any run after a model's first. Not a test: on a shared machine numbers vary run to
run; compare only within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RANK, ALPHA, LR, BETA, SEED = 8, 16.0, 1e-4, 0.1, 0
VARIANTS = {  # name: (label, kind, setting)
    "nomoat": ("nomoat dpo (dtype chosen for this CPU)", "nomoat", "auto"),
    "nomoat-fp32": ("nomoat dpo, float32 base", "nomoat", "float32"),
    "trl": ("TRL DPOTrainer + PEFT fp32, defaults", "trl", "gc"),
    "trl-nogc": ("TRL, no checkpointing", "trl", "nogc"),
    "trl-bf16": ("TRL, bf16 autocast, no checkpointing", "trl", "bf16"),
}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_pairs(directory: Path, n: int) -> Path:
    """n preference records in TRL's conversational layout: a right ISO date with a short reason against a
    wrong one in a longer sentence."""
    from nomoat.skills import date_examples

    rows = []
    for i, r in enumerate(date_examples(n, SEED)):
        y, m, d = r["expected"].split("-")
        spelled = r["prompt"].split("Date: ")[1]
        iso = r["expected"]
        chosen = f"{iso}\n\n{spelled} is year {y}, month {m}, day {d}, so the ISO 8601 form is {iso}."
        rejected = (f"The date {spelled} in ISO 8601 format (YYYY-MM-DD) would be written as {y}-{d}-{m}, with the "
                    f"day before the month" + (", as many countries write it." if i % 2 else "."))
        rows.append({"prompt": [{"role": "user", "content": r["prompt"]}],
                     "chosen": [{"role": "assistant", "content": chosen}],
                     "rejected": [{"role": "assistant", "content": rejected}]})
    path = directory / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def warm_fingerprint(args: argparse.Namespace) -> None:
    """The base's fingerprint into the bench's cache, as any earlier nomoat run on this model leaves it."""
    from nomoat.adapters import base_fingerprint
    from nomoat.runtime.loading import load

    base_fingerprint(load(args.model, threads=args.threads))


def run_nomoat(args: argparse.Namespace, dtype: str) -> dict:
    import shutil

    import torch

    from nomoat.runtime.loading import load
    from nomoat.train.dpo import DPOConfig, cache_dir, train_dpo
    from nomoat.train.loop import StepInfo

    torch.set_num_threads(args.threads)
    shutil.rmtree(cache_dir(), ignore_errors=True)  # a fresh reference pass every run
    total = args.warmup + args.steps
    cfg = DPOConfig(data=args.data, out=str(Path(args.work) / f"nomoat-{dtype}"), max_steps=total,
                    batch_size=args.batch, lr=LR, beta=BETA, val_fraction=0.0, save_every=0, eval_every=10**9,
                    rank=RANK, alpha=ALPHA, targets=["all-linear"], seed=SEED,
                    dtype=None if dtype == "auto" else dtype)
    lm = load(args.model, dtype=cfg.base_dtype(), threads=args.threads)
    rss_load = peak_rss_mib()
    steps: list[float] = []
    rss: dict[str, float] = {}
    t0 = time.perf_counter()
    first: dict[str, float] = {}

    def on_step(i: StepInfo) -> None:
        if not steps:
            first["setup"] = time.perf_counter() - t0 - i.seconds
        steps.append(i.seconds)
        if i.step == total:
            rss["peak"] = peak_rss_mib()

    summary = train_dpo(lm, cfg, overwrite=True, on_step=on_step)
    return {"step_seconds": steps, "pairs": summary["train_pairs"], "rss_load": rss_load, "rss_peak": rss["peak"],
            "setup": first["setup"], "dtype": summary["base_dtype"], "checkpointing": summary["gradient_checkpointing"]}


def run_trl(args: argparse.Namespace, setting: str) -> dict:
    import datasets
    import torch
    import transformers
    import trl
    from peft import LoraConfig
    from transformers.utils import logging as hf_logging

    from nomoat.lora import ALL_LINEAR
    from nomoat.runtime.loading import default_model_path

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    datasets.disable_progress_bars()
    torch.set_num_threads(args.threads)
    path = Path(args.model) if args.model else default_model_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    # transformers dequantizes the GGUF to float32 at load but keeps a GGUF "quantizer" mark, which Trainer refuses
    # to train; the weights are plain floats, so drop the mark.
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.quantization_config = None
    rss_load = peak_rss_mib()
    records = [json.loads(line) for line in Path(args.data).read_text().splitlines()]
    total = args.warmup + args.steps
    cfg = trl.DPOConfig(output_dir=str(Path(args.work) / f"trl-{setting}"), per_device_train_batch_size=args.batch,
                        learning_rate=LR, beta=BETA, loss_type=["sigmoid"], max_steps=total, max_grad_norm=1.0,
                        use_cpu=True, bf16=setting == "bf16", gradient_checkpointing=setting == "gc",
                        precompute_ref_log_probs=False, report_to=[], save_strategy="no", logging_steps=10**9,
                        dataloader_num_workers=0, seed=SEED, optim="adamw_torch", disable_tqdm=True)
    lora = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(ALL_LINEAR),
                      task_type="CAUSAL_LM")
    steps: list[float] = []
    state: dict[str, float] = {}

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, *a, **k):
            state["t"] = time.perf_counter()
            state.setdefault("first", state["t"])

        def on_step_end(self, *a, **k):
            steps.append(time.perf_counter() - state["t"])
            if len(steps) == total:
                state["peak"] = peak_rss_mib()

    t0 = time.perf_counter()
    trainer = trl.DPOTrainer(model=model, ref_model=None, args=cfg, processing_class=tok, peft_config=lora,
                             train_dataset=datasets.Dataset.from_list(records), callbacks=[Timer()])
    trainer.train()
    return {"step_seconds": steps, "pairs": len(records), "rss_load": rss_load, "rss_peak": state["peak"],
            "setup": state["first"] - t0, "dtype": "bfloat16 autocast" if setting == "bf16" else "float32",
            "checkpointing": setting == "gc"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="GGUF file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=8, help="measured steps")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=8, help="pairs per step")
    p.add_argument("--only", nargs="*", choices=list(VARIANTS), help="run only these variants")
    p.add_argument("--side", choices=[*VARIANTS, "warm"], help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side == "warm":
        warm_fingerprint(args)
        return
    if args.side:
        _, kind, setting = VARIANTS[args.side]
        res = run_nomoat(args, setting) if kind == "nomoat" else run_trl(args, setting)
        print("RESULT " + json.dumps(res))
        return
    total = args.warmup + args.steps
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-dpo-") as work:
        data = write_pairs(Path(work), args.batch * total)  # one epoch: every variant sees each pair once
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1",
               "NOMOAT_CACHE": str(Path(work) / "cache")}
        warm = [sys.executable, __file__, "--side", "warm", "--threads", str(args.threads)]
        subprocess.run(warm + (["--model", args.model] if args.model else []), check=True, env=env,
                       capture_output=True)
        for side in args.only or VARIANTS:
            cmd = [sys.executable, __file__, "--side", side, "--threads", str(args.threads), "--steps",
                   str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch), "--work", work,
                   "--data", str(data)] + (["--model", args.model] if args.model else [])
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                sys.exit(f"{side} run failed:\n{proc.stderr[-3000:]}")
            res = json.loads(line[len("RESULT "):])
            assert len(res["step_seconds"]) == total and res["pairs"] == args.batch * total, (side, res)
            res["wall"] = time.perf_counter() - t0
            res["pairs_per_s"] = args.batch / statistics.median(res["step_seconds"][args.warmup:])
            results[side] = res
            print(f"  {side}: {res['wall']:.0f} s", file=sys.stderr)
    print(f"SmolLM2-135M-Instruct, DPO (sigmoid, beta {BETA}), LoRA r={RANK} all-linear, {args.batch} pairs a step, "
          f"AdamW lr {LR}, {args.threads} threads; median of {args.steps} steps after {args.warmup} warm-up")
    trls = {k: r for k, r in results.items() if VARIANTS[k][1] == "trl"}
    ref = trls.get("trl")
    best = max(trls.values(), key=lambda r: r["pairs_per_s"]) if trls else None
    print(f"{'variant':40} {'pairs/s':>8} {'setup s':>8} {'RSS load':>9} {'peak RSS':>9} {'speed vs TRL':>13} "
          f"{'memory vs TRL':>14} {'speed vs best TRL':>18} {'weights':>18} {'ckpt':>5}")
    for side, r in results.items():
        speed = f"{r['pairs_per_s'] / ref['pairs_per_s']:.2f}x" if ref else "-"
        mem = f"{r['rss_peak'] / ref['rss_peak']:.2f}x" if ref else "-"
        vs_best = f"{r['pairs_per_s'] / best['pairs_per_s']:.2f}x" if best else "-"
        print(f"{VARIANTS[side][0]:40} {r['pairs_per_s']:8.2f} {r['setup']:8.1f} {r['rss_load']:9.0f} "
              f"{r['rss_peak']:9.0f} {speed:>13} {mem:>14} {vs_best:>18} {r['dtype']:>18} "
              f"{'yes' if r['checkpointing'] else 'no':>5}")
    print("(speed > 1: faster than TRL with its defaults; memory < 1: smaller. RSS in MiB. nomoat's setup includes "
          "its one reference pass over every pair.)")


if __name__ == "__main__":
    main()
