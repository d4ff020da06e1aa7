"""Bad input through the command line: a non-zero exit, one line on stderr naming the culprit, no traceback."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_lm, write_tiny_gguf
from safetensors.torch import load_file, save_file

from nomoat.api import convert_to_hf
from nomoat.cli import main
from nomoat.formats.hf import config_to_hf


def run_cli(args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """Run `nomoat ARGS` in-process through the real entry point; returns (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["nomoat", *args])
    with pytest.raises(SystemExit) as e:
        main()
    cap = capsys.readouterr()
    return e.value.code, cap.out, cap.err


def assert_one_line_error(code: int, err: str, *mentions: str) -> None:
    assert code not in (0, None), err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for m in mentions:
        assert m in lines[0], (m, lines[0])


def _absurd_header(path: Path) -> Path:
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1 << 40, 5) + bytes(64))
    return path


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """name -> (path, a string the error must contain)."""
    d = tmp_path_factory.mktemp("bad")
    tiny = make_tiny_lm()
    full = write_tiny_gguf(tiny, d / "full.gguf").read_bytes()
    (d / "cut.gguf").write_bytes(full[:-5000])
    (d / "text.gguf").write_text("hello, I am not a model\n")
    (d / "empty.gguf").write_bytes(b"")
    (d / "noconfig").mkdir()
    (d / "badjson").mkdir()
    (d / "badjson" / "config.json").write_text("{not json")
    (d / "pickle").mkdir()
    (d / "pickle" / "config.json").write_text(json.dumps(config_to_hf(tiny.config)))
    (d / "pickle" / "pytorch_model.bin").write_bytes(b"\x80\x04K.")
    gpt2_dir = convert_to_hf(tiny, d / "gpt2-hf")
    cfg = json.loads((gpt2_dir / "config.json").read_text())
    (gpt2_dir / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2", "architectures": ["GPT2"]}))
    extra_dir = convert_to_hf(tiny, d / "extra-hf")
    tensors = load_file(str(extra_dir / "model.safetensors"))
    save_file({**tensors, "model.layers.0.mlp.extra_proj.weight": torch.zeros(4, 4)},
              str(extra_dir / "model.safetensors"))
    extra_gguf = write_tiny_gguf(tiny, d / "extra.gguf", extra={"blk.0.attn_extra.weight": np.zeros((4, 4),
                                                                                                  np.float32)})
    return {
        "missing": (d / "no-such-model.gguf", "no such file"),
        "not-gguf": (d / "text.gguf", "not a GGUF file"),
        "empty": (d / "empty.gguf", "not a GGUF file"),
        "absurd-counts": (_absurd_header(d / "absurd.gguf"), "1099511627776 tensors"),
        "arch-gpt2": (write_tiny_gguf(tiny, d / "gpt2.gguf", arch="gpt2"), "architecture 'gpt2'"),
        "cut-tensor-data": (d / "cut.gguf", "truncated"),
        "no-config": (d / "noconfig", "config.json"),
        "bad-json": (d / "badjson", "config.json"),
        "pickle-only": (d / "pickle", "pickle"),
        "hf-gpt2": (gpt2_dir, "model_type 'gpt2'"),
        "hf-unknown-tensor": (extra_dir, "model.layers.0.mlp.extra_proj.weight"),
        "gguf-unknown-tensor": (extra_gguf, "blk.0.attn_extra.weight"),
    }


@pytest.mark.parametrize("case", ["missing", "not-gguf", "empty", "absurd-counts", "arch-gpt2",
                                  "cut-tensor-data", "no-config", "bad-json", "pickle-only", "hf-gpt2",
                                  "hf-unknown-tensor", "gguf-unknown-tensor"])
@pytest.mark.parametrize("command", ["generate", "info"])
def test_bad_model_file(bad_files, monkeypatch, capsys, case: str, command: str) -> None:
    path, why = bad_files[case]
    args = ["generate", "hi", "-m", str(path), "-n", "2"] if command == "generate" else ["info", "-m", str(path)]
    code, out, err = run_cli(args, monkeypatch, capsys)
    assert_one_line_error(code, err, path.name, why)
    assert out == ""


@pytest.mark.slow
def test_truncated_default_model(default_model_file, tmp_path, monkeypatch, capsys) -> None:
    with open(default_model_file, "rb") as f:
        (tmp_path / "trunc.gguf").write_bytes(f.read(1 << 20))
    code, out, err = run_cli(["generate", "hi", "-m", str(tmp_path / "trunc.gguf")], monkeypatch, capsys)
    assert_one_line_error(code, err, "trunc.gguf", "truncated")


def test_prompt_longer_than_context(tmp_path, monkeypatch, capsys) -> None:
    lm = make_tiny_lm(max_position_embeddings=64)
    d = convert_to_hf(lm, tmp_path / "ctx64")
    long = "hello world " * 100
    code, out, err = run_cli(["generate", long, "-m", str(d), "--raw", "-n", "4"], monkeypatch, capsys)
    assert_one_line_error(code, err, f"prompt is {len(lm.tokenizer.encode(long))} tokens", "context is 64")
    # A prompt that fits still runs.
    short = "hello world " * 4
    assert len(lm.tokenizer.encode(short)) < 64
    code, out, err = run_cli(["generate", short, "-m", str(d), "--raw", "-n", "4", "--temperature", "0"],
                             monkeypatch, capsys)
    assert code in (0, None), err


@pytest.mark.parametrize("opt,field", [(["--top-p", "2"], "top_p"), (["--temperature", "-1"], "temperature"),
                                       (["--repeat-penalty", "0"], "repetition_penalty")])
def test_bad_generation_options(monkeypatch, capsys, opt: list[str], field: str) -> None:
    code, _, err = run_cli(["generate", "hi", *opt], monkeypatch, capsys)
    assert_one_line_error(code, err, field)


def test_installed_entry_point(tmp_path) -> None:
    """The real `nomoat` executable in a fresh process: exit 1, one stderr line, nothing on stdout."""
    exe = shutil.which("nomoat", path=str(Path(sys.executable).parent))
    cmd = [exe] if exe else [sys.executable, "-c", "from nomoat.cli import main; main()"]
    path = _absurd_header(tmp_path / "absurd.gguf")
    res = subprocess.run([*cmd, "info", "--model", str(path)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and res.stdout == ""
    assert_one_line_error(res.returncode, res.stderr, str(path), "tensors")
