"""LoRA supervised fine-tuning: AdamW, warmup + cosine, accumulation, clipping, checkpoints, resume."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from nomoat import __version__
from nomoat.adapters import base_fingerprint
from nomoat.data import Batches, build_dataset, data_fingerprint, load_examples, split_validation
from nomoat.errors import NomoatError
from nomoat.formats.peft import META_FILE, write_peft_dir
from nomoat.lora import LoraConfig, adapter_state_dict, add_adapter, mark_trainable, set_active
from nomoat.model import causal_lm_loss
from nomoat.train.checkpoint import CHECKPOINT_DIR, load_checkpoint, restore_optimizer, save_checkpoint

ADAPTER = "default"


@dataclass
class TrainConfig:
    """Everything that determines a fine-tuning run (saved with the checkpoint for --resume)."""

    data: str
    out: str
    format: str = "auto"
    epochs: float = 1.0
    max_steps: int = 0  # optimizer steps; 0 = from epochs
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup: float = 0.05  # fraction of the steps
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    seq_len: int = 512
    pack: bool = False
    train_on_prompt: bool = False
    val_fraction: float = 0.05
    eval_every: int = 50
    save_every: int = 50
    seed: int = 42
    grad_checkpointing: str = "auto"  # auto | on | off
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["all-linear"])
    rslora: bool = False

    def lora(self) -> LoraConfig:
        return LoraConfig(r=self.rank, alpha=self.alpha, dropout=self.dropout, targets=self.targets,
                          rslora=self.rslora)

    def check(self) -> None:
        for name in ("batch_size", "grad_accum", "seq_len"):
            if getattr(self, name) < 1:
                raise NomoatError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.epochs <= 0 and self.max_steps <= 0:
            raise NomoatError("--epochs must be > 0 (or give --max-steps)")
        if self.lr <= 0:
            raise NomoatError(f"--lr must be > 0, got {self.lr}")
        if self.grad_checkpointing not in ("auto", "on", "off"):
            raise NomoatError(f"--grad-checkpointing must be auto, on or off, got {self.grad_checkpointing!r}")
        self.lora()  # validates rank, dropout, targets


@dataclass
class StepInfo:
    step: int
    total_steps: int
    loss: float
    lr: float
    tokens_per_s: float
    val_loss: float | None = None


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warmup then cosine decay to min_lr_ratio * lr (step counts from 0)."""
    warm = max(1, round(cfg.warmup * total)) if cfg.warmup > 0 else 0
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    floor = cfg.min_lr_ratio
    return cfg.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def loss_sum(model, rows, batches: Batches, batch_size: int,
             progress: Callable[[int], None] | None = None) -> tuple[float, int]:
    """(summed next-token loss, number of loss tokens) over rows, in eval mode."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for b in range(0, len(rows), batch_size):
        batch = batches.collate(rows[b:b + batch_size])
        n = int((batch.labels[:, 1:] != -100).sum())
        if n:
            h = model.hidden_states(batch.input_ids)
            total += float(causal_lm_loss(model, h, batch.labels, reduction="sum"))
            count += n
        if progress:
            progress(len(rows[b:b + batch_size]))
    model.train(was)
    return total, count


def evaluate_loss(model, rows, batches: Batches, batch_size: int) -> float:
    """Token-weighted mean loss over rows (response tokens only)."""
    total, count = loss_sum(model, rows, batches, batch_size)
    return total / max(count, 1)


def _prepare_out(out: Path, resume: bool, overwrite: bool) -> None:
    if resume:
        if not (out / CHECKPOINT_DIR / "state.json").exists() and not (out / f".{CHECKPOINT_DIR}.old").exists():
            raise NomoatError(f"{out}: nothing to resume (no {CHECKPOINT_DIR}/state.json)")
        return
    if out.exists() and not out.is_dir():
        raise NomoatError(f"{out}: exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        what = "a previous run" if (out / META_FILE).exists() or (out / CHECKPOINT_DIR).exists() else "files"
        raise NomoatError(f"{out}: already holds {what}; use --resume to continue it, --overwrite to replace "
                          "it, or another --out")
    out.mkdir(parents=True, exist_ok=True)


def _save_loss_curve(out: Path, history: list[dict[str, Any]]) -> Path | None:
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
    ax.set_ylabel("loss (response tokens)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out / "loss_curve.png"
    tmp = out / ".loss_curve.tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path


def finetune(lm, cfg: TrainConfig, resume: bool = False, overwrite: bool = False,
             on_step: Callable[[StepInfo], None] | None = None,
             on_message: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train a LoRA adapter on `lm` (in place) and write it to cfg.out; returns the run summary.

    With `resume`, the run saved in cfg.out/checkpoint continues with its saved settings and
    reaches the same result as an uninterrupted run. KeyboardInterrupt saves a checkpoint first.
    """
    say = on_message or (lambda s: None)
    out = Path(cfg.out)
    if resume:
        _prepare_out(out, True, False)
        adapter_sd, opt_sd, state = load_checkpoint(out)
        saved = TrainConfig(**state["config"])
        saved.out = cfg.out
        if Path(cfg.data).exists() and data_fingerprint(cfg.data) != state["data_sha256"]:
            raise NomoatError(f"{cfg.data}: differs from the data the run in {out} was trained on")
        saved.data = cfg.data if Path(cfg.data).exists() else saved.data
        cfg = saved
    else:
        cfg.check()
        _prepare_out(out, False, overwrite)
        state = None
    torch.manual_seed(cfg.seed)
    examples = load_examples(cfg.data, cfg.format)
    data_sha = data_fingerprint(cfg.data)
    skipped: list[str] = []
    rows = build_dataset(examples, lm.tokenizer, min(cfg.seq_len, lm.config.max_position_embeddings),
                         cfg.train_on_prompt, cfg.pack, skipped=skipped)
    if skipped:
        say(f"skipped {len(skipped)} examples with no response token within --seq-len {cfg.seq_len} "
            f"(first: {skipped[0]})")
    train_rows, val_rows = split_validation(rows, cfg.val_fraction, cfg.seed)
    batches = Batches(lm.tokenizer.pad_id)
    per_epoch = Batches.count(len(train_rows), cfg.batch_size)
    total_steps = cfg.max_steps or max(1, math.ceil(per_epoch * cfg.epochs / cfg.grad_accum))

    model = lm.model
    lcfg = cfg.lora()
    add_adapter(model, lcfg, ADAPTER, init=True)
    set_active(model, {ADAPTER: 1.0})
    n_trainable = mark_trainable(model, ADAPTER)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999), eps=1e-8)
    tokens_per_batch = cfg.batch_size * max(len(r[0]) for r in train_rows)
    model.gradient_checkpointing = cfg.grad_checkpointing == "on" or (
        cfg.grad_checkpointing == "auto" and tokens_per_batch > 2048)

    step, micro, tokens_seen, history = 0, 0, 0, []
    wall_before = 0.0
    if state is not None:
        named = adapter_state_dict(model, ADAPTER)
        with torch.no_grad():
            for k, v in named.items():
                v.copy_(adapter_sd[k])
        restore_optimizer(opt, opt_sd, state["optimizer"])
        step, micro, tokens_seen = state["step"], state["micro"], state["tokens_seen"]
        history, wall_before = state["history"], state["wall_seconds"]
        torch.set_rng_state(state["torch_rng"])  # dropout continues the interrupted run's stream
        say(f"resuming {out} at step {step}/{total_steps}")

    fingerprint = base_fingerprint(lm)
    run_state = {"config": asdict(cfg), "data_sha256": data_sha}

    def checkpoint() -> None:
        save_checkpoint(out, adapter_state_dict(model, ADAPTER), opt,
                        {**run_state, "step": step, "micro": micro, "tokens_seen": tokens_seen,
                         "history": history, "wall_seconds": wall_before + time.perf_counter() - t_start})

    model.train()
    t_start = time.perf_counter()
    interrupted = False
    epoch_iter: tuple[int, Any] = (-1, None)  # one batch iterator per epoch: its shuffle is computed once
    try:
        while step < total_steps:
            t0 = time.perf_counter()
            step_loss, step_tokens = 0.0, 0
            for g in range(cfg.grad_accum):
                epoch, b_idx = divmod(micro + g, per_epoch)
                if epoch_iter[0] != epoch:
                    epoch_iter = (epoch, batches.iter_batches(train_rows, cfg.batch_size, cfg.seed, epoch,
                                                              start=b_idx))
                batch = next(epoch_iter[1])
                n_tok = int(batch.attention_mask.sum())
                h = model.hidden_states(batch.input_ids)
                loss = causal_lm_loss(model, h, batch.labels)
                (loss / cfg.grad_accum).backward()
                step_loss += float(loss.detach()) / cfg.grad_accum
                step_tokens += n_tok
            lr = lr_at(step, total_steps, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            micro += cfg.grad_accum
            step += 1
            tokens_seen += step_tokens
            dt = time.perf_counter() - t0
            val_loss = None
            if val_rows and (step % cfg.eval_every == 0 or step == total_steps):
                val_loss = evaluate_loss(model, val_rows, batches, cfg.batch_size)
            entry = {"step": step, "loss": round(step_loss, 5), "lr": lr, "tokens": tokens_seen,
                     "seconds": round(dt, 3)}
            if val_loss is not None:
                entry["val_loss"] = round(val_loss, 5)
            history.append(entry)
            if on_step:
                on_step(StepInfo(step, total_steps, step_loss, lr, step_tokens / dt if dt else 0.0, val_loss))
            if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
                checkpoint()
    except KeyboardInterrupt:
        interrupted = True
        checkpoint()
        say(f"interrupted: checkpoint saved at step {step}; continue with --resume {out}")
    model.eval()
    wall = wall_before + time.perf_counter() - t_start
    final_val = next((h["val_loss"] for h in reversed(history) if "val_loss" in h), None)
    summary = {
        "nomoat_version": __version__,
        "base_name": lm.name,
        "base_source": str(lm.source),
        "base_fingerprint": fingerprint,
        "data": str(cfg.data),
        "data_sha256": data_sha,
        "examples": len(rows),
        "train_examples": len(train_rows),
        "val_examples": len(val_rows),
        "hyperparameters": asdict(cfg),
        "trainable_parameters": n_trainable,
        "steps": step,
        "total_steps": total_steps,
        "tokens_seen": tokens_seen,
        "wall_seconds": round(wall, 2),
        "final_train_loss": history[-1]["loss"] if history else None,
        "final_val_loss": final_val,
        "gradient_checkpointing": model.gradient_checkpointing,
        "complete": not interrupted and step >= total_steps,
    }
    if interrupted:
        raise KeyboardInterrupt
    checkpoint()  # the final state too, so a finished run can be extended or inspected
    write_peft_dir(out, lcfg, adapter_state_dict(model, ADAPTER), lm.name, summary,
                   extra_files={"training_log.json": json.dumps({"summary": summary, "history": history},
                                                                indent=1).encode()})
    _save_loss_curve(out, history)
    return summary
