"""Continuous batching: sequences that join at different steps, at different positions, with different
adapter stacks, decoded in one forward pass per step, give what each gives alone (tokens, and logits within
tolerance), on the tiny model and on the default model; the slot cache keeps rows packed as they leave."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_lm

from nomoat.lora import LoraConfig, add_adapter, lora_modules, set_active, set_row_adapters
from nomoat.model import SlotCache
from nomoat.runtime import generate as gen_mod
from nomoat.runtime.batching import BatchDecoder
from nomoat.runtime.generate import GenerationConfig, stream
from nomoat.runtime.loading import LoadedModel

STACKS = [{}, {"a": 1.0}, {"b": 0.5}, {"a": 1.0, "b": 1.0}, {"a": 0.7}]


def with_adapters(lm: LoadedModel, seed: int = 0) -> LoadedModel:
    g = torch.Generator().manual_seed(seed)
    for name, cfg in (("a", LoraConfig(r=4, alpha=8, targets="q,v")), ("b", LoraConfig(r=2, alpha=4, targets="all"))):
        add_adapter(lm.model, cfg, name=name)
        for _, mod in lora_modules(lm.model):
            if name in mod.lora_B:
                with torch.no_grad():
                    mod.lora_A[name].copy_(torch.randn(mod.lora_A[name].shape, generator=g) / mod.in_features ** .5)
                    mod.lora_B[name].copy_(0.3 * torch.randn(mod.lora_B[name].shape, generator=g))
    set_active(lm.model, {})
    return lm


class Recorder:
    """Records the logits every `Decoding` is fed, per sequence, in order."""

    def __init__(self, monkeypatch) -> None:
        self.logits: dict[int, list[torch.Tensor]] = {}
        push = gen_mod.Decoding.push

        def rec(dec, logits):
            if not hasattr(dec, "rec_key"):  # not id(): a freed sequence's id is reused
                dec.rec_key = len(self.logits)
            self.logits.setdefault(dec.rec_key, []).append(logits.detach().clone().float())
            return push(dec, logits)

        monkeypatch.setattr(gen_mod.Decoding, "push", rec)


def alone(lm: LoadedModel, ids: list[int], stack: dict[str, float], cfg: GenerationConfig, rec: Recorder):
    set_active(lm.model, stack)
    before = set(rec.logits)
    text = "".join(stream(lm.model, lm.tokenizer, ids, cfg))
    set_active(lm.model, {})
    (key,) = set(rec.logits) - before
    return text, rec.logits[key]


def batched(lm: LoadedModel, jobs: list[tuple[list[int], dict[str, float], int]], cfg: GenerationConfig,
            slots: int) -> tuple[dict[int, str], dict[int, object]]:
    """Run jobs through one BatchDecoder; job k joins at step `jobs[k][2]` (or when a slot frees)."""
    bd = BatchDecoder(lm.model, lm.tokenizer, slots)
    texts: dict[int, str] = {k: "" for k in range(len(jobs))}
    decs: dict[int, object] = {}
    waiting = list(range(len(jobs)))
    step, finished = 0, set()
    while len(finished) < len(jobs):
        for k in list(waiting):
            if jobs[k][2] <= step and bd.free:
                bd.add(k, jobs[k][0], cfg, jobs[k][1])
                decs[k] = bd.prefilling[-1].dec
                waiting.remove(k)
        for ev in bd.step():
            texts[ev.key] += "".join(ev.pieces)
            if ev.finished:
                finished.add(ev.key)
        step += 1
        assert step < 10_000
    assert len(bd) == 0 and bd.cache.capacity == 256  # emptied and shrunk back
    return texts, decs


def check_equal(lm: LoadedModel, prompts: list[list[int]], monkeypatch, slots: int, max_new: int, atol: float,
                stop: tuple[str, ...] = (), near_tie: float | None = None) -> None:
    """Batched == alone: the same text and logits within `atol` at every step. With `near_tie`, numerics that
    differ by rounding (bf16 activations) may flip a greedy choice whose top two logits lie closer than that;
    the comparison of a sequence then ends at that step (what follows is another, equally valid, sequence)."""
    rec = Recorder(monkeypatch)
    cfg = GenerationConfig(max_new_tokens=max_new, temperature=0, stop=stop)
    jobs = [(p, STACKS[k % len(STACKS)], 3 * k) for k, p in enumerate(prompts)]
    want = [alone(lm, ids, stack, cfg, rec) for ids, stack, _ in jobs]
    texts, decs = batched(lm, jobs, cfg, slots)
    for k, (text, logits) in enumerate(want):
        got = rec.logits[decs[k].rec_key]
        tied = False
        for a, b in zip(got, logits):
            torch.testing.assert_close(a, b, atol=atol, rtol=0)
            top2 = b[0].topk(2).values
            if near_tie is not None and float(top2[0] - top2[1]) < near_tie:
                tied = True
                break
            assert int(a.argmax()) == int(b.argmax()), (k, jobs[k][1])
        if not tied:
            assert texts[k] == text and len(got) == len(logits), (k, jobs[k][1])


def test_mixed_positions_and_adapters_equal_one_at_a_time(monkeypatch) -> None:
    lm = with_adapters(make_tiny_lm(seed=5, max_position_embeddings=512))
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    prompts = [torch.randint(3, 300, (int(n),), generator=g).tolist() for n in (5, 40, 1, 17, 90, 8, 600 // 8)]
    # 7 sequences through 3 slots: joining mid-flight, waiting for a free slot, leaving at different steps.
    check_equal(lm, prompts, monkeypatch, slots=3, max_new=24, atol=1e-4)


def test_long_prompt_is_prefilled_in_chunks_while_others_decode(monkeypatch) -> None:
    from nomoat.runtime import batching

    monkeypatch.setattr(batching, "PREFILL_BESIDE", 16)
    lm = with_adapters(make_tiny_lm(seed=6, max_position_embeddings=512))
    bd = BatchDecoder(lm.model, lm.tokenizer, 4)
    cfg = GenerationConfig(max_new_tokens=40, temperature=0)
    bd.add("short", [5, 6, 7], cfg, {"a": 1.0})
    bd.step()  # the short one is running now
    bd.add("long", list(range(3, 203)), cfg, {})
    got = []
    while bd.prefilling:
        got += [e.key for e in bd.step()]
    # The short sequence advanced on every step the long prompt took to prefill (200 / 16 -> 13 chunks).
    assert got.count("short") == 13


def test_stop_strings_logprobs_and_sampling_per_row(monkeypatch) -> None:
    lm = with_adapters(make_tiny_lm(seed=7))
    ids = [[5, 9, 11], [40, 41], [7] * 12]
    for cfg in (GenerationConfig(max_new_tokens=12, temperature=0.9, top_k=20, seed=11, logprobs=2),
                GenerationConfig(max_new_tokens=12, temperature=0, repetition_penalty=1.3, stop=("a",))):
        want = []
        for p, stack in zip(ids, STACKS):
            set_active(lm.model, stack)
            want.append([(str(x), getattr(x, "logprobs", None)) for x in stream(lm.model, lm.tokenizer, p, cfg)])
        set_active(lm.model, {})
        bd = BatchDecoder(lm.model, lm.tokenizer, 3)
        for k, (p, stack) in enumerate(zip(ids, STACKS)):
            bd.add(k, p, cfg, stack)
        got: dict[int, list] = {k: [] for k in range(3)}
        while len(bd):
            for ev in bd.step():
                got[ev.key] += [(str(x), getattr(x, "logprobs", None)) for x in ev.pieces]
        for k in range(3):
            assert "".join(t for t, _ in got[k]) == "".join(t for t, _ in want[k])
            if cfg.logprobs is not None:
                flat = [e.token for _, lp in got[k] for e in lp or ()]
                assert flat == [e.token for _, lp in want[k] for e in lp or ()]


def test_slot_cache_grows_moves_and_shrinks() -> None:
    lm = make_tiny_lm(seed=1)
    c = SlotCache(lm.config, 3, capacity=4)
    c.k[:, 2, :, :3] = 7.0
    c.lens[2] = 3
    c.ensure(9)
    assert c.capacity == 9 and float(c.k[0, 2, 0, 2, 0]) == 7.0
    c.move(2, 0)
    assert int(c.lens[0]) == 3 and float(c.k[1, 0, 1, 1, 3]) == 7.0
    c.shrink(4)
    assert c.capacity == 4 and int(c.lens.sum()) == 0


def test_row_adapters_refuse_unknown_and_merged() -> None:
    lm = with_adapters(make_tiny_lm(seed=2))
    with pytest.raises(Exception, match="'zz' is not loaded"):
        set_row_adapters(lm.model, [{"zz": 1.0}])
    set_row_adapters(lm.model, None)


@pytest.mark.slow
def test_default_model_batched_equals_alone(monkeypatch) -> None:
    from nomoat.api import load, prompt_ids

    lm = with_adapters(load(quant="auto", threads=2))
    prompts = [prompt_ids(lm, [{"role": "user", "content": q}]) for q in (
        "What is the capital of France?", "Write a haiku about rivers.", "Name three colors.",
        "Explain what a CPU does in one sentence.")]
    # On this path the activations are bf16 (8 significant bits) from layer to layer, and the int4 kernel sums
    # a batch of rows in another order than one row: a last-bit difference early on compounds over 30 layers
    # to logits within ~1 of each other (of a spread of ~30); greedy tokens agree except at near ties.
    check_equal(lm, prompts, monkeypatch, slots=4, max_new=20, atol=1.5, near_tie=1.5)


@pytest.mark.slow
def test_adapter_on_fused_projections_equals_the_separate_layers() -> None:
    """A LoRA on q/k/v or gate/up keeps the fused base matmul; its update goes on the part's slice."""
    from nomoat.api import load
    from nomoat.model.llama import FusableBlock

    lm = with_adapters(load(quant="auto", threads=2))
    blocks = [m for m in lm.model.modules() if isinstance(m, FusableBlock)]
    assert blocks and all(b.fused is not None for b in blocks)
    ids = torch.randint(3, 40000, (2, 9))
    set_active(lm.model, {"a": 1.0, "b": 0.5})
    with torch.inference_mode():
        fused = lm.model(ids).float()
        saved = [b.fused for b in blocks]
        for b in blocks:
            b.set_fused(None)
        separate = lm.model(ids).float()
        for b, f in zip(blocks, saved):
            b.set_fused(f)
        set_active(lm.model, {})
        base = lm.model(ids).float()
    torch.testing.assert_close(fused, separate, atol=0.3, rtol=0)  # bf16 outputs, as above
    assert (fused - base).abs().max() > 0.1  # the adapters did change the output
