"""The model and generation on a tiny random LLaMA: cache, padding, RoPE scaling, GQA, sampling, GGUF layout."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import transformers
from conftest import gguf_permute, hf_twin, make_tiny_lm, rel_err, tiny_config, write_tiny_gguf
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from nomoat.api import generate, generate_stream
from nomoat.formats.gguf_read import qk_permute_rows, qk_row_order
from nomoat.formats.hf import config_to_hf
from nomoat.model import KVCache
from nomoat.model.llama import rope_inv_freq
from nomoat.runtime.generate import GenerationConfig, generate_batch
from nomoat.runtime.loading import load

GREEDY = GenerationConfig(max_new_tokens=24, temperature=0.0)
PROMPT = "The quick brown fox"
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 256}


def _rand_ids(B: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 300, (B, T), generator=torch.Generator().manual_seed(seed))


def test_tiny_model_is_deterministic() -> None:
    a, b, c = make_tiny_lm(), make_tiny_lm(), make_tiny_lm(seed=1)
    sa, sb, sc = a.model.state_dict(), b.model.state_dict(), c.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.layers.0.self_attn.q_proj.weight"], sc["model.layers.0.self_attn.q_proj.weight"])
    assert a.tokenizer.vocab_size == a.config.vocab_size == 300
    assert a.model.lm_head.weight is a.model.model.embed_tokens.weight
    assert a.tokenizer.encode("<|im_start|>user\nhi<|im_end|>")[0] == a.tokenizer.bos_id == 1


@torch.inference_mode()
@pytest.mark.parametrize("chunk", [1, 7, 30])
def test_kv_cache_decode_equals_full_forward(chunk: int) -> None:
    lm = make_tiny_lm()
    ids = _rand_ids(2, 50)
    full = lm.model(ids)
    cache = KVCache(lm.config, 2, 50)
    pieces = [lm.model(ids[:, s:s + chunk], cache=cache) for s in range(0, 50, chunk)]
    assert cache.pos == 50
    assert rel_err(torch.cat(pieces, 1), full) < 1e-5


@torch.inference_mode()
def test_left_padded_batch_equals_unpadded() -> None:
    lm = make_tiny_lm()
    rows = [_rand_ids(1, n, seed=n)[0].tolist() for n in (5, 17, 12)]
    T = max(map(len, rows))
    ids = torch.full((3, T), lm.tokenizer.pad_id)
    mask = torch.zeros(3, T, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, T - len(r):], mask[i, T - len(r):] = torch.tensor(r), True
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    padded = lm.model(ids, position_ids=pos, attention_mask=mask)
    assert torch.isfinite(padded).all()
    for i, r in enumerate(rows):
        assert rel_err(padded[i, T - len(r):], lm.model(torch.tensor([r]))[0]) < 1e-5
    # And through generation: one padded batch gives what each prompt gives alone.
    batch = generate_batch(lm.model, lm.tokenizer, rows, GREEDY)
    for r, b in zip(rows, batch):
        assert b.token_ids == generate_batch(lm.model, lm.tokenizer, [r], GREEDY)[0].token_ids


def _hf_inv_freq(cfg, kind: str) -> torch.Tensor:
    return ROPE_INIT_FUNCTIONS[kind](transformers.LlamaConfig(**config_to_hf(cfg)), "cpu")[0]


@pytest.mark.parametrize("hidden,heads,theta,scaling", [
    (64, 4, 10000.0, LLAMA3),  # head_dim 16: high, medium and low frequency bands all present
    (4096, 32, 500000.0, {**LLAMA3, "original_max_position_embeddings": 8192}),  # Llama 3.1 8B
])
def test_llama3_rope_matches_transformers(hidden: int, heads: int, theta: float, scaling: dict) -> None:
    cfg = tiny_config(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=heads,
                      rope_theta=theta, rope_scaling=scaling)
    ref = _hf_inv_freq(cfg, "llama3")
    torch.testing.assert_close(rope_inv_freq(cfg), ref, rtol=1e-6, atol=0)
    plain = rope_inv_freq(tiny_config(hidden_size=hidden, num_attention_heads=heads,
                                      num_key_value_heads=heads, rope_theta=theta))
    assert (rope_inv_freq(cfg) < plain).any() and (rope_inv_freq(cfg) == plain).any()
    # GGUF stores the same scaling as per-frequency divisors (llama.cpp convert_hf_to_gguf.py's rope_freqs).
    factors = []
    lo = scaling["original_max_position_embeddings"] / scaling["low_freq_factor"]
    hi = scaling["original_max_position_embeddings"] / scaling["high_freq_factor"]
    for f in plain.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < hi:
            factors.append(1.0)
        elif wavelen > lo:
            factors.append(scaling["factor"])
        else:
            smooth = (scaling["original_max_position_embeddings"] / wavelen - scaling["low_freq_factor"]) / (
                scaling["high_freq_factor"] - scaling["low_freq_factor"])
            factors.append(1 / ((1 - smooth) / scaling["factor"] + smooth))
    gguf_cfg = tiny_config(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=heads,
                           rope_theta=theta)
    gguf_cfg.extra["rope_freq_factors"] = factors
    torch.testing.assert_close(rope_inv_freq(gguf_cfg), ref, rtol=1e-5, atol=0)


def test_linear_rope_matches_transformers() -> None:
    cfg = tiny_config(rope_scaling={"rope_type": "linear", "factor": 4.0})
    torch.testing.assert_close(rope_inv_freq(cfg), _hf_inv_freq(cfg, "linear"), rtol=1e-6, atol=0)


@torch.inference_mode()
@pytest.mark.parametrize("kw", [
    {},  # GQA 4 heads / 2 KV heads, tied
    {"tie": False},  # untied head
    {"num_key_value_heads": 4},  # plain multi-head
    {"num_key_value_heads": 1, "tie": False},  # multi-query
    {"rope_scaling": LLAMA3, "max_position_embeddings": 1024},
    {"head_dim": 32},  # head_dim * heads != hidden
], ids=["gqa", "untied", "mha", "mqa", "llama3-rope", "head-dim"])
def test_logits_and_greedy_match_transformers(kw: dict) -> None:
    lm = make_tiny_lm(seed=6, **kw)
    hf = hf_twin(lm)
    ids = _rand_ids(2, 300 if "rope_scaling" in kw else 60)
    assert rel_err(lm.model(ids), hf(ids).logits) < 1e-5
    prompt = lm.tokenizer.encode(PROMPT)
    [ours] = generate_batch(lm.model, lm.tokenizer, [prompt], GREEDY)
    assert len(ours.token_ids) == 24  # no early stop: the whole decode path is compared
    stops = sorted(lm.tokenizer.stop_ids)
    ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                      max_new_tokens=24, do_sample=False, eos_token_id=stops, pad_token_id=stops[0])
    ref = ref[0, len(prompt):].tolist()
    assert ours.token_ids == (ref[:-1] if ref[-1] in stops else ref)


def test_sampling_with_a_seed_is_reproducible() -> None:
    lm = make_tiny_lm()
    cfg = GenerationConfig(max_new_tokens=40, temperature=1.0, top_k=0, top_p=1.0, seed=7)
    a, b = generate(lm, PROMPT, cfg, raw=True), generate(lm, PROMPT, cfg, raw=True)
    assert a == b
    assert "".join(generate_stream(lm, PROMPT, cfg, raw=True)) == a
    other = generate(lm, PROMPT, GenerationConfig(max_new_tokens=40, temperature=1.0, top_k=0, seed=8), raw=True)
    assert other != a
    batch = generate(lm, [PROMPT, "Hello"], cfg, raw=True)
    assert batch == generate(lm, [PROMPT, "Hello"], cfg, raw=True)


def test_top_k_1_and_tiny_top_p_equal_greedy() -> None:
    lm = make_tiny_lm()
    greedy = generate(lm, PROMPT, GREEDY, raw=True)
    for cfg in (GenerationConfig(max_new_tokens=24, temperature=1.5, top_k=1, seed=3),
                GenerationConfig(max_new_tokens=24, temperature=1.5, top_k=0, top_p=1e-6, seed=3)):
        assert generate(lm, PROMPT, cfg, raw=True) == greedy


def test_stop_strings_cut_the_text() -> None:
    lm = make_tiny_lm(seed=2)
    cfg = GenerationConfig(max_new_tokens=40, temperature=1.0, seed=11)
    full = generate(lm, PROMPT, cfg, raw=True)
    assert len(full) > 10
    stop = full[len(full) // 2:len(full) // 2 + 2]
    want = full[:full.find(stop)]
    cut = GenerationConfig(max_new_tokens=40, temperature=1.0, seed=11, stop=(stop, "never seen"))
    assert generate(lm, PROMPT, cut, raw=True) == want
    assert "".join(generate_stream(lm, PROMPT, cut, raw=True)) == want
    assert generate(lm, [PROMPT], cut, raw=True) == [want]
    [c] = generate_batch(lm.model, lm.tokenizer, [lm.tokenizer.encode(PROMPT)], cut)
    assert c.stats.finish_reason == "stop"


@torch.inference_mode()
def test_repetition_penalty_changes_outputs_like_transformers() -> None:
    lm = make_tiny_lm()
    prompt = lm.tokenizer.encode(PROMPT)
    plain = generate_batch(lm.model, lm.tokenizer, [prompt], GREEDY)[0].token_ids
    cfg = GenerationConfig(max_new_tokens=24, temperature=0.0, repetition_penalty=1.8)
    penalised = generate_batch(lm.model, lm.tokenizer, [prompt], cfg)[0].token_ids
    assert penalised != plain
    assert len(set(penalised)) > len(set(plain))
    stops = sorted(lm.tokenizer.stop_ids)
    ref = hf_twin(lm).generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                               max_new_tokens=24, do_sample=False, repetition_penalty=1.8,
                               eos_token_id=stops, pad_token_id=stops[0])[0, len(prompt):].tolist()
    assert penalised == (ref[:-1] if ref[-1] in stops else ref)


@pytest.mark.parametrize("rows,n_head", [(64, 4), (32, 2), (576, 9), (192, 3), (16, 1)])
def test_qk_permutation(rows: int, n_head: int) -> None:
    w = np.random.default_rng(0).standard_normal((rows, 8)).astype(np.float32)
    to_gguf, to_hf = qk_permute_rows(rows, n_head), qk_row_order(rows, n_head)
    assert torch.equal(to_gguf[to_hf], torch.arange(rows))
    assert torch.equal(to_hf[to_gguf], torch.arange(rows))
    gguf_w = gguf_permute(w, n_head)
    np.testing.assert_array_equal(w[to_gguf.numpy()], gguf_w)
    np.testing.assert_array_equal(gguf_w[to_hf.numpy()], w)


@torch.inference_mode()
@pytest.mark.parametrize("tie", [True, False])
def test_gguf_round_trip(tmp_path, tie: bool) -> None:
    lm = make_tiny_lm(seed=4, tie=tie)
    back = load(write_tiny_gguf(lm, tmp_path / "tiny.gguf"))
    assert back.source_format == "gguf" and back.config.tie_word_embeddings == tie
    ids = _rand_ids(2, 40)
    assert torch.equal(back.model(ids), lm.model(ids))
    text = "<|im_start|>user\nHello world 12345  and\n\n 3.14<|im_end|>"
    assert back.tokenizer.encode(text) == lm.tokenizer.encode(text)
    assert back.tokenizer.stop_ids == lm.tokenizer.stop_ids
    messages = [{"role": "user", "content": "hi"}]
    assert back.tokenizer.encode_chat(messages) == lm.tokenizer.encode_chat(messages)
