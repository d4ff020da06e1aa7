"""The local catalog: names == paths (generate, merge, serve), wrong bases refused at add and at use, corrupt
files refused at read, two processes adding at once, lineage kept through removals, model cards the Hub's
parser reads, Modelfile adapters llama.cpp loads, a server that follows the catalog live.

Every test gets its own NOMOAT_HOME; nothing here touches the real home or cache.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from conftest import make_tiny_lm, rel_err, write_tiny_gguf
from test_bad_input import assert_one_line_error, run_cli
from test_serve import Live, free_port, stop_server

from nomoat.adapters import base_fingerprint, load_adapter
from nomoat.api import convert_to_hf, generate
from nomoat.catalog import Catalog, Ref, resolve_adapter, resolve_model
from nomoat.catalog.ingest import add_adapter, add_model
from nomoat.errors import NomoatError
from nomoat.formats.peft import write_peft_dir
from nomoat.lora import LoraConfig, adapter_state_dict, lora_modules, remove_adapter, strip_lora
from nomoat.lora import add_adapter as add_lora
from nomoat.runtime.generate import GenerationConfig
from nomoat.runtime.loading import load

HUB_ID = "nomoat-test/tiny-llama"
GREEDY = ["--temperature", "0", "-n", "12"]


@pytest.fixture(scope="module", autouse=True)
def _isolated(tmp_path_factory):
    """No test in this module may touch the real home or fingerprint cache (module fixtures included)."""
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("isolated")
    mp.setenv("NOMOAT_CACHE", str(root / "cache"))
    mp.setenv("NOMOAT_HOME", str(root / "unused-home"))
    yield
    mp.undo()


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("NOMOAT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def make_adapter(lm, out: Path, cfg: LoraConfig, seed: int, meta: dict) -> Path:
    """A LoRA with non-zero B saved for `lm` (PEFT directory, nomoat metadata); the model is left bare."""
    g = torch.Generator().manual_seed(seed)
    add_lora(lm.model, cfg, name="tmp")
    for _, mod in lora_modules(lm.model):
        if "tmp" in mod.lora_B:
            with torch.no_grad():
                mod.lora_B["tmp"].copy_(0.5 * torch.randn(mod.lora_B["tmp"].shape, generator=g))
    tensors = adapter_state_dict(lm.model, "tmp")
    remove_adapter(lm.model, "tmp")
    strip_lora(lm.model)
    return write_peft_dir(out, cfg, tensors, lm.base_model_id, meta)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A tiny base as an HF directory (hub id, license) and as its F32 GGUF twin (same weights, same
    fingerprint), another base of the same shapes, and adapters whose provenance names the first base."""
    root = tmp_path_factory.mktemp("catalog-files")
    tiny = make_tiny_lm(seed=3, max_position_embeddings=2048)
    hf = convert_to_hf(tiny, root / "tiny-hf")
    cfg = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**cfg, "_name_or_path": HUB_ID}))
    (hf / "README.md").write_text("---\nlicense: mit\n---\n# tiny\n")
    gguf = write_tiny_gguf(tiny, root / "tiny.gguf")
    other = convert_to_hf(make_tiny_lm(seed=4), root / "other-hf")
    lm = load(hf)
    fp = base_fingerprint(lm)
    meta = {"base_fingerprint": fp, "base_name": lm.name, "data": str(root / "train.jsonl"),
            "data_sha256": "ab" * 32, "hyperparameters": {"rank": 4, "lr": 5e-4}, "steps": 3}
    out = {"hf": hf, "gguf": gguf, "other": other, "root": root}
    out["sup"] = make_adapter(lm, root / "sup", LoraConfig(r=4, alpha=8, targets="q,v"), 1, meta)
    out["pir"] = make_adapter(lm, root / "pirate", LoraConfig(r=2, alpha=4, targets="all-linear"), 2, meta)
    for i in range(4):
        out[f"extra{i}"] = make_adapter(lm, root / f"extra{i}", LoraConfig(r=2, alpha=2, targets="q"), 10 + i, meta)
    foreign = make_adapter(lm, root / "foreign", LoraConfig(r=2, alpha=4, targets="v"), 5, {})
    out["foreign"] = foreign
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Say {w}."},
                                                     {"role": "assistant", "content": w}]}) + "\n"
                            for w in ("one", "two", "three", "four", "five", "six", "seven", "eight")))
    out["data"] = data
    task = root / "task.jsonl"
    task.write_text("".join(json.dumps({"prompt": f"Say {w}.", "expected": w}) + "\n" for w in ("one", "two")))
    out["task"] = task
    return out


@pytest.fixture
def stocked(home: Path, files: dict[str, Path]) -> Catalog:
    """A catalog with the tiny base (HF as `tiny`, GGUF as `tinyg:v1`) and two adapters."""
    add_model(files["hf"], "tiny")
    add_model(files["gguf"], "tinyg:v1")
    add_adapter(files["sup"], "sup:v1")
    add_adapter(files["pir"], "pir:v1")
    return Catalog()


# ---- names == paths ----
def test_generate_by_name_equals_by_path(stocked, files, monkeypatch, capsys) -> None:
    by_name = run_cli(["generate", "--model", "tiny", "--adapter", "sup:v1", "--adapter", "pir:v1:0.5", *GREEDY,
                       "Hello there"], monkeypatch, capsys)
    by_path = run_cli(["generate", "--model", str(files["hf"]), "--adapter", str(files["sup"]), "--adapter",
                       f"{files['pir']}:0.5", *GREEDY, "Hello there"], monkeypatch, capsys)
    bare = run_cli(["generate", "--model", "tiny", *GREEDY, "Hello there"], monkeypatch, capsys)
    assert by_name[0] in (0, None) and by_name[1] == by_path[1], (by_name, by_path)
    assert by_name[1] != bare[1]  # the adapters do something
    gguf = run_cli(["generate", "--model", "tinyg:v1", "--adapter", "sup:v1", "--adapter", "pir:v1:0.5", *GREEDY,
                    "Hello there"], monkeypatch, capsys)
    assert gguf[1] == by_path[1]  # the GGUF twin has the same weights


def test_gguf_adapter_by_name(stocked, files, tmp_path, monkeypatch, capsys) -> None:
    from nomoat.catalog.export import export_adapter

    g = tmp_path / "sup.gguf"
    code, _, err = run_cli(["adapter", "convert", "sup:v1", "--to", "gguf", "--out", str(g), "--model", "tiny"],
                           monkeypatch, capsys)
    assert code in (0, None), err
    assert add_adapter(g, "supg").artifact.format == "gguf"  # its base found from the GGUF's header alone
    by_gguf = run_cli(["generate", "--model", "tiny", "--adapter", "supg", *GREEDY, "Hello"], monkeypatch, capsys)
    by_peft = run_cli(["generate", "--model", "tiny", "--adapter", "sup:v1", *GREEDY, "Hello"], monkeypatch, capsys)
    assert by_gguf[1] == by_peft[1]
    rep = export_adapter("supg", tmp_path / "share")
    assert {p.name for p in rep.files} >= {"adapter_config.json", "adapter_model.safetensors", "supg.gguf"}
    assert (tmp_path / "share" / "supg.gguf").read_bytes() == g.read_bytes()  # a stored GGUF goes out as it is


def test_merge_by_name_equals_by_path(stocked, files, tmp_path, monkeypatch, capsys) -> None:
    for tag, model, adapter in (("name", "tiny", "sup:v1"), ("path", str(files["hf"]), str(files["sup"]))):
        code, _, err = run_cli(["adapter", "merge", "--model", model, "--adapter", adapter, "--out",
                                str(tmp_path / tag), "--type", "f32"], monkeypatch, capsys)
        assert code in (0, None), err
    a, b = load(tmp_path / "name"), load(tmp_path / "path")
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    assert torch.equal(a.model(ids), b.model(ids))
    info = run_cli(["adapter", "info", "sup:v1", "--model", "tiny"], monkeypatch, capsys)
    assert "q_proj, v_proj" in info[1]


def test_names_paths_and_default(stocked, files, tmp_path, monkeypatch) -> None:
    entry = resolve_adapter("sup:v1")
    assert Path(entry).is_dir() and Path(entry).is_relative_to(stocked.home)
    assert resolve_adapter("sup:v1:0.5").endswith(":0.5")
    assert resolve_adapter("sup:v1", named=True).startswith("sup:v1=")
    assert resolve_adapter("x=sup:v1:2").startswith("x=") and resolve_adapter("x=sup:v1:2").endswith(":2")
    assert resolve_adapter("pir") == resolve_adapter("pir:v1")  # a bare name: its only tag
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sup:v1").mkdir()  # a path that exists wins over a name
    assert resolve_adapter("sup:v1") == "sup:v1"
    with pytest.raises(NomoatError, match=r"no adapter of that name.*close: sup"):
        resolve_adapter("supp")
    with pytest.raises(NomoatError, match=r"--model tinny: .*close: tiny"):
        resolve_model("tinny")
    try:
        from nomoat.runtime.loading import default_model_path

        assert resolve_model("default") == str(default_model_path())
    except NomoatError:
        pass  # the default model is not installed here


def test_same_content_stored_once(stocked, files) -> None:
    objects = sorted(p for p in (stocked.home / "objects").rglob("*") if p.is_file())
    rep = add_adapter(files["sup"], "sup-again")
    assert not rep.new and set(rep.artifact.names) == {"sup:v1", "sup-again:latest"}
    assert sorted(p for p in (stocked.home / "objects").rglob("*") if p.is_file()) == objects
    assert len(stocked.artifacts("adapter")) == 2
    with pytest.raises(NomoatError, match="already names another adapter"):
        add_adapter(files["pir"], "sup:v1")
    with pytest.raises(NomoatError, match="reads as a number"):
        add_adapter(files["pir"], "pir:2")


# ---- wrong bases ----
def test_wrong_base_refused_at_add_and_at_use(home, files, monkeypatch, capsys) -> None:
    add_model(files["other"], "other")
    with pytest.raises(NomoatError, match=r"its base .* is not in the catalog: add the base first"):
        add_adapter(files["sup"], "sup:v1")
    code, _, err = run_cli(["adapters", "add", str(files["sup"]), "--for", "other"], monkeypatch, capsys)
    assert_one_line_error(code, err, "not on other", "--force")
    with pytest.raises(NomoatError, match="matches no model in the catalog"):
        add_adapter(files["foreign"], "foreign")  # no fingerprint, and its base id is a path not in the catalog
    rep = add_adapter(files["sup"], "sup:v1", force=True)
    assert rep.notes and rep.artifact.fingerprint != Catalog().find("model", Ref("other")).fingerprint
    code, _, err = run_cli(["generate", "--model", "other", "--adapter", "sup:v1", *GREEDY, "Hi"], monkeypatch, capsys)
    assert_one_line_error(code, err, "adapter was trained on base", "--force")
    add_model(files["hf"], "tiny")
    assert add_adapter(files["foreign"], "foreign", for_="tiny").artifact.info["base_name"] == "tiny"


def test_wrong_shapes_refused_even_with_force(home, files, tmp_path) -> None:
    add_model(files["hf"], "tiny")
    wide = make_tiny_lm(seed=9, hidden_size=128, intermediate_size=256)
    a = make_adapter(wide, tmp_path / "wide", LoraConfig(r=2, alpha=2, targets="q"), 1, {})
    with pytest.raises(NomoatError, match="does not fit the base tiny"):
        add_adapter(a, "wide", for_="tiny", force=True)


# ---- integrity ----
def _flip(p: Path) -> None:
    os.chmod(p, 0o644)  # stored files are read-only: corruption has to try harder
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))


def test_flipped_byte_refused_at_read(stocked, files, monkeypatch, capsys) -> None:
    art = stocked.find("adapter", Ref("sup", "v1"))
    stored = stocked.entry_dir(art) / art.root / "adapter_model.safetensors"
    _flip(stored)
    code, _, err = run_cli(["generate", "--model", "tiny", "--adapter", "sup:v1", *GREEDY, "Hi"], monkeypatch, capsys)
    assert_one_line_error(code, err, str(stored), "corrupt", "sha256")
    recorded = next(f.sha256 for f in stocked.files(art) if f.path.endswith("adapter_model.safetensors"))
    assert recorded in err
    model = stocked.find("model", Ref("tinyg", "v1"))
    gg = stocked.entry_dir(model) / model.root
    _flip(gg)
    with pytest.raises(NomoatError, match="corrupt or swapped"):
        resolve_model("tinyg:v1")
    # rm and add again repairs it
    run_cli(["adapters", "rm", "sup:v1"], monkeypatch, capsys)
    add_adapter(files["sup"], "sup:v1")
    assert Path(resolve_adapter("sup:v1")).is_dir()


_ADDER = """
import sys
from nomoat.catalog.ingest import add_adapter, add_model
add_model(sys.argv[1], "tiny")
for i, p in enumerate(sys.argv[3:]):
    add_adapter(p, f"{sys.argv[2]}-{i}")
"""


def test_two_processes_adding_at_once(home, files) -> None:
    adapters = [str(files[k]) for k in ("sup", "pir", "extra0", "extra1", "extra2", "extra3")]
    env = {**os.environ, "NOMOAT_HOME": str(home)}
    procs = [subprocess.Popen([sys.executable, "-c", _ADDER, str(files["hf"]), f"p{i}", *adapters[::1 - 2 * i]],
                              env=env, stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    cat = Catalog(home)
    assert cat.integrity() == []
    arts = cat.artifacts("adapter")
    assert len(arts) == len(adapters)  # each content once
    assert len(cat.names("adapter")) == 2 * len(adapters) and cat.names("model") == ["tiny:latest"]
    for name in cat.names("adapter"):
        assert Path(resolve_adapter(name)).is_dir()
    live = {f.sha256 for a in arts + cat.artifacts("model") for f in cat.files(a)}
    stored = {p.name for p in (home / "objects").rglob("*") if p.is_file()}
    assert stored == live  # no orphans, nothing missing
    assert not any((home / "tmp").iterdir())


# ---- lineage ----
def test_rm_with_descendants_warns_and_keeps_lineage(stocked, files, tmp_path, monkeypatch, capsys) -> None:
    comb = tmp_path / "comb"
    code, _, err = run_cli(["adapter", "combine", "sup:v1", "pir:v1:0.5", "--out", str(comb), "--model", "tiny"],
                           monkeypatch, capsys)
    assert code in (0, None), err
    add_adapter(comb, "comb:v1")
    code, out, _ = run_cli(["adapters", "list"], monkeypatch, capsys)
    assert "combine: sup:v1, pir:v1" in out
    code, _, err = run_cli(["adapters", "rm", "sup:v1"], monkeypatch, capsys)
    assert code in (0, None) and "warning" in err and "comb:v1" in err and "marked removed" in err
    code, out, _ = run_cli(["adapters", "show", "comb:v1"], monkeypatch, capsys)
    assert "<- combine, weight 1: sup:v1 (removed)" in out and "<- combine, weight 0.5: pir:v1" in out
    code, out, _ = run_cli(["adapters", "show", "sup:v1"], monkeypatch, capsys)  # by its former name
    assert "(removed)" in out and "-> combine: comb:v1" in out
    with pytest.raises(NomoatError, match="no adapter of that name"):
        resolve_adapter("sup:v1")
    add_adapter(files["sup"], "sup:v2")  # the same content again: the lineage row holds
    code, out, _ = run_cli(["adapters", "list"], monkeypatch, capsys)
    assert "combine: sup:v2, pir:v1" in out


def test_finetune_on_and_register_and_eval_record(stocked, files, tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "ft"
    base = ["finetune", "--model", "tiny", "--data", str(files["data"]), "--max-steps", "2", "--batch-size", "2",
            "--val-fraction", "0", "--rank", "2", "--targets", "q,v"]
    code, _, err = run_cli([*base, "--out", str(tmp_path / "bad"), "--register", "ft:v1", "--model",
                            str(files["other"])], monkeypatch, capsys)
    assert_one_line_error(code, err, "--register ft:v1", "not in the catalog")
    assert not (tmp_path / "bad").exists()  # refused before training
    code, _, err = run_cli([*base, "--out", str(out), "--on", "sup:v1", "--register", "ft:v1"], monkeypatch, capsys)
    assert code in (0, None), err
    assert "registered ft:v1" in err
    meta = json.loads((out / "nomoat_adapter.json").read_text())
    assert meta["parents"][0]["relation"] == "finetune-on"
    code, out_, _ = run_cli(["adapters", "list", "--json"], monkeypatch, capsys)
    rows = {r["name"]: r for r in json.loads(out_)}
    assert rows["ft:v1"]["parent"] == "finetune-on: sup:v1" and rows["ft:v1"]["base"] == "tiny:latest"
    code, _, err = run_cli(["eval", "--model", "tiny", "--adapter", "sup:v1", "--data", str(files["task"]),
                            "--max-new-tokens", "3", "--record"], monkeypatch, capsys)
    assert code in (0, None) and "recorded exact-match" in err, err
    code, out_, _ = run_cli(["adapters", "list", "--json"], monkeypatch, capsys)
    rows = {r["name"]: r for r in json.loads(out_)}
    assert "exact-match" in rows["sup:v1"]["metrics"]
    code, _, err = run_cli(["eval", "--adapter", str(files["foreign"]), "--data", str(files["task"]), "--record"],
                           monkeypatch, capsys)
    assert_one_line_error(code, err, "--record", "not in the catalog")


def test_judge_record_attaches_win_rates_to_the_answering_adapters(stocked, files, tmp_path, monkeypatch,
                                                                   capsys) -> None:
    from types import SimpleNamespace

    from nomoat.cli.catalog import judged_targets, record_judgments

    qs = tmp_path / "q.jsonl"
    qs.write_text(json.dumps({"prompt": "Say one."}) + "\n")
    for name, extra in (("base", []), ("sup", ["--adapter", "sup:v1"])):
        code, _, err = run_cli(["answer", "--model", "tiny", "--questions", str(qs), "-n", "2", "--out",
                                str(tmp_path / f"{name}.jsonl"), *extra], monkeypatch, capsys)
        assert code in (0, None), err
    targets = judged_targets([tmp_path / "base.jsonl", tmp_path / "sup.jsonl"])
    tally = SimpleNamespace(adjusted=0.75, ci=(0.5, 1.0), wins=3, ties=0, losses=1)
    report = SimpleNamespace(pairwise=[SimpleNamespace(model_1="tiny-hf", model_2="sup", judge="j", overall=tally)],
                             single=[])
    assert set(targets) == {"tiny-hf", "sup"}
    record_judgments(report, targets, tmp_path / "verdicts.jsonl")
    res = stocked.results(stocked.find("adapter", Ref("sup", "v1")))
    assert [(r.kind, r.metric, r.value) for r in res] == [("judge", "win rate vs tiny-hf", 0.75)]
    assert res[0].detail["ci"] == [0.5, 1.0]


# ---- interop ----
def test_export_model_card_parses_as_hub_metadata(stocked, files, tmp_path, monkeypatch, capsys) -> None:
    run_cli(["eval", "--model", "tiny", "--adapter", "sup:v1", "--data", str(files["task"]), "--max-new-tokens", "3",
             "--record"], monkeypatch, capsys)
    code, _, err = run_cli(["adapters", "export", "sup:v1", "--out", str(tmp_path / "share")], monkeypatch, capsys)
    assert code in (0, None), err
    share = tmp_path / "share"
    assert {p.name for p in share.iterdir()} == {"adapter_config.json", "adapter_model.safetensors",
                                                 "nomoat_adapter.json", "README.md", "sup-v1.gguf", "Modelfile"}
    text = (share / "README.md").read_text()
    yaml = pytest.importorskip("yaml")
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["base_model"] == HUB_ID and front["base_model_relation"] == "adapter"
    assert front["library_name"] == "peft" and front["license"] == "mit"
    assert front["datasets"] == ["sha256:" + "ab" * 32]
    assert front["model-index"][0]["results"][0]["metrics"][0]["type"] == "exact-match"
    hub = pytest.importorskip("huggingface_hub")
    card = hub.ModelCard(text)
    assert card.data.base_model == HUB_ID and card.data.library_name == "peft" and card.data.license == "mit"
    assert card.data.eval_results[0].metric_type == "exact-match"
    peft = pytest.importorskip("peft")
    assert peft.PeftConfig.from_pretrained(str(share)).r == 4  # the folder is a PEFT adapter as is
    code, _, err = run_cli(["adapters", "export", "sup:v1", "--out", str(share)], monkeypatch, capsys)
    assert_one_line_error(code, err, "not empty")


def test_modelfile_adapter_loads_in_llamacpp_with_its_base(stocked, files, tmp_path) -> None:
    from nomoat.catalog.export import export_adapter

    rep = export_adapter("sup:v1", tmp_path / "share")
    mf = (tmp_path / "share" / "Modelfile").read_text()
    base = Path(re.search(r"^FROM (.+)$", mf, re.M).group(1))
    adapter = tmp_path / "share" / re.search(r"^ADAPTER (.+)$", mf, re.M).group(1)
    assert base.is_file() and base.suffix == ".gguf" and adapter.is_file()
    assert 'TEMPLATE """{{ range .Messages }}' in mf and 'PARAMETER stop "<|im_end|>"' in mf
    assert not any("approximate" in n for n in rep.notes)  # ChatML reads off exactly
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    import numpy as np

    ids = [5, 17, 42, 99, 3, 250, 7, 64]
    scores = []
    for lora in (None, adapter):
        llm = llama_cpp.Llama(model_path=str(base), lora_path=str(lora) if lora else None, n_ctx=64, logits_all=True,
                              verbose=False, n_threads=1)
        llm.eval(ids)
        scores.append(torch.tensor(np.array(llm.scores[: len(ids)]), dtype=torch.float32))
        llm.close()
    ours = load(base)
    load_adapter(ours, resolve_adapter("sup:v1"))
    with torch.inference_mode():
        want = ours.model(torch.tensor([ids]))[0].float()
    assert rel_err(scores[1], want) < 5e-3
    assert rel_err(scores[0], want) > 10 * rel_err(scores[1], want)  # the adapter was applied


def test_models_export_back_to_either_format(stocked, tmp_path, monkeypatch, capsys) -> None:
    for args, out in ((["--type", "f32"], tmp_path / "t.gguf"), ([], tmp_path / "t-hf"), ([], tmp_path / "g.gguf")):
        name = "tinyg:v1" if out.name == "g.gguf" else "tiny"
        code, _, err = run_cli(["models", "export", name, "--out", str(out), *args], monkeypatch, capsys)
        assert code in (0, None), err
    ids = torch.tensor([[5, 17, 42]])
    want = load(resolve_model("tiny")).model(ids)
    for p in ("t.gguf", "t-hf", "g.gguf"):
        assert rel_err(load(tmp_path / p).model(ids), want) < 1e-6, p
    code, _, err = run_cli(["models", "rm", "tiny"], monkeypatch, capsys)
    assert code in (0, None) and "removed tiny and its files" in err
    code, _, err = run_cli(["models", "rm", "tinyg:v1"], monkeypatch, capsys)
    assert "2 adapter(s) sit on this base" in err
    code, _, err = run_cli(["models", "rm", "default"], monkeypatch, capsys)
    assert_one_line_error(code, err, "cannot be removed")


# ---- the live server ----
def _serve(home: Path, model: Path, api_key: str | None = None) -> tuple[Live, object]:
    from nomoat.serve import ServerSettings, create_app, make_server
    from nomoat.serve.catalog_routes import mount_catalog

    lm = load(model)
    app = create_app(lm, "tiny", {}, ServerSettings(api_key=api_key, max_tokens_limit=1800))
    watcher = mount_catalog(app, Catalog(home), poll=0.1)
    port = free_port()
    server = make_server(app, port=port)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    return Live(f"http://127.0.0.1:{port}", app, server, thread), watcher


def _until(cond, seconds: float = 10.0) -> float:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < seconds, "timed out"
        time.sleep(0.05)
    return time.monotonic() - t0


def _reference(model: Path, adapters: list[Path], prompt: str, n: int) -> str:
    lm = load(model)
    for p in adapters:
        load_adapter(lm, p)
    return generate(lm, prompt, GenerationConfig(temperature=0, max_new_tokens=n))  # as a user turn


def test_live_server_follows_the_catalog(stocked, files, home) -> None:
    live, watcher = _serve(home, files["hf"], api_key="k")
    h = {"Authorization": "Bearer k"}
    try:
        ids = lambda: [m["id"] for m in httpx.get(live.url + "/v1/models", headers=h).json()["data"]]  # noqa: E731
        assert ids() == ["tiny", "pir:v1", "sup:v1"]
        cards = {m["id"]: m for m in httpx.get(live.url + "/v1/models", headers=h).json()["data"]}
        assert cards["sup:v1"]["base"] == "tiny" and cards["sup:v1"]["parent"] is None

        def chat(model: str, n: int = 12, stream: bool = False):
            body = {"model": model, "messages": [{"role": "user", "content": "Hello there"}], "temperature": 0,
                    "max_tokens": n, "stream": stream}
            return httpx.post(live.url + "/v1/chat/completions", json=body, headers=h, timeout=120)

        assert chat("sup:v1").json()["choices"][0]["message"]["content"] == \
            _reference(files["hf"], [files["sup"]], "Hello there", 12)  # served by name == loaded by path
        # Added while running: listed and usable within seconds.
        add_adapter(files["extra0"], "late:v1")
        took = _until(lambda: "late:v1" in ids())
        assert took < 5
        assert chat("late:v1").json()["choices"][0]["message"]["content"] == \
            _reference(files["hf"], [files["extra0"]], "Hello there", 12)
        # A long streamed request on pir:v1, in flight while pir:v1 is removed from the catalog.
        want = _reference(files["hf"], [files["pir"]], "Hello there", 1500)
        pieces: list[str] = []
        started = threading.Event()

        def stream() -> None:
            body = {"model": "pir:v1", "messages": [{"role": "user", "content": "Hello there"}], "temperature": 0,
                    "max_tokens": 1500, "stream": True}
            with httpx.stream("POST", live.url + "/v1/chat/completions", json=body, headers=h, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        delta = json.loads(line[6:])["choices"][0].get("delta", {})
                        pieces.append(delta.get("content") or "")
                        started.set()

        batch = live.app.state.server.engine.batch
        step = batch.step

        def slow_step():  # a slower model: the request is surely still generating when the removal lands,
            time.sleep(0.02)  # even on a loaded CI machine (1500 tokens: at least 30 s)
            return step()

        batch.step = slow_step
        t = threading.Thread(target=stream)
        t.start()
        assert started.wait(30)
        Catalog(home).remove("adapter", Ref("pir", "v1"))
        _until(lambda: "pir:v1" not in ids())
        in_flight = httpx.get(live.url + "/health", headers=h).json()["active"] > 0
        r = chat("pir:v1")
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        assert in_flight
        t.join(120)
        assert "".join(pieces) == want  # undisturbed
        _until(lambda: not any(k.startswith("pir:v1#") for _, m in
                               lora_modules(live.app.state.server.lm.model) for k in m.lora_A))  # then freed
    finally:
        watcher.stop()
        stop_server(live)


def test_post_and_delete_adapters_over_http(stocked, files, home) -> None:
    live, watcher = _serve(home, files["hf"], api_key="k")
    h = {"Authorization": "Bearer k"}
    try:
        assert httpx.post(live.url + "/v1/adapters", json={"name": "sup:v1"}).status_code == 401
        r = httpx.delete(live.url + "/v1/adapters/sup:v1", headers=h)
        assert r.status_code == 200 and r.json()["deleted"] is True
        assert httpx.post(live.url + "/v1/chat/completions", headers=h, json={
            "model": "sup:v1", "messages": [{"role": "user", "content": "x"}]}).status_code == 404
        time.sleep(0.3)  # the watcher does not bring back what was unloaded over HTTP
        names = [m["id"] for m in httpx.get(live.url + "/v1/models", headers=h).json()["data"]]
        assert "sup:v1" not in names
        r = httpx.post(live.url + "/v1/adapters", headers=h, json={"name": "sup:v1"})
        assert r.status_code == 201 and r.json()["id"] == "sup:v1"
        r = httpx.post(live.url + "/v1/adapters", headers=h, json={"path": str(files["extra1"]), "name": "side"})
        assert r.status_code == 201
        body = {"model": "side", "messages": [{"role": "user", "content": "Hello there"}], "temperature": 0,
                "max_tokens": 12}
        got = httpx.post(live.url + "/v1/chat/completions", headers=h, json=body).json()
        assert got["choices"][0]["message"]["content"] == _reference(files["hf"], [files["extra1"]], "Hello there", 12)
        assert httpx.post(live.url + "/v1/adapters", headers=h, json={"name": "nope"}).status_code == 404
        assert httpx.post(live.url + "/v1/adapters", headers=h, json={"path": str(files["extra2"]),
                                                                      "name": "side"}).status_code == 409
        add_model(files["other"], "other")
        wrong = files["root"] / "wrong"
        other = load(files["other"])
        make_adapter(other, wrong, LoraConfig(r=2, alpha=2, targets="q"), 3,
                     {"base_fingerprint": base_fingerprint(other)})
        add_adapter(wrong, "wrong")
        r = httpx.post(live.url + "/v1/adapters", headers=h, json={"name": "wrong"})
        assert r.status_code == 422 and "this server runs" in r.json()["error"]["message"]
        assert httpx.delete(live.url + "/v1/adapters/nope", headers=h).status_code == 404
    finally:
        watcher.stop()
        stop_server(live)


def test_serve_cli_has_catalog_flag(monkeypatch, capsys) -> None:
    code, out, _ = run_cli(["serve", "--help"], monkeypatch, capsys)
    assert code in (0, None) and "--catalog" in out
