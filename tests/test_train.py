"""LoRA fine-tuning on a tiny model: learning, exact resume, loss masking, refusing to clobber, bad data."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_lm
from safetensors.torch import load_file

from nomoat.api import convert_to_hf
from nomoat.cli import main
from nomoat.data import IGNORE_INDEX, Batches, Example, build_dataset
from nomoat.errors import NomoatError
from nomoat.model import causal_lm_loss
from nomoat.runtime.loading import load
from nomoat.skills import date_examples
from nomoat.train.sft import StepInfo, TrainConfig, finetune


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("NOMOAT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """The tiny random model saved as a Hugging Face directory, so that it loads like any model."""
    return convert_to_hf(make_tiny_lm(), tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = [{"instruction": r["prompt"].splitlines()[-1], "output": r["expected"]} for r in date_examples(24, 7)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data=str(data), out=str(out), max_steps=8, batch_size=4, grad_accum=1, lr=5e-3, seq_len=64,
                val_fraction=0.1, eval_every=3, save_every=2, rank=4, alpha=8, seed=3)
    return TrainConfig(**{**base, **kw})


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter_model.safetensors"))


def test_a_few_steps_lower_the_loss(tiny_dir, data_file, tmp_path) -> None:
    lm = load(tiny_dir)
    steps: list[StepInfo] = []
    s = finetune(lm, _cfg(data_file, tmp_path / "run", max_steps=15, lr=1e-2, warmup=0.0), on_step=steps.append)
    losses = [i.loss for i in steps]
    assert len(losses) == 15 and s["complete"] and s["steps"] == 15
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    assert s["final_val_loss"] is not None
    assert s["trainable_parameters"] == sum(t.numel() for t in _adapter(tmp_path / "run").values())


@pytest.mark.parametrize("kw", [{}, dict(dropout=0.1, grad_accum=2)], ids=["plain", "dropout-accum"])
def test_resume_equals_uninterrupted(tiny_dir, data_file, tmp_path, kw) -> None:
    # 21 training rows in batches of 4: 6 micro-batches an epoch, so both runs cross epoch boundaries.
    full = tmp_path / "full"
    finetune(load(tiny_dir), _cfg(data_file, full, **kw))

    part = tmp_path / "part"

    def stop_at_5(info: StepInfo) -> None:
        if info.step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(load(tiny_dir), _cfg(data_file, part, **kw), on_step=stop_at_5)
    assert not (part / "adapter_model.safetensors").exists()
    state = json.loads((part / "checkpoint" / "state.json").read_text())
    assert state["step"] == 5
    # A fresh process would pass only data and out; the saved settings win.
    s = finetune(load(tiny_dir), TrainConfig(data=str(data_file), out=str(part)), resume=True)
    assert s["steps"] == 8 and s["complete"]
    a, b = _adapter(full), _adapter(part)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-6), (k, (a[k] - b[k]).abs().max())  # bit-equal here
    log_a = json.loads((full / "training_log.json").read_text())["history"]
    log_b = json.loads((part / "training_log.json").read_text())["history"]
    assert [h["loss"] for h in log_a] == pytest.approx([h["loss"] for h in log_b], abs=1e-5)


def test_resume_refuses_other_data(tiny_dir, data_file, tmp_path) -> None:
    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        finetune(load(tiny_dir), _cfg(data_file, part), on_step=lambda i: (_ for _ in ()).throw(KeyboardInterrupt))
    other = tmp_path / "other.jsonl"
    other.write_text(data_file.read_text().replace("1", "2"))
    with pytest.raises(NomoatError, match="differs from the data"):
        finetune(load(tiny_dir), TrainConfig(data=str(other), out=str(part)), resume=True)
    with pytest.raises(NomoatError, match="nothing to resume"):
        finetune(load(tiny_dir), TrainConfig(data=str(data_file), out=str(tmp_path / "none")), resume=True)


@torch.no_grad()
def test_prompt_tokens_carry_no_loss() -> None:
    lm = make_tiny_lm()
    tok = lm.tokenizer
    ex = Example(messages=[{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": "What is the capital of France?"},
                           {"role": "assistant", "content": "Paris."}], text=None, source="x.jsonl:1")
    (ids, labels), = build_dataset([ex], tok, 128)
    rendered = tok.apply_chat_template(ex.messages)
    assert tok.decode(ids) == rendered
    kept = [i for i, y in zip(ids, labels) if y != IGNORE_INDEX]
    assert tok.decode(kept) == "Paris.<|im_end|>"
    first = next(i for i, y in enumerate(labels) if y != IGNORE_INDEX)
    assert tok.decode(ids[:first]).endswith("<|im_start|>assistant\n")

    # The training loss is the mean cross-entropy over exactly those positions.
    batch = Batches(tok.pad_id).collate([(ids, labels), (ids[:-3], labels[:-3])])
    h = lm.model.hidden_states(batch.input_ids)
    loss = causal_lm_loss(lm.model, h, batch.labels)
    logits = lm.model(batch.input_ids)[:, :-1]
    target = batch.labels[:, 1:]
    keep = target != IGNORE_INDEX
    assert int(keep.sum()) == len(kept) + sum(y != IGNORE_INDEX for y in labels[:-3]) == 5 + 3
    manual = F.cross_entropy(logits[keep], target[keep])
    assert torch.allclose(loss, manual, rtol=1e-5)
    # With --train-on-prompt every token is labelled, and the loss is another number.
    everything = build_dataset([ex], tok, 128, train_on_prompt=True)[0]
    assert everything[0] == ids and everything[1] == [IGNORE_INDEX, *ids[1:]]  # only the BOS goes unlabelled
    loss_all = causal_lm_loss(lm.model, h[:1], torch.tensor([everything[1]]))
    assert not torch.allclose(loss_all, causal_lm_loss(lm.model, h[:1], batch.labels[:1]))


def test_previous_run_is_refused(tiny_dir, data_file, tmp_path) -> None:
    out = tmp_path / "run"
    finetune(load(tiny_dir), _cfg(data_file, out, max_steps=2))
    first = _adapter(out)
    with pytest.raises(NomoatError, match="previous run.*--resume.*--overwrite"):
        finetune(load(tiny_dir), _cfg(data_file, out, max_steps=2))
    assert all(torch.equal(first[k], v) for k, v in _adapter(out).items())
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(NomoatError, match="already holds files"):
        finetune(load(tiny_dir), _cfg(data_file, tmp_path / "other", max_steps=2))
    s = finetune(load(tiny_dir), _cfg(data_file, out, max_steps=2, seed=9), overwrite=True)
    assert s["complete"] and not torch.equal(first["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"],
                                             _adapter(out)["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"])


BAD_DATA = {
    "bad-json": ('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n{"instruction": \n', 3),
    "no-output": ('{"instruction": "a", "output": "b"}\n\n{"instruction": "c"}\n', 3),
    "wrong-type": ('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": 7}\n', 2),
    "empty-reply": ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}\n', 1),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_malformed_data_names_file_and_line(tiny_dir, tmp_path, case: str) -> None:
    text, line = BAD_DATA[case]
    path = tmp_path / f"{case}.jsonl"
    path.write_text(text)
    lm = load(tiny_dir)
    with pytest.raises(NomoatError, match=f"{case}.jsonl:{line}: ") as e:
        finetune(lm, _cfg(path, tmp_path / "out"))
    assert "\n" not in str(e.value)
    assert not any(True for _ in lm.model.parameters() if _.requires_grad)


def _run_cli(args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["nomoat", *args])
    with pytest.raises(SystemExit) as e:
        main()
    cap = capsys.readouterr()
    return e.value.code or 0, cap.out, cap.err


def _one_line_error(code: int, err: str, *mentions: str) -> None:
    assert code != 0, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for m in mentions:
        assert m in lines[0], (m, lines[0])


def test_cli_finetune(tiny_dir, data_file, tmp_path, monkeypatch, capsys) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "outptu": "d"}\n')
    common = ["finetune", "--model", str(tiny_dir), "--seq-len", "64", "--batch-size", "4", "--dtype", "float32"]
    code, _, err = _run_cli([*common, "--data", str(bad), "--out", str(tmp_path / "o1")], monkeypatch, capsys)
    _one_line_error(code, err, "bad.jsonl:2", '"output"')
    code, _, err = _run_cli([*common, "--data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o1")],
                            monkeypatch, capsys)
    _one_line_error(code, err, "nope.jsonl")
    code, _, err = _run_cli([*common, "--data", str(data_file), "--out", str(tmp_path / "o1"), "--rank", "0"],
                            monkeypatch, capsys)
    _one_line_error(code, err, "rank")

    args = [*common, "--data", str(data_file), "--out", str(tmp_path / "ok"), "--max-steps", "2"]
    code, _, err = _run_cli(args, monkeypatch, capsys)
    assert code == 0, err
    assert (tmp_path / "ok" / "adapter_config.json").exists()
    code, _, err = _run_cli(args, monkeypatch, capsys)
    _one_line_error(code, err, str(tmp_path / "ok"), "--overwrite")
    code, _, err = _run_cli([*args, "--overwrite"], monkeypatch, capsys)
    assert code == 0, err
