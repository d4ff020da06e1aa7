"""Damaged and hostile files are refused with one line naming file and field, before any large allocation.

GGUF files here are written byte by byte (not with a library writer) so that every field can be set to a
wrong type, a wrong value, or twice; each starts from the tiny test model's pristine file.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from conftest import make_tiny_lm, write_tiny_gguf
from test_bad_input import assert_one_line_error, run_cli

from nomoat.api import convert_to_hf
from nomoat.formats.gguf_read import parse_gguf

U32, I32, F32, BOOL, STR, ARR = 4, 5, 6, 7, 8, 9


def _value(v) -> tuple[int, bytes]:
    """GGUF (type, payload) for a Python value; ints are int32, floats float32, lists typed by their first item."""
    if isinstance(v, bool):
        return BOOL, struct.pack("<?", v)
    if isinstance(v, int):
        return I32, struct.pack("<i", v)
    if isinstance(v, float):
        return F32, struct.pack("<f", v)
    if isinstance(v, str):
        b = v.encode()
        return STR, struct.pack("<Q", len(b)) + b
    if isinstance(v, tuple) and v and v[0] == "u32-array":  # ("u32-array", [...]): a mistyped array
        return ARR, struct.pack("<IQ", U32, len(v[1])) + b"".join(struct.pack("<I", x) for x in v[1])
    if isinstance(v, list):
        t = _value(v[0])[0] if v else I32
        return ARR, struct.pack("<IQ", t, len(v)) + b"".join(_value(x)[1] for x in v)
    raise TypeError(v)


def write_gguf(path: Path, kv: list[tuple[str, object]], tensors: list[tuple[str, list[int], int, bytes]],
               align: int = 32, offsets: dict[str, int] | None = None) -> Path:
    """A GGUF v3 file: kv pairs in order (duplicates allowed), tensors (name, dims, type id, data)."""
    out = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kv)))
    for key, v in kv:
        t, payload = _value(v)
        kb = key.encode()
        out += struct.pack("<Q", len(kb)) + kb + struct.pack("<I", t) + payload
    pos, placed = 0, []
    for name, dims, ttype, data in tensors:
        off = (offsets or {}).get(name, pos)
        nb = name.encode()
        out += struct.pack("<Q", len(nb)) + nb + struct.pack("<I", len(dims)) + b"".join(
            struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", ttype, off)
        placed.append(data)
        pos = -(-(pos + len(data)) // 32) * 32
    out += bytes(-len(out) % 32)
    for data in placed:
        out += data + bytes(-len(data) % 32)
    path.write_bytes(bytes(out))
    return path


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """The tiny model's GGUF as (kv list, tensor list) to mutate."""
    d = tmp_path_factory.mktemp("hostile")
    src = write_tiny_gguf(make_tiny_lm(), d / "tiny.gguf")
    fields, tensors = parse_gguf(src)
    kv = [(k, v) for k, v in fields.items() if k != "GGUF.version"]
    ts = [(t.name, [int(x) for x in t.shape], int(t.tensor_type), np.asarray(t.data).tobytes())
          for t in sorted(tensors.values(), key=lambda t: t.data_offset)]
    return d, kv, ts


def _set(kv, key, value):
    return [(k, value if k == key else v) for k, v in kv]


CASES = {
    # name: (mutation of (kv, tensors) -> (kv, tensors, extra write kwargs), text the error must contain)
    "alignment-7": (lambda kv, ts: (kv + [("general.alignment", 7)], ts, {}), "general.alignment"),
    "alignment-1": (lambda kv, ts: (kv + [("general.alignment", 1)], ts, {}), "bytes"),
    "alignment-0": (lambda kv, ts: (kv + [("general.alignment", 0)], ts, {}), "general.alignment"),
    "rope-base-nan": (lambda kv, ts: (_set(kv, "llama.rope.freq_base", float("nan")), ts, {}), "rope_theta"),
    "rope-base-negative": (lambda kv, ts: (_set(kv, "llama.rope.freq_base", -1.0), ts, {}), "rope_theta"),
    "eps-nan": (lambda kv, ts: (_set(kv, "llama.attention.layer_norm_rms_epsilon", float("nan")), ts, {}),
                "rms_norm_eps"),
    "duplicate-key": (lambda kv, ts: (kv + [("llama.block_count", 2)], ts, {}), "appears twice"),
    "block-count-string": (lambda kv, ts: (_set(kv, "llama.block_count", "2"), ts, {}), "llama.block_count"),
    "block-count-short": (lambda kv, ts: (_set(kv, "llama.block_count", 1), ts, {}), "block_count"),
    "block-count-long": (lambda kv, ts: (_set(kv, "llama.block_count", 3), ts, {}), "missing"),
    "rope-dims-63": (lambda kv, ts: (_set(kv, "llama.rope.dimension_count", 15), ts, {}), "dimension_count"),
    "eos-string": (lambda kv, ts: (_set(kv, "tokenizer.ggml.eos_token_id", "2"), ts, {}), "eos_token_id"),
    "tokens-u32": (lambda kv, ts: ([(k, ("u32-array", list(range(len(v)))) if k == "tokenizer.ggml.tokens" else v)
                                    for k, v in kv], ts, {}), "tokenizer.ggml.tokens"),
    "token-type-one": (lambda kv, ts: (_set(kv, "tokenizer.ggml.token_type", [1]), ts, {}), "token_type"),
    "merge-without-space": (lambda kv, ts: ([(k, ["ab"] + v[1:] if k == "tokenizer.ggml.merges" else v)
                                             for k, v in kv], ts, {}), "merges"),
    "template-int": (lambda kv, ts: (_set(kv, "tokenizer.chat_template", 7), ts, {}), "chat_template"),
    "block-count-huge": (lambda kv, ts: (_set(kv, "llama.block_count", 1 << 24), ts, {}), "layers missing"),
    "tokens-scalar": (lambda kv, ts: (_set(kv, "tokenizer.ggml.tokens", 7), ts, {}), "tokenizer.ggml.tokens"),
    "arch-int": (lambda kv, ts: (_set(kv, "general.architecture", 7), ts, {}), "general.architecture"),
    "add-bos-int": (lambda kv, ts: (_set(kv, "tokenizer.ggml.add_bos_token", 7), ts, {}), "add_bos_token"),
    "token-type-negative": (lambda kv, ts: ([(k, [-1] * len(v) if k == "tokenizer.ggml.token_type" else v)
                                             for k, v in kv], ts, {}), "token_type"),
    "merges-empty": (lambda kv, ts: (_set(kv, "tokenizer.ggml.merges", []), ts, {}), "merges"),
    "merge-of-unknown-tokens": (lambda kv, ts: ([(k, ["zz qq"] + v[1:] if k == "tokenizer.ggml.merges" else v)
                                                 for k, v in kv], ts, {}), "merges"),
    "pre-list": (lambda kv, ts: (_set(kv, "tokenizer.ggml.pre", ["default"]), ts, {}), "tokenizer.ggml.pre"),
    "weight-nan": (lambda kv, ts: (kv, [(n, d, t, struct.pack("<f", float("nan")) + b[4:] if n == "token_embd.weight"
                                         else b) for n, d, t, b in ts], {}), "holds nan"),
    "weight-huge": (lambda kv, ts: (kv, [(n, d, t, struct.pack("<f", 3e38) + b[4:] if n == "output_norm.weight"
                                          else b) for n, d, t, b in ts], {}), "holds 3e+38"),
    "huge-vocab": (lambda kv, ts: (_set(kv, "llama.vocab_size", 1 << 24), ts, {}), "embed_tokens"),
    "dim-zero": (lambda kv, ts: (kv, [(n, [0, *d[1:]] if n == "output_norm.weight" else d, t, b)
                                      for n, d, t, b in ts], {}), "dimension of 0"),
    "type-to-f16": (lambda kv, ts: (kv, [(n, d, 1 if n == "blk.0.attn_q.weight" else t, b) for n, d, t, b in ts],
                                    {}), "blk.0.attn_q.weight"),
    "offset-into-other": (lambda kv, ts: (kv, ts, {"offsets": {ts[3][0]: 0}}), "overlaps"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_damaged_gguf_is_one_line_error(pristine, case, monkeypatch, capsys) -> None:
    d, kv, ts = pristine
    mutate, why = CASES[case]
    kv2, ts2, kw = mutate(kv, ts)
    path = write_gguf(d / f"{case}.gguf", kv2, ts2, **kw)
    code, out, err = run_cli(["generate", "hi", "-m", str(path), "-n", "1"], monkeypatch, capsys)
    assert_one_line_error(code, err, path.name, why)
    assert out == ""


def test_the_byte_writer_reproduces_a_working_file(pristine, monkeypatch, capsys) -> None:
    """Control: the unmutated kv and tensors, written by the same writer, load and generate."""
    d, kv, ts = pristine
    path = write_gguf(d / "copy.gguf", kv, ts)
    code, out, err = run_cli(["generate", "hi", "-m", str(path), "-n", "2", "--temperature", "0"], monkeypatch,
                             capsys)
    assert code in (0, None), err


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return convert_to_hf(make_tiny_lm(), tmp_path_factory.mktemp("hf") / "tiny")


@pytest.mark.parametrize("field,value,why", [("rope_scaling", {"rope_type": "llama3"}, "factor"),
                                             ("eos_token_id", "x", "eos_token_id"),
                                             ("rms_norm_eps", -1, "rms_norm_eps"),
                                             ("hidden_act", "gelu", "hidden_act"),
                                             ("attention_bias", True, "attention_bias"),
                                             ("tie_word_embeddings", "false", "tie_word_embeddings"),
                                             ("vocab_size", "300", "vocab_size"),
                                             ("hidden_size", 64.5, "hidden_size"),
                                             ("num_hidden_layers", 1 << 24, "num_hidden_layers")])
def test_damaged_config_json(hf_dir, tmp_path, field, value, why, monkeypatch, capsys) -> None:
    import shutil

    d = shutil.copytree(hf_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, field: value}))
    code, _, err = run_cli(["info", "-m", str(d)], monkeypatch, capsys)
    assert_one_line_error(code, err, why)


def test_duplicate_keys_in_config_json(hf_dir, tmp_path, monkeypatch, capsys) -> None:
    import shutil

    d = shutil.copytree(hf_dir, tmp_path / "m")
    text = (d / "config.json").read_text()
    (d / "config.json").write_text(text.replace('"vocab_size": 300,', '"vocab_size": 300, "vocab_size": 512,'))
    code, _, err = run_cli(["info", "-m", str(d)], monkeypatch, capsys)
    assert_one_line_error(code, err, "config.json", "'vocab_size' appears twice")


def test_json_array_reads_linearly_and_deep_nesting_is_an_error(tmp_path) -> None:
    from nomoat.data import load_examples
    from nomoat.errors import NomoatError

    big = tmp_path / "big.json"
    big.write_text(json.dumps([{"instruction": f"q{i}", "output": f"a{i}"} for i in range(50_000)], indent=1))
    examples = load_examples(big)
    assert len(examples) == 50_000 and examples[-1].source.endswith(f":{2 + 4 * 49_999}")  # the line its "{" is on
    deep = tmp_path / "deep.json"
    deep.write_text("[" + "[" * 100_000 + "]" * 100_000 + "]")
    with pytest.raises(NomoatError, match="deep.json:1: JSON nested too deeply"):
        load_examples(deep)
    cut = tmp_path / "cut.json"
    cut.write_text('[{"instruction": "a", "output": "b"},\n{"instruction": "c", "output": "d"}')
    with pytest.raises(NomoatError, match="cut.json:2: invalid JSON: the JSON array is not closed"):
        load_examples(cut)


@pytest.fixture()
def data_file(tmp_path) -> Path:
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps({"instruction": f"say {i}", "output": str(i)}) + "\n" for i in range(20)))
    return p


def test_out_is_checked_before_loading_and_refused_runs_leave_nothing(hf_dir, data_file, tmp_path, monkeypatch,
                                                                      capsys) -> None:
    a_file = tmp_path / "plain-file"
    a_file.write_text("x")
    code, _, err = run_cli(["finetune", "--data", str(data_file), "--out", str(a_file / "run"), "-m", "/nonexistent"],
                           monkeypatch, capsys)
    assert_one_line_error(code, err, "plain-file")  # refused before the (missing) model is even opened
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    import os

    if os.access(locked, os.W_OK):  # root ignores permissions: nothing to prove there
        pytest.skip("running as root: directory permissions are not enforced")
    code, _, err = run_cli(["finetune", "--data", str(data_file), "--out", str(locked / "run"), "-m", "/nonexistent"],
                           monkeypatch, capsys)
    assert_one_line_error(code, err, "not writable")


def test_bad_data_leaves_no_out_dir_and_a_cut_first_checkpoint_is_not_a_run(hf_dir, tmp_path, monkeypatch,
                                                                              capsys) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a"}\n')
    out = tmp_path / "run"
    code, _, err = run_cli(["finetune", "--data", str(bad), "--out", str(out), "-m", str(hf_dir)], monkeypatch,
                           capsys)
    assert_one_line_error(code, err, "bad.jsonl:1")
    assert not out.exists()
    (out / ".checkpoint.tmp").mkdir(parents=True)  # a kill during the first checkpoint write
    code, _, err = run_cli(["finetune", "--data", str(bad), "--out", str(out), "--resume", str(out), "-m",
                            str(hf_dir)], monkeypatch, capsys)
    assert_one_line_error(code, err, "interrupted", "--overwrite")
    from nomoat.train.sft import check_out

    check_out(out)  # a plain rerun accepts it (and cleans it when it starts)


@pytest.mark.parametrize("edit,why", [
    (lambda c: {**c, "lora_alpha": float("nan")}, "alpha"),
    (lambda c: {**c, "lora_alpha": 1e308}, "alpha"),
    (lambda c: {**c, "rank_pattern": {"q_proj(": 4}}, "regular expression"),
    (lambda c: {**c, "lora_alpha": True}, "lora_alpha"),
    (lambda c: {**c, "use_rslora": "yes"}, "use_rslora"),
    (lambda c: {**c, "r": float("inf")}, "r = Infinity"),
    (lambda c: {**c, "bias": 7}, "bias"),
    (lambda c: {**c, "target_modules": ["k_proj"]}, "does not cover"),
    (lambda c: {**c, "target_modules": ".*k_proj"}, "does not cover"),
    (lambda c: {**c, "layers_to_transform": [0]}, "layers_to_transform"),
])
def test_damaged_adapter_config(tmp_path, edit, why) -> None:
    from test_adapter_ops import random_adapter

    from nomoat.errors import NomoatError
    from nomoat.formats.peft import read_peft_dir, write_peft_dir
    from nomoat.lora import LoraConfig

    cfg = LoraConfig(r=4, alpha=8, targets=["q_proj"])
    tensors, _ = random_adapter(cfg, make_tiny_lm().config, seed=1)
    d = write_peft_dir(tmp_path / "a", cfg, tensors, "tiny", {})
    raw = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps(edit(raw)))
    with pytest.raises(NomoatError, match=why):
        read_peft_dir(d)


@pytest.mark.parametrize("tamper,why", [("huge", "values up to"), ("int", "not a float type")])
def test_damaged_adapter_weights(tmp_path, tamper, why) -> None:
    import torch
    from safetensors.torch import load_file, save_file
    from test_adapter_ops import random_adapter

    from nomoat.api import load_with_adapters
    from nomoat.errors import NomoatError
    from nomoat.formats.peft import write_peft_dir
    from nomoat.lora import LoraConfig

    lm = make_tiny_lm()
    cfg = LoraConfig(r=4, alpha=8, targets=["q_proj"])
    tensors, _ = random_adapter(cfg, lm.config, seed=1)
    d = write_peft_dir(tmp_path / "a", cfg, tensors, "tiny", {})
    st = load_file(str(d / "adapter_model.safetensors"))
    key = next(k for k in st if "lora_B" in k)
    st[key] = torch.full_like(st[key], 3e38) if tamper == "huge" else st[key].to(torch.int32)
    save_file(st, str(d / "adapter_model.safetensors"))
    model = convert_to_hf(lm, tmp_path / "m")
    with pytest.raises(NomoatError, match=why):
        load_with_adapters(model, [str(d)], threads=1)


def test_hf_shards_are_mapped_once_and_index_entries_checked(hf_dir, tmp_path, monkeypatch) -> None:
    import shutil

    from nomoat.errors import NomoatError
    from nomoat.formats import hf
    from nomoat.runtime.loading import load

    opened: list[str] = []
    real = hf.safe_open
    monkeypatch.setattr(hf, "safe_open", lambda path, **kw: opened.append(path) or real(path, **kw))
    load(hf_dir, threads=1)
    assert len(opened) <= 2, opened  # the key listing, then one map for the whole load (not one per tensor)
    monkeypatch.setattr(hf, "safe_open", real)
    d = shutil.copytree(hf_dir, tmp_path / "sharded")
    names = list(load(hf_dir, threads=1).model.state_dict())
    for target, why in (("model-00002.bin", "only .safetensors"), ("missing.safetensors", "is missing")):
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: target for n in names}}))
        with pytest.raises(NomoatError, match=why):
            hf.HFModelDir(d)


HOSTILE_TEMPLATES = {
    "nested-range": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "longer than"),
    "nested-set": ("{% set x = range(100000) %}{% for i in x %}{% for j in x %}{% endfor %}{% endfor %}",
                   "longer than"),
    "exponential-macro": ("{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(60) }}",
                          "longer than"),
    "repeat": ("{{ 'x' * 1000000000 }}", "size limit"),
    "doubling": ("{% set ns = namespace(s='xx') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}"
                 "{{ ns.s }}", "builds a value"),
    "power": ("{{ 10 ** 100000000 }}", "too large"),
    "wide-filter": ("{{ 'x'|center(1000000000) }}", "passes"),
    "wide-method": ("{{ 'x'.ljust(1000000000) }}", "passes"),
    "wide-percent": ("{{ '%0999999999d' % 1 }}", "format string"),
    "wide-format": ("{{ '{:>999999999}'.format('x') }}", "format string"),
    "recursion": ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recursion"),
    "syntax-error": ("{% for %}", "line 1"),
    "type-error": ("{{ messages[0]['content'] + 1 }}", "TypeError"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_TEMPLATES))
def test_chat_template_runs_in_a_budget(case) -> None:
    """A template from a model file cannot hang, allocate without bound or raise anything but one line."""
    import time

    from nomoat.errors import NomoatError
    from nomoat.formats.tokenizer import RENDER_SECONDS, render_template

    source, why = HOSTILE_TEMPLATES[case]
    t0 = time.monotonic()
    with pytest.raises(NomoatError, match=why) as e:
        render_template(source, messages=[{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert time.monotonic() - t0 < RENDER_SECONDS + 3
    assert "\n" not in str(e.value) and str(e.value).startswith("chat template: ")


def test_template_limits_leave_real_templates_alone() -> None:
    from conftest import CHATML

    from nomoat.formats.tokenizer import render_template

    msgs = [{"role": "user", "content": "hi " * 100_000}, {"role": "assistant", "content": "ok"}]
    out = render_template(CHATML, messages=msgs, add_generation_prompt=False)
    assert out == f"<|im_start|>user\n{'hi ' * 100_000}<|im_end|>\n<|im_start|>assistant\nok<|im_end|>\n"
    assert render_template("{{ '%5d'|format(3) }}{{ '{:>3}'.format('x') }}{{ range(3)|list }}") == "    3  x[0, 1, 2]"


def test_runaway_template_in_a_model_file_is_one_line(pristine, monkeypatch, capsys) -> None:
    d, kv, ts = pristine
    loop = HOSTILE_TEMPLATES["nested-range"][0]
    path = write_gguf(d / "loop-template.gguf", _set(kv, "tokenizer.chat_template", loop), ts)
    code, out, err = run_cli(["generate", "hi", "-m", str(path), "-n", "1"], monkeypatch, capsys)
    assert_one_line_error(code, err, "chat template", "longer than")


def test_a_huge_record_is_cut_before_it_is_tokenized(tmp_path) -> None:
    """A 100 MB record costs a tokenizer call on a few thousand characters, and gives the same tokens."""
    from conftest import make_tiny_tokenizer

    from nomoat.data import build_dataset, load_examples
    from nomoat.data.sft import char_budget, tokenize_example

    tok = make_tiny_tokenizer()
    big = "hello world " * 9_000_000
    p = tmp_path / "big.jsonl"
    p.write_text(json.dumps({"text": big}) + "\n" + json.dumps({"text": "short one"}) + "\n")
    seen: list[int] = []
    real = tok.encode
    tok.encode = lambda text, *a, **k: seen.append(len(text)) or real(text, *a, **k)  # type: ignore[method-assign]
    examples = load_examples(p)
    rows = build_dataset(examples, tok, 64)
    assert max(seen) <= char_budget(tok, 64) < 50_000
    assert rows[0][0] == real(big[:20_000])[:64]
    chat = load_examples(_jsonl(tmp_path / "chat.jsonl", {"instruction": big, "output": "ok"}))[0]
    seen.clear()
    ids, labels = tokenize_example(chat, tok, 64)
    assert max(seen) <= char_budget(tok, 64) + 100 and len(ids) == 64 and set(labels) == {-100}


def _jsonl(path: Path, *records: dict) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_packed_long_records_are_tokenized_in_pieces_or_refused_by_line(tmp_path) -> None:
    from conftest import make_tiny_tokenizer

    from nomoat.data import build_dataset, load_examples
    from nomoat.data.sft import LONG_PIECE
    from nomoat.errors import NomoatError

    tok = make_tiny_tokenizer()
    text = "The quick brown fox.\nJumps over  the lazy dog 123,\n\n  x\nHello there! " * (3 * LONG_PIECE // 60)
    rows = build_dataset(load_examples(_jsonl(tmp_path / "t.jsonl", {"text": text})), tok, 256, pack=True)
    assert [i for r in rows for i in r[0]] == (tok.encode(text) + [tok.eos_id])[:len(rows) * 256]
    one_line = "x" * (2 * LONG_PIECE)
    with pytest.raises(NomoatError, match=r"u\.jsonl:2: a record of \d+ characters with no line break"):
        build_dataset(load_examples(_jsonl(tmp_path / "u.jsonl", {"text": "a"}, {"text": one_line})), tok, 64,
                      pack=True)
    with pytest.raises(NomoatError, match=r"c\.jsonl:1: a conversation of \d+ characters is too long for --pack"):
        build_dataset(load_examples(_jsonl(tmp_path / "c.jsonl", {"instruction": one_line, "output": "b"})), tok, 64,
                      pack=True)


def test_one_line_errors_escape_what_files_hold(pristine, monkeypatch, capsys) -> None:
    """A value from a damaged file may hold line breaks, control characters, rich markup or megabytes."""
    d, kv, ts = pristine
    path = write_gguf(d / "odd-arch.gguf", _set(kv, "general.architecture", "x\n[/bold]\x1c" + "y" * 100_000), ts)
    code, out, err = run_cli(["info", "-m", str(path)], monkeypatch, capsys)
    assert_one_line_error(code, err, "x\\n[/bold]\\x1c", " ... ")
    assert len(err) < 1200


def test_gguf_adapter_offsets_are_checked(tmp_path) -> None:
    """An adapter's tensor offset moved into another tensor was read (gguf's reader does not check)."""
    from fuzz_corpus import apply_gguf, read_doc
    from test_adapter_ops import random_adapter

    from nomoat.adapters import convert_adapter
    from nomoat.errors import NomoatError
    from nomoat.formats.gguf_adapter import read_gguf_adapter
    from nomoat.formats.peft import write_peft_dir
    from nomoat.lora import LoraConfig

    lm = make_tiny_lm()
    cfg = LoraConfig(r=4, alpha=8, targets=["q_proj"])
    tensors, _ = random_adapter(cfg, lm.config, seed=1)
    src = convert_adapter(write_peft_dir(tmp_path / "a", cfg, tensors, "tiny", {}), "gguf", tmp_path / "a.gguf",
                          lm.config)
    raw = src.read_bytes()
    bad = tmp_path / "b.gguf"
    bad.write_bytes(apply_gguf(read_doc(raw), raw, {"op": "tensor", "index": 1, "field": "offset", "value": 0}))
    with pytest.raises(NomoatError, match="overlaps"):
        read_gguf_adapter(bad, lm.config)


def test_damaged_hf_files(hf_dir, tmp_path, monkeypatch, capsys) -> None:
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    cases = {
        "eos-flag": ("tokenizer_config.json", lambda c: {**c, "add_eos_token": "yes"}, "add_eos_token"),
        "template-list": ("tokenizer_config.json", lambda c: {**c, "chat_template": ["x"]}, "chat_template"),
        "config-list": ("tokenizer_config.json", lambda c: [c], "expected a JSON object"),
    }
    for name, (fname, edit, why) in cases.items():
        d = shutil.copytree(hf_dir, tmp_path / name)
        (d / fname).write_text(json.dumps(edit(json.loads((d / fname).read_text()))))
        code, _, err = run_cli(["generate", "hi", "-m", str(d), "-n", "1"], monkeypatch, capsys)
        assert_one_line_error(code, err, fname, why)
    for name, tamper, why in (("int-weights", lambda t: t.view(torch.int32), "not a float type"),
                              ("nan-weight", lambda t: t.clone().fill_(float("nan")), "holds nan")):
        d = shutil.copytree(hf_dir, tmp_path / name)
        st = load_file(str(d / "model.safetensors"))
        st["model.norm.weight"] = tamper(st["model.norm.weight"])
        save_file(st, str(d / "model.safetensors"))
        code, _, err = run_cli(["generate", "hi", "-m", str(d), "-n", "1"], monkeypatch, capsys)
        assert_one_line_error(code, err, "model.norm.weight", why)


def test_quantized_block_scales_are_checked() -> None:
    import numpy as np

    from nomoat.errors import NomoatError
    from nomoat.formats.gguf_read import check_blocks

    blocks = np.zeros((2, 18), np.uint8)  # two Q4_0 blocks: fp16 scale, then 16 bytes of codes
    blocks[0, :2] = np.array([0.01], np.float16).view(np.uint8)
    blocks[1, :2] = np.array([np.inf], np.float16).view(np.uint8)
    check_blocks(blocks[:1], "Q4_0", "t")
    with pytest.raises(NomoatError, match="t has a block scale of inf"):
        check_blocks(blocks, "Q4_0", "t")


def test_unpaired_surrogates_are_refused_by_name(tmp_path, monkeypatch, capsys) -> None:
    from nomoat.data import load_examples
    from nomoat.errors import NomoatError

    p = tmp_path / "s.jsonl"
    p.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": "\\ud800"}\n')
    with pytest.raises(NomoatError, match=r"s\.jsonl:2: \"output\" holds an unpaired surrogate"):
        load_examples(p)
    model = write_tiny_gguf(make_tiny_lm(), tmp_path / "t.gguf")
    code, _, err = run_cli(["generate", "bad \udcff byte", "-m", str(model), "-n", "1", "--raw"], monkeypatch, capsys)
    assert_one_line_error(code, err, "unpaired surrogate")


def test_a_prompt_no_context_can_hold_is_refused_before_tokenizing(tmp_path, monkeypatch, capsys) -> None:
    import io
    import resource
    import sys

    model = write_tiny_gguf(make_tiny_lm(), tmp_path / "t.gguf")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello world " * 8_000_000))  # 96 MB: ~20 GB to tokenize
    code, _, err = run_cli(["generate", "-m", str(model), "-n", "1", "--raw"], monkeypatch, capsys)
    assert_one_line_error(code, err, "the prompt is 96000000 characters", "context of 512 tokens")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 1 << 20  # KiB: under 1 GiB
