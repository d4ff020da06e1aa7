"""nomoat against llama.cpp itself on the default GGUF: the same next-token predictions.

Skipped where llama-cpp-python is not installed (it compiles llama.cpp from source: `.ci/run`
tries it and goes on without it if the build fails).
"""

from __future__ import annotations

import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)")

from nomoat.runtime.loading import default_model_path, load  # noqa: E402

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about rivers.",
    "List three uses of a paperclip.",
    "Explain what a CPU does in one sentence.",
]


@pytest.fixture(scope="module")
def llm():
    return llama_cpp.Llama(model_path=str(default_model_path()), n_ctx=512, n_threads=1, logits_all=True,
                           verbose=False)


@pytest.fixture(scope="module")
def q4_lm():
    return load(quant="auto")


def _llama_greedy(llm, ids: list[int], n: int) -> tuple[list[int], list[float]]:
    llm.reset()
    llm.eval(ids)
    out, margins = [], []
    for _ in range(n):
        logits = torch.tensor(llm.scores[llm.n_tokens - 1])
        top2 = logits.topk(2).values
        tok = int(logits.argmax())
        out.append(tok)
        margins.append(float(top2[0] - top2[1]))
        llm.eval([tok])
    return out, margins


@pytest.mark.parametrize("quant", ["auto", "none"])
def test_teacher_forced_predictions_agree_with_llama_cpp(llm, quant, q4_lm):
    """Feed llama.cpp's greedy continuation to nomoat; at every position llama.cpp's token must be
    nomoat's argmax, except where llama.cpp itself was nearly undecided (llama.cpp quantizes
    activations to 8 bits for its Q4 dot products, so near-ties may flip)."""
    lm = q4_lm if quant == "auto" else load(quant="none")
    disagreements, total = 0, 0
    for prompt in PROMPTS:
        ids = lm.tokenizer.encode_chat([{"role": "user", "content": prompt}])
        ref, margins = _llama_greedy(llm, ids, 24)
        seq = torch.tensor([ids + ref])
        with torch.inference_mode():
            logits = lm.model(seq).float()[0, len(ids) - 1:-1]
        ours = logits.argmax(-1).tolist()
        for pos, (a, b, margin) in enumerate(zip(ours, ref, margins)):
            total += 1
            if a != b:
                disagreements += 1
                gap = float(logits[pos].max() - logits[pos, b])
                assert margin < 0.5 and gap < 0.5, (prompt, pos, a, b, margin, gap)
    assert disagreements <= total * 0.1, (disagreements, total)  # measured: 5 of 96, all near-ties


def test_next_token_logits_close_to_llama_cpp(llm, q4_lm):
    ids = q4_lm.tokenizer.encode_chat([{"role": "user", "content": PROMPTS[0]}])
    llm.reset()
    llm.eval(ids)
    ref = torch.tensor(llm.scores[len(ids) - 1])
    with torch.inference_mode():
        ours = q4_lm.model(torch.tensor([ids]))[0, -1].float()
    p, q = ref.log_softmax(-1), ours.log_softmax(-1)
    kl = float((p.exp() * (p - q)).sum())
    assert kl < 0.02, kl


def test_fused_decoding_steps_agree_with_llama_cpp(llm, q4_lm):
    """The one-token decoding path `generate` takes (on this machine the fused native step), fed llama.cpp's
    greedy continuation a token at a time: llama.cpp's token is nomoat's argmax except at near-ties."""
    from nomoat.model import KVCache

    disagreements, total, kls = 0, 0, []
    for prompt in PROMPTS:
        ids = q4_lm.tokenizer.encode_chat([{"role": "user", "content": prompt}])
        ref, margins = _llama_greedy(llm, ids, 24)
        cache = KVCache(q4_lm.config, 1, len(ids) + len(ref) + 1)
        with torch.inference_mode():
            logits = [q4_lm.model(torch.tensor([ids]), cache=cache, last_only=True)[0, -1].float()]
            logits += [q4_lm.model(torch.tensor([[t]]), cache=cache)[0, -1].float() for t in ref[:-1]]
        for step, (ours, b, margin) in enumerate(zip(logits, ref, margins)):
            total += 1
            if int(ours.argmax()) != b:
                disagreements += 1
                assert margin < 0.5 and float(ours.max() - ours[b]) < 0.5, (prompt, step, margin)
        for step, ours in enumerate(logits[1:], start=len(ids)):  # the decoding steps' distributions
            p, q = torch.tensor(llm.scores[step]).log_softmax(-1), ours.log_softmax(-1)
            kls.append(float((p.exp() * (p - q)).sum()))
    assert disagreements <= total * 0.1, (disagreements, total)
    assert sum(kls) / len(kls) < 0.02, kls
