"""Does the training base's precision change what an adapter learns? Train the same adapter over bases of
different dtypes, then judge every adapter on a float32 base (so no base's rounding can flatter itself).

Run: python bench/bench_train_quality.py [--task demo|docs] [--dtypes float32,int8] [--steps N]

- demo: the `nomoat demo` skill (800 spelled-out dates -> ISO 8601, 60 held-out), 60 steps at lr 5e-4; reports
  the held-out response loss on a float32 base and the exact-match accuracy on the default Q4 inference model.
- docs: 380 Python standard-library docstrings as "continue this documentation" (150 characters of prompt,
  up to 750 of response), 100 others held out, 40 steps at lr 3e-4, seq 384: the loss stays far from zero, so
  small differences in what was learned show.
The same seed, data order and steps for every dtype. Not a test: takes minutes per dtype on 2 cores.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import random
import tempfile
import time
from pathlib import Path

import torch

from nomoat.adapters import load_adapter
from nomoat.data import Batches, build_dataset, load_examples
from nomoat.eval import load_task, task_accuracy
from nomoat.eval.perplexity import loss_sum
from nomoat.lora.inject import remove_adapter
from nomoat.runtime.loading import load
from nomoat.skills import write_skill_data
from nomoat.train.sft import TrainConfig, finetune

DOC_MODULES = ["os", "json", "re", "collections", "itertools", "functools", "pathlib", "subprocess", "argparse",
               "logging", "unittest", "typing", "dataclasses", "asyncio", "decimal", "fractions", "statistics",
               "textwrap", "string", "datetime", "calendar", "zipfile", "tarfile", "csv", "sqlite3", "socket",
               "threading", "shutil", "tempfile", "inspect", "ast", "pickle", "copy", "heapq", "bisect", "random",
               "math", "hashlib", "base64", "struct", "codecs", "io", "contextlib", "abc", "enum", "operator",
               "weakref", "traceback", "warnings", "configparser", "uuid", "ipaddress", "selectors", "signal", "email",
               "http.client", "urllib.request", "multiprocessing", "dis", "cmath", "hmac", "secrets", "binascii",
               "numbers", "gc", "pdb", "doctest", "xml.etree.ElementTree", "html.parser", "mailbox", "smtplib",
               "ftplib", "imaplib", "mmap", "ctypes", "locale", "gettext"]


def doc_data(directory: Path) -> tuple[Path, Path]:
    docs, seen = [], set()
    for name in DOC_MODULES:
        m = importlib.import_module(name)
        for attr in sorted(dir(m)):
            obj = getattr(m, attr, None)
            members = [getattr(obj, a, None) for a in sorted(dir(obj))[:40]] if inspect.isclass(obj) else []
            for o in [obj, *members]:
                d = inspect.getdoc(o) if o is not None else None
                if d and len(d) > 300 and d not in seen:
                    seen.add(d)
                    docs.append(d)
    random.Random(0).shuffle(docs)

    def row(d: str) -> str:
        return json.dumps({"instruction": "Continue this Python documentation.\n\n" + d[:150], "output": d[150:900]})

    train, test = directory / "train.jsonl", directory / "test.jsonl"
    train.write_text("".join(row(d) + "\n" for d in docs[:380]))
    test.write_text("".join(row(d) + "\n" for d in docs[380:480]))
    return train, test


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=["demo", "docs"], default="demo")
    ap.add_argument("--dtypes", default="float32,int8", help="comma-separated --dtype values to train over")
    ap.add_argument("--steps", type=int, help="optimizer steps (default: 60 demo, 40 docs)")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="train-quality-"))
    if a.task == "demo":
        train, test_records = write_skill_data(work / "data")
        test = work / "data" / "test_alpaca.jsonl"
        test.write_text("".join(json.dumps({"instruction": r["prompt"], "output": r["expected"]}) + "\n"
                                for r in map(json.loads, test_records.read_text().splitlines())))
        steps, lr, seq = a.steps or 60, 5e-4, 512
    else:
        train, test = doc_data(work)
        test_records, steps, lr, seq = None, a.steps or 40, 3e-4, 384
    results: dict[str, dict] = {}
    for dtype in a.dtypes.split(","):
        torch.manual_seed(0)
        lm = load(dtype=dtype, quant="none")
        cfg = TrainConfig(data=str(train), out=str(work / f"adapter-{dtype}"), max_steps=steps, batch_size=8, lr=lr,
                          seq_len=seq, rank=8, alpha=16, targets=["all-linear"], eval_every=10**6, save_every=0,
                          val_fraction=0.0)
        t0 = time.perf_counter()
        s = finetune(lm, cfg, overwrite=True)
        results[dtype] = {"train s": round(time.perf_counter() - t0, 1), "final train loss": s["final_train_loss"]}
        del lm
    judge = load(dtype="float32", quant="none")
    rows = build_dataset(load_examples(str(test)), judge.tokenizer, seq, False, False)
    total, count = loss_sum(judge.model, rows, Batches(judge.tokenizer.pad_id), 8)
    print(f"task {a.task}: {steps} steps; held-out response tokens {count}; base model's held-out loss "
          f"(float32) {total / count:.4f}")
    inference = load() if test_records is not None else None
    for dtype, res in results.items():
        name = load_adapter(judge, work / f"adapter-{dtype}", name="judged")
        total, count = loss_sum(judge.model, rows, Batches(judge.tokenizer.pad_id), 8)
        remove_adapter(judge.model, name)
        res["held-out loss on a float32 base"] = round(total / count, 4)
        if inference is not None:
            name = load_adapter(inference, work / f"adapter-{dtype}", name="judged")
            res["held-out accuracy (Q4 inference)"] = task_accuracy(inference, load_task(test_records), "exact-match",
                                                                    max_new_tokens=24).accuracy
            remove_adapter(inference.model, name)
        print(f"trained over {dtype}: {res}")


if __name__ == "__main__":
    main()
