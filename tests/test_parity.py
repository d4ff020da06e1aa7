"""The default model against transformers' own GGUF loading: logits, greedy generation, batching."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err

from nomoat.api import prompt_ids
from nomoat.runtime.generate import GenerationConfig, generate_batch, stream

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Once upon a time, in a land far, far away, there lived a",
    "日本の首都は東京です。中国的首都是",
]
CHATS = ["What is 2 + 2?", "Write a haiku about the sea."]
GREEDY = GenerationConfig(max_new_tokens=32, temperature=0.0)


def _rows(default_lm) -> list[list[int]]:
    raw = [default_lm.tokenizer.encode(p) for p in PROMPTS]
    chat = [prompt_ids(default_lm, c) for c in CHATS]
    g = torch.Generator().manual_seed(0)
    rand = [torch.randint(0, default_lm.config.vocab_size, (n,), generator=g).tolist() for n in (1, 37, 300)]
    return raw + chat + rand


@torch.inference_mode()
def test_logits_match_transformers(default_lm, hf_ref) -> None:
    hf, _ = hf_ref
    for ids in _rows(default_lm):
        x = torch.tensor([ids])
        ours, ref = default_lm.model(x), hf(x).logits
        assert ours.shape == ref.shape
        per_pos = [rel_err(ours[0, t], ref[0, t]) for t in range(len(ids))]
        assert max(per_pos) < 1e-4, (ids[:8], max(per_pos))


def _hf_greedy(hf, ids: list[int], n: int, eos: list[int]) -> list[int]:
    out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                      max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=eos[0])
    new = out[0, len(ids):].tolist()
    return new[:-1] if new and new[-1] in eos else new


@pytest.fixture(scope="module")
def singles(default_lm):
    """Greedy completions of the first six rows, one prompt at a time."""
    tok = default_lm.tokenizer
    rows = _rows(default_lm)[:6]
    return rows, [generate_batch(default_lm.model, tok, [ids], GREEDY)[0] for ids in rows]


@torch.inference_mode()
def test_greedy_generation_matches_transformers(default_lm, hf_ref, singles) -> None:
    hf, _ = hf_ref
    tok = default_lm.tokenizer
    eos = sorted(tok.stop_ids)
    for ids, done in zip(*singles):
        assert done.token_ids == _hf_greedy(hf, ids, 32, eos), ids[:8]
        # The raw prompts are free text: they run to the length limit, so all 32 tokens were compared.
        if done.stats.finish_reason == "length":
            assert len(done.token_ids) == 32
    assert sum(d.stats.finish_reason == "length" for d in singles[1]) >= 3
    # Streaming gives the same text as the batch path.
    ids, done = singles[0][0], singles[1][0]
    assert "".join(stream(default_lm.model, tok, ids, GREEDY)) == done.text


@torch.inference_mode()
def test_batched_padded_generation_equals_one_at_a_time(default_lm, singles) -> None:
    rows, ones = singles
    assert len({len(r) for r in rows}) > 1  # the batch really is padded
    batch = generate_batch(default_lm.model, default_lm.tokenizer, rows, GREEDY)
    for b, one in zip(batch, ones):
        assert b.token_ids == one.token_ids
        assert b.text == one.text
        assert b.stats.finish_reason == one.stats.finish_reason


@torch.inference_mode()
def test_padded_batch_logits_equal_unpadded(default_lm) -> None:
    tok = default_lm.tokenizer
    rows = [tok.encode(p) for p in PROMPTS]
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), tok.pad_id)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = torch.tensor(r)
        mask[i, T - len(r):] = True
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    padded = default_lm.model(ids, position_ids=pos, attention_mask=mask)
    for i, r in enumerate(rows):
        alone = default_lm.model(torch.tensor([r]))[0]
        assert rel_err(padded[i, T - len(r):], alone) < 1e-5
