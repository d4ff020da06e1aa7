"""The default model on int4/int8 kernels: exact Q4 codes from the file, close to the float model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nomoat.formats.gguf_read import GGUFModelFile
from nomoat.quant import Int4Linear, Int8Linear
from nomoat.runtime.loading import default_model_path, load

TEXT = ("The river winds through the valley, carrying snow-melt from the mountains to the sea. "
        "Along its banks, farmers grow wheat and barley, and in the evenings children fish from the old "
        "stone bridge. def add(a, b):\n    return a + b\n")


@pytest.fixture(scope="module")
def q4_lm():
    """torch's int4/int8 kernels (what QLoRA trains through)."""
    return load(quant="auto", for_training=True)


def test_auto_keeps_q4_blocks_as_int4(q4_lm):
    layers = q4_lm.model.model.layers
    assert isinstance(layers[0].self_attn.q_proj, Int4Linear)
    assert isinstance(layers[29].mlp.down_proj, Int4Linear)
    assert isinstance(q4_lm.model.lm_head, Int8Linear)
    assert q4_lm.weight_types["model.layers.0.self_attn.q_proj.weight"].startswith("Q4_1 -> int4")


def test_inference_load_keeps_gguf_blocks_for_the_native_kernels():
    from nomoat import kernels
    from nomoat.quant import Q4Linear, Q8Linear

    if kernels.library() is None:
        pytest.skip(f"native kernels {kernels.status()}")
    lm = load(quant="auto")
    layers = lm.model.model.layers
    assert isinstance(layers[0].self_attn.q_proj, Q4Linear) and isinstance(layers[29].mlp.down_proj, Q4Linear)
    assert isinstance(lm.model.lm_head, Q8Linear)
    assert lm.model.lm_head.codes is lm.model.model.embed_tokens.codes  # the tied head shares the table
    assert lm.weight_types["model.layers.0.self_attn.q_proj.weight"] == "Q4_1 -> q4 (native) (exact blocks)"
    assert lm.model.fast_decode is not None
    # The blocks are the file's: dequantized, they equal gguf's own dequantization exactly.
    ckpt = GGUFModelFile(default_model_path())
    for name in ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj"):
        ref = ckpt.load_float(f"model.layers.3.{name}.weight", ckpt.config())
        assert torch.equal(layers[3].get_submodule(name).dequantize(), ref), name


@pytest.mark.parametrize("name", ["self_attn.q_proj", "self_attn.k_proj", "mlp.gate_proj"])
def test_int4_weights_match_the_file(q4_lm, name):
    """The loaded int4 weight (after the q/k un-permutation) equals gguf's dequantized values up to the
    bf16 rounding of each block's scale and offset (8 significant bits)."""
    ckpt = GGUFModelFile(default_model_path())
    cfg = ckpt.config()
    ref = ckpt.load_float(f"model.layers.3.{name}.weight", cfg)
    got = q4_lm.model.model.layers[3].get_submodule(name).dequantize()
    assert got.shape == ref.shape
    rel = float((got - ref).norm() / ref.norm())
    assert rel < 5e-3, rel


def test_quantized_logits_close_to_float(q4_lm):
    ids = torch.tensor([q4_lm.tokenizer.encode(TEXT)])
    ref_lm = load(quant="none")
    with torch.inference_mode():
        a = ref_lm.model(ids).float()[0]
        b = q4_lm.model(ids).float()[0]
    # The quantized model reads the same Q4_1 codes; only bf16 activations and the bf16 scales differ.
    kl = F.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True, reduction="batchmean")
    top1 = (a.argmax(-1) == b.argmax(-1)).float().mean()
    assert kl < 0.05, float(kl)
    assert top1 > 0.9, float(top1)


def test_quantized_model_follows_float_greedy_continuations(q4_lm):
    """Teacher-forced on the float model's greedy answers, the int4 model predicts the same next
    token almost everywhere (free-running greedy text may fork at the first near-tie and never rejoin)."""
    from nomoat.api import prompt_ids
    from nomoat.runtime.generate import GenerationConfig, generate_batch

    ref_lm = load(quant="none")
    prompts = ["What is the capital of France?", "Name three colours.", "Explain rain to a child."]
    agree = total = 0
    for p in prompts:
        ids = prompt_ids(ref_lm, p)
        out = generate_batch(ref_lm.model, ref_lm.tokenizer, [ids], GenerationConfig(max_new_tokens=32,
                                                                                       temperature=0))[0]
        seq = torch.tensor([ids + out.token_ids])
        with torch.inference_mode():
            a = ref_lm.model(seq)[0, len(ids) - 1:-1].argmax(-1)
            b = q4_lm.model(seq)[0, len(ids) - 1:-1].argmax(-1)
        agree += int((a == b).sum())
        total += a.numel()
    assert agree / total > 0.85, (agree, total)


def test_q8_and_q4_modes_requantize(tmp_path):
    lm8 = load(quant="q8")
    assert isinstance(lm8.model.model.layers[0].mlp.up_proj, Int8Linear)
    ids = torch.tensor([lm8.tokenizer.encode("Hello there, how are you?")])
    with torch.inference_mode():
        assert torch.isfinite(lm8.model(ids)).all()


def test_unknown_quant_mode_named():
    from nomoat.errors import NomoatError

    with pytest.raises(NomoatError, match="--quant 'q3'"):
        load(quant="q3")


def test_qlora_gradients_flow_through_int4_base(q4_lm):
    from nomoat.lora import LoraConfig, add_adapter, lora_parameters, mark_trainable, remove_adapter

    model = q4_lm.model
    add_adapter(model, LoraConfig(r=4, alpha=8, targets=["q", "v"]), "qlora-test")
    try:
        mark_trainable(model, "qlora-test")
        for p in lora_parameters(model, "qlora-test")[1::2]:
            torch.nn.init.normal_(p, std=0.01)
        ids = torch.tensor([q4_lm.tokenizer.encode(TEXT)[:32]])
        model.train()
        loss = model(ids).float().log_softmax(-1)[0, :-1].gather(-1, ids[0, 1:, None]).mean().neg()
        loss.backward()
        grads = [p.grad for p in lora_parameters(model, "qlora-test")]
        assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
        assert not any(isinstance(b, torch.Tensor) and b.requires_grad for b in model.buffers())
    finally:
        model.eval()
        remove_adapter(model, "qlora-test")
