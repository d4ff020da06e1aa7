"""Preference training: the losses against TRL's DPOTrainer and the published formulas, the packed row, the
reference with the new adapter off (precomputed, cached, recomputed), resume, the command, and a short run on
the default model."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from conftest import CHATML, _tiny_tokenizer_json, hf_twin, make_tiny_lm, rel_err
from safetensors.torch import load_file
from test_bad_input import assert_one_line_error, run_cli

from nomoat.adapters import base_fingerprint, load_adapter, save_adapter
from nomoat.api import convert_to_hf
from nomoat.data.preference import (
    IGNORE_INDEX,
    PreferenceBatches,
    PreferencePair,
    PreferenceRow,
    build_preference_rows,
    collate_pairs,
)
from nomoat.errors import NomoatError
from nomoat.lora import (
    ALL_LINEAR,
    LoraConfig,
    add_adapter,
    load_adapter_weights,
    lora_modules,
    mark_trainable,
    set_active,
)
from nomoat.model.losses import PreferenceLoss, preference_loss
from nomoat.runtime.loading import load
from nomoat.train.dpo import DPOConfig, DPOObjective, StepInfo, reference_logps, sequence_logps, train_dpo

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("NOMOAT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return convert_to_hf(make_tiny_lm(), tmp_path_factory.mktemp("model") / "tiny")


def _write_pairs(path: Path, n: int = 24) -> Path:
    rows = [{"prompt": f"What is {i} plus {i}?", "chosen": f"It is {2 * i}.", "rejected": f"The lazy dog {i}."}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    return _write_pairs(tmp_path_factory.mktemp("data") / "pairs.jsonl")


def _cfg(data: Path, out: Path, **kw) -> DPOConfig:
    base = dict(data=str(data), out=str(out), max_steps=6, batch_size=4, lr=5e-3, seq_len=64, val_fraction=0.2,
                eval_every=3, save_every=2, rank=4, alpha=8, seed=3)
    return DPOConfig(**{**base, **kw})


def _pairs() -> list[PreferencePair]:
    user = lambda s: [{"role": "user", "content": s}]  # noqa: E731
    bot = lambda s: [{"role": "assistant", "content": s}]  # noqa: E731
    return [PreferencePair(user("What is the capital of France?"), bot("Paris."), bot("The dog sleeps in the sun."),
                           "x:1"),
            PreferencePair(user("Hello there"), bot("Hello world! How are you?"), bot("1 2 3"), "x:2"),
            PreferencePair(user("Say hi") + bot("Hi!") + user("Again?"), bot("Hello there, how are you today?"),
                           bot("No."), "x:3")]


# --------------------------------------------------------------------------- the packed row


@torch.no_grad()
def test_packed_row_scores_each_completion_as_its_own_sequence() -> None:
    """prompt | chosen | rejected in one row, the rejected positions continuing the prompt and blind to the chosen
    tokens, gives the same log-probabilities as two separate forward passes."""
    lm = make_tiny_lm()
    rows = build_preference_rows(_pairs(), lm.tokenizer, 512)
    got = sequence_logps(lm.model, collate_pairs(rows, range(len(rows)), lm.tokenizer.pad_id))
    want = []
    for side in ("chosen", "rejected"):
        for r in rows:
            ids = r.prompt + getattr(r, side)
            labels = [IGNORE_INDEX] * len(r.prompt) + getattr(r, f"{side}_labels")
            lp = lm.model(torch.tensor([ids]))[0].float().log_softmax(-1)
            want.append(sum(float(lp[i - 1, ids[i]]) for i in range(1, len(ids)) if labels[i] != IGNORE_INDEX))
    assert torch.allclose(got, torch.tensor(want), atol=1e-4, rtol=1e-5), (got, want)
    # The multi-turn prompt's own assistant reply carries no loss; each completion's end-of-turn token does.
    r = rows[2]
    assert lm.tokenizer.decode([t for t, y in zip(r.chosen, r.chosen_labels) if y != IGNORE_INDEX]) == \
        "Hello there, how are you today?<|im_end|>"
    assert lm.tokenizer.decode(r.prompt).endswith("Again?<|im_end|>\n<|im_start|>assistant\n")


# --------------------------------------------------------------------------- against TRL


def _trl_trainer(loss: str, beta: float, label_smoothing: float, tmp_path: Path, n: int = 4):
    trl = pytest.importorskip("trl")
    peft = pytest.importorskip("peft")
    datasets = pytest.importorskip("datasets")
    import transformers
    from tokenizers import Tokenizer as HFTokenizer

    lm = make_tiny_lm()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=HFTokenizer.from_str(_tiny_tokenizer_json()),
                                               eos_token="<|im_end|>", pad_token="<|im_end|>", bos_token="<|im_start|>")
    tok.chat_template = CHATML
    data = [{"prompt": [{"role": "user", "content": f"What is {i} plus {3 * i}?"}],
             "chosen": [{"role": "assistant", "content": f"It is {4 * i}." + " Yes." * i}],
             "rejected": [{"role": "assistant", "content": "Hello world, the fox." if i % 2 else "No"}]}
            for i in range(n)]
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=n, beta=beta, loss_type=[loss],
                         label_smoothing=label_smoothing, report_to=[], use_cpu=True, bf16=False, max_length=None,
                         precompute_ref_log_probs=False, dataloader_num_workers=0, seed=0)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(ALL_LINEAR), lora_dropout=0.0, task_type="CAUSAL_LM")
    trainer = trl.DPOTrainer(model=hf_twin(lm), ref_model=None, args=args, processing_class=tok, peft_config=lora,
                             train_dataset=datasets.Dataset.from_list(data))
    # Non-zero A and B on both sides, so that the policy differs from the reference and every gradient is live.
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for name, p in trainer.model.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            mod, ab = name.removeprefix("base_model.model.").split(".lora_")
            tensors[f"{mod}.lora_{ab[0]}.weight"] = p.detach().clone()
    return trainer, lm, tensors


@pytest.mark.parametrize("loss,beta,eps", [("sigmoid", 0.1, 0.0), ("ipo", 0.5, 0.0), ("hinge", 0.3, 0.0),
                                           ("robust", 0.1, 0.2)])
def test_loss_rewards_and_gradients_match_trl(loss, beta, eps, tmp_path) -> None:
    trainer, lm, tensors = _trl_trainer(loss, beta, eps, tmp_path)
    n = len(trainer.train_dataset)
    examples = [trainer.train_dataset[i] for i in range(n)]
    trainer.model.train()
    trl_loss = trainer.compute_loss(trainer.model, trainer.data_collator(examples))
    trl_loss.backward()
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    trl_grads = {}
    for name, p in trainer.model.named_parameters():
        if p.grad is not None:
            mod, ab = name.removeprefix("base_model.model.").split(".lora_")
            trl_grads[f"{mod}.lora_{ab[0]}"] = p.grad

    # nomoat on the same token ids (TRL's completion mask scores every completion token), weights and batch.
    rows = [PreferenceRow(e["prompt_ids"], e["chosen_ids"], e["chosen_ids"], e["rejected_ids"], e["rejected_ids"],
                          f"trl:{i}") for i, e in enumerate(examples)]
    cfg = LoraConfig(r=4, alpha=8, targets=list(ALL_LINEAR))
    scales = {m: cfg.scale_for(m) for m in {k.rsplit(".", 2)[0] for k in tensors}}
    load_adapter_weights(lm.model, tensors, scales, name="default")
    mark_trainable(lm.model, "default")
    set_active(lm.model, {"default": 1.0})
    lm.model.train()
    objective = DPOObjective(rows, [], PreferenceLoss(loss, beta, eps), PreferenceBatches(lm.tokenizer.pad_id), n, 0,
                             reference={})
    batch = next(objective.batches(0, 0))
    ours, _ = objective.loss(lm.model, batch)
    ours.backward()
    metrics = objective.metrics()

    assert float(ours.detach()) == pytest.approx(float(trl_loss.detach()), abs=2e-5, rel=1e-5)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected"):
        assert metrics[key] == pytest.approx(trl_metrics[key], abs=2e-4, rel=1e-4), key
    assert 0 < trl_metrics["rewards/accuracies"] < 1 and abs(trl_metrics["rewards/margins"]) > 1e-3  # a live batch
    grads = {f"{m}.lora_{ab}": getattr(mod, f"lora_{ab}")["default"].grad
             for m, mod in lora_modules(lm.model) for ab in "AB"}
    assert grads.keys() == trl_grads.keys()
    for k in grads:
        assert rel_err(grads[k], trl_grads[k]) < 1e-4, (k, rel_err(grads[k], trl_grads[k]))


# --------------------------------------------------------------------------- published formulas


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


HAND = dict(chosen=[-12.0, -30.5, -4.25], rejected=[-15.0, -22.0, -9.5], n_chosen=[6, 10, 2], n_rejected=[5, 11, 4],
            ref_chosen=[-13.0, -29.0, -4.0], ref_rejected=[-14.0, -23.5, -8.0])


def _losses(spec: PreferenceLoss):
    t = {k: torch.tensor(v, dtype=torch.float64) for k, v in HAND.items()}
    return preference_loss(spec, t["chosen"], t["rejected"], t["n_chosen"], t["n_rejected"], t["ref_chosen"],
                           t["ref_rejected"])


def test_simpo_and_orpo_equal_their_published_formulas() -> None:
    rows = list(zip(*HAND.values()))
    # SimPO (Meng et al. 2024, eq. 6): -log sigma(beta/|y_w| log pi(y_w|x) - beta/|y_l| log pi(y_l|x) - gamma)
    beta, gamma = 2.0, 0.7
    terms = _losses(PreferenceLoss("simpo", beta, simpo_gamma=gamma))
    for i, (c, r, nc, nr, _, _) in enumerate(rows):
        assert float(terms.loss[i]) == pytest.approx(-math.log(_sig(beta * c / nc - beta * r / nr - gamma)), rel=1e-12)
        assert float(terms.chosen_rewards[i]) == pytest.approx(beta * c / nc)
    # ORPO (Hong et al. 2024, eqs. 4-7): L_SFT + lambda * -log sigma(log(odds(y_w) / odds(y_l))),
    # odds(y) = P(y|x) / (1 - P(y|x)), P the length-normalised likelihood, L_SFT the chosen's mean token NLL.
    lam = 0.25
    terms = _losses(PreferenceLoss("orpo", lam))
    for i, (c, r, nc, nr, _, _) in enumerate(rows):
        pc, pr = math.exp(c / nc), math.exp(r / nr)
        odds_ratio = (pc / (1 - pc)) / (pr / (1 - pr))
        assert float(terms.loss[i]) == pytest.approx(-c / nc - lam * math.log(_sig(math.log(odds_ratio))), rel=1e-10)


def test_dpo_family_equals_the_formulas_by_hand() -> None:
    rows = list(zip(*HAND.values()))
    beta, eps = 0.3, 0.1
    cases = {
        "sigmoid": lambda d, dc, dr, nc, nr: -(1 - eps) * math.log(_sig(beta * d)) - eps * math.log(_sig(-beta * d)),
        "robust": lambda d, dc, dr, nc, nr: (-(1 - eps) * math.log(_sig(beta * d)) + eps * math.log(_sig(-beta * d)))
        / (1 - 2 * eps),
        "hinge": lambda d, dc, dr, nc, nr: max(0.0, 1 - beta * d),
        "ipo": lambda d, dc, dr, nc, nr: (dc / nc - dr / nr - 1 / (2 * beta)) ** 2,
    }
    for kind, formula in cases.items():
        terms = _losses(PreferenceLoss(kind, beta, eps if kind in ("sigmoid", "robust") else 0.0))
        for i, (c, r, nc, nr, rc, rr) in enumerate(rows):
            dc, dr = c - rc, r - rr
            assert float(terms.loss[i]) == pytest.approx(formula(dc - dr, dc, dr, nc, nr), rel=1e-12), kind
            assert float(terms.chosen_rewards[i]) == pytest.approx(beta * dc)


# --------------------------------------------------------------------------- the reference


def _sft_adapter(tiny_dir: Path, out: Path) -> Path:
    """A random (non-zero) adapter on the tiny base, saved as a PEFT directory with the base's fingerprint."""
    lm = load(tiny_dir)
    cfg = LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"])
    add_adapter(lm.model, cfg, "sft")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, mod in lora_modules(lm.model):
            mod.lora_B["sft"].copy_(torch.randn(mod.lora_B["sft"].shape, generator=g) * 0.05)
    return save_adapter(lm.model, out, cfg, lm.base_model_id, {"base_fingerprint": base_fingerprint(lm)}, name="sft")


def test_reference_is_the_model_with_the_new_adapter_off(tiny_dir, pairs_file, tmp_path) -> None:
    sft = _sft_adapter(tiny_dir, tmp_path / "sft")
    lm = load(tiny_dir)
    s = train_dpo(lm, _cfg(pairs_file, tmp_path / "run", on=str(sft)))
    cached = load_file(s["preference"]["reference_cache"])["logps"]
    rows = build_preference_rows(_load(pairs_file), lm.tokenizer, 64)
    # The trained model with only its SFT adapter on gives the cached reference values exactly ...
    ref_now = reference_logps(lm.model, rows, lm.tokenizer.pad_id, 8, {"on": 1.0})
    assert torch.equal(ref_now, cached)
    # ... and so does a fresh base with the SFT adapter alone: training changed nothing the reference uses,
    fresh = load(tiny_dir)
    load_adapter(fresh, sft, name="on")
    assert torch.allclose(reference_logps(fresh.model, rows, fresh.tokenizer.pad_id, 8, {"on": 1.0}), cached,
                          atol=1e-5)
    # while switching the new adapter on changes the log-probabilities (that is the policy),
    policy = reference_logps(lm.model, rows, lm.tokenizer.pad_id, 8, {"on": 1.0, "default": 1.0})
    assert (policy - cached).abs().max() > 0.1
    # and the reference is not the bare base either.
    bare = reference_logps(lm.model, rows, lm.tokenizer.pad_id, 8, {})
    assert (bare - cached).abs().max() > 1e-3
    meta = json.loads((tmp_path / "run" / "nomoat_adapter.json").read_text())
    assert meta["preference"]["reference"] == "base + adapter" and meta["stack_on"]["path"] == str(sft.resolve())
    assert meta["parents"][0]["relation"] == "dpo-on" and meta["parents"][0]["digest"] == meta["stack_on"]["digest"]


def _load(path: Path) -> list[PreferencePair]:
    from nomoat.data.preference import load_pairs

    return load_pairs(path)


def test_precomputed_equals_recomputed_and_the_cache_is_reused(tiny_dir, pairs_file, tmp_path) -> None:
    messages: list[str] = []
    a = train_dpo(load(tiny_dir), _cfg(pairs_file, tmp_path / "pre"), on_message=messages.append)
    assert any("computed in" in m for m in messages)
    b = train_dpo(load(tiny_dir), _cfg(pairs_file, tmp_path / "per-step", precompute=False))
    log = lambda d: json.loads((d / "training_log.json").read_text())["history"]  # noqa: E731
    la, lb = log(tmp_path / "pre"), log(tmp_path / "per-step")
    for key in ("loss", "rewards/margins", "val_loss", "val_rewards/margins", "logps/chosen"):
        assert [h.get(key) for h in la] == pytest.approx([h.get(key) for h in lb], abs=1e-4), key
    assert b["preference"]["reference_logps"] == "per step" and b["preference"]["reference_cache"] is None
    # A second run on the same base, data and reference reads the cache; another reference does not.
    messages.clear()
    c = train_dpo(load(tiny_dir), _cfg(pairs_file, tmp_path / "again", loss="ipo"), on_message=messages.append)
    assert any("from the cache" in m for m in messages) and c["preference"]["reference_cache"] == \
        a["preference"]["reference_cache"]
    messages.clear()
    train_dpo(load(tiny_dir), _cfg(pairs_file, tmp_path / "on", on=str(_sft_adapter(tiny_dir, tmp_path / "sft"))),
              on_message=messages.append)
    assert not any("from the cache" in m for m in messages)


def test_reference_free_losses_need_no_reference(tiny_dir, pairs_file, tmp_path) -> None:
    messages: list[str] = []
    s = train_dpo(load(tiny_dir), _cfg(pairs_file, tmp_path / "simpo", loss="simpo"), on_message=messages.append)
    assert not any("reference log-probabilities" in m for m in messages)
    assert s["preference"]["reference"] is None and s["preference"]["beta"] == 2.0
    assert s["final_metrics"]["val_rewards/accuracies"] > 0.5


# --------------------------------------------------------------------------- resume and the artifact


def test_resume_equals_uninterrupted(tiny_dir, pairs_file, tmp_path) -> None:
    kw = dict(max_steps=8, dropout=0.1, grad_accum=2)
    train_dpo(load(tiny_dir), _cfg(pairs_file, tmp_path / "full", **kw))

    def stop_at_5(info: StepInfo) -> None:
        if info.step == 5:
            raise KeyboardInterrupt

    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        train_dpo(load(tiny_dir), _cfg(pairs_file, part, **kw), on_step=stop_at_5)
    assert not (part / "adapter_model.safetensors").exists()
    s = train_dpo(load(tiny_dir), DPOConfig(data=str(pairs_file), out=str(part)), resume=True)
    assert s["steps"] == 8 and s["complete"]
    a, b = load_file(str(tmp_path / "full" / "adapter_model.safetensors")), load_file(
        str(part / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-6), k
    def log(d: Path) -> list[dict]:
        return [{k: v for k, v in h.items() if k != "seconds"}
                for h in json.loads((d / "training_log.json").read_text())["history"]]

    full_log, part_log = log(tmp_path / "full"), log(part)
    assert len(full_log) == len(part_log) == 8
    for x, y in zip(full_log, part_log):
        assert x.keys() == y.keys() and x == pytest.approx(y, abs=1e-5), (x, y)


def test_combined_adapter_equals_the_stack(tiny_dir, pairs_file, tmp_path) -> None:
    sft = _sft_adapter(tiny_dir, tmp_path / "sft")
    train_dpo(load(tiny_dir), _cfg(pairs_file, tmp_path / "stacked", on=str(sft)))
    train_dpo(load(tiny_dir), _cfg(pairs_file, tmp_path / "combined", on=str(sft), combine=True))
    ids = torch.tensor([[1, 17, 42, 99, 7, 250, 3, 64]])
    stacked = load(tiny_dir)
    load_adapter(stacked, sft)
    load_adapter(stacked, tmp_path / "stacked")
    one = load(tiny_dir)
    load_adapter(one, tmp_path / "combined")
    with torch.no_grad():
        assert rel_err(one.model(ids), stacked.model(ids)) < 1e-5
        assert rel_err(stacked.model(ids), load(tiny_dir).model(ids)) > 1e-3


def test_command_writes_the_adapter_its_provenance_and_plots(tiny_dir, pairs_file, tmp_path, monkeypatch,
                                                             capsys) -> None:
    out = tmp_path / "cli"
    code, _, err = run_cli(["dpo", "--model", str(tiny_dir), "--data", str(pairs_file), "--out", str(out),
                            "--max-steps", "4", "--batch-size", "4", "--lr", "5e-3", "--seq-len", "64",
                            "--loss", "hinge", "--beta", "0.2", "--rank", "4"], monkeypatch, capsys)
    assert code in (0, None), err
    assert "acc " in err and "pairs/s" in err and "held-out pairs: reward accuracy" in err
    meta = json.loads((out / "nomoat_adapter.json").read_text())
    assert meta["objective"] == "preference" and meta["data_sha256"]
    assert meta["preference"]["loss"] == "hinge" and meta["preference"]["beta"] == 0.2
    assert meta["preference"]["reference"] == "base" and meta["preference"]["reference_logps"] == "precomputed"
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    hist = json.loads((out / "training_log.json").read_text())["history"]
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected"} <= hist[-1].keys() and "val_rewards/accuracies" in hist[-1]
    for png in ("loss_curve.png", "reward_curves.png"):
        assert (out / png).stat().st_size > 1000
    # The adapter is an ordinary one: it loads (fingerprint checked) and changes the output.
    lm = load(tiny_dir)
    load_adapter(lm, out)


@pytest.mark.parametrize("args,mentions", [
    (["--loss", "kto"], ["--loss", "kto"]),
    (["--label-smoothing", "0.6", "--loss", "robust"], ["--label-smoothing", "robust"]),
    (["--label-smoothing", "0.1", "--loss", "hinge"], ["--label-smoothing", "hinge"]),
    (["--combine"], ["--combine", "--on"]),
    (["--beta", "0"], ["--beta"]),
    (["--format", "csv"], ["--format", "csv"]),
])
def test_bad_settings_are_one_line_errors(args, mentions, tiny_dir, pairs_file, tmp_path, monkeypatch,
                                          capsys) -> None:
    code, _, err = run_cli(["dpo", "--model", str(tiny_dir), "--data", str(pairs_file), "--out",
                            str(tmp_path / "x"), *args], monkeypatch, capsys)
    assert_one_line_error(code, err, *mentions)
    assert not (tmp_path / "x").exists()


def test_on_adapter_of_another_base_is_refused_before_anything_is_written(tiny_dir, pairs_file, tmp_path) -> None:
    sft = _sft_adapter(tiny_dir, tmp_path / "sft")
    other = convert_to_hf(make_tiny_lm(seed=1), tmp_path / "other-base")
    with pytest.raises(NomoatError, match="trained on base"):
        train_dpo(load(other), _cfg(pairs_file, tmp_path / "run", on=str(sft)))
    assert not (tmp_path / "run").exists()


def test_bad_data_is_a_file_line_error(tiny_dir, tmp_path, monkeypatch, capsys) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": 3, "rejected": "c"}\n')
    code, _, err = run_cli(["dpo", "--model", str(tiny_dir), "--data", str(bad), "--out", str(tmp_path / "x")],
                           monkeypatch, capsys)
    assert_one_line_error(code, err, f"{bad}:2", '"chosen"')
    assert not (tmp_path / "x").exists()
    with pytest.raises(NomoatError, match="no such"):
        train_dpo(make_tiny_lm(), DPOConfig(data=str(tmp_path / "none.jsonl"), out=str(tmp_path / "y")))


def test_arena_database_votes_become_pairs(tmp_path) -> None:
    from nomoat.eval.arena_store import ArenaStore
    from nomoat.train.dpo import data_digest, load_preference_pairs

    db = tmp_path / "arena.sqlite"
    q = [{"role": "user", "content": "Capital of France?"}]

    def battle(store: ArenaStore, vote: str, a: str, b: str) -> None:
        bid = store.create("smollm2", "sft", {}, {"sft": {"weight": 1.0}}, "smollm2", None)
        store.save_turn(bid, q + [{"role": "assistant", "content": a}], q + [{"role": "assistant", "content": b}], 1)
        store.vote(bid, vote, "voter-1")

    with ArenaStore(db) as store:
        battle(store, "a", "Paris.", "Lyon?")
        battle(store, "tie", "Paris.", "Paris!")
        battle(store, "b", "I don't know.", "Paris.")
        before = data_digest(db)
        battle(store, "bothbad", "Rome.", "Berlin.")
        assert data_digest(db) != before  # the votes count, wherever SQLite keeps them
    skipped: list[str] = []
    pairs = load_preference_pairs(db, skipped=skipped)
    assert [(p.prompt, p.chosen[0]["content"], p.rejected[0]["content"]) for p in pairs] == [
        (q, "Paris.", "Lyon?"), (q, "Paris.", "I don't know.")]
    assert len(skipped) == 2
    with pytest.raises(NomoatError, match="--lang"):
        load_preference_pairs(db, langs=["en"])
    with pytest.raises(NomoatError, match="not --format oasst"):
        load_preference_pairs(db, "oasst")


# --------------------------------------------------------------------------- the default model


@pytest.mark.slow
def test_short_run_on_the_default_model_learns_the_preference(default_model_file, tmp_path) -> None:
    """The preference: a date answered in ISO 8601 form and nothing else (the base mostly writes a sentence). The
    base's own answers that miss it are rejected, the right ISO date chosen. Ten steps lift held-out reward
    accuracy above chance and the share of held-out answers in that form above the base's."""
    import re

    from nomoat.api import GenerationConfig, generate
    from nomoat.skills import date_examples

    lm = load(default_model_file, dtype="bfloat16")
    ex = date_examples(56, 12)
    gen = GenerationConfig(temperature=0, max_new_tokens=12)

    def iso(answer: str) -> bool:
        return re.fullmatch(r"\d{4}-\d{2}-\d{2}", answer.strip()) is not None

    base = generate(lm, [r["prompt"] for r in ex], gen)
    train, test = ex[:36], ex[36:]
    pairs = [{"prompt": r["prompt"], "chosen": r["expected"], "rejected": a.strip().splitlines()[0]}
             for r, a in zip(train, base) if not iso(a)]
    data = tmp_path / "dates.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    s = train_dpo(lm, DPOConfig(data=str(data), out=str(tmp_path / "run"), max_steps=10, batch_size=4, lr=2e-4,
                                val_fraction=0.25, eval_every=10))
    assert s["final_metrics"]["val_rewards/accuracies"] > 0.5 and s["final_metrics"]["val_rewards/margins"] > 0
    after = generate(lm, [r["prompt"] for r in test], gen)
    assert sum(map(iso, after)) > sum(map(iso, base[36:])), (base[36:], after)
