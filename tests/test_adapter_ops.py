"""Adapter arithmetic and merging: stacking == merging, concat == running both, linear/ties errors, merged export."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_lm, rel_err, write_tiny_gguf
from typer.testing import CliRunner

from nomoat.adapters import combine_files, merge_files, merge_to_model, update_retention
from nomoat.errors import NomoatError
from nomoat.formats.export import export_model, model_tensors
from nomoat.formats.peft import read_peft_dir, write_peft_dir
from nomoat.lora import ALL_LINEAR, LoraConfig, load_adapter_weights, set_active, unmerge_adapters
from nomoat.lora.combine import combine, combined_config
from nomoat.model.registry import LLAMA
from nomoat.runtime.loading import load

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64, 128, 11, 200, 31]])


def random_adapter(cfg: LoraConfig, model_cfg, seed: int, b_std: float = 0.05
                   ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """A LoRA with random A and non-zero B for every layer's targets, and its per-module scales."""
    g = torch.Generator().manual_seed(seed)
    tensors, scales = {}, {}
    for i in range(model_cfg.num_hidden_layers):
        for leaf in cfg.targets:
            part = "self_attn" if leaf in ALL_LINEAR[:4] else "mlp"
            mod = f"model.layers.{i}.{part}.{leaf}"
            out_f, in_f = LLAMA.linear_shape(mod, model_cfg)
            r = cfg.rank_for(mod)
            tensors[f"{mod}.lora_A.weight"] = torch.randn(r, in_f, generator=g) / math.sqrt(in_f)
            tensors[f"{mod}.lora_B.weight"] = torch.randn(out_f, r, generator=g) * b_std
            scales[mod] = cfg.scale_for(mod)
    return tensors, scales


def logits(lm) -> torch.Tensor:
    with torch.inference_mode():
        return lm.model(IDS).float()


def with_adapters(adapters, seed: int = 0):
    """A fresh tiny model with these (tensors, scales, weight) adapters stacked, unmerged."""
    lm = make_tiny_lm(seed)
    weights = {}
    for i, (t, s, w) in enumerate(adapters):
        load_adapter_weights(lm.model, t, s, name=f"a{i}")
        weights[f"a{i}"] = w
    set_active(lm.model, weights)
    return lm


@pytest.fixture(scope="module")
def two():
    lm = make_tiny_lm()
    c1 = LoraConfig(r=4, alpha=8, targets="all-linear")
    c2 = LoraConfig(r=2, alpha=4, targets="q,v,down", rslora=True)
    t1, s1 = random_adapter(c1, lm.config, 1)
    t2, s2 = random_adapter(c2, lm.config, 2)
    return (c1, t1, s1), (c2, t2, s2)


def _delta(tensors, scales, mod, weight=1.0) -> torch.Tensor:
    A, B = tensors[f"{mod}.lora_A.weight"], tensors[f"{mod}.lora_B.weight"]
    return (B.double() @ A.double()) * (scales[mod] * weight)


def test_stacked_unmerged_equals_merged_and_unmerge_restores(two) -> None:
    (_, t1, s1), (_, t2, s2) = two
    lm = with_adapters([(t1, s1, 1.0), (t2, s2, 0.5)])
    base = {k: v.clone() for k, v in model_tensors(make_tiny_lm().model, lm.config).items()}
    stacked = logits(lm)
    assert rel_err(stacked, logits(make_tiny_lm())) > 1e-3  # the adapters do something
    merge_to_model(lm)
    assert rel_err(logits(lm), stacked) < 1e-5
    merged = model_tensors(lm.model, lm.config)
    assert rel_err(merged["model.layers.1.mlp.down_proj.weight"], base["model.layers.1.mlp.down_proj.weight"]) > 0
    unmerge_adapters(lm.model)
    assert rel_err(logits(lm), stacked) < 1e-5  # unmerged, still active
    set_active(lm.model, {})
    for name, w in model_tensors(lm.model, lm.config).items():
        torch.testing.assert_close(w, base[name], atol=1e-6, rtol=0)


def test_concat_equals_running_both(two) -> None:
    (_, t1, s1), (_, t2, s2) = two
    stacked = logits(with_adapters([(t1, s1, 1.0), (t2, s2, 0.5)]))
    t, s, report = combine([(t1, s1, 1.0), (t2, s2, 0.5)], "concat")
    assert report.max_rel_error == 0.0
    q = "model.layers.0.self_attn.q_proj"
    assert t[f"{q}.lora_A.weight"].shape[0] == 4 + 2 and report.modules[q]["rank"] == 6
    assert t["model.layers.0.mlp.up_proj.lora_A.weight"].shape[0] == 4  # only in the first adapter
    assert rel_err(logits(with_adapters([(t, s, 1.0)])), stacked) < 1e-5
    # equal weights keep the scale and the original B bit for bit
    t_eq, s_eq, _ = combine([(t1, s1, 1.0), (t1, s1, 1.0)], "concat")
    assert s_eq[q] == s1[q] and torch.equal(t_eq[f"{q}.lora_B.weight"][:, :4], t1[f"{q}.lora_B.weight"])


def test_linear_full_rank_exact_and_low_rank_error_reported(two) -> None:
    (_, t1, s1), (_, t2, s2) = two
    adapters = [(t1, s1, 1.0), (t2, s2, 0.5)]
    stacked = logits(with_adapters(adapters))
    t, s, report = combine(adapters, "linear", rank=6)
    assert report.max_rel_error < 1e-6
    assert rel_err(logits(with_adapters([(t, s, 1.0)])), stacked) < 1e-5
    t, s, report = combine(adapters, "linear", rank=2)
    q = "model.layers.1.self_attn.q_proj"
    assert t[f"{q}.lora_A.weight"].shape[0] == 2
    exact = _delta(t1, s1, q) + _delta(t2, s2, q, 0.5)
    got = _delta(t, s, q)
    actual = ((got - exact).norm() / exact.norm()).item()
    assert report.modules[q]["rel_error"] == pytest.approx(actual, rel=1e-4)
    assert 0.01 < report.total_rel_error < 1 and report.max_rel_error >= report.mean_rel_error > 0
    # default rank: the largest input rank of each module
    t, _, _ = combine(adapters, "linear")
    assert t[f"{q}.lora_A.weight"].shape[0] == 4


def test_ties_runs_and_is_sane(two) -> None:
    (_, t1, s1), (_, t2, s2) = two
    t, s, report = combine([(t1, s1, 1.0), (t2, s2, 1.0)], "ties", rank=4, density=0.3)
    assert all(torch.isfinite(v).all() for v in t.values())
    assert all(v.shape[0] <= 4 for k, v in t.items() if k.endswith("lora_A.weight"))
    assert all(0 <= m["rel_error"] < 1 and m["ties_vs_sum"] > 0 for m in report.modules.values())
    assert math.isfinite(rel_err(logits(with_adapters([(t, s, 1.0)])), logits(make_tiny_lm())))
    # one adapter, density 1, full rank: TIES is the identity
    t, s, report = combine([(t1, s1, 1.0)], "ties", rank=4, density=1.0)
    q = "model.layers.0.self_attn.q_proj"
    assert rel_err(_delta(t, s, q), _delta(t1, s1, q)) < 1e-5 and report.max_rel_error < 1e-6


def test_combined_config_reproduces_scales(two) -> None:
    (_, t1, s1), (_, t2, s2) = two
    t, s, _ = combine([(t1, s1, 1.0), (t2, s2, 0.5)], "concat")
    cfg = combined_config(t, s)
    for mod in s:
        assert cfg.rank_for(mod) == t[f"{mod}.lora_A.weight"].shape[0]
        assert cfg.scale_for(mod) == pytest.approx(s[mod], rel=1e-12)


def test_combine_files_peft_and_fingerprints(two, tmp_path: Path) -> None:
    (c1, t1, s1), (c2, t2, s2) = two
    a = write_peft_dir(tmp_path / "a", c1, t1, "tiny", {"base_fingerprint": "fp1:same", "base_name": "tiny"})
    b = write_peft_dir(tmp_path / "b", c2, t2, "tiny", {"base_fingerprint": "fp1:same", "base_name": "tiny"})
    report = combine_files([(a, 1.0), (b, 0.5)], tmp_path / "ab", "concat")
    assert report.max_rel_error == 0
    cfg, t, s, meta = read_peft_dir(tmp_path / "ab")
    assert meta["base_fingerprint"] == "fp1:same" and len(meta["combined_from"]) == 2
    stacked = logits(with_adapters([(t1, s1, 1.0), (t2, s2, 0.5)]))
    assert rel_err(logits(with_adapters([(t, s, 1.0)])), stacked) < 1e-5
    other = write_peft_dir(tmp_path / "c", c2, t2, "tiny", {"base_fingerprint": "fp1:other"})
    with pytest.raises(NomoatError, match="different bases"):
        combine_files([(a, 1.0), (other, 1.0)], tmp_path / "bad", "linear")
    assert not (tmp_path / "bad").exists()
    combine_files([(a, 1.0), (other, 1.0)], tmp_path / "forced", "linear", force=True)


def test_merged_export_hf_dir_same_logits(two, tmp_path: Path) -> None:
    (_, t1, s1), (_, t2, s2) = two
    lm = with_adapters([(t1, s1, 1.0), (t2, s2, 0.5)])
    stacked = logits(lm)
    with pytest.raises(NomoatError, match="not merged"):
        export_model(lm, tmp_path / "early", "f32")
    merge_to_model(lm)
    export_model(lm, tmp_path / "merged", "f32", meta={"merged": True})
    assert rel_err(logits(load(tmp_path / "merged")), stacked) < 1e-5
    with pytest.raises(NomoatError, match="GGUF output"):
        export_model(lm, tmp_path / "hf-q8", "q8_0")


@pytest.mark.parametrize(("ftype", "tol", "agree"), [("f32", 1e-5, 1.0), ("f16", 2e-3, 1.0), ("q8_0", 3e-2, 0.9)])
def test_merged_export_gguf_loads_with_same_predictions(two, tmp_path: Path, ftype: str, tol: float,
                                                        agree: float) -> None:
    import gguf

    (_, t1, s1), (_, t2, s2) = two
    lm = with_adapters([(t1, s1, 1.0), (t2, s2, 0.5)])
    stacked = logits(lm)
    merge_to_model(lm)
    path = export_model(lm, tmp_path / f"merged-{ftype}.gguf", ftype)
    back = load(path)
    got = logits(back)
    assert rel_err(got, stacked) < tol
    assert (got.argmax(-1) == stacked.argmax(-1)).float().mean().item() >= agree
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert types["blk.0.ffn_down.weight"] == ftype.upper()


def test_merge_files_from_disk_with_fingerprint(two, tmp_path: Path, monkeypatch) -> None:
    from nomoat.adapters import base_fingerprint

    monkeypatch.setenv("NOMOAT_CACHE", str(tmp_path / "cache"))
    (c1, t1, s1), _ = two
    model = write_tiny_gguf(make_tiny_lm(), tmp_path / "tiny.gguf")
    fp = base_fingerprint(load(model))
    a = write_peft_dir(tmp_path / "a", c1, t1, "tiny", {"base_fingerprint": fp, "base_name": "tiny"})
    stacked = logits(with_adapters([(t1, s1, 0.5)]))
    out, kept = merge_files(load(model), [(a, 0.5)], tmp_path / "m.gguf", "f32")
    assert kept == pytest.approx(1.0) and rel_err(logits(load(out)), stacked) < 1e-5
    wrong = write_peft_dir(tmp_path / "w", c1, t1, "tiny", {"base_fingerprint": "fp1:nope"})
    with pytest.raises(NomoatError, match="--force"):
        merge_files(load(model), [(wrong, 1.0)], tmp_path / "w.gguf", "f32")
    assert not (tmp_path / "w.gguf").exists()


def test_update_retention_flags_merge_then_requantize(two, tmp_path: Path) -> None:
    """A base already on the Q4_1 grid plus a small update, re-quantized to Q4_1, loses most of the update;
    Q8_0 and f16 keep it; the CLI warns."""
    (c1, t1, s1), _ = two
    q4 = load(export_model(make_tiny_lm(), tmp_path / "q4_1.gguf", "q4_1"))
    small = {k: v * (0.05 if "lora_B" in k else 1.0) for k, v in t1.items()}
    load_adapter_weights(q4.model, small, s1, name="a")
    merge_to_model(q4)
    kept = {f: update_retention(q4, f) for f in ("f32", "f16", "q8_0", "q4_1")}
    assert kept["f32"] == pytest.approx(1.0) and kept["f16"] > 0.95 and kept["q8_0"] > 0.8
    assert kept["q4_1"] < 0.5
    from nomoat.cli import app

    a = write_peft_dir(tmp_path / "a", c1, small, "tiny", {})
    r = CliRunner().invoke(app, ["adapter", "merge", "-a", str(a), "--model", str(tmp_path / "q4_1.gguf"),
                                 "--out", str(tmp_path / "m.gguf"), "--type", "q4_1"])
    assert r.exit_code == 0 and "warning" in r.output, r.output


def test_bad_combinations_refused(two) -> None:
    (_, t1, s1), (_, t2, s2) = two
    other = make_tiny_lm(hidden_size=32, intermediate_size=64)
    t3, s3 = random_adapter(LoraConfig(r=2, targets="q"), other.config, 3)
    with pytest.raises(NomoatError, match="different base"):
        combine([(t1, s1, 1.0), (t3, s3, 1.0)], "linear")
    nan = dict(t1)
    nan["model.layers.0.self_attn.q_proj.lora_B.weight"] = torch.full_like(
        t1["model.layers.0.self_attn.q_proj.lora_B.weight"], float("nan"))
    with pytest.raises(NomoatError, match="NaN"):
        combine([(nan, s1, 1.0)], "concat")
    with pytest.raises(NomoatError, match="--how"):
        combine([(t1, s1, 1.0)], "svd")
    with pytest.raises(NomoatError, match="--rank"):
        combine([(t1, s1, 1.0)], "linear", rank=0)
    with pytest.raises(NomoatError, match="--density"):
        combine([(t1, s1, 1.0)], "ties", density=0)
    with pytest.raises(NomoatError, match="lora_A or lora_B missing"):
        combine([({"model.layers.0.self_attn.q_proj.lora_A.weight": t1[
            "model.layers.0.self_attn.q_proj.lora_A.weight"]}, s1, 1.0)], "concat")
    with pytest.raises(NomoatError, match="more than"):
        combine([(t1, s1, 1.0)] * 9, "concat")  # 9 x rank 4 > 32 rows of k_proj
    with pytest.raises(NomoatError, match="no adapters"):
        combine([], "concat")


def test_cli_combine_merge_convert(two, tmp_path: Path) -> None:
    from nomoat.cli import app

    (c1, t1, s1), (c2, t2, s2) = two
    model = write_tiny_gguf(make_tiny_lm(), tmp_path / "tiny.gguf")
    a = write_peft_dir(tmp_path / "a", c1, t1, "tiny", {"base_name": "tiny"})
    b = write_peft_dir(tmp_path / "b", c2, t2, "tiny", {"base_name": "tiny"})
    run = CliRunner().invoke
    r = run(app, ["adapter", "combine", str(a), f"{b}:0.5", "--how", "linear", "--rank", "2",
                  "--out", str(tmp_path / "lin")])
    assert r.exit_code == 0, r.output
    assert "relative error" in r.output
    r = run(app, ["adapter", "convert", str(a), "--to", "gguf", "--out", str(tmp_path / "a.gguf"),
                  "--model", str(model)])
    assert r.exit_code == 0, r.output
    r = run(app, ["adapter", "convert", str(tmp_path / "a.gguf"), "--to", "peft", "--out", str(tmp_path / "a2"),
                  "--model", str(model)])
    assert r.exit_code == 0, r.output
    _, t, s, _ = read_peft_dir(tmp_path / "a2")
    assert rel_err(logits(with_adapters([(t, s, 1.0)])), logits(with_adapters([(t1, s1, 1.0)]))) < 1e-6
    for src in (a, tmp_path / "a.gguf"):  # `adapter info` reads both formats alike
        r = run(app, ["adapter", "info", str(src), "--model", str(model)])
        assert r.exit_code == 0, r.output
        assert f"{sum(v.numel() for v in t1.values()):,}" in r.output
    r = run(app, ["adapter", "merge", "--adapter", str(tmp_path / "a.gguf"), "--adapter", f"{b}:0.5",
                  "--out", str(tmp_path / "m.gguf"), "--type", "f32", "--model", str(model)])
    assert r.exit_code == 0, r.output
    stacked = logits(with_adapters([(t1, s1, 1.0), (t2, s2, 0.5)]))
    assert rel_err(logits(load(tmp_path / "m.gguf")), stacked) < 1e-5
    r = run(app, ["convert", "--to", "gguf", "--type", "q8_0", "--out", str(tmp_path / "c.gguf"),
                  "--model", str(model)])
    assert r.exit_code == 0, r.output
    assert rel_err(logits(load(tmp_path / "c.gguf")), logits(make_tiny_lm())) < 3e-2
    r = run(app, ["adapter", "combine", str(a), "--how", "svd", "--out", str(tmp_path / "x")])
    assert r.exit_code != 0 and isinstance(r.exception, NomoatError)
