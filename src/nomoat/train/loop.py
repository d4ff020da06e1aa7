"""The training loop every objective shares: optimizer steps with gradient accumulation and clipping,
warmup + cosine schedule, periodic validation, atomic checkpoints and exact resume, Ctrl-C, progress,
the step log and the loss plot.

An objective (SFT, preference training; pretraining later) is a loss over batches plus its data: it
supplies each epoch's batches, the loss of one batch and, optionally, a validation loss and per-step
metrics. The loop trains whatever parameters of the model require gradients (one adapter's A and B for LoRA).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from nomoat.errors import NomoatError
from nomoat.train.checkpoint import Checkpoint, restore_optimizer, save_checkpoint

# --dtype values for the frozen base (`runtime.loading.load`); int8 = `quant.W8A8Linear` projections.
TRAIN_DTYPES = ("float32", "bfloat16", "int8", "fp32", "bf16")


def check_train_dtype(dtype: str | None) -> None:
    if dtype is not None and dtype not in TRAIN_DTYPES:
        raise NomoatError(f"--dtype must be float32, bfloat16 or int8, got {dtype!r}")


def base_weights(model: torch.nn.Module) -> str:
    """The frozen base's weights as logs and caches name them: "int8" for W8A8 projections, else the dtype."""
    from nomoat.quant import W8A8Linear

    if any(isinstance(m, W8A8Linear) for m in model.modules()):
        return "int8"
    return str(model.dtype).removeprefix("torch.")


class Objective(Protocol):
    """What a training objective gives the loop.

    An objective may also define `metrics() -> dict[str, float]`: its figures for the micro-batches since
    the last call (e.g. preference rewards), logged with each optimizer step.
    """

    batches_per_epoch: int

    def batches(self, epoch: int, start: int) -> Iterator[Any]:
        """One epoch's batches in its (seeded) order, from batch index `start`."""
        ...

    def loss(self, model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, int]:
        """(mean loss of the batch, tokens it processed); the loop calls backward on it."""
        ...

    def validate(self, model: torch.nn.Module) -> float | dict[str, float] | None:
        """Validation loss (or {"loss": ..., other metrics}), or None when there is no validation data."""
        ...


@dataclass
class LoopConfig:
    """The loop's settings (an objective's config provides them)."""

    total_steps: int
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup: float = 0.05  # fraction of the steps
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    grad_accum: int = 1
    eval_every: int = 50
    save_every: int = 50


@dataclass
class StepInfo:
    step: int
    total_steps: int
    loss: float
    lr: float
    tokens_per_s: float
    val_loss: float | None = None
    seconds: float = 0.0  # the step's wall time
    metrics: dict[str, float] = field(default_factory=dict)  # the objective's, validation ones as val_<name>


@dataclass
class LoopResult:
    step: int
    tokens_seen: int
    history: list[dict[str, Any]] = field(default_factory=list)
    wall_seconds: float = 0.0
    interrupted: bool = False

    @property
    def final_train_loss(self) -> float | None:
        return self.history[-1]["loss"] if self.history else None

    @property
    def final_val_loss(self) -> float | None:
        return next((h["val_loss"] for h in reversed(self.history) if "val_loss" in h), None)


def lr_at(step: int, cfg: LoopConfig) -> float:
    """Linear warmup then cosine decay to min_lr_ratio * lr (step counts from 0)."""
    total = cfg.total_steps
    warm = max(1, round(cfg.warmup * total)) if cfg.warmup > 0 else 0
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    floor = cfg.min_lr_ratio
    return cfg.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train_loop(model: torch.nn.Module, objective: Objective, cfg: LoopConfig, out: Path,
               trained: Callable[[], dict[str, torch.Tensor]], run_state: dict[str, Any],
               resume: Checkpoint | None = None, on_step: Callable[[StepInfo], None] | None = None,
               say: Callable[[str], None] = lambda s: None) -> LoopResult:
    """Run optimizer steps until `cfg.total_steps`, checkpointing into `out`.

    Args:
        trained: the trained tensors by name (saved in checkpoints; restored in place on resume).
        run_state: what the objective needs saved beside them to resume (its config, data hash).
        resume: a loaded checkpoint to continue from, exactly.

    Returns:
        Counters and the step log. Ctrl-C (KeyboardInterrupt) saves a checkpoint and returns with
        `interrupted` set.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999), eps=1e-8)
    res = LoopResult(step=0, tokens_seen=0)
    micro, wall_before = 0, 0.0
    if resume is not None:
        current = trained()
        for k, v in current.items():
            saved = resume.tensors.get(k)
            if saved is None or saved.shape != v.shape:
                raise NomoatError(f"{out}: the checkpoint's {k} is {None if saved is None else list(saved.shape)}, "
                                  f"the run's settings make it {list(v.shape)} (edited state.json?)")
        if set(resume.tensors) - set(current):
            raise NomoatError(f"{out}: the checkpoint holds tensors this run does not train, e.g. "
                              f"{sorted(set(resume.tensors) - set(current))[0]}")
        with torch.no_grad():
            for k, v in current.items():
                v.copy_(resume.tensors[k])
        restore_optimizer(opt, resume.optimizer, resume.state["optimizer"])
        res.step, micro, res.tokens_seen = resume.state["step"], resume.state["micro"], resume.state["tokens_seen"]
        res.history, wall_before = resume.state["history"], resume.state["wall_seconds"]
        torch.set_rng_state(resume.rng)  # dropout continues the interrupted run's stream
        say(f"resuming {out} at step {res.step}/{cfg.total_steps}")
    t_start = time.perf_counter()

    def checkpoint() -> None:
        save_checkpoint(out, trained(), opt, {**run_state, "step": res.step, "micro": micro,
                                              "tokens_seen": res.tokens_seen, "history": res.history,
                                              "wall_seconds": wall_before + time.perf_counter() - t_start})

    model.train()
    per_epoch = objective.batches_per_epoch
    epoch_iter: tuple[int, Any] = (-1, None)  # one batch iterator per epoch: its shuffle is computed once
    try:
        while res.step < cfg.total_steps:
            t0 = time.perf_counter()
            step_loss, step_tokens = 0.0, 0
            for g in range(cfg.grad_accum):
                epoch, b_idx = divmod(micro + g, per_epoch)
                if epoch_iter[0] != epoch:
                    epoch_iter = (epoch, objective.batches(epoch, b_idx))
                loss, n_tok = objective.loss(model, next(epoch_iter[1]))
                (loss / cfg.grad_accum).backward()
                step_loss += float(loss.detach()) / cfg.grad_accum
                step_tokens += n_tok
            lr = lr_at(res.step, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            micro += cfg.grad_accum
            res.step += 1
            res.tokens_seen += step_tokens
            dt = time.perf_counter() - t0
            metrics = objective.metrics() if hasattr(objective, "metrics") else {}
            val_loss = None
            if res.step % cfg.eval_every == 0 or res.step == cfg.total_steps:
                val = objective.validate(model)
                if isinstance(val, dict):
                    val_loss = val["loss"]
                    metrics.update({f"val_{k}": v for k, v in val.items() if k != "loss"})
                else:
                    val_loss = val
            entry = {"step": res.step, "loss": round(step_loss, 5), "lr": lr, "tokens": res.tokens_seen,
                     "seconds": round(dt, 3)}
            if val_loss is not None:
                entry["val_loss"] = round(val_loss, 5)
            entry.update({k: round(v, 5) for k, v in metrics.items()})
            res.history.append(entry)
            if on_step:
                on_step(StepInfo(res.step, cfg.total_steps, step_loss, lr, step_tokens / dt if dt else 0.0,
                                 val_loss, dt, metrics))
            if cfg.save_every and res.step % cfg.save_every == 0 and res.step < cfg.total_steps:
                checkpoint()
    except KeyboardInterrupt:
        res.interrupted = True
        say(f"interrupted: checkpoint saved at step {res.step}; continue with --resume {out}")
    model.eval()
    checkpoint()  # on Ctrl-C, and the final state too, so a finished run can be extended or inspected
    res.wall_seconds = wall_before + time.perf_counter() - t_start
    return res


def save_loss_curve(out: Path, history: list[dict[str, Any]], ylabel: str = "loss (trained tokens)") -> Path | None:
    """loss_curve.png (train, and validation where measured) when matplotlib is installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, [h["loss"] for h in history], label="train", lw=1)
    val = [(h["step"], h["val_loss"]) for h in history if h.get("val_loss") is not None]
    if val:
        ax.plot(*zip(*val), "o-", label="validation", lw=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out / "loss_curve.png"
    tmp = out / ".loss_curve.tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path


def save_metric_curves(out: Path, history: list[dict[str, Any]], names: list[str], filename: str) -> Path | None:
    """One panel per metric (train, and validation where measured as val_<name>), e.g. preference margins and
    accuracies; None when matplotlib is not installed or no step logged them."""
    names = [n for n in names if any(n in h for h in history)]
    if not names:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.5), dpi=100, squeeze=False)
    for ax, name in zip(axes[0], names):
        train = [(h["step"], h[name]) for h in history if name in h]
        ax.plot(*zip(*train), label="train", lw=1)
        val = [(h["step"], h[f"val_{name}"]) for h in history if f"val_{name}" in h]
        if val:
            ax.plot(*zip(*val), "o-", label="validation", lw=1.5)
        ax.set_xlabel("optimizer step")
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = out / filename
    tmp = out / f".{filename}.tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path
