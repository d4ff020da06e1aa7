"""LoRA against Hugging Face PEFT: the math, the adapter directory both ways, merge/stack, bad adapters."""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

import pytest
import torch
from conftest import hf_twin, make_tiny_lm, rel_err

from nomoat.adapters import base_fingerprint, fingerprint_tensors, load_adapter, save_adapter
from nomoat.api import convert_to_hf
from nomoat.errors import NomoatError
from nomoat.formats.peft import PEFT_PREFIX, read_peft_dir, write_peft_dir
from nomoat.lora import (
    ALL_LINEAR,
    LoraConfig,
    LoRALinear,
    adapter_state_dict,
    add_adapter,
    load_adapter_weights,
    lora_modules,
    mark_trainable,
    merge_adapters,
    set_active,
    unmerge_adapters,
)
from nomoat.runtime.loading import LoadedModel, load

os.environ.setdefault("HF_HUB_OFFLINE", "1")
peft = pytest.importorskip("peft")

IDS = torch.tensor([[1, 17, 42, 99, 7, 250, 3, 64, 128, 5, 2, 11], [1, 200, 201, 5, 8, 13, 21, 34, 55, 89, 144, 233]])
RSLORA = dict(rslora=True, rank_pattern={"q_proj": 2, "model.layers.1.mlp.down_proj": 6, "k_proj|up_proj": 3},
              alpha_pattern={"v_proj": 5.0, "layers.0.mlp.gate_proj": 12.0})


def _peft_cfg(cfg: LoraConfig) -> peft.LoraConfig:
    return peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, target_modules=list(cfg.targets), use_rslora=cfg.rslora,
                           rank_pattern=dict(cfg.rank_pattern), alpha_pattern=dict(cfg.alpha_pattern),
                           lora_dropout=0.0, init_lora_weights=True, task_type="CAUSAL_LM")


def _random_lora(peft_model, seed: int = 1) -> dict[str, torch.Tensor]:
    """Fill every lora_A/lora_B of a PEFT model with non-zero random values; returns nomoat-named tensors."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in peft_model.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            mod, ab = name.removeprefix(PEFT_PREFIX).split(".lora_")
            out[f"{mod}.lora_{ab[0]}.weight"] = p.detach().clone()
    assert out
    return out


def _scales(model, cfg: LoraConfig) -> dict[str, float]:
    return {n: cfg.scale_for(n) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in cfg.targets
            and ".layers." in n}


def _snapshot(model) -> tuple[list[tuple[str, str]], dict[str, torch.Tensor]]:
    """Module tree (names and types) and every tensor, to show a model was not touched."""
    return ([(n, type(m).__name__) for n, m in model.named_modules()],
            {k: v.clone() for k, v in model.state_dict(keep_vars=False).items()})


def _assert_same(model, snap) -> None:
    tree, sd = _snapshot(model)
    assert tree == snap[0]
    assert sd.keys() == snap[1].keys()
    assert all(torch.equal(sd[k], snap[1][k]) for k in sd)


@pytest.mark.parametrize("kw", [{}, RSLORA], ids=["plain", "rslora-patterns"])
@torch.no_grad()
def test_lora_math_matches_peft(kw) -> None:
    cfg = LoraConfig(r=4, alpha=8, targets=list(ALL_LINEAR), **kw)
    lm = make_tiny_lm()
    pm = peft.get_peft_model(hf_twin(lm), _peft_cfg(cfg)).eval()
    tensors = _random_lora(pm)
    if kw:  # the patterns really produced per-module ranks and scales, in PEFT and in nomoat alike
        ranks = {k.rsplit(".", 2)[0]: v.shape[0] for k, v in tensors.items() if "lora_A" in k}
        assert set(ranks.values()) == {2, 3, 4, 6}
        assert ranks["model.layers.1.mlp.down_proj"] == 6 and ranks["model.layers.0.mlp.down_proj"] == 4
        assert ranks["model.layers.0.self_attn.k_proj"] == 3 and ranks["model.layers.1.mlp.up_proj"] == 3
        for mod, r in ranks.items():
            layer = pm.get_submodule(PEFT_PREFIX + mod)
            assert layer.r["default"] == r == cfg.rank_for(mod)
            assert layer.scaling["default"] == pytest.approx(cfg.scale_for(mod), rel=1e-12)
    load_adapter_weights(lm.model, tensors, _scales(lm.model, cfg))
    ref = pm(IDS).logits
    assert rel_err(lm.model(IDS), ref) < 1e-4
    # The adapter changes the output for real (it is not a no-op on both sides).
    base = make_tiny_lm().model(IDS)
    assert rel_err(base, ref) > 1e-2


def _capture_peft_load(hf, path: Path, caplog):
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(hf, str(path)).eval()
    messages = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    return pm, messages


@pytest.mark.parametrize("kw", [{}, RSLORA], ids=["plain", "rslora-patterns"])
@torch.no_grad()
def test_nomoat_adapter_loads_in_peft(tmp_path, caplog, kw) -> None:
    cfg = LoraConfig(r=4, alpha=8, **kw)
    lm = make_tiny_lm()
    add_adapter(lm.model, cfg)
    g = torch.Generator().manual_seed(3)
    for _, mod in lora_modules(lm.model):
        mod.lora_A["default"].copy_(torch.randn(mod.lora_A["default"].shape, generator=g) * 0.2)
        mod.lora_B["default"].copy_(torch.randn(mod.lora_B["default"].shape, generator=g) * 0.2)
    out = save_adapter(lm.model, tmp_path / "ad", cfg, "tiny-llama", {"base_fingerprint": "fp1:x"})
    pm, messages = _capture_peft_load(hf_twin(make_tiny_lm()), out, caplog)
    bad = [m for m in messages if any(w in m.lower() for w in ("missing", "unexpected", "unused", "not used"))]
    assert not bad, bad
    assert rel_err(lm.model(IDS), pm(IDS).logits) < 1e-4
    # Every tensor PEFT holds came from the file (none left at PEFT's init), and no file key went unused.
    sd = peft.get_peft_model_state_dict(pm)
    assert len(sd) == len(adapter_state_dict(lm.model)) == 2 * 7 * 2
    res = pm.load_adapter(str(out), adapter_name="again")
    assert not res.unexpected_keys and not [k for k in res.missing_keys if ".again." in k]
    # The check would see a bad file: drop one module's pair and PEFT reports it missing.
    tensors = adapter_state_dict(lm.model)
    tensors = {k: v for k, v in tensors.items() if not k.startswith("model.layers.1.mlp.up_proj.")}
    cut = write_peft_dir(tmp_path / "cut", cfg, tensors, "tiny-llama", {})
    _, messages = _capture_peft_load(hf_twin(make_tiny_lm()), cut, caplog)
    assert any("missing" in m.lower() and "layers.1.mlp.up_proj" in m for m in messages), messages


@pytest.mark.parametrize("kw", [{}, RSLORA], ids=["plain", "rslora-patterns"])
@torch.no_grad()
def test_peft_adapter_loads_in_nomoat(tmp_path, kw) -> None:
    cfg = LoraConfig(r=4, alpha=8, **kw)
    pm = peft.get_peft_model(hf_twin(make_tiny_lm()), _peft_cfg(cfg)).eval()
    _random_lora(pm, seed=5)
    pm.save_pretrained(str(tmp_path / "peft"))
    lm = make_tiny_lm()
    name = load_adapter(lm, tmp_path / "peft")
    assert rel_err(lm.model(IDS), pm(IDS).logits) < 1e-4
    set_active(lm.model, {})
    assert torch.equal(lm.model(IDS), make_tiny_lm().model(IDS))
    set_active(lm.model, {name: 1.0})
    read_cfg = read_peft_dir(tmp_path / "peft")[0]
    assert read_cfg.rslora == cfg.rslora and read_cfg.r == 4


@torch.no_grad()
def test_minimal_peft_config_uses_peft_defaults(tmp_path, caplog) -> None:
    """A hand-written adapter_config.json with only the required keys: missing alpha means PEFT's 8, not r."""
    lm = make_tiny_lm()
    tensors = {k: v * 0.1 for k, v in _good_tensors(lm.model, r=4).items() if ".self_attn." in k}
    out = _write(tmp_path / "ad", tensors)
    (out / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4,
                                                         "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}))
    load_adapter(lm, out)
    pm, _ = _capture_peft_load(hf_twin(make_tiny_lm()), out, caplog)
    assert pm.get_submodule(PEFT_PREFIX + "model.layers.0.self_attn.q_proj").scaling["default"] == 2.0
    assert rel_err(lm.model(IDS), pm(IDS).logits) < 1e-4


def _random_adapter(model, cfg: LoraConfig, name: str, seed: int) -> None:
    add_adapter(model, cfg, name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, mod in lora_modules(model):
            if name in mod.lora_A:
                mod.lora_B[name].copy_(torch.randn(mod.lora_B[name].shape, generator=g) * 0.2)


@torch.no_grad()
def test_merge_unmerge_and_stack() -> None:
    lm = make_tiny_lm()
    model = lm.model
    base_logits = model(IDS)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    _random_adapter(model, LoraConfig(r=4, alpha=8), "a", 1)
    _random_adapter(model, LoraConfig(r=2, alpha=4, targets=["q", "v", "down"]), "b", 2)

    set_active(model, {})
    assert torch.equal(model(IDS), base_logits)
    set_active(model, {"a": 1.0})
    unmerged = model(IDS)
    assert rel_err(unmerged, base_logits) > 1e-2
    merge_adapters(model, ["a"])
    assert rel_err(model(IDS), unmerged) < 1e-5
    unmerge_adapters(model)
    for name, mod in lora_modules(model):
        assert torch.allclose(mod.base.weight, original[f"{name}.weight"], atol=1e-6, rtol=0)
    assert rel_err(model(IDS), unmerged) < 1e-6

    # Stacking: base + 0.7 * delta_a + (-0.4) * delta_b, built by hand in a fresh model.
    set_active(model, {"a": 0.7, "b": -0.4})
    stacked = model(IDS)
    ref = make_tiny_lm().model
    for name, mod in lora_modules(model):
        w = ref.get_submodule(name).weight
        w += 0.7 * mod.scales["a"] * (mod.lora_B["a"] @ mod.lora_A["a"])
        if "b" in mod.lora_A:
            w += -0.4 * mod.scales["b"] * (mod.lora_B["b"] @ mod.lora_A["b"])
    assert rel_err(stacked, ref(IDS)) < 1e-5
    merge_adapters(model)
    assert rel_err(model(IDS), stacked) < 1e-5
    unmerge_adapters(model)
    set_active(model, {"b": 1.0})
    assert rel_err(model(IDS), stacked) > 1e-3

    set_active(model, {})  # after merge/unmerge cycles the base carries only rounding residue
    assert rel_err(model(IDS), base_logits) < 1e-6
    with pytest.raises(NomoatError, match="'c' is not loaded"):
        set_active(model, {"c": 1.0})


@torch.no_grad()
def test_fresh_adapter_is_the_base_and_only_lora_trains() -> None:
    lm = make_tiny_lm()
    base_logits = lm.model(IDS)
    wrapped = add_adapter(lm.model, LoraConfig(r=8, alpha=16))
    assert len(wrapped) == 2 * 7
    assert torch.equal(lm.model(IDS), base_logits)
    for _, mod in lora_modules(lm.model):
        assert mod.lora_A["default"].abs().sum() > 0 and not mod.lora_B["default"].any()
    n = mark_trainable(lm.model)
    trainable = [k for k, p in lm.model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in k or ".lora_B." in k for k in trainable)
    assert n == sum(p.numel() for p in lm.model.parameters() if p.requires_grad) == \
        sum(8 * (m.in_features + m.out_features) for _, m in lora_modules(lm.model))


# --------------------------------------------------------------------------- bad adapters


def _good_tensors(model, r: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, mod in model.named_modules():
        if name.rsplit(".", 1)[-1] in ALL_LINEAR:
            out[f"{name}.lora_A.weight"] = torch.randn(r, mod.in_features, generator=g)
            out[f"{name}.lora_B.weight"] = torch.randn(mod.out_features, r, generator=g)
    return out


def _write(path: Path, tensors: dict[str, torch.Tensor], r: int = 4, meta: dict | None = None) -> Path:
    return write_peft_dir(path, LoraConfig(r=r, alpha=8), tensors, "tiny-llama", meta or {})


def _bad_dirs(tmp: Path, model) -> dict[str, tuple[Path, str]]:
    good = _good_tensors(model)
    k_a, k_b = "model.layers.1.self_attn.k_proj.lora_A.weight", "model.layers.1.self_attn.k_proj.lora_B.weight"
    cases: dict[str, tuple[dict[str, torch.Tensor], int, str]] = {
        "wrong-shape": ({**good, k_b: torch.randn(64, 4)}, 4, "k_proj"),
        "unknown-target": ({**good, "model.layers.0.self_attn.qkv_proj.lora_A.weight": torch.randn(4, 64),
                            "model.layers.0.self_attn.qkv_proj.lora_B.weight": torch.randn(96, 4)}, 4, "qkv_proj"),
        "missing-layer": ({**good, "model.layers.7.mlp.up_proj.lora_A.weight": torch.randn(4, 64),
                           "model.layers.7.mlp.up_proj.lora_B.weight": torch.randn(128, 4)}, 4, "layers.7"),
        "nan": ({**good, k_a: good[k_a].clone().fill_(float("nan"))}, 4, "NaN"),
        "rank-too-large": (_good_tensors(model, r=40), 40, "rank 40"),
        "half-pair": ({k: v for k, v in good.items() if k != k_b}, 4, "missing"),
    }
    out = {}
    for name, (tensors, r, why) in cases.items():
        out[name] = (_write(tmp / name, tensors, r), why)
    trunc = _write(tmp / "truncated", good)
    st = trunc / "adapter_model.safetensors"
    st.write_bytes(st.read_bytes()[:-1000])
    out["truncated"] = (trunc, "adapter_model.safetensors")
    garbage = _write(tmp / "garbage", good)
    (garbage / "adapter_model.safetensors").write_bytes(b"\xff" * 64)
    out["garbage"] = (garbage, "adapter_model.safetensors")
    return out


BAD = ["wrong-shape", "unknown-target", "missing-layer", "nan", "rank-too-large", "half-pair", "truncated", "garbage"]


@pytest.mark.parametrize("case", BAD)
@pytest.mark.parametrize("stacked", [False, True], ids=["bare", "on-top-of-another"])
def test_bad_adapter_refused_before_touching_model(tmp_path, case: str, stacked: bool) -> None:
    lm = make_tiny_lm()
    if stacked:
        _random_adapter(lm.model, LoraConfig(r=2, targets=["q", "v"]), "first", 1)
    path, why = _bad_dirs(tmp_path, lm.model)[case]
    snap = _snapshot(lm.model)
    with pytest.raises(NomoatError) as e:
        load_adapter(lm, path)
    assert why in str(e.value), str(e.value)
    assert "\n" not in str(e.value)
    _assert_same(lm.model, snap)


def test_good_adapter_of_the_bad_suite_loads(tmp_path) -> None:
    lm = make_tiny_lm()
    path = _write(tmp_path / "ok", _good_tensors(lm.model))
    load_adapter(lm, path)
    assert sum(isinstance(m, LoRALinear) for m in lm.model.modules()) == 14


def _saved_tiny(tmp_path: Path, seed: int) -> LoadedModel:
    return load(convert_to_hf(make_tiny_lm(seed=seed), tmp_path / f"tiny{seed}"))


def test_fingerprint_mismatch(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("NOMOAT_CACHE", str(tmp_path / "cache"))
    lm0, lm1 = _saved_tiny(tmp_path, 0), _saved_tiny(tmp_path, 1)
    fp0 = base_fingerprint(lm0)
    assert fp0 == fingerprint_tensors((k, v) for k, v in lm0.model.state_dict().items() if k != "lm_head.weight")
    assert fp0 != base_fingerprint(lm1)
    path = _write(tmp_path / "ad", _good_tensors(lm0.model), meta={"base_fingerprint": fp0, "base_name": "t0"})
    snap = _snapshot(lm1.model)
    with pytest.raises(NomoatError, match="trained on base t0") as e:
        load_adapter(lm1, path)
    assert "--force" in str(e.value)
    _assert_same(lm1.model, snap)
    load_adapter(lm0, path)  # the right base takes it
    load_adapter(lm1, path, force=True)  # and --force overrides
    cached = json.loads((tmp_path / "cache" / "fingerprints.json").read_text())
    assert fp0 in cached.values()


def test_low_rank_add_gradients_match_autograd() -> None:
    from torch.autograd import gradcheck

    from nomoat.lora.layer import _LowRankAdd

    g = torch.Generator().manual_seed(0)
    x, A, B, y = (torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)
                  for s in ((9, 6), (3, 6), (5, 3), (9, 5)))
    assert gradcheck(lambda *t: _LowRankAdd.apply(*t, 0.7), (x, A, B, y))
    ref = y + 0.7 * (x @ A.T) @ B.T
    assert torch.allclose(_LowRankAdd.apply(x, A, B, y, 0.7), ref)
