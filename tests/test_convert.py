"""`nomoat convert --to hf`: transformers and nomoat load the result and agree with the source."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import hf_twin, rel_err
from safetensors.torch import load_file
from typer.testing import CliRunner

from nomoat.api import convert_to_hf
from nomoat.cli import app
from nomoat.errors import NomoatError
from nomoat.formats import hf as hf_format
from nomoat.runtime.loading import load

TEXTS = ["The capital of France is", "def f(x):\n    return x  *  2\n", "数学 🎉 12345 and 3.14159",
         "<|im_start|>user\nhi<|im_end|>\n"]


def _ids(lm) -> torch.Tensor:
    return torch.tensor([lm.tokenizer.encode("Once upon a time, 12345 and 3.14159 ducks")])


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def hf_dir(default_lm, tmp_path_factory) -> Path:
    return convert_to_hf(default_lm, tmp_path_factory.mktemp("convert") / "smollm2-hf")


@pytest.mark.slow
@torch.inference_mode()
def test_transformers_loads_converted_default(default_lm, hf_dir) -> None:
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    x = _ids(default_lm)
    assert rel_err(hf(x).logits, default_lm.model(x)) < 1e-6
    for text in TEXTS:
        assert tok(text, add_special_tokens=False).input_ids == default_lm.tokenizer.encode(text)
    assert (tok.bos_token_id, tok.eos_token_id) == (default_lm.tokenizer.bos_id, default_lm.tokenizer.eos_id)
    messages = [{"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        default_lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)


@pytest.mark.slow
@torch.inference_mode()
def test_nomoat_loads_converted_default(default_lm, hf_dir) -> None:
    back = load(hf_dir)
    assert back.source_format == "hf"
    x = _ids(default_lm)
    assert torch.equal(back.model(x), default_lm.model(x))
    a, b = back.config.as_dict(), default_lm.config.as_dict()
    for k in ("name", "extra"):
        a.pop(k), b.pop(k)
    assert a == b
    for text in TEXTS:
        assert back.tokenizer.encode(text) == default_lm.tokenizer.encode(text)
    assert back.tokenizer.chat_template == default_lm.tokenizer.chat_template
    assert (back.tokenizer.bos_id, back.tokenizer.eos_id, back.tokenizer.add_bos) == \
        (default_lm.tokenizer.bos_id, default_lm.tokenizer.eos_id, default_lm.tokenizer.add_bos)
    assert back.tokenizer.stop_ids == default_lm.tokenizer.stop_ids


@pytest.mark.slow
def test_cli_convert_writes_the_same_tensors(hf_dir, tmp_path) -> None:
    out = tmp_path / "cli-bf16"
    res = CliRunner().invoke(app, ["convert", "--to", "hf", "--out", str(out), "--dtype", "bfloat16"])
    assert res.exit_code == 0, res.output
    ref, got = _tensors(hf_dir), _tensors(out)
    assert got.keys() == ref.keys() and "lm_head.weight" not in got  # tied: written once
    for k, v in ref.items():
        assert got[k].dtype == torch.bfloat16 and torch.equal(got[k], v.to(torch.bfloat16)), k
    cfg, ref_cfg = json.loads((out / "config.json").read_text()), json.loads((hf_dir / "config.json").read_text())
    assert cfg.pop("torch_dtype") == "bfloat16"
    ref_cfg.pop("torch_dtype")
    assert cfg == ref_cfg
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / f).read_text() == (hf_dir / f).read_text()


@pytest.mark.parametrize("tie", [True, False])
@torch.inference_mode()
def test_sharded_round_trip(tiny_model, tmp_path, monkeypatch, tie: bool) -> None:
    import transformers

    lm = tiny_model(seed=3, tie=tie)
    monkeypatch.setattr(hf_format, "SHARD_BYTES", 40_000)
    out = convert_to_hf(lm, tmp_path / "tiny")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert ("lm_head.weight" in index["weight_map"]) != tie
    x = torch.randint(0, lm.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    ref = lm.model(x)
    assert torch.equal(load(out).model(x), ref)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert rel_err(hf(x).logits, ref) < 1e-6
    assert rel_err(hf_twin(lm)(x).logits, ref) < 1e-6


def test_convert_refuses_a_non_empty_directory(tiny_model, tmp_path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(NomoatError, match="not empty"):
        convert_to_hf(tiny_model(), tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
