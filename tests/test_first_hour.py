"""Traps a new user met in the first hour, each pinned: adapter names from paths with dots, run lengths chosen
by data size, progress in logs, a usable base id in adapter_config.json, and what convert and info say."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import make_tiny_lm, write_tiny_gguf
from test_adapter_ops import random_adapter
from test_bad_input import run_cli

from nomoat.adapters import convert_adapter
from nomoat.api import convert_to_hf, load_with_adapters
from nomoat.formats.peft import write_peft_dir
from nomoat.lora import LoraConfig, active_weights
from nomoat.runtime.loading import DEFAULT_MODEL_REPO, base_model_id, open_checkpoint
from nomoat.serve import create_app
from nomoat.skills import date_examples
from nomoat.train.sft import MIN_STEPS, TrainConfig


@pytest.fixture(scope="module")
def dotted(tmp_path_factory) -> dict[str, Path]:
    """A tiny GGUF model, a PEFT adapter in a directory whose name has dots, and the same as a GGUF adapter."""
    d = tmp_path_factory.mktemp("dots")
    lm = make_tiny_lm()
    model = write_tiny_gguf(lm, d / "tiny.v1.gguf")
    cfg = LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"])
    tensors, _ = random_adapter(cfg, lm.config, seed=5)
    peft = write_peft_dir(d / "adapter.v2", cfg, tensors, "tiny", {})
    gguf = convert_adapter(peft, "gguf", d / "x.gguf", lm.config)
    tasks = d / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"prompt": f"say {i}", "expected": str(i)}) + "\n" for i in range(3)))
    return {"model": model, "peft": peft, "gguf": gguf, "tasks": tasks}


@pytest.mark.parametrize("which", ["peft", "gguf"])
def test_adapter_paths_with_dots_work_in_every_command(dotted, which, monkeypatch, capsys) -> None:
    model, adapter = str(dotted["model"]), str(dotted[which])
    code, out, err = run_cli(["generate", "hello", "-m", model, "--adapter", adapter, "-n", "3", "--temperature",
                              "0"], monkeypatch, capsys)
    assert code in (0, None), err
    code, out, err = run_cli(["eval", "--data", str(dotted["tasks"]), "-m", model, "--adapter", adapter + ":0.5",
                              "-n", "2"], monkeypatch, capsys)
    assert code in (0, None) and "adapted" in out, err
    monkeypatch.setattr(sys, "stdin", open(dotted["tasks"]))  # three lines of chat input, then EOF
    code, out, err = run_cli(["chat", "-m", model, "--adapter", adapter, "-n", "2"], monkeypatch, capsys)
    assert code in (0, None), err
    # serve: the same parsing and loading as `nomoat serve --adapter ...`, then the app's model ids.
    lm = load_with_adapters(model, [adapter, f"named={adapter}:0.5"], activate=False, threads=1)
    app = create_app(lm, "tiny", {"adapter_v2" if which == "peft" else "x": 1.0, "named": 0.5})
    assert {"adapter_v2" if which == "peft" else "x", "named"} <= set(app.state.server.registry.ids())
    assert active_weights(lm.model) == {}


def test_run_length_and_learning_rate_follow_the_data_size() -> None:
    small, notes = TrainConfig(data="d", out="o").resolved(150)
    steps = -(-150 // 8) * small.epochs
    assert steps >= MIN_STEPS and small.epochs > 1 and small.lr == 5e-4 and small.eval_every <= steps // 4
    assert notes == []
    big, _ = TrainConfig(data="d", out="o").resolved(20_000)
    assert (big.epochs, big.lr) == (1.0, 2e-4)
    mine, notes = TrainConfig(data="d", out="o", epochs=1, lr=1e-3, eval_every=7).resolved(150)
    assert (mine.epochs, mine.lr, mine.eval_every) == (1, 1e-3, 7)  # what the user gives wins
    assert notes and "19 optimizer steps" in notes[0] and "--epochs" in notes[0]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return convert_to_hf(make_tiny_lm(), tmp_path_factory.mktemp("m") / "tiny")


def test_training_to_a_pipe_prints_plain_progress_and_a_real_base_id(tiny_dir, tmp_path, monkeypatch,
                                                                        capsys) -> None:
    data = tmp_path / "d.jsonl"
    rows = [{"instruction": r["prompt"].splitlines()[-1], "output": r["expected"]} for r in date_examples(40, 1)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    code, _, err = run_cli(["finetune", "--data", str(data), "--out", str(out), "-m", str(tiny_dir), "--max-steps",
                            "12", "--seq-len", "64", "--threads", "1"], monkeypatch, capsys)
    assert code in (0, None), err
    lines = err.splitlines()
    steps = [ln for ln in lines if ln.startswith("training step ")]
    assert steps[0].startswith("training step 1/12 |") and steps[-1].startswith("training step 12/12 |"), err
    assert "1 threads" in err and ("base weights float32" in err or "base weights bfloat16" in err)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny_dir.resolve())
    log = json.loads((out / "training_log.json").read_text())["summary"]
    assert log["threads"] == 1 and log["base_dtype"] in ("float32", "bfloat16", "int8")


def test_base_model_id_prefers_a_repository(tiny_dir, tmp_path) -> None:
    ck = open_checkpoint(tiny_dir)
    assert base_model_id(ck, tiny_dir) == str(tiny_dir.resolve())
    ck.raw_config["_name_or_path"] = "someorg/tiny-llama"
    assert base_model_id(ck, tiny_dir) == "someorg/tiny-llama"
    ck.raw_config["_name_or_path"] = "https://huggingface.co/someorg/tiny-llama/"
    assert base_model_id(ck, tiny_dir) == "someorg/tiny-llama"


@pytest.mark.slow
def test_default_model_names_its_repository(default_model_file) -> None:
    assert base_model_id(open_checkpoint(default_model_file), default_model_file) == DEFAULT_MODEL_REPO


@pytest.mark.slow
def test_convert_warns_when_the_file_grows_without_gaining(default_model_file, tmp_path, monkeypatch,
                                                           capsys) -> None:
    code, _, err = run_cli(["convert", "--to", "gguf", "--type", "q8_0", "--out", str(tmp_path / "m.gguf")],
                           monkeypatch, capsys)
    assert code in (0, None), err
    assert "warning:" in err and "larger than" in err and "Q4_1" in err


def test_info_prints_the_whole_path_and_names_an_unsupported_model(dotted, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("COLUMNS", "40")
    deep = tmp_path / ("a-rather-long-directory-name-" * 3)
    deep.mkdir()
    model = deep / "tiny.gguf"
    model.write_bytes(dotted["model"].read_bytes())
    code, out, err = run_cli(["info", "-m", str(model)], monkeypatch, capsys)
    assert code in (0, None), err
    assert str(model.resolve()) in out
    other = write_tiny_gguf(make_tiny_lm(), tmp_path / "other.gguf", arch="gpt2")
    code, out, err = run_cli(["info", "-m", str(other)], monkeypatch, capsys)
    assert code == 1 and "a GGUF gpt2 model" in err and "not supported" in err


def test_targets_given_as_one_comma_list() -> None:
    from nomoat.lora import resolve_targets

    assert resolve_targets(["q,v"]) == ["q_proj", "v_proj"]  # what `--targets q,v` passes
    assert resolve_targets("q, gate ,down") == ["q_proj", "gate_proj", "down_proj"]
