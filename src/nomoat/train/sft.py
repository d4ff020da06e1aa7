"""LoRA supervised fine-tuning: the SFT objective (data, loss) on the shared loop, and the adapter it writes."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from nomoat import __version__
from nomoat.adapters import base_fingerprint
from nomoat.data import Batches, build_dataset, data_fingerprint, load_examples, split_validation
from nomoat.data.sft import Batch
from nomoat.errors import NomoatError
from nomoat.eval.perplexity import loss_sum
from nomoat.formats.peft import META_FILE, write_peft_dir
from nomoat.lora import LoraConfig, adapter_state_dict, add_adapter, mark_trainable, set_active
from nomoat.model import causal_lm_loss
from nomoat.train.checkpoint import CHECKPOINT_DIR, config_from_saved, load_checkpoint
from nomoat.train.loop import LoopConfig, StepInfo, base_weights, check_train_dtype, save_loss_curve, train_loop

ADAPTER = "default"
# Size-dependent defaults (see TrainConfig.resolved): a LoRA run needs some tens of optimizer steps to
# learn a skill; the demo's date skill goes from ~13% to ~95% in 60 steps at 5e-4.
MIN_STEPS = 60
MAX_AUTO_EPOCHS = 5
SHORT_RUN_STEPS = 300
SHORT_RUN_LR = 5e-4
LONG_RUN_LR = 2e-4


@dataclass
class TrainConfig:
    """Everything that determines a fine-tuning run (saved with the checkpoint for --resume)."""

    data: str
    out: str
    format: str = "auto"
    epochs: float | None = None  # None: chosen by the data's size (see `resolved`)
    max_steps: int = 0  # optimizer steps; 0 = from epochs
    batch_size: int = 8
    grad_accum: int = 1
    lr: float | None = None  # None: chosen by the run's length
    weight_decay: float = 0.0
    warmup: float = 0.05  # fraction of the steps
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    seq_len: int = 512
    pack: bool = False
    train_on_prompt: bool = False
    val_fraction: float = 0.05
    eval_every: int | None = None  # None: about five validations per run
    save_every: int = 50
    seed: int = 42
    grad_checkpointing: str = "auto"  # auto | on | off
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["all-linear"])
    rslora: bool = False
    dtype: str | None = None  # base weights; None: bfloat16 with hardware BF16, else float32
    on: str | None = None  # an adapter to train on top of (kept frozen and active; the result stacks on it)

    @classmethod
    def from_saved(cls, d: Any, source: str) -> TrainConfig:
        """The config a checkpoint's state.json recorded, checked field by field."""
        return config_from_saved(cls, d, source)

    def base_dtype(self) -> str:
        """The base weights' dtype: as given, else what this CPU trains fastest in."""
        from nomoat.runtime.cpu import train_dtype_for

        return self.dtype or train_dtype_for()[0]

    def resolved(self, n_train: int) -> tuple[TrainConfig, list[str]]:
        """This config with the size-dependent defaults filled in for `n_train` training rows, and warnings.

        Small sets get more than one epoch (at least MIN_STEPS optimizer steps, at most MAX_AUTO_EPOCHS
        epochs) and, on short runs, a higher learning rate; validation runs about five times per run.
        """
        per_epoch = max(1, math.ceil(math.ceil(n_train / self.batch_size) / self.grad_accum))
        epochs = self.epochs
        if epochs is None:
            epochs = 1.0 if self.max_steps else float(min(MAX_AUTO_EPOCHS, max(1, math.ceil(MIN_STEPS / per_epoch))))
        steps = self.max_steps or max(1, math.ceil(per_epoch * epochs))
        lr = self.lr if self.lr is not None else (SHORT_RUN_LR if steps <= SHORT_RUN_STEPS else LONG_RUN_LR)
        eval_every = self.eval_every if self.eval_every is not None else max(1, steps // 5)
        notes = []
        if steps < MIN_STEPS // 2:
            notes.append(f"warning: only {steps} optimizer steps ({n_train} training examples, batch {self.batch_size}"
                         f"); a run this short rarely learns much: give more --epochs or --max-steps")
        cfg = dataclasses.replace(self, epochs=epochs, lr=lr, eval_every=eval_every)
        return cfg, notes

    def lora(self) -> LoraConfig:
        return LoraConfig(r=self.rank, alpha=self.alpha, dropout=self.dropout, targets=self.targets,
                          rslora=self.rslora)

    def check(self) -> None:
        for name in ("batch_size", "grad_accum", "seq_len"):
            if getattr(self, name) < 1:
                raise NomoatError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.epochs is not None and self.epochs <= 0 and self.max_steps <= 0:
            raise NomoatError("--epochs must be > 0 (or give --max-steps)")
        if self.lr is not None and self.lr <= 0:
            raise NomoatError(f"--lr must be > 0, got {self.lr}")
        if self.eval_every is not None and self.eval_every < 1:
            raise NomoatError(f"--eval-every must be >= 1, got {self.eval_every}")
        check_train_dtype(self.dtype)
        if self.grad_checkpointing not in ("auto", "on", "off"):
            raise NomoatError(f"--grad-checkpointing must be auto, on or off, got {self.grad_checkpointing!r}")
        self.lora()  # validates rank, dropout, targets


def check_out(out: str | Path, resume: bool = False, overwrite: bool = False) -> None:
    """Refuse an unusable --out before anything loads or is created: not a directory, not writable, or
    holding files (unless resuming or overwriting). A first checkpoint cut short (only its temporary
    directory, from a kill while writing) counts as empty."""
    out = Path(out)
    tmp = out / f".{CHECKPOINT_DIR}.tmp"
    if resume:
        if not (out / CHECKPOINT_DIR / "state.json").exists() and not (out / f".{CHECKPOINT_DIR}.old").exists():
            hint = (" (its first checkpoint was interrupted while being written: start again with --overwrite)"
                    if tmp.exists() else "")
            raise NomoatError(f"{out}: nothing to resume (no {CHECKPOINT_DIR}/state.json){hint}")
    elif out.exists() and not out.is_dir():
        raise NomoatError(f"{out}: exists and is not a directory")
    elif out.exists() and any(p != tmp for p in out.iterdir()) and not overwrite:
        what = "a previous run" if (out / META_FILE).exists() or (out / CHECKPOINT_DIR).exists() else "files"
        raise NomoatError(f"{out}: already holds {what}; use --resume to continue it, --overwrite to replace "
                          "it, or another --out")
    existing = next((p for p in (out, *out.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        raise NomoatError(f"{out}: cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise NomoatError(f"{out}: not writable ({existing} does not allow writing)")


def make_out(out: Path) -> None:
    """Create --out (clearing a cut-short first checkpoint), once the data has been accepted."""
    shutil.rmtree(out / f".{CHECKPOINT_DIR}.tmp", ignore_errors=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise NomoatError(f"{out}: cannot create the output directory ({e.strerror})") from None


@dataclass
class SFTObjective:
    """Next-token loss on the supervised tokens of instruction / chat / text rows."""

    train_rows: list
    val_rows: list
    collate: Batches
    batch_size: int
    seed: int

    @property
    def batches_per_epoch(self) -> int:
        return Batches.count(len(self.train_rows), self.batch_size)

    def batches(self, epoch: int, start: int) -> Iterator[Batch]:
        return self.collate.iter_batches(self.train_rows, self.batch_size, self.seed, epoch, start=start)

    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
        h = model.hidden_states(batch.input_ids)
        return causal_lm_loss(model, h, batch.labels), int(batch.attention_mask.sum())

    def validate(self, model: torch.nn.Module) -> float | None:
        """Token-weighted mean loss over the validation rows (supervised tokens only)."""
        if not self.val_rows:
            return None
        total, count = loss_sum(model, self.val_rows, self.collate, self.batch_size)
        return total / max(count, 1)


def _load_on(lm, cfg: TrainConfig, ckpt) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """With `cfg.on`: the adapter to train on top of, loaded frozen and active (its base checked), and its
    parent record; a resumed run must find the same adapter it started with."""
    if not cfg.on:
        return {}, []
    from nomoat.adapters import load_adapter, parent_record

    rec = parent_record(cfg.on, "finetune-on")
    saved = ckpt.state.get("on_digest") if ckpt is not None else None
    if saved and saved != rec["digest"]:
        raise NomoatError(f"--on {cfg.on}: differs from the adapter the run in {cfg.out} was trained on")
    name = load_adapter(lm, cfg.on, name="on", activate=True)
    return {name: 1.0}, [rec]


def finetune(lm, cfg: TrainConfig, resume: bool = False, overwrite: bool = False,
             on_step: Callable[[StepInfo], None] | None = None,
             on_message: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train a LoRA adapter on `lm` (in place) and write it to cfg.out; returns the run summary.

    With `resume`, the run saved in cfg.out/checkpoint continues with its saved settings and
    reaches the same result as an uninterrupted run. KeyboardInterrupt saves a checkpoint first.
    """
    say = on_message or (lambda s: None)
    out = Path(cfg.out)
    ckpt = None
    if resume:
        check_out(out, resume=True)
        ckpt = load_checkpoint(out)
        saved = TrainConfig.from_saved(ckpt.state.get("config"), f"{out}/{CHECKPOINT_DIR}/state.json")
        saved.out = cfg.out
        if Path(cfg.data).exists() and data_fingerprint(cfg.data) != ckpt.state["data_sha256"]:
            raise NomoatError(f"{cfg.data}: differs from the data the run in {out} was trained on")
        saved.data = cfg.data if Path(cfg.data).exists() else saved.data
        cfg = saved
    else:
        cfg.check()
        check_out(out, overwrite=overwrite)
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
    make_out(out)  # only now, so that refused data leaves nothing behind
    if not resume:
        cfg, notes = cfg.resolved(len(train_rows))
        for note in notes:
            say(note)
    objective = SFTObjective(train_rows, val_rows, Batches(lm.tokenizer.pad_id), cfg.batch_size, cfg.seed)
    total_steps = cfg.max_steps or max(1, math.ceil(objective.batches_per_epoch * cfg.epochs / cfg.grad_accum))
    length = f"max {cfg.max_steps} steps" if cfg.max_steps else f"{cfg.epochs:g} epoch(s)"
    say(f"{len(train_rows)} training / {len(val_rows)} validation examples: {total_steps} steps ({length}, "
        f"lr {cfg.lr:g}), base weights {base_weights(lm.model)}, "
        f"{torch.get_num_threads()} threads")

    model = lm.model
    lcfg = cfg.lora()
    stack, parents = _load_on(lm, cfg, ckpt)
    add_adapter(model, lcfg, ADAPTER, init=True)
    set_active(model, {**stack, ADAPTER: 1.0})
    n_trainable = mark_trainable(model, ADAPTER)
    tokens_per_batch = cfg.batch_size * max(len(r[0]) for r in train_rows)
    model.gradient_checkpointing = cfg.grad_checkpointing == "on" or (
        cfg.grad_checkpointing == "auto" and tokens_per_batch > 2048)

    fingerprint = base_fingerprint(lm)
    loop = LoopConfig(total_steps=total_steps, lr=cfg.lr, weight_decay=cfg.weight_decay, warmup=cfg.warmup,
                      min_lr_ratio=cfg.min_lr_ratio, max_grad_norm=cfg.max_grad_norm, grad_accum=cfg.grad_accum,
                      eval_every=cfg.eval_every, save_every=cfg.save_every)
    res = train_loop(model, objective, loop, out, lambda: adapter_state_dict(model, ADAPTER),
                     {"config": asdict(cfg), "data_sha256": data_sha,
                      "on_digest": parents[0]["digest"] if parents else None},
                     resume=ckpt, on_step=on_step, say=say)
    if res.interrupted:
        raise KeyboardInterrupt
    summary = {
        "nomoat_version": __version__,
        "base_name": lm.name,
        "base_model_name_or_path": lm.base_model_id,
        "base_source": str(lm.source),
        "base_fingerprint": fingerprint,
        "data": str(cfg.data),
        "data_sha256": data_sha,
        "examples": len(rows),
        "train_examples": len(train_rows),
        "val_examples": len(val_rows),
        "hyperparameters": asdict(cfg),
        "trainable_parameters": n_trainable,
        "steps": res.step,
        "total_steps": total_steps,
        "tokens_seen": res.tokens_seen,
        "wall_seconds": round(res.wall_seconds, 2),
        "final_train_loss": res.final_train_loss,
        "final_val_loss": res.final_val_loss,
        "gradient_checkpointing": model.gradient_checkpointing,
        "base_dtype": base_weights(model),
        "threads": torch.get_num_threads(),
        "complete": res.step >= total_steps,
    }
    if parents:
        summary["parents"] = parents  # the catalog's lineage
        summary["stack_on"] = {"path": parents[0]["path"], "digest": parents[0]["digest"]}
    write_peft_dir(out, lcfg, adapter_state_dict(model, ADAPTER), lm.base_model_id, summary,
                   extra_files={"training_log.json": json.dumps({"summary": summary, "history": res.history},
                                                                indent=1).encode()})
    save_loss_curve(out, res.history)
    return summary
