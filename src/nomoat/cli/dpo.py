"""`nomoat dpo`: preference training (DPO and its relatives) with LoRA."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from nomoat.cli.common import ModelOpt, ThreadsOpt, err, status
from nomoat.cli.train import print_run_summary, run_with_progress
from nomoat.errors import NomoatError


def progress_figures() -> Any:
    """The preference figures a progress line shows: reward accuracy and margin (last validation in brackets)
    and pairs per second."""
    last_val: dict[str, float] = {}

    def extra(i) -> str:
        m = i.metrics
        last_val.update({k: v for k, v in m.items() if k.startswith("val_")})
        acc = f"acc {m.get('rewards/accuracies', 0):.2f}"
        if "val_rewards/accuracies" in last_val:
            acc += f" (val {last_val['val_rewards/accuracies']:.2f})"
        pairs = f"{m['pairs'] / i.seconds:.1f} pairs/s" if i.seconds and m.get("pairs") else ""
        return f"{acc} margin {m.get('rewards/margins', 0):.2f} | {pairs}"

    return extra


def dpo(
    data: Annotated[Path, typer.Option("--data", "-d", help="Preference data: JSON/JSONL pairs ({prompt, chosen, "
                                       "rejected} as text or chat messages, or chosen/rejected conversations with a "
                                       "shared start), an Open Assistant export, nomoat judge verdicts, arena "
                                       "battles (JSONL) or an arena database (.sqlite).")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Adapter output directory (PEFT format).")],
    model: ModelOpt = None,
    fmt: Annotated[str, typer.Option("--format", help="auto, trl, oasst, verdicts or battles (auto: from the "
                                     "first record).")] = "auto",
    lang: Annotated[list[str] | None, typer.Option("--lang", help="Open Assistant: keep only messages in these "
                                                   "languages (repeat, or en,de).")] = None,
    on: Annotated[Path | None, typer.Option("--on", help="An SFT adapter to train on top of: the policy is base + "
                                            "it + the new adapter, the reference base + it.")] = None,
    combine: Annotated[bool, typer.Option("--combine", help="With --on: write one adapter holding both (exact, "
                                          "rank r1+r2) instead of the new one to stack over it.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Accept an --on adapter trained on another base.")] = False,
    loss: Annotated[str, typer.Option("--loss", help="sigmoid (DPO), ipo, hinge, robust, or the reference-free "
                                      "orpo and simpo.")] = "sigmoid",
    beta: Annotated[float | None, typer.Option("--beta", help="DPO's beta (IPO's tau, ORPO's lambda, SimPO's beta); "
                                               "default 0.1, 2.0 for simpo.")] = None,
    label_smoothing: Annotated[float, typer.Option(help="sigmoid: conservative DPO's label smoothing; robust: the "
                                                   "assumed share of flipped labels.")] = 0.0,
    simpo_gamma: Annotated[float, typer.Option(help="SimPO's target reward margin.")] = 0.5,
    precompute: Annotated[bool, typer.Option("--precompute/--no-precompute", help="Reference log-probabilities "
                                             "once before training, cached on disk (or again at every step).")
                          ] = True,
    rank: Annotated[int, typer.Option("--rank", "-r", help="LoRA rank.")] = 8,
    alpha: Annotated[float, typer.Option("--alpha", help="LoRA alpha (scale = alpha / rank).")] = 16.0,
    dropout: Annotated[float, typer.Option(help="LoRA dropout.")] = 0.0,
    targets: Annotated[str, typer.Option(help="Target modules: all-linear or a list such as q,v.")] = "all-linear",
    rslora: Annotated[bool, typer.Option("--rslora", help="Scale by alpha / sqrt(rank).")] = False,
    epochs: Annotated[float | None, typer.Option(help="Passes over the pairs (default: 1, more for small sets, "
                                                 "at least ~40 steps up to 3 epochs).")] = None,
    max_steps: Annotated[int, typer.Option(help="Stop after this many optimizer steps (0: from --epochs).")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Pairs per micro-batch.")] = 8,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step.")] = 1,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (AdamW; default 1e-4).")] = None,
    weight_decay: float = 0.0,
    warmup: Annotated[float, typer.Option(help="Warmup, as a fraction of the steps.")] = 0.1,
    max_grad_norm: Annotated[float, typer.Option(help="Gradient clipping norm (0: off).")] = 1.0,
    seq_len: Annotated[int, typer.Option(help="Tokens per side (prompt + completion); completions are cut at the "
                                         "end.")] = 1024,
    val_fraction: Annotated[float, typer.Option(help="Share of pairs held out for validation.")] = 0.1,
    eval_every: Annotated[int | None, typer.Option(help="Validation every N steps (default: about 5 times per "
                                                   "run).")] = None,
    save_every: Annotated[int, typer.Option(help="Checkpoint every N steps.")] = 50,
    seed: int = 42,
    grad_checkpointing: Annotated[str, typer.Option(help="auto, on or off.")] = "auto",
    resume: Annotated[Path | None, typer.Option(help="Continue the interrupted run in this directory.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a previous run in --out.")] = False,
    qlora: Annotated[bool, typer.Option("--qlora", help="Train over a frozen 4-bit (int4) base.")] = False,
    threads: ThreadsOpt = None,
    dtype: Annotated[str | None, typer.Option("--dtype", help="The frozen base's dtype: bfloat16, float32 "
                                              "or int8 (int8 weights, activations rounded to int8 per token). "
                                              "Default: bfloat16 where the CPU has hardware BF16, else int8 "
                                              "where torch has an int8 GEMM, else float32.")] = None,
) -> None:
    """Train a LoRA adapter on preference pairs (DPO and its relatives); writes a PEFT adapter directory.

    The reference policy is the same model with the new adapter switched off (the base, or base + the --on
    adapter): no second copy in memory. Its log-probabilities are computed once and cached (keyed by the
    base, the adapter and the data). Arena battles and judge verdicts give pairs from their decided votes
    (ties dropped); Open Assistant trees give every better- against every worse-ranked sibling reply.
    """
    from nomoat.runtime.loading import load
    from nomoat.train.dpo import DPOConfig, saved_config, train_dpo
    from nomoat.train.sft import check_out

    if resume is not None and resume != out_dir:
        raise NomoatError(f"--resume {resume} must be the run's --out directory ({out_dir})")
    if not data.exists():
        raise NomoatError(f"{data}: no such data file")
    if on is not None and not on.exists():
        raise NomoatError(f"{on}: no such adapter")
    langs = [x.strip() for v in (lang or []) for x in v.split(",") if x.strip()]
    cfg = DPOConfig(data=str(data), out=str(out_dir), format=fmt, lang=langs, on=str(on) if on else None,
                    combine=combine, force=force, loss=loss, beta=beta, label_smoothing=label_smoothing,
                    simpo_gamma=simpo_gamma, precompute=precompute, epochs=epochs, max_steps=max_steps,
                    batch_size=batch_size, grad_accum=grad_accum, lr=lr, weight_decay=weight_decay, warmup=warmup,
                    max_grad_norm=max_grad_norm, seq_len=seq_len, val_fraction=val_fraction, eval_every=eval_every,
                    save_every=save_every, seed=seed, grad_checkpointing=grad_checkpointing, rank=rank, alpha=alpha,
                    dropout=dropout, targets=[targets], rslora=rslora, dtype=dtype)
    if resume is None:
        cfg.check()
        check_out(out_dir, overwrite=overwrite)  # before minutes of loading
    else:
        cfg.dtype = saved_config(out_dir).base_dtype()  # the reference values depend on it
    with status("loading model..."):
        lm = load(model, dtype=None if qlora else cfg.base_dtype(), threads=threads, quant="q4" if qlora else "none",
                  for_training=True)
    summary = run_with_progress(lambda on_step, say: train_dpo(lm, cfg, resume=resume is not None,
                                                               overwrite=overwrite, on_step=on_step, on_message=say),
                                extra=progress_figures())
    print_run_summary(out_dir, summary)
    m = summary["final_metrics"]
    if "val_rewards/accuracies" in m:
        err.print(f"held-out pairs: reward accuracy {m['val_rewards/accuracies']:.2f}, margin "
                  f"{m['val_rewards/margins']:.3f} | plots: {out_dir / 'loss_curve.png'}, "
                  f"{out_dir / 'reward_curves.png'}", soft_wrap=True, highlight=False)
    if summary.get("stack_on"):
        err.print(f"use it stacked on its SFT adapter: --adapter {summary['stack_on']['path']} --adapter {out_dir}",
                  soft_wrap=True, highlight=False)


def register(app: typer.Typer) -> None:
    app.command()(dpo)
