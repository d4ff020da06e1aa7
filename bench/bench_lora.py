"""LoRA training speed and memory: nomoat's `finetune` against Hugging Face PEFT, same model, data and threads.

Run: python bench/bench_lora.py [--threads 2] [--steps 10] [--warmup 2] [--model PATH]

Every variant trains rank 8 (alpha 16) on all seven linear projections, batch 8 x 128 tokens, AdamW at
lr 2e-4 with gradient clipping at 1.0, on the same token windows: date-conversion instructions
(`nomoat.skills.date_examples`) rendered with the model's chat template and packed into 128-token
windows, batched in the order `nomoat finetune` uses. Each variant runs in its own fresh process so its
peak RSS is its own.
- nomoat: the real `nomoat.train.sft.finetune` (bf16, int8 or float32 base). By default nomoat computes the loss
  only on response tokens and projects only those onto the vocabulary; "all tokens" (--train-on-prompt)
  labels every token, like the PEFT loop, for a like-for-like comparison.
- PEFT: transformers' LlamaForCausalLM loaded from the same GGUF (float32), `peft.get_peft_model`, a plain
  torch loop (`model(input_ids, attention_mask, labels).loss.backward()`), labels = the all-token labels.
tokens/s counts every real (non-padding) input token of a step over the step's wall time (forward,
backward, clipping, optimizer); the median over `--steps` steps after `--warmup` warm-up steps.
Not a test: on a shared machine numbers vary run to run; compare only within one run.
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

RANK, ALPHA, LR, BATCH, SEQ, SEED = 8, 16.0, 2e-4, 8, 128, 0
sys.path.insert(0, str(Path(__file__).resolve().parent))
from busy import busy  # noqa: E402

VARIANTS = {  # name: (label, dtype, train_on_prompt)
    "nomoat-default": ("nomoat default (dtype chosen for this CPU)", "auto", False),
    "nomoat-bf16": ("nomoat bf16 base, response-token loss", "bfloat16", False),
    "nomoat-bf16-all": ("nomoat bf16 base, all-token loss", "bfloat16", True),
    "nomoat-qlora": ("nomoat QLoRA (int4 base), response-token loss", "qlora", False),
    "nomoat-int8": ("nomoat int8 base (int8 products), response-token loss", "int8", False),
    "nomoat-fp32": ("nomoat fp32 base, response-token loss", "float32", False),
    "nomoat-fp32-all": ("nomoat fp32 base, all-token loss", "float32", True),
    "peft": ("PEFT + transformers fp32, all-token loss", "float32", True),
}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_data(directory: Path) -> Path:
    from nomoat.skills import date_examples

    path = directory / "train.jsonl"
    rows = [{"instruction": r["prompt"], "output": r["expected"]} for r in date_examples(400, SEED)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def batches(model: str | None, data: Path, train_on_prompt: bool, n: int) -> list[dict[str, list]]:
    """The first n batches exactly as `finetune` builds them (pack, no validation split, epoch 0)."""
    from nomoat.data import Batches, build_dataset, load_examples, split_validation
    from nomoat.runtime.loading import load_tokenizer, open_checkpoint

    tok = load_tokenizer(open_checkpoint(model))
    rows = build_dataset(load_examples(data), tok, SEQ, train_on_prompt, pack=True)
    train, _ = split_validation(rows, 0.0, SEED)
    out = []
    for b in Batches(tok.pad_id).batches(train, BATCH, SEED, 0)[:n]:
        out.append({"input_ids": b.input_ids.tolist(), "labels": b.labels.tolist(),
                    "attention_mask": b.attention_mask.long().tolist()})
    return out


def run_nomoat(args: argparse.Namespace, dtype: str, train_on_prompt: bool) -> dict:
    import torch

    from nomoat.runtime.loading import load
    from nomoat.train.sft import StepInfo, TrainConfig, finetune

    torch.set_num_threads(args.threads)
    os.environ["NOMOAT_CACHE"] = str(Path(args.work) / "cache")
    total = args.warmup + args.steps
    if dtype == "auto":  # what `nomoat finetune` picks here with no --dtype
        dtype = TrainConfig(data="", out="").base_dtype()
    if dtype == "qlora":  # as `finetune --qlora` loads it
        lm = load(args.model, dtype="bfloat16", quant="q4", threads=args.threads, for_training=True)
    else:
        lm = load(args.model, dtype=dtype, threads=args.threads)
    rss_load = peak_rss_mib()
    out = Path(args.work) / f"nomoat-{dtype}-{int(train_on_prompt)}"
    cfg = TrainConfig(data=args.data, out=str(out), max_steps=total, batch_size=BATCH, seq_len=SEQ, pack=True,
                      train_on_prompt=train_on_prompt, val_fraction=0.0, save_every=0, eval_every=10**9, lr=LR,
                      rank=RANK, alpha=ALPHA, targets=["all-linear"], seed=SEED, grad_checkpointing="auto")
    rss: dict[str, float] = {}

    def on_step(i: StepInfo) -> None:
        if i.step == total:  # before the final checkpoint and adapter files are written
            rss["peak"] = peak_rss_mib()

    summary = finetune(lm, cfg, overwrite=True, on_step=on_step)
    hist = json.loads((out / "training_log.json").read_text())["history"]
    tokens = [h["tokens"] - (hist[i - 1]["tokens"] if i else 0) for i, h in enumerate(hist)]
    return {"tps": [t / h["seconds"] for t, h in zip(tokens, hist)], "tokens": tokens,
            "loss": [h["loss"] for h in hist], "rss_load": rss_load, "rss_peak": rss["peak"],
            "grad_checkpointing": summary["gradient_checkpointing"]}


def run_peft(args: argparse.Namespace) -> dict:
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers.utils import logging as hf_logging

    from nomoat.lora import ALL_LINEAR

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    data = json.loads(Path(args.batches).read_text())
    if args.model is None:
        from nomoat.runtime.loading import default_model_path

        path = default_model_path()
    else:
        path = Path(args.model)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32)
    rss_load = peak_rss_mib()
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                             target_modules=list(ALL_LINEAR), task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)
    tps, tokens, losses = [], [], []
    for b in data:
        ids, mask = torch.tensor(b["input_ids"]), torch.tensor(b["attention_mask"])
        labels = torch.tensor(b["labels"])
        t0 = time.perf_counter()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        n = int(mask.sum())
        tps.append(n / dt)
        tokens.append(n)
        losses.append(float(loss.detach()))
    return {"tps": tps, "tokens": tokens, "loss": losses, "rss_load": rss_load, "rss_peak": peak_rss_mib(),
            "grad_checkpointing": False}


def child(args: argparse.Namespace) -> None:
    if args.side == "peft":
        res = run_peft(args)
    else:
        _, dtype, all_tokens = VARIANTS[args.side]
        res = run_nomoat(args, dtype, all_tokens)
    print("RESULT " + json.dumps(res))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="GGUF file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=10, help="measured steps")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--only", nargs="*", choices=list(VARIANTS), help="run only these variants")
    p.add_argument("--busy", type=int, default=0, help="run beside this many CPU-bound processes")
    p.add_argument("--side", choices=list(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--batches", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        child(args)
        return
    total = args.warmup + args.steps
    with tempfile.TemporaryDirectory(prefix="bench-lora-") as work:
        data = write_data(Path(work))
        expected = {flag: batches(args.model, data, flag, total) for flag in (False, True)}
        (Path(work) / "batches.json").write_text(json.dumps(expected[True]))
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
        results = {}
        with busy(args.busy):  # 0: nothing beside
            for side in args.only or VARIANTS:
                cmd = [sys.executable, __file__, "--side", side, "--threads", str(args.threads), "--steps",
                       str(args.steps), "--warmup", str(args.warmup), "--work", work, "--data", str(data),
                       "--batches", str(Path(work) / "batches.json")]
                if args.model:
                    cmd += ["--model", args.model]
                t0 = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
                if proc.returncode or line is None:
                    sys.exit(f"{side} run failed:\n{proc.stderr[-3000:]}")
                res = json.loads(line[len("RESULT "):])
                want = [int(sum(map(sum, b["attention_mask"]))) for b in expected[VARIANTS[side][2]]]
                assert res["tokens"] == want, (side, res["tokens"], want)  # every side saw the same windows
                res["wall"] = time.perf_counter() - t0
                results[side] = res
                print(f"  {side}: {res['wall']:.0f} s", file=sys.stderr)
    n_tok = sum(sum(map(sum, b["attention_mask"])) for b in expected[True])
    n_lab = {flag: sum(sum(y != -100 for y in row[1:]) for b in expected[flag] for row in b["labels"])
             for flag in (False, True)}
    print(f"SmolLM2-135M-Instruct, LoRA r={RANK} all-linear, batch {BATCH} x {SEQ} tokens, AdamW lr {LR}, "
          f"{args.threads} threads; median of {args.steps} steps after {args.warmup} warm-up; "
          f"{n_tok} tokens in {total} steps, {n_lab[False]} of them response (loss) tokens")
    ref = results.get("peft")
    print(f"{'variant':44} {'tokens/s':>9} {'RSS load MiB':>13} {'peak RSS MiB':>13} {'speed vs PEFT':>14} "
          f"{'memory vs PEFT':>15} {'loss step 1':>12}")
    for side, r in results.items():
        tps = statistics.median(r["tps"][args.warmup:])
        r["median_tps"] = tps
        speed = f"{tps / statistics.median(ref['tps'][args.warmup:]):.2f}x" if ref else "-"
        mem = f"{r['rss_peak'] / ref['rss_peak']:.2f}x" if ref else "-"
        print(f"{VARIANTS[side][0]:44} {tps:9.1f} {r['rss_load']:13.0f} {r['rss_peak']:13.0f} {speed:>14} {mem:>15} "
              f"{r['loss'][0]:12.4f}")
    print("(speed > 1: nomoat faster; memory < 1: nomoat smaller. Step-1 losses of the all-token variants "
          "should agree: same weights, same tokens, B = 0.)")


if __name__ == "__main__":
    main()
