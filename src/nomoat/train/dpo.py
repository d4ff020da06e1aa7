"""Preference training with LoRA: DPO and its relatives as an objective on the shared loop.

The policy is the model with a new LoRA adapter on (over the base, or over the base plus the SFT adapter
named by `on`); the reference is the same model with that new adapter off, so no second copy is held.
Reference log-probabilities are computed once before training and cached on disk under a key of the
base's fingerprint, the reference adapter, the dtype and the tokenized data (`precompute=False` computes
them again at every step instead). Each batch packs every pair as prompt | chosen | rejected: one forward
pass scores both completions and computes the shared prompt once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from nomoat import __version__
from nomoat.adapters import base_fingerprint, load_adapter, parent_record
from nomoat.data import data_fingerprint, split_validation
from nomoat.data.preference import (
    PAIR_FORMATS,
    PreferenceBatch,
    PreferenceBatches,
    PreferencePair,
    PreferenceRow,
    build_preference_rows,
    is_sqlite,
    load_pairs,
    pairs_from_battles,
)
from nomoat.errors import NomoatError
from nomoat.formats.peft import write_peft_dir
from nomoat.lora import (
    LoraConfig,
    active_weights,
    adapter_state_dict,
    add_adapter,
    lora_modules,
    mark_trainable,
    set_active,
)
from nomoat.lora.combine import combine, combined_config
from nomoat.model.losses import PREFERENCE_LOSSES, PreferenceLoss, preference_loss, token_logps
from nomoat.train.checkpoint import CHECKPOINT_DIR, config_from_saved, load_checkpoint
from nomoat.train.loop import (
    LoopConfig,
    StepInfo,
    base_weights,
    check_train_dtype,
    save_loss_curve,
    save_metric_curves,
    train_loop,
)
from nomoat.train.sft import check_out, make_out

ADAPTER = "default"  # the adapter being trained
ON = "on"  # the adapter the policy and the reference share (--on)
# Size-dependent defaults (see DPOConfig.resolved), as for SFT: a LoRA run needs some tens of optimizer steps.
MIN_STEPS = 40
MAX_AUTO_EPOCHS = 3
DEFAULT_LR = 1e-4  # LoRA on a small model: 5e-4 (the SFT default) overshoots, driving rejected far down
DEFAULT_BETA = {"sigmoid": 0.1, "robust": 0.1, "hinge": 0.1, "ipo": 0.1, "orpo": 0.1, "simpo": 2.0}
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")
REFERENCE_CACHE = "reference-logps"
# Scored tokens per vocabulary projection: a 128 x 49k chunk of logits and its gradient stay small.
LOGIT_CHUNK = 128
# Gradient checkpointing (auto) above this many tokens a batch. Without it the default model keeps ~2 MB of
# activations per token: 8 pairs of ~160 tokens peaked at 3.4 GB without, 1.3 GB with, for ~20% more time a step.
CHECKPOINT_ABOVE = 512
CACHE_VERSION = 1


@dataclass
class DPOConfig:
    """Everything that determines a preference-training run (saved with the checkpoint for --resume)."""

    data: str
    out: str
    format: str = "auto"  # auto | trl | oasst | verdicts | battles
    lang: list[str] = field(default_factory=list)  # Open Assistant languages to keep (empty: all)
    on: str | None = None  # an SFT adapter the policy and the reference both carry
    combine: bool = False  # write the `on` adapter and the new one as one adapter (exact concatenation)
    force: bool = False  # accept an `on` adapter trained on another base
    loss: str = "sigmoid"
    beta: float | None = None  # None: 0.1 (2.0 for simpo)
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    precompute: bool = True  # reference log-probabilities once, cached; False: at every step
    epochs: float | None = None  # None: chosen by the data's size
    max_steps: int = 0
    batch_size: int = 8  # pairs
    grad_accum: int = 1
    lr: float | None = None  # None: DEFAULT_LR
    weight_decay: float = 0.0
    warmup: float = 0.1
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    seq_len: int = 1024  # per side: prompt + completion
    val_fraction: float = 0.1
    eval_every: int | None = None  # None: about five validations per run
    save_every: int = 50
    seed: int = 42
    grad_checkpointing: str = "auto"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["all-linear"])
    rslora: bool = False
    dtype: str | None = None  # base weights; None: bfloat16 with hardware BF16, else float32

    @classmethod
    def from_saved(cls, d: Any, source: str) -> DPOConfig:
        return config_from_saved(cls, d, source)

    def base_dtype(self) -> str:
        from nomoat.runtime.cpu import train_dtype_for

        return self.dtype or train_dtype_for()[0]

    def preference_loss(self) -> PreferenceLoss:
        beta = self.beta if self.beta is not None else DEFAULT_BETA[self.loss]
        return PreferenceLoss(self.loss, beta, self.label_smoothing, self.simpo_gamma)

    def lora(self) -> LoraConfig:
        return LoraConfig(r=self.rank, alpha=self.alpha, dropout=self.dropout, targets=self.targets,
                          rslora=self.rslora)

    def check(self) -> None:
        if self.format != "auto" and self.format not in PAIR_FORMATS:
            raise NomoatError(f"--format must be auto or one of {', '.join(PAIR_FORMATS)}, got {self.format!r}")
        if self.loss not in PREFERENCE_LOSSES:
            raise NomoatError(f"--loss must be one of {', '.join(PREFERENCE_LOSSES)}, got {self.loss!r}")
        if self.beta is not None and not (math.isfinite(self.beta) and self.beta > 0):
            raise NomoatError(f"--beta must be > 0, got {self.beta}")
        top = 0.5 if self.loss == "robust" else 1.0
        if not 0 <= self.label_smoothing < top:
            raise NomoatError(f"--label-smoothing must be in [0, {top:g}) for the {self.loss} loss, "
                              f"got {self.label_smoothing}")
        if self.label_smoothing and self.loss not in ("sigmoid", "robust"):
            raise NomoatError(f"--label-smoothing applies to the sigmoid and robust losses, not {self.loss}")
        if not math.isfinite(self.simpo_gamma):
            raise NomoatError(f"--simpo-gamma must be a finite number, got {self.simpo_gamma}")
        if self.combine and not self.on:
            raise NomoatError("--combine needs --on ADAPTER (it joins that adapter and the new one)")
        for name in ("batch_size", "grad_accum", "seq_len"):
            if getattr(self, name) < 1:
                raise NomoatError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.seq_len < 8:
            raise NomoatError(f"--seq-len must be at least 8 tokens, got {self.seq_len}")
        if self.epochs is not None and self.epochs <= 0 and self.max_steps <= 0:
            raise NomoatError("--epochs must be > 0 (or give --max-steps)")
        if self.lr is not None and self.lr <= 0:
            raise NomoatError(f"--lr must be > 0, got {self.lr}")
        if not 0 <= self.val_fraction < 1:
            raise NomoatError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.eval_every is not None and self.eval_every < 1:
            raise NomoatError(f"--eval-every must be >= 1, got {self.eval_every}")
        check_train_dtype(self.dtype)
        if self.grad_checkpointing not in ("auto", "on", "off"):
            raise NomoatError(f"--grad-checkpointing must be auto, on or off, got {self.grad_checkpointing!r}")
        self.lora()

    def resolved(self, n_train: int) -> tuple[DPOConfig, list[str]]:
        """The config with the size-dependent defaults filled in for `n_train` training pairs, and warnings."""
        per_epoch = max(1, math.ceil(math.ceil(n_train / self.batch_size) / self.grad_accum))
        epochs = self.epochs
        if epochs is None:
            epochs = 1.0 if self.max_steps else float(min(MAX_AUTO_EPOCHS, max(1, math.ceil(MIN_STEPS / per_epoch))))
        steps = self.max_steps or max(1, math.ceil(per_epoch * epochs))
        notes = []
        if steps < MIN_STEPS // 2:
            notes.append(f"warning: only {steps} optimizer steps ({n_train} training pairs, batch {self.batch_size}"
                         "); a run this short rarely learns much: give more --epochs or --max-steps")
        cfg = dataclasses.replace(self, epochs=epochs, lr=self.lr if self.lr is not None else DEFAULT_LR,
                                  eval_every=self.eval_every if self.eval_every is not None else max(1, steps // 5))
        return cfg, notes


# --------------------------------------------------------------------------- data


def load_preference_pairs(path: str | Path, fmt: str = "auto", langs: Sequence[str] = (),
                          skipped: list[str] | None = None) -> list[PreferencePair]:
    """Pairs from any layout `nomoat dpo` reads, arena SQLite databases included."""
    if not Path(path).exists():
        raise NomoatError(f"{path}: no such data file")
    if not is_sqlite(path):
        return load_pairs(path, fmt, langs, skipped)
    if fmt not in ("auto", "battles"):
        raise NomoatError(f"{path}: an SQLite database holds arena battles, not --format {fmt}")
    if langs:
        raise NomoatError(f"{path}: --lang filters Open Assistant data; this is an arena database")
    from nomoat.eval.battles import read_battles  # the arena's store is the arena's business

    notes: list[str] = []
    battles = read_battles(path)
    pairs = pairs_from_battles(((f"{path}#battle {i + 1}", b) for i, b in enumerate(battles)), notes)
    if skipped is not None:
        skipped.extend(notes)
    if not pairs:
        raise NomoatError(f"{path}: no decided battles ({len(battles)} battles, {len(notes)} ties or both-bad)")
    return pairs


def data_digest(path: str | Path) -> str:
    """sha256 of the data: the file's bytes, or for an arena database the battles it holds (recent votes may
    still sit in its write-ahead log, beside the main file)."""
    if not is_sqlite(path):
        return data_fingerprint(path)
    from nomoat.eval.battles import read_battles

    return hashlib.sha256(json.dumps(read_battles(path), sort_keys=True, default=str).encode()).hexdigest()


def rows_digest(rows: Sequence[PreferenceRow]) -> str:
    """sha256 of the tokenized pairs: what the reference log-probabilities are a function of, besides the model."""
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps([r.prompt, r.chosen, r.chosen_labels, r.rejected, r.rejected_labels]).encode())
    return h.hexdigest()


# --------------------------------------------------------------------------- log-probabilities


def sequence_logps(model: torch.nn.Module, batch: PreferenceBatch) -> torch.Tensor:
    """Summed log-probabilities of every completion of a packed batch: [2B] (chosen of pair i at i, its
    rejected at B + i), float32, differentiable through the active adapters."""
    h = model.hidden_states(batch.input_ids, batch.position_ids, batch.attention)
    lp = token_logps(model, h[batch.src_row, batch.src_pos], batch.target, chunk=LOGIT_CHUNK)
    return torch.zeros(batch.lengths.numel(), dtype=lp.dtype).index_add(0, batch.seq, lp)


@torch.no_grad()
def reference_logps(model: torch.nn.Module, rows: Sequence[PreferenceRow], pad_id: int, batch_size: int,
                    reference: dict[str, float]) -> torch.Tensor:
    """[N, 2] reference (chosen, rejected) log-probabilities, the adapters in `reference` active (and only
    them), in eval mode; the active set is restored after."""
    was, before = model.training, active_weights(model)
    model.eval()
    set_active(model, reference)
    out = torch.zeros(len(rows), 2)
    try:
        for batch in PreferenceBatches(pad_id).in_order(rows, batch_size):
            s = sequence_logps(model, batch)
            B = batch.index.numel()
            out[batch.index, 0], out[batch.index, 1] = s[:B], s[B:]
    finally:
        set_active(model, before)
        model.train(was)
    return out


def cache_dir() -> Path:
    return Path(os.environ.get("NOMOAT_CACHE", Path.home() / ".cache" / "nomoat")) / REFERENCE_CACHE


def cached_reference_logps(model: torch.nn.Module, rows: Sequence[PreferenceRow], pad_id: int, batch_size: int,
                           reference: dict[str, float], key: dict[str, Any],
                           say: Callable[[str], None] = lambda s: None) -> tuple[torch.Tensor, Path]:
    """`reference_logps`, read from the on-disk cache when `key` (base fingerprint, reference adapters, dtype,
    tokenized data) was computed before, else computed and stored (atomically)."""
    digest = hashlib.sha256(json.dumps({"version": CACHE_VERSION, **key}, sort_keys=True).encode()).hexdigest()[:32]
    path = cache_dir() / f"{digest}.safetensors"
    if path.exists():
        try:
            t = load_file(str(path))["logps"]
            if t.shape == (len(rows), 2) and bool(torch.isfinite(t).all()):
                say(f"reference log-probabilities of {len(rows)} pairs: from the cache ({path})")
                return t, path
        except Exception:  # a damaged cache entry is recomputed, never trusted
            pass
    t0 = time.perf_counter()
    t = reference_logps(model, rows, pad_id, batch_size, reference)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file({"logps": t.contiguous()}, str(tmp), metadata={"key": json.dumps(key, sort_keys=True)})
        os.replace(tmp, path)
    except OSError as e:
        say(f"warning: the reference log-probabilities could not be cached in {path.parent} ({e.strerror})")
    say(f"reference log-probabilities of {len(rows)} pairs: computed in {time.perf_counter() - t0:.0f} s "
        f"(cached in {path})")
    return t, path


# --------------------------------------------------------------------------- the objective


@dataclass
class DPOObjective:
    """A preference loss on packed pairs, with the reference from precomputed values or a pass per batch."""

    train_rows: list[PreferenceRow]
    val_rows: list[PreferenceRow]
    spec: PreferenceLoss
    collate: PreferenceBatches
    batch_size: int
    seed: int
    reference: dict[str, float]  # the adapters the reference runs with (the policy adds ADAPTER)
    ref_train: torch.Tensor | None = None  # [N, 2] precomputed, or None: computed per batch
    ref_val: torch.Tensor | None = None
    _acc: list[tuple[int, dict[str, float]]] = field(default_factory=list)

    @property
    def batches_per_epoch(self) -> int:
        return -(-len(self.train_rows) // self.batch_size)

    @property
    def policy(self) -> dict[str, float]:
        return {**self.reference, ADAPTER: 1.0}

    def batches(self, epoch: int, start: int) -> Iterator[PreferenceBatch]:
        return self.collate.iter_batches(self.train_rows, self.batch_size, self.seed, epoch, start=start)

    def _terms(self, model: torch.nn.Module, batch: PreferenceBatch, precomputed: torch.Tensor | None
               ) -> tuple[torch.Tensor, dict[str, float]]:
        """Per-pair losses [B] and the batch's metrics; the reference from `precomputed` rows, else a pass with
        the new adapter off."""
        B = batch.index.numel()
        ref_c = ref_r = None
        if self.spec.uses_reference:
            if precomputed is not None:
                ref_c, ref_r = precomputed[batch.index, 0], precomputed[batch.index, 1]
            else:
                set_active(model, self.reference)
                with torch.no_grad():
                    ref = sequence_logps(model, batch)
                set_active(model, self.policy)
                ref_c, ref_r = ref[:B], ref[B:]
        s = sequence_logps(model, batch)
        terms = preference_loss(self.spec, s[:B], s[B:], batch.lengths[:B], batch.lengths[B:], ref_c, ref_r)
        c, r = terms.chosen_rewards, terms.rejected_rewards
        metrics = {"rewards/chosen": float(c.mean()), "rewards/rejected": float(r.mean()),
                   "rewards/accuracies": float((c > r).float().mean()), "rewards/margins": float((c - r).mean()),
                   "logps/chosen": float(s[:B].detach().mean()), "logps/rejected": float(s[B:].detach().mean())}
        return terms.loss, metrics

    def loss(self, model: torch.nn.Module, batch: PreferenceBatch) -> tuple[torch.Tensor, int]:
        loss, metrics = self._terms(model, batch, self.ref_train)
        self._acc.append((batch.index.numel(), metrics))
        return loss.mean(), batch.tokens

    def metrics(self) -> dict[str, float]:
        """Pair-weighted means over the micro-batches since the last call, and the number of pairs."""
        n = sum(k for k, _ in self._acc)
        out = {name: sum(k * m[name] for k, m in self._acc) / n for name in METRICS} if n else {}
        out["pairs"] = n
        self._acc.clear()
        return out

    @torch.no_grad()
    def validate(self, model: torch.nn.Module) -> dict[str, float] | None:
        """Loss and reward metrics over the held-out pairs (pair-weighted means), in eval mode."""
        if not self.val_rows:
            return None
        was = model.training
        model.eval()
        total, sums = 0.0, dict.fromkeys(METRICS, 0.0)
        for batch in self.collate.in_order(self.val_rows, self.batch_size):
            loss, metrics = self._terms(model, batch, self.ref_val)
            k = batch.index.numel()
            total += float(loss.sum())
            for name in METRICS:
                sums[name] += k * metrics[name]
        model.train(was)
        n = len(self.val_rows)
        return {"loss": total / n, **{name: v / n for name, v in sums.items()}}


# --------------------------------------------------------------------------- the run


def saved_config(out: str | Path) -> DPOConfig:
    """The settings of the preference run checkpointed in `out` (for --resume: its dtype, its adapter)."""
    return _resume_config(DPOConfig(data="", out=str(out)), Path(out))[0]


def _resume_config(cfg: DPOConfig, out: Path):
    check_out(out, resume=True)
    ckpt = load_checkpoint(out)
    if ckpt.state.get("objective") != "preference":
        raise NomoatError(f"{out}: the run there is not a preference (dpo) run; resume it with its own command")
    saved = DPOConfig.from_saved(ckpt.state.get("config"), f"{out}/{CHECKPOINT_DIR}/state.json")
    saved.out = cfg.out
    if cfg.data and Path(cfg.data).exists() and data_digest(cfg.data) != ckpt.state["data_sha256"]:
        raise NomoatError(f"{cfg.data}: differs from the data the run in {out} was trained on")
    saved.data = cfg.data if cfg.data and Path(cfg.data).exists() else saved.data
    return saved, ckpt


def _load_on(lm, cfg: DPOConfig, ckpt) -> tuple[dict[str, float], dict[str, Any] | None]:
    """With `cfg.on`: the adapter the policy and the reference share, loaded active (its base checked), and its
    parent record (the catalog's lineage; its digest also keys the reference cache). A resumed run must find the
    adapter it started with."""
    if not cfg.on:
        return {}, None
    rec = parent_record(cfg.on, "dpo-on")
    saved = ckpt.state.get("on_digest") if ckpt is not None else None
    if saved and saved != rec["digest"]:
        raise NomoatError(f"--on {cfg.on}: differs from the adapter the run in {cfg.out} was trained on")
    return {load_adapter(lm, cfg.on, name=ON, force=cfg.force): 1.0}, rec


def train_dpo(lm, cfg: DPOConfig, resume: bool = False, overwrite: bool = False,
              on_step: Callable[[StepInfo], None] | None = None,
              on_message: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train a LoRA adapter on preference pairs (in place on `lm`) and write it to cfg.out; returns the summary.

    With `resume`, the run saved in cfg.out/checkpoint continues with its saved settings and reaches the same
    result as an uninterrupted run. KeyboardInterrupt saves a checkpoint first.
    """
    say = on_message or (lambda s: None)
    out = Path(cfg.out)
    ckpt = None
    if resume:
        cfg, ckpt = _resume_config(cfg, out)
    else:
        cfg.check()
        check_out(out, overwrite=overwrite)
    torch.manual_seed(cfg.seed)
    spec = cfg.preference_loss()
    skipped: list[str] = []
    pairs = load_preference_pairs(cfg.data, cfg.format, cfg.lang, skipped)
    data_sha = data_digest(cfg.data)
    rows = build_preference_rows(pairs, lm.tokenizer, min(cfg.seq_len, lm.config.max_position_embeddings), skipped)
    if skipped:
        say(f"left out {len(skipped)} records without a usable preference (first: {skipped[0]})")
    train_idx, val_idx = split_validation(list(range(len(rows))), cfg.val_fraction, cfg.seed)
    reference, on_info = _load_on(lm, cfg, ckpt)
    make_out(out)  # only now, so that refused data or a refused --on adapter leave nothing behind
    if not resume:
        cfg, notes = cfg.resolved(len(train_idx))
        for note in notes:
            say(note)

    model = lm.model
    lcfg = cfg.lora()
    add_adapter(model, lcfg, ADAPTER, init=True)
    n_trainable = mark_trainable(model, ADAPTER)
    fingerprint = base_fingerprint(lm)
    if ckpt is not None and ckpt.state.get("base_fingerprint") not in (None, fingerprint):
        raise NomoatError(f"{out}: the run was trained on base {ckpt.state['base_fingerprint']}, the loaded model is "
                          f"{fingerprint}; resume with the run's own model (--model)")
    pad = lm.tokenizer.pad_id
    ref_all = None
    cache_path = None
    if spec.uses_reference and cfg.precompute:
        key = {"base": fingerprint, "on": on_info and on_info["digest"], "dtype": base_weights(model),
               "quant": lm.quant, "data_sha256": data_sha, "rows": rows_digest(rows)}
        ref_all, cache_path = cached_reference_logps(model, rows, pad, 2 * cfg.batch_size, reference, key, say)
    set_active(model, {**reference, ADAPTER: 1.0})
    objective = DPOObjective(
        [rows[i] for i in train_idx], [rows[i] for i in val_idx], spec, PreferenceBatches(pad), cfg.batch_size,
        cfg.seed, reference, ref_all[train_idx] if ref_all is not None else None,
        ref_all[val_idx] if ref_all is not None else None)
    total_steps = cfg.max_steps or max(1, math.ceil(objective.batches_per_epoch * cfg.epochs / cfg.grad_accum))
    length = f"max {cfg.max_steps} steps" if cfg.max_steps else f"{cfg.epochs:g} epoch(s)"
    ref_text = f"base + {cfg.on}" if cfg.on else "the base"
    say(f"{len(train_idx)} training / {len(val_idx)} validation pairs: {total_steps} steps ({length}, lr {cfg.lr:g}), "
        f"{spec.kind} loss, beta {spec.beta:g}, reference "
        + (f"{ref_text} (adapter off)" if spec.uses_reference else "none (reference-free loss)")
        + f", base weights {base_weights(model)}, {torch.get_num_threads()} threads")
    widest = max(r.width for r in objective.train_rows)
    model.gradient_checkpointing = cfg.grad_checkpointing == "on" or (
        cfg.grad_checkpointing == "auto" and cfg.batch_size * widest > CHECKPOINT_ABOVE)
    loop = LoopConfig(total_steps=total_steps, lr=cfg.lr, weight_decay=cfg.weight_decay, warmup=cfg.warmup,
                      min_lr_ratio=cfg.min_lr_ratio, max_grad_norm=cfg.max_grad_norm, grad_accum=cfg.grad_accum,
                      eval_every=cfg.eval_every, save_every=cfg.save_every)
    res = train_loop(model, objective, loop, out, lambda: adapter_state_dict(model, ADAPTER),
                     {"config": asdict(cfg), "data_sha256": data_sha, "objective": "preference",
                      "base_fingerprint": fingerprint, "on_digest": on_info and on_info["digest"]},
                     resume=ckpt, on_step=on_step, say=say)
    if res.interrupted:
        raise KeyboardInterrupt
    last = res.history[-1] if res.history else {}
    summary = {
        "nomoat_version": __version__,
        "objective": "preference",
        "base_name": lm.name,
        "base_model_name_or_path": lm.base_model_id,
        "base_source": str(lm.source),
        "base_fingerprint": fingerprint,
        "data": str(cfg.data),
        "data_sha256": data_sha,
        "pairs": len(rows),
        "train_pairs": len(train_idx),
        "val_pairs": len(val_idx),
        "skipped_records": len(skipped),
        "preference": {"loss": spec.kind, "beta": spec.beta, "label_smoothing": spec.label_smoothing,
                       "simpo_gamma": spec.simpo_gamma if spec.kind == "simpo" else None,
                       "reference": ("base + adapter" if cfg.on else "base") if spec.uses_reference else None,
                       "reference_adapter": on_info,
                       "reference_logps": (("precomputed" if cfg.precompute else "per step")
                                           if spec.uses_reference else None),
                       "reference_cache": str(cache_path) if cache_path else None},
        "hyperparameters": asdict(cfg),
        "trainable_parameters": n_trainable,
        "steps": res.step,
        "total_steps": total_steps,
        "tokens_seen": res.tokens_seen,
        "wall_seconds": round(res.wall_seconds, 2),
        "final_train_loss": res.final_train_loss,
        "final_val_loss": res.final_val_loss,
        "final_metrics": {k: v for k, v in last.items() if "/" in k},
        "gradient_checkpointing": model.gradient_checkpointing,
        "base_dtype": base_weights(model),
        "threads": torch.get_num_threads(),
        "complete": res.step >= total_steps,
    }
    if on_info:
        summary["parents"] = [on_info]
        if not cfg.combine:  # the new adapter works stacked on that one
            summary["stack_on"] = {"path": on_info["path"], "digest": on_info["digest"]}
    _write_adapter(out, model, lcfg, lm.base_model_id, summary, res.history, on=next(iter(reference), None)
                   if cfg.combine else None)
    save_loss_curve(out, res.history, ylabel=f"{spec.kind} loss (mean over pairs)")
    save_metric_curves(out, res.history, ["rewards/margins", "rewards/accuracies"], "reward_curves.png")
    return summary


def _scales(model: torch.nn.Module, name: str) -> dict[str, float]:
    return {n: m.scales[name] for n, m in lora_modules(model) if name in m.scales}


def _write_adapter(out: Path, model: torch.nn.Module, lcfg: LoraConfig, base_id: str, summary: dict[str, Any],
                   history: list[dict[str, Any]], on: str | None) -> None:
    """The new adapter alone (to stack over the `on` adapter), or, given `on`, both as one (exact concatenation:
    rank r1 + r2, the same outputs as the two stacked)."""
    tensors = adapter_state_dict(model, ADAPTER)
    if on is not None:
        tensors, sc, _ = combine([(adapter_state_dict(model, on), _scales(model, on), 1.0),
                                  (tensors, _scales(model, ADAPTER), 1.0)], "concat")
        lcfg = combined_config(tensors, sc)
        summary["combined_with_on"] = True  # holds the --on adapter and the new one (rank r1 + r2)
    log = json.dumps({"summary": summary, "history": history}, indent=1).encode()
    write_peft_dir(out, lcfg, tensors, base_id, summary, extra_files={"training_log.json": log})
