"""Training commands: finetune, and the progress display that training commands share."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from nomoat.cli.common import ModelOpt, RegisterOpt, ThreadsOpt, adapter_ref_path, err, status
from nomoat.errors import NomoatError


def run_with_progress(fn: Callable[[Callable, Callable], Any], label: str = "training",
                      extra: Callable[[Any], str] | None = None) -> Any:
    """Run `fn(on_step, say)` with a progress bar on a terminal, or plain progress lines otherwise (a pipe or
    a log file sees a line at the first step, every ~10% and at the end). `extra(step_info)` adds an
    objective's own figures after the loss. Ctrl-C becomes a one-line message."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    live = err.is_terminal
    bar = Progress(TextColumn(f"[bold]{label}[/bold]"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                   console=err, transient=False)
    state: dict = {"val": None, "task": None, "t0": time.perf_counter()}

    def on_step(i) -> None:
        if i.val_loss is not None:
            state["val"] = i.val_loss
        val = f" val {state['val']:.3f}" if state["val"] is not None else ""
        more = f" | {extra(i)}" if extra else ""
        info = f"loss {i.loss:.3f}{val}{more} | {i.tokens_per_s:.0f} tok/s | lr {i.lr:.1e}"
        if not live:
            every = max(1, i.total_steps // 10)
            if i.step == 1 or i.step % every == 0 or i.step == i.total_steps or i.val_loss is not None:
                err.print(f"{label} step {i.step}/{i.total_steps} | {info} | "
                          f"{time.perf_counter() - state['t0']:.0f} s", soft_wrap=True, highlight=False)
            return
        # The bar starts with the first step, so an error in the data or the settings stays one line.
        if state["task"] is None:
            bar.start()
            state["task"] = bar.add_task("train", total=i.total_steps, info="")
        bar.update(state["task"], completed=i.step, total=i.total_steps, info=info)

    def say(message: str) -> None:
        (bar.console if state["task"] is not None else err).print(message, soft_wrap=True, highlight=False)

    try:
        return fn(on_step, say)
    except KeyboardInterrupt:
        raise NomoatError("training interrupted; the checkpoint was saved (use --resume to continue)") from None
    finally:
        if state["task"] is not None:
            bar.stop()


def print_run_summary(out_dir: Path, s: dict) -> None:
    size = (out_dir / "adapter_model.safetensors").stat().st_size
    err.print(f"adapter: [bold]{out_dir}[/bold] ({size / 2**20:.1f} MiB, {s['trainable_parameters']:,} parameters) "
              f"| {s['steps']} steps, {s['tokens_seen']:,} tokens in {s['wall_seconds']:.0f} s | final loss "
              f"{s['final_train_loss']}" + (f", validation {s['final_val_loss']}" if s["final_val_loss"] else ""),
              soft_wrap=True)


def finetune(
    data: Annotated[Path, typer.Option("--data", "-d", help="Training data: JSON or JSONL (Alpaca, OpenAI chat "
                                       "messages, ShareGPT, prompt/completion, or plain text).")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Adapter output directory (PEFT format).")],
    model: ModelOpt = None,
    fmt: Annotated[str, typer.Option("--format", help="auto, alpaca, chat, sharegpt, completion, text.")] = "auto",
    rank: Annotated[int, typer.Option("--rank", "-r", help="LoRA rank.")] = 8,
    alpha: Annotated[float, typer.Option("--alpha", help="LoRA alpha (scale = alpha / rank).")] = 16.0,
    dropout: Annotated[float, typer.Option(help="LoRA dropout.")] = 0.0,
    targets: Annotated[str, typer.Option(help="Target modules: all-linear or a list such as q,v or "
                                         "q,k,v,o,gate,up,down.")] = "all-linear",
    rslora: Annotated[bool, typer.Option("--rslora", help="Scale by alpha / sqrt(rank).")] = False,
    epochs: Annotated[float | None, typer.Option(help="Passes over the training data (default: chosen by the "
                                                 "data's size, see --help of `nomoat finetune`).")] = None,
    max_steps: Annotated[int, typer.Option(help="Stop after this many optimizer steps (0: from --epochs).")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b")] = 8,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step.")] = 1,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (AdamW; default: chosen by the data's "
                                             "size).")] = None,
    weight_decay: float = 0.0,
    warmup: Annotated[float, typer.Option(help="Warmup, as a fraction of the steps.")] = 0.05,
    max_grad_norm: Annotated[float, typer.Option(help="Gradient clipping norm (0: off).")] = 1.0,
    seq_len: Annotated[int, typer.Option(help="Truncate examples to this many tokens.")] = 512,
    pack: Annotated[bool, typer.Option("--pack", help="Pack examples into --seq-len windows.")] = False,
    train_on_prompt: Annotated[bool, typer.Option("--train-on-prompt", help="Loss on every token, not only "
                                                  "the responses.")] = False,
    val_fraction: Annotated[float, typer.Option(help="Share of examples held out for validation loss.")] = 0.05,
    eval_every: Annotated[int | None, typer.Option(help="Validation loss every N steps (default: about 5 times "
                                                   "per run).")] = None,
    save_every: Annotated[int, typer.Option(help="Checkpoint every N steps.")] = 50,
    seed: int = 42,
    grad_checkpointing: Annotated[str, typer.Option(help="auto, on or off.")] = "auto",
    resume: Annotated[Path | None, typer.Option(help="Continue the interrupted run in this directory.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a previous run in --out.")] = False,
    qlora: Annotated[bool, typer.Option("--qlora", help="Train over a frozen 4-bit (int4) base: QLoRA.")] = False,
    on: Annotated[Path | None, typer.Option("--on", callback=adapter_ref_path, help="An adapter (path or catalog "
                                            "name) to train on top of: it stays frozen and on, and the new adapter "
                                            "is used stacked on it.")] = None,
    register: RegisterOpt = None,
    threads: ThreadsOpt = None,
    dtype: Annotated[str | None, typer.Option("--dtype", help="The frozen base's dtype: bfloat16, float32 "
                                              "or int8 (int8 weights, activations rounded to int8 per token). "
                                              "Default: bfloat16 where the CPU has hardware BF16, else int8 "
                                              "where torch has an int8 GEMM, else float32.")] = None,
) -> None:
    """Fine-tune a LoRA adapter on instruction data; writes a PEFT adapter directory.

    With no --epochs / --max-steps / --lr / --eval-every, they are chosen from the data's size: small sets
    get several epochs (at least ~60 optimizer steps) and a higher learning rate, and a warning says when
    a run is likely too short to learn much.
    """
    from nomoat.cli.catalog import check_register, register_output
    from nomoat.runtime.loading import load
    from nomoat.train.sft import TrainConfig, check_out
    from nomoat.train.sft import finetune as run

    if resume is not None and resume != out_dir:
        raise NomoatError(f"--resume {resume} must be the run's --out directory ({out_dir})")
    if not data.exists():
        raise NomoatError(f"{data}: no such data file")
    cfg = TrainConfig(data=str(data), out=str(out_dir), format=fmt, epochs=epochs, max_steps=max_steps,
                      batch_size=batch_size, grad_accum=grad_accum, lr=lr, weight_decay=weight_decay,
                      warmup=warmup, max_grad_norm=max_grad_norm, seq_len=seq_len, pack=pack,
                      train_on_prompt=train_on_prompt, val_fraction=val_fraction, eval_every=eval_every,
                      save_every=save_every, seed=seed, grad_checkpointing=grad_checkpointing, rank=rank,
                      alpha=alpha, dropout=dropout, targets=[targets], rslora=rslora, dtype=dtype,
                      on=str(on) if on else None)
    if resume is None:
        cfg.check()
    check_out(out_dir, resume=resume is not None, overwrite=overwrite)  # before minutes of loading
    with status("loading model..."):
        lm = load(model, dtype=None if qlora else cfg.base_dtype(), threads=threads, quant="q4" if qlora else "none",
                  for_training=True)
    check_register(register, lm)  # before minutes of training
    summary = run_with_progress(lambda on_step, say: run(lm, cfg, resume=resume is not None, overwrite=overwrite,
                                                         on_step=on_step, on_message=say))
    print_run_summary(out_dir, summary)
    if summary.get("stack_on"):
        err.print(f"use it stacked on the adapter it was trained on: --adapter {on} --adapter {out_dir}",
                  soft_wrap=True)
    register_output(out_dir, register)


def register(app: typer.Typer) -> None:
    app.command()(finetune)
