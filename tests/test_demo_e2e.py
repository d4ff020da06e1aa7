"""The whole fine-tuning story on the real default model: `nomoat demo` teaches a skill, PEFT reads the result.

One slow run (~3 minutes on one core): 30 LoRA steps on date -> ISO 8601 conversion, accuracy before and
after on held-out prompts, the adapter loaded by Hugging Face PEFT onto transformers' own GGUF loading of
the same base with the same logits, and the fine-tuned model ending its answers with <|im_end|>.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

import pytest
import torch
from conftest import rel_err

from nomoat.adapters import load_adapter
from nomoat.api import prompt_ids
from nomoat.demo import run_demo
from nomoat.eval import load_task
from nomoat.lora import strip_lora
from nomoat.runtime.generate import GenerationConfig, generate_batch

pytestmark = pytest.mark.slow
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo")
    mp = pytest.MonkeyPatch()
    mp.setenv("NOMOAT_CACHE", str(out / "cache"))
    try:
        result = run_demo(out, steps=30)
    finally:
        mp.undo()
    return out, result


def test_demo_learns_the_skill(demo_run) -> None:
    out, r = demo_run
    assert r["steps"] == 30
    assert r["accuracy_after"] > r["accuracy_before"] + 0.3, r
    assert json.loads((out / "demo_result.json").read_text()) == r
    assert r["adapter_bytes"] < 0.15 * r["base_bytes"]


@torch.no_grad()
def test_demo_adapter_in_peft_and_stops(demo_run, default_lm, hf_ref, caplog, monkeypatch) -> None:
    peft = pytest.importorskip("peft")
    out, r = demo_run
    adapter = Path(r["adapter"])
    monkeypatch.setenv("NOMOAT_CACHE", str(out / "cache"))
    hf, _ = hf_ref
    records = load_task(out / "data" / "test.jsonl")[:8]
    ids = [prompt_ids(default_lm, rec.prompt) for rec in records]
    pm = None
    try:
        with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
            warnings.simplefilter("always")
            pm = peft.PeftModel.from_pretrained(hf, str(adapter)).eval()
            res = pm.load_adapter(str(adapter), adapter_name="again")
        messages = [str(w.message) for w in caught] + [rec.getMessage() for rec in caplog.records]
        assert not [m for m in messages if "missing" in m.lower() or "unexpected" in m.lower()], messages
        assert not res.unexpected_keys and not [k for k in res.missing_keys if ".again." in k]
        pm.set_adapter("default")

        x = torch.tensor([ids[0]])
        base = default_lm.model(x)
        load_adapter(default_lm, adapter)  # float32 nomoat; the recorded base fingerprint matches
        ours, ref = default_lm.model(x), pm(x).logits
        assert rel_err(ours, ref) < 1e-3
        assert rel_err(ref, base) > 1e-2  # and the adapter does change the model

        cfg = GenerationConfig(max_new_tokens=32, temperature=0.0)
        outs = generate_batch(default_lm.model, default_lm.tokenizer, ids, cfg)
        end = default_lm.tokenizer.encode("<|im_end|>")
        assert len(end) == 1 and end[0] in default_lm.tokenizer.stop_ids
        for prompt, rec, o in zip(ids, records, outs):
            assert o.stats.finish_reason == "stop" and o.stats.generated_tokens <= 16, (rec.prompt, o.text)
            # What ended the answer is <|im_end|> itself: the greedy next token after the answer.
            nxt = default_lm.model(torch.tensor([prompt + o.token_ids]), last_only=True)[0, -1].argmax()
            assert int(nxt) == end[0], (rec.prompt, o.text)
    finally:
        strip_lora(default_lm.model)
        if pm is not None:
            pm.unload()
