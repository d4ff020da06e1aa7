"""`nomoat demo`: teach the default model a skill it lacks, and show the before/after."""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from nomoat.eval import load_task, task_accuracy
from nomoat.lora import active_weights, set_active
from nomoat.skills import write_skill_data


def run_demo(out_dir: Path, steps: int = 60, threads: int | None = None, console: Console | None = None,
             err_console: Console | None = None, run_training=None) -> dict:
    from nomoat.runtime.loading import load
    from nomoat.train.sft import TrainConfig, finetune

    console = console or Console()
    err = err_console or Console(stderr=True)
    t_all = time.perf_counter()
    out_dir = Path(out_dir)
    train_path, test_path = write_skill_data(out_dir / "data")
    records = load_task(test_path)
    console.print(f"[bold]skill:[/bold] spelled-out dates -> ISO 8601 (e.g. {records[0].prompt.splitlines()[-1]!r} "
                  f"-> {records[0].expected!r}); {sum(1 for _ in open(train_path))} training examples, "
                  f"{len(records)} held-out tests in {out_dir / 'data'}")
    cfg = TrainConfig(data=str(train_path), out=str(out_dir / "adapter"), max_steps=steps, batch_size=8, lr=5e-4,
                      rank=8, alpha=16, targets=["all-linear"], eval_every=max(10, steps // 3),
                      save_every=max(10, steps // 3), val_fraction=0.05)
    with err.status("loading the default model..."):
        lm = load(dtype=cfg.base_dtype(), threads=threads, quant="none")
    console.print(f"[dim]{lm.cpu.threads} threads, base weights {cfg.base_dtype()} "
                  f"({lm.cpu.reasons['train dtype'].split(': ', 1)[-1]})[/dim]")
    with err.status("measuring the base model..."):
        before = task_accuracy(lm, records, "exact-match", max_new_tokens=24)
    console.print(f"base model: {100 * before.accuracy:.0f}% exact match")
    adapter_dir = out_dir / "adapter"
    t0 = time.perf_counter()

    def train(on_step, say):
        return finetune(lm, cfg, overwrite=True, on_step=on_step, on_message=say)

    summary = run_training(train) if run_training else train(None, None)
    train_s = time.perf_counter() - t0
    with err.status("measuring the fine-tuned model..."):
        after = task_accuracy(lm, records, "exact-match", max_new_tokens=24)
    set_active(lm.model, active_weights(lm.model))
    table = Table(title="held-out accuracy (exact match)")
    for c in ("date", "expected", "base model", "with adapter"):
        table.add_column(c)
    for i, rec in enumerate(records[:6]):
        table.add_row(rec.prompt.splitlines()[-1].removeprefix("Date: "), rec.expected, before.answers[i][:40],
                      after.answers[i][:40])
    table.add_row("[bold]accuracy[/bold]", "", f"[bold]{100 * before.accuracy:.0f}%[/bold] "
                  f"({before.correct}/{before.total})", f"[bold]{100 * after.accuracy:.0f}%[/bold] "
                  f"({after.correct}/{after.total})")
    console.print(table)
    adapter_bytes = (adapter_dir / "adapter_model.safetensors").stat().st_size
    base_bytes = Path(lm.source).stat().st_size
    console.print(
        f"adapter: [bold]{adapter_dir}[/bold], {adapter_bytes / 2**20:.1f} MiB "
        f"({summary['trainable_parameters']:,} parameters; the base file is {base_bytes / 2**20:.0f} MiB, "
        f"{lm.config.num_parameters() / 1e6:.0f} M parameters: the adapter is {100 * adapter_bytes / base_bytes:.1f}% "
        f"of it)\ntraining: {summary['steps']} steps, {summary['tokens_seen']:,} tokens in {train_s / 60:.1f} min"
        f" | whole demo {(time.perf_counter() - t_all) / 60:.1f} min\n"
        f"try it: nomoat chat --adapter {adapter_dir}   or   nomoat generate --adapter {adapter_dir} "
        f"\"{records[1].prompt.splitlines()[0]}\\nDate: July 4, 1976\"")
    result = {"accuracy_before": before.accuracy, "accuracy_after": after.accuracy, "train_seconds": train_s,
              "adapter_bytes": adapter_bytes, "base_bytes": base_bytes, "adapter": str(adapter_dir),
              "steps": summary["steps"], "tokens": summary["tokens_seen"]}
    (out_dir / "demo_result.json").write_text(json.dumps(result, indent=2))
    return result
