"""A seeded corpus of hostile and broken inputs built from the tiny test model's files, and the worker that
runs it (see test_fuzz.py, which prepares the pristine files and drives a pool of these workers).

Pristine files: the tiny model as an F32 GGUF and as a Q4_0 GGUF, as a Hugging Face directory, a PEFT
adapter and its llama.cpp GGUF twin, and a training data file. Every case is a JSON descriptor (target,
mutation, parameters) that `build_case` turns back into files, so a case number reproduces a case anywhere:

    python tests/fuzz_corpus.py show CORPUS_DIR 123     # what case 123 is, and its files under CORPUS_DIR/show
    python tests/fuzz_corpus.py run CORPUS_DIR 123      # run it once in this process and print the result

Mutations: truncations, byte flips (each classified by the region it hits), every metadata field set to
each wrong type, zero, negative, NaN, infinite, huge and inconsistent values, the same value in other
encodings, duplicated and removed keys, tensor dimensions, types, names and offsets moved out of and
across bounds. A case is `strict` when the damage is detectable by construction (the file must be refused,
or give exactly the pristine output), `lenient` when the file may be a valid different one (a flipped
weight or token string: no crash, finite logits).
"""

from __future__ import annotations

import copy
import io
import json
import math
import os
import random
import shutil
import struct
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# ----------------------------------------------------------------------------------------------- GGUF bytes

SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12
INT_TYPES = (U8, I8, U16, I16, U32, I32, U64, I64)
_RANGES = {U8: (0, 255), I8: (-128, 127), U16: (0, 65535), I16: (-32768, 32767), U32: (0, 2**32 - 1),
           I32: (-(2**31), 2**31 - 1), U64: (0, 2**64 - 1), I64: (-(2**63), 2**63 - 1)}


@dataclass
class KV:
    key: str
    vtype: int
    value: Any  # a list for arrays; bytes for a raw payload written as is
    itype: int | None = None  # item type of an array


@dataclass
class TInfo:
    name: str
    dims: list[int]
    ttype: int
    offset: int


@dataclass
class Doc:
    """A GGUF file as its parts: header counts are derived unless overridden."""

    kv: list[KV]
    tensors: list[TInfo]
    data: list[bytes]  # each tensor's bytes, in `tensors` order
    version: int = 3
    layout_align: int = 32  # the alignment the writer lays the data out with
    n_tensors: int | None = None
    n_kv: int | None = None
    tail: bytes = b""

    def get(self, key: str) -> KV | None:
        return next((kv for kv in self.kv if kv.key == key), None)


def _read_value(buf: bytes, pos: int, vtype: int) -> tuple[Any, int, int | None]:
    if vtype in SCALARS:
        fmt = SCALARS[vtype]
        return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt), None
    if vtype == STR:
        (n,) = struct.unpack_from("<Q", buf, pos)
        return buf[pos + 8:pos + 8 + n].decode("utf-8"), pos + 8 + n, None
    itype, count = struct.unpack_from("<IQ", buf, pos)
    pos += 12
    items = []
    for _ in range(count):
        v, pos, _ = _read_value(buf, pos, itype)
        items.append(v)
    return items, pos, itype


def read_doc(raw: bytes) -> Doc:
    """The parts of a well-formed GGUF file (our own test files: no validation here)."""
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", raw, 4)
    pos, kvs = 24, []
    for _ in range(n_kv):
        (n,) = struct.unpack_from("<Q", raw, pos)
        key = raw[pos + 8:pos + 8 + n].decode()
        (vtype,) = struct.unpack_from("<I", raw, pos + 8 + n)
        value, pos, itype = _read_value(raw, pos + 12 + n, vtype)
        kvs.append(KV(key, vtype, value, itype))
    infos = []
    for _ in range(n_tensors):
        (n,) = struct.unpack_from("<Q", raw, pos)
        name = raw[pos + 8:pos + 8 + n].decode()
        pos += 8 + n
        (nd,) = struct.unpack_from("<I", raw, pos)
        dims = list(struct.unpack_from(f"<{nd}Q", raw, pos + 4))
        pos += 4 + 8 * nd
        ttype, offset = struct.unpack_from("<IQ", raw, pos)
        pos += 12
        infos.append(TInfo(name, dims, ttype, offset))
    align = next((kv.value for kv in kvs if kv.key == "general.alignment"), 32)
    start = -(-pos // align) * align
    data = [raw[start + t.offset:start + t.offset + tensor_nbytes(t)] for t in infos]
    return Doc(kvs, infos, data, version, align)


def tensor_nbytes(t: TInfo) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(t.ttype)]
    n = math.prod(t.dims)
    return n // block * size


def encode_value(vtype: int, value: Any, itype: int | None = None) -> bytes:
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if vtype in SCALARS:
        return struct.pack(SCALARS[vtype], value)
    if vtype == STR:
        b = value.encode("utf-8")
        return struct.pack("<Q", len(b)) + b
    if vtype == ARR:
        assert itype is not None
        return struct.pack("<IQ", itype, len(value)) + b"".join(encode_value(itype, v) for v in value)
    return b""  # an unknown value type: no payload


def write_doc(doc: Doc) -> tuple[bytes, list[tuple[int, int, str]]]:
    """The file's bytes, and its regions (start, end, kind) for classifying byte flips."""
    out = bytearray(b"GGUF")
    regions: list[tuple[int, int, str]] = []

    def put(b: bytes, kind: str) -> None:
        regions.append((len(out), len(out) + len(b), kind))
        out.extend(b)

    put(struct.pack("<I", doc.version), "version")
    put(struct.pack("<QQ", len(doc.tensors) if doc.n_tensors is None else doc.n_tensors,
                    len(doc.kv) if doc.n_kv is None else doc.n_kv), "count")
    for kv in doc.kv:
        kb = kv.key.encode()
        put(struct.pack("<Q", len(kb)), "len")
        put(kb, "key")
        put(struct.pack("<I", kv.vtype), "vtype")
        if kv.vtype == ARR and not isinstance(kv.value, bytes):
            put(struct.pack("<IQ", kv.itype, len(kv.value)), "arr-head")
            for v in kv.value:
                if kv.itype == STR:
                    b = v.encode()
                    put(struct.pack("<Q", len(b)), "len")
                    put(b, "str")
                else:
                    put(encode_value(kv.itype, v), "num")
        elif kv.vtype == STR and not isinstance(kv.value, bytes):
            b = kv.value.encode()
            put(struct.pack("<Q", len(b)), "len")
            put(b, "str")
        else:
            put(encode_value(kv.vtype, kv.value, kv.itype), "num")
    for t in doc.tensors:
        nb = t.name.encode()
        put(struct.pack("<Q", len(nb)), "len")
        put(nb, "tensor-name")
        put(struct.pack("<I", len(t.dims)) + b"".join(struct.pack("<Q", d) for d in t.dims), "dims")
        put(struct.pack("<I", t.ttype), "ttype")
        put(struct.pack("<Q", t.offset), "offset")
    a = doc.layout_align
    put(bytes(-len(out) % a), "pad")
    start = len(out)
    for t, d in sorted(zip(doc.tensors, doc.data), key=lambda p: p[0].offset):
        if 0 < start + t.offset - len(out) <= 1 << 20:  # a wild offset gets no data (and no huge gap)
            put(bytes(start + t.offset - len(out)), "pad")
        if start + t.offset == len(out):
            put(d, "data")
    put(bytes(-(len(out) - start) % a), "pad")
    if doc.tail:
        put(doc.tail, "tail")
    return bytes(out), regions


def relayout(doc: Doc, align: int | None = None) -> Doc:
    """Recompute every tensor's offset for the data as it now is (after a type, shape or data change)."""
    doc = copy.deepcopy(doc)
    a = align or doc.layout_align
    doc.layout_align = a
    pos = 0
    for t, d in zip(doc.tensors, doc.data):
        t.offset = pos
        pos = -(-(pos + len(d)) // a) * a
    return doc


# ---------------------------------------------------------------------------------------------- the corpus

NAN, INF = float("nan"), float("inf")
_BLOCK_BYTES = {2: 18, 3: 20, 8: 34}  # Q4_0, Q4_1, Q8_0: a block starts with its fp16 scale
PROMPT = "hello world, the quick brown fox"
IDS = [1, 5, 17, 200, 33, 2, 8, 64, 150, 299]  # the token ids whose logits every accepted model must keep


def pristine_paths(root: Path) -> dict[str, Path]:
    return {"gguf": root / "tiny.gguf", "q4": root / "tiny-q4.gguf", "hf": root / "tiny-hf",
            "peft": root / "adapter", "agguf": root / "adapter.gguf", "data": root / "data.jsonl"}


def _int_variants(v: int) -> list[tuple[int, Any, str]]:
    """(vtype, value, kind) for an integer field: the same value in every encoding that holds it (strict),
    wrong types, and out-of-range or inconsistent values."""
    out: list[tuple[int, Any, str]] = [(t, v, "same") for t in INT_TYPES if _RANGES[t][0] <= v <= _RANGES[t][1]]
    out += [(F32, float(v), "same"), (F64, float(v), "same")]
    out += [(STR, str(v), "type"), (STR, "x", "type"), (BOOL, True, "type"), (F32, v + 0.5, "type"),
            (ARR, [v], "type"), (ARR, [], "type")]
    for x in (0, -1, v + 1, v - 1, 2 * v, v // 2, 2**31 - 1):
        out.append((I32, x, "value"))
    out += [(U32, 2**32 - 1, "value"), (U64, 2**63, "value"), (U64, 2**64 - 1, "value"), (I64, -(2**63), "value"),
            (F32, NAN, "value"), (F32, INF, "value"), (F32, -INF, "value"), (F64, 1e300, "value"),
            (I32, 1 << 24, "value")]
    return out


def _float_variants(v: float) -> list[tuple[int, Any, str]]:
    return [(F64, v, "same"), (STR, str(v), "type"), (BOOL, True, "type"), (ARR, [v], "type"), (U32, 0, "value"),
            (F32, 0.0, "value"), (F32, -1.0, "value"), (F32, NAN, "value"), (F32, INF, "value"), (F32, -INF, "value"),
            (F32, 3e38, "value"), (F32, 1e-38, "value"), (F32, -v, "value"), (F32, 2 * v, "legit")]


def _str_variants(v: str) -> list[tuple[int, Any, str]]:
    return [(U32, 7, "type"), (BOOL, True, "type"), (ARR, [v], "type"), (STR, "", "value"),
            (STR, v + "x", "value"), (STR, v[:-1], "value"), (STR, "\u00e9" * 40_000, "value")]


# Fields whose other well-typed values make a valid, different model (the corpus only asks for no crash and
# finite logits there): names, the pre-tokenizer, the chat template, token ids inside the vocabulary.
_LENIENT_KEYS = {"general.name", "tokenizer.ggml.pre", "tokenizer.chat_template", "nomoat.meta", "nomoat.lora_config",
                 "nomoat.version", "nomoat.base_name", "nomoat.base_source", "general.base_model.0.name",
                 "general.base_model.count", "general.file_type", "general.quantization_version"}
# llama.cpp reads any finite alpha (0 means a scale of 1): other sane values make a different valid adapter.
_LENIENT_NUMBERS = {"adapter.lora.alpha"}
_ID_KEYS = {"tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id"}
# Keys whose removal gives a valid, different file.
_LENIENT_REMOVAL = _LENIENT_KEYS | _ID_KEYS | {"tokenizer.ggml.token_type", "adapter.lora.alpha"}


def gguf_cases(target: str, doc: Doc, raw: bytes, regions: list[tuple[int, int, str]], rng: random.Random,
               flips: int, cuts: int) -> list[dict]:
    """Mutations of a GGUF file (model or adapter)."""
    cases: list[dict] = [{"op": "pristine"}]
    vocab = len(doc.get("tokenizer.ggml.tokens").value) if doc.get("tokenizer.ggml.tokens") else 0

    def add(kind: str, **kw: Any) -> None:
        cases.append({"kind": kind, **kw})

    for kv in doc.kv:
        k = kv.key
        if kv.vtype in INT_TYPES:
            variants = _int_variants(kv.value)
        elif kv.vtype in (F32, F64):
            variants = _float_variants(kv.value)
        elif kv.vtype == STR:
            variants = _str_variants(kv.value) if len(kv.value) < 100_000 else []
        elif kv.vtype == BOOL:
            variants = [(U8, int(kv.value), "type"), (I32, 0, "type"), (I32, 7, "type"), (STR, "true", "type"),
                        (BOOL, not kv.value, "legit")]
        else:  # arrays
            items = kv.value
            variants = [(U32, 7, "type"), (STR, "x", "type"), (ARR, [], "value"), (ARR, items[:1], "value"),
                        (ARR, items[:-1], "value"), (ARR, items + items[-1:], "value")]
            if kv.itype == STR:
                variants.append((ARR, (I32, list(range(len(items)))), "type"))
            elif kv.itype in INT_TYPES:
                variants += [(ARR, (STR, [str(x) for x in items]), "type"), (ARR, (F32, [float(x) for x in items]),
                                                                             "type")]
            if kv.itype == STR and k == "tokenizer.ggml.tokens":
                variants.append((ARR, items[:5] + [items[6]] + items[6:], "value"))  # a duplicated token
            if k == "tokenizer.ggml.token_type":
                variants += [(ARR, [1] * len(items), "legit"), (ARR, [99] + items[1:], "value"),
                             (ARR, [-1] * len(items), "value")]
            if k == "tokenizer.ggml.merges":  # fewer merges: a valid, different BPE
                variants = [(t, v, "legit" if t == ARR and v and why == "value" else why) for t, v, why in variants]
                variants += [(ARR, ["a b c"] + items[1:], "value"), (ARR, ["zz qq"] + items[1:], "value"),
                             (ARR, items[1:], "legit")]
        for vtype, value, why in variants:
            itype = None
            if vtype == ARR:
                if isinstance(value, tuple):
                    itype, value = value
                else:
                    itype = kv.itype if kv.vtype == ARR else (STR if isinstance(kv.value, str) else
                                                               F32 if isinstance(kv.value, float) else I32)
            number = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            lenient = why == "legit" or k in _LENIENT_KEYS or (
                k in _ID_KEYS and number and value == int(value) and 0 <= value < vocab) or (
                k in _LENIENT_NUMBERS and number and abs(value) <= 1e4)
            add("lenient" if lenient else "strict", op="set", key=k, vtype=vtype, value=value, itype=itype,
                why=why)
        add("lenient" if k in _LENIENT_REMOVAL else "strict", op="del", key=k)
        add("strict", op="dup", key=k)
    for layout, key_v in ((32, (U32, 32)), (64, (U32, 64)), (32, (U32, 64)), (64, (U32, 32)), (32, (U32, 0)),
                          (32, (U32, 1)), (32, (U32, 7)), (32, (U32, 3)), (32, (U64, 2**63)), (32, (STR, "32")),
                          (32, (F32, 32.0)), (16, (U32, 16)), (32, (U32, 1 << 16)), (32, (I32, -32)), (8, (U64, 8))):
        add("strict", op="align", layout=layout, vtype=key_v[0], value=key_v[1])
    for i, t in enumerate(doc.tensors):
        d = t.dims
        for dims in ([*d[::-1]], [0, *d[1:]], [d[0] + 1, *d[1:]], [d[0] * 2, *d[1:]], [*d, 1], [*d, 2],
                     [2**40, *d[1:]], [2**63, 2**63], [d[0]] if len(d) > 1 else [d[0], 1], [1] * 5, []):
            add("strict", op="tensor", index=i, field="dims", value=dims)
        for tt in (0, 1, 2, 3, 6, 8, 30, 24, 26, 99, 2**31):
            if tt != t.ttype:
                add("strict", op="tensor", index=i, field="ttype", value=tt)
        prev = doc.tensors[i - 1].offset if i else 0
        for off in (0, prev, t.offset + 32, t.offset + 1, t.offset - 32, 2**40, 2**64 - 32, len(raw)):
            if off != t.offset and off >= 0:
                add("strict", op="tensor", index=i, field="offset", value=off)
        add("strict", op="tensor", index=i, field="name", value=doc.tensors[(i + 1) % len(doc.tensors)].name)
        add("strict", op="tensor", index=i, field="name", value=t.name.replace("weight", "wheight"))
        add("strict", op="drop-tensor", index=i)
    same = {}
    for i, t in enumerate(doc.tensors):
        same.setdefault((tuple(t.dims), t.ttype), []).append(i)
    for group in same.values():  # a valid permutation of equal-sized tensors: a different, valid file
        if len(group) > 1:
            add("lenient", op="swap", i=group[0], j=group[1])
    # Weights set to values no trained model holds: refused on load (a valid large weight is a different model).
    for i in sorted({0, 1, len(doc.tensors) // 2, len(doc.tensors) - 1}):
        t = doc.tensors[i]
        size, fmt = {0: (4, "<f"), 1: (2, "<e")}.get(t.ttype, (_BLOCK_BYTES.get(t.ttype, 0), "<e"))
        if not size:
            continue
        for value in (NAN, INF, -INF, 3e38, 1e30, 70000.0, 60000.0, 1000.0, 0.5):
            if fmt == "<e" and abs(value) > 65504 and math.isfinite(value):
                continue
            legit = math.isfinite(value) and abs(value) * (1 if t.ttype in (0, 1) else 16) <= 65504
            for at in (0, (len(doc.data[i]) // size // 2) * size):
                add("lenient" if legit else "strict", op="poke", index=i, at=at, fmt=fmt, value=value)
    add("strict", op="extra-tensor", name="blk.0.attn_extra.weight")
    add("strict", op="extra-tensor", name="blk.7.attn_q.weight")
    for n_t, n_kv in ((len(doc.tensors) + 1, None), (len(doc.tensors) - 1, None), (None, len(doc.kv) + 1),
                      (None, len(doc.kv) - 1), (2**40, None), (None, 2**40), (0, None), (None, 0)):
        add("strict", op="counts", n_tensors=n_t, n_kv=n_kv)
    for v in (0, 1, 2, 4, 2**31):
        add("lenient" if v == 2 else "strict", op="version", value=v)
    for n in (1, 31, 32, 33, 4096):
        add("strict", op="append", n=n)
    header_end = max(e for s, e, k in regions if k in ("offset", "ttype", "dims"))
    points = sorted({0, 3, 4, 8, 23, 24, 25, header_end - 1, header_end, header_end + 1, len(raw) - 1, len(raw) - 32}
                    | {rng.randrange(1, len(raw)) for _ in range(cuts)})
    for at in points:
        add("strict", op="truncate", at=at)
    for _ in range(flips):
        # Half of the flips in the header and tensor table, half anywhere.
        pos = rng.randrange(header_end) if rng.random() < 0.6 else rng.randrange(len(raw))
        region = next(k for s, e, k in regions if s <= pos < e)
        add("lenient" if region in ("str", "num", "data", "key", "tensor-name") else "strict", op="flip", pos=pos,
            xor=rng.randrange(1, 256), region=region)
    return cases


def apply_gguf(doc: Doc, raw: bytes, case: dict) -> bytes:
    """The bytes of a GGUF case."""
    op = case["op"]
    if op == "truncate":
        return raw[:case["at"]]
    if op == "flip":
        b = bytearray(raw)
        b[case["pos"]] ^= case["xor"]
        return bytes(b)
    if op == "append":
        return raw + bytes(range(256)) * (case["n"] // 256) + bytes(range(case["n"] % 256))
    doc = copy.deepcopy(doc)
    if op == "set":
        kv = KV(case["key"], case["vtype"], case["value"], case.get("itype"))
        doc.kv = [kv if k.key == case["key"] else k for k in doc.kv]
        if not any(k.key == case["key"] for k in doc.kv):
            doc.kv.append(kv)
    elif op == "del":
        doc.kv = [k for k in doc.kv if k.key != case["key"]]
    elif op == "dup":
        doc.kv.append(copy.deepcopy(doc.get(case["key"])))
    elif op == "align":
        doc.kv = [k for k in doc.kv if k.key != "general.alignment"] + [KV("general.alignment", case["vtype"],
                                                                              case["value"])]
        doc = relayout(doc, case["layout"])
    elif op == "tensor":
        setattr(doc.tensors[case["index"]], case["field"], case["value"])
    elif op == "drop-tensor":
        del doc.tensors[case["index"]], doc.data[case["index"]]
        doc = relayout(doc)
    elif op == "poke":
        d = bytearray(doc.data[case["index"]])
        struct.pack_into(case["fmt"], d, case["at"], case["value"])
        doc.data[case["index"]] = bytes(d)
    elif op == "swap":
        i, j = case["i"], case["j"]
        doc.data[i], doc.data[j] = doc.data[j], doc.data[i]
    elif op == "extra-tensor":
        doc.tensors.append(TInfo(case["name"], [64, 64], 0, 0))  # GGML type 0: F32
        doc.data.append(bytes(64 * 64 * 4))
        doc = relayout(doc)
    elif op == "counts":
        doc.n_tensors, doc.n_kv = case["n_tensors"], case["n_kv"]
    elif op == "version":
        doc.version = case["value"]
    return write_doc(doc)[0]


# --- JSON and safetensors files (HF directory, PEFT adapter)

def json_cases(fname: str, obj: dict, table: dict[str, str]) -> list[dict]:
    """Every key set to each wrong type and odd value, removed and duplicated; `table` marks keys whose other
    values are valid ("lenient"), or whose every value is ("any")."""
    cases = []
    for k, v in obj.items():
        values: list[Any] = ["x", str(v), True, None, [v], {}, 0, -1, NAN, INF, 1e308, 2**63, 0.5]
        if isinstance(v, int) and not isinstance(v, bool):
            values += [v + 1, v - 1, 2 * v, float(v), v + 0.5]
        if isinstance(v, float):
            values += [2 * v, -v]
        if isinstance(v, bool):
            values += [not v, int(v), "false", "true"]
        if isinstance(v, list):
            values += [[], v[:1], v + ["zz_proj"], "all-linear", 7]
        if isinstance(v, str):
            values += ["", v + "x", 7]
        for x in values:
            if x == v and type(x) is type(v):
                continue
            kind = table.get(k, "strict")
            number = isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)
            same_type = type(x) is type(v) or (number and isinstance(v, int | float) and not isinstance(v, bool))
            lenient = kind == "any" or (kind == "lenient" and same_type)
            cases.append({"kind": "lenient" if lenient else "strict", "op": "json-set", "file": fname, "key": k,
                          "value": x})
        cases.append({"kind": "lenient" if table.get(k) in ("any", "lenient", "optional") else "strict",
                      "op": "json-del", "file": fname, "key": k})
        cases.append({"kind": "strict", "op": "json-dup", "file": fname, "key": k, "value": v})
    for text in ("", "[]", "{", "null", "NaN", "[" * 100_000 + "]" * 100_000, '{"a": 1}\n{"b": 2}', "\ufeff{}"):
        cases.append({"kind": "strict", "op": "json-text", "file": fname, "text": text})
    return cases


def safetensors_cases(fname: str, raw: bytes, rng: random.Random, flips: int, cuts: int) -> list[dict]:
    n = struct.unpack_from("<Q", raw)[0]
    header = json.loads(raw[8:8 + n])
    cases: list[dict] = []
    names = [k for k in header if k != "__metadata__"]
    for name in names:
        info = header[name]
        for dtype in ("I32", "F16", "BF16", "F64", "U8", "BOOL", "X"):
            if dtype != info["dtype"]:
                cases.append({"kind": "strict", "op": "st-header", "file": fname, "name": name, "field": "dtype",
                              "value": dtype})
        shape = info["shape"]
        for sh in (shape[::-1], [shape[0] * 2, shape[1] // 2] if len(shape) == 2 and shape[1] % 2 == 0 else [1],
                   [*shape, 1], [0, *shape[1:]], [2**40, *shape[1:]], [-1, *shape[1:]], [math.prod(shape)]):
            if sh != shape:
                cases.append({"kind": "strict", "op": "st-header", "file": fname, "name": name, "field": "shape",
                              "value": sh})
        a, b = info["data_offsets"]
        for offs in ([a + 4, b + 4], [0, b - a], [a, b + 4], [a, 2**62], [b, a]):
            cases.append({"kind": "strict", "op": "st-header", "file": fname, "name": name, "field": "data_offsets",
                          "value": offs})
        cases.append({"kind": "strict", "op": "st-rename", "file": fname, "name": name,
                      "value": name.replace("weight", "wheight")})
    for name in names[:3] + names[-2:]:
        for value in (NAN, INF, -INF, 3e38, 1e30, 70000.0, 100.0):
            legit = math.isfinite(value) and abs(value) <= (1e4 if "lora" in name else 65504)
            cases.append({"kind": "lenient" if legit else "strict", "op": "st-poke", "file": fname, "name": name,
                          "value": value})
    for length in (0, 1, n - 1, n + 1, 2**63, len(raw)):
        cases.append({"kind": "strict", "op": "st-length", "file": fname, "value": length})
    for at in sorted({0, 7, 8, 9, 8 + n - 1, 8 + n, len(raw) - 1} | {rng.randrange(1, len(raw)) for _ in range(cuts)}):
        cases.append({"kind": "strict", "op": "truncate-file", "file": fname, "at": at})
    for _ in range(flips):
        pos = rng.randrange(8 + n) if rng.random() < 0.5 else rng.randrange(len(raw))
        cases.append({"kind": "strict" if pos < 8 + n else "lenient", "op": "flip-file", "file": fname, "pos": pos,
                      "xor": rng.randrange(1, 256), "region": "header" if pos < 8 + n else "data"})
    return cases


def apply_file(root: Path, case: dict) -> None:
    """Apply a JSON, safetensors or byte mutation to a file inside a copied directory `root`."""
    path = root / case["file"]
    op = case["op"]
    if op == "json-set":
        obj = json.loads(path.read_text())
        obj[case["key"]] = case["value"]
        path.write_text(json.dumps(obj))
    elif op == "json-del":
        obj = json.loads(path.read_text())
        del obj[case["key"]]
        path.write_text(json.dumps(obj))
    elif op == "json-dup":
        text = path.read_text()
        i = text.index("{") + 1
        path.write_text(text[:i] + json.dumps(case["key"]) + ": " + json.dumps(case["value"]) + ", " + text[i:])
    elif op == "json-text":
        path.write_text(case["text"])
    elif op == "rm":
        path.unlink()
    elif op in ("st-header", "st-rename", "st-length"):
        raw = path.read_bytes()
        n = struct.unpack_from("<Q", raw)[0]
        header, body = json.loads(raw[8:8 + n]), raw[8 + n:]
        if op == "st-header":
            header[case["name"]][case["field"]] = case["value"]
        elif op == "st-rename":
            header[case["value"]] = header.pop(case["name"])
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        length = case["value"] if op == "st-length" else len(text)
        path.write_bytes(struct.pack("<Q", length) + (raw[8:8 + n] if op == "st-length" else text) + body)
    elif op == "st-poke":  # the tensor's first value (all test tensors are F32)
        raw = bytearray(path.read_bytes())
        n = struct.unpack_from("<Q", raw)[0]
        start = 8 + n + json.loads(raw[8:8 + n])[case["name"]]["data_offsets"][0]
        struct.pack_into("<f", raw, start, case["value"])
        path.write_bytes(bytes(raw))
    elif op == "truncate-file":
        path.write_bytes(path.read_bytes()[:case["at"]])
    elif op == "flip-file":
        b = bytearray(path.read_bytes())
        b[case["pos"]] ^= case["xor"]
        path.write_bytes(bytes(b))
    elif op == "data-record":
        lines = path.read_text().splitlines()
        rec = json.loads(lines[case["line"]])
        if case["value"] == "<delete>":
            rec.pop(case["key"], None)
        else:
            rec[case["key"]] = case["value"]
        lines[case["line"]] = json.dumps(rec)
        path.write_text("\n".join(lines) + "\n")
    elif op == "data-bytes":
        path.write_bytes(bytes.fromhex(case["hex"]))
    else:
        raise ValueError(op)


# Config keys: "lenient" = another value of the same type is a valid different model; "any" = ignored or
# cosmetic; "optional" = may be removed.
HF_CONFIG = {"torch_dtype": "any", "architectures": "any", "bos_token_id": "lenient", "eos_token_id": "lenient",
             "rope_theta": "lenient", "rms_norm_eps": "lenient", "max_position_embeddings": "lenient",
             "rope_scaling": "optional", "head_dim": "optional", "hidden_act": "optional", "attention_bias": "optional",
             "mlp_bias": "optional", "tie_word_embeddings": "strict", "model_type": "optional"}
TOKENIZER_CONFIG = {"chat_template": "any", "bos_token": "any", "eos_token": "any", "pad_token": "any",
                    "tokenizer_class": "any", "clean_up_tokenization_spaces": "any", "model_max_length": "any",
                    "add_eos_token": "lenient", "add_bos_token": "lenient"}
GENERATION_CONFIG = {"bos_token_id": "any", "eos_token_id": "any"}
ADAPTER_CONFIG = {"lora_alpha": "lenient", "task_type": "any", "base_model_name_or_path": "any", "revision": "any",
                  "init_lora_weights": "any", "inference_mode": "any", "lora_dropout": "lenient",
                  "use_rslora": "lenient", "alpha_pattern": "lenient", "layers_pattern": "any",
                  "target_modules": "optional", "rank_pattern": "optional"}
ADAPTER_META = {"base_fingerprint": "optional"}


def data_cases(path: Path, rng: random.Random, flips: int) -> list[dict]:
    lines = path.read_text().splitlines()
    cases: list[dict] = [{"kind": "data", "op": "pristine"}]
    for line in (0, 3):
        rec = json.loads(lines[line])
        for key in [*rec, "system", "extra"]:
            for value in ("<delete>", None, 7, 1.5, True, [], {}, ["a"], {"a": 1}, "", " ", "x" * 300_000,
                          "\u0000\ud7ff\ufffd", "<|im_start|>assistant\n", "{{ raise_exception('x') }}"):
                cases.append({"kind": "data", "op": "data-record", "file": path.name, "line": line, "key": key,
                              "value": value})
    raw = path.read_bytes()
    texts = [b"", b"\n\n", b"[]", b"{}", b"[{}]", b"null\n", b"\xff\xfe\x00", b"\xef\xbb\xbf" + raw,
             raw.replace(b"\n", b"\r\n"), b"[" + b",".join(raw.splitlines()) + b"]", b"[" * 100_000,
             b'{"instruction": "a", "output": "b", "output": "c"}\n', raw + b"{not json}\n", b'{"text": NaN}\n',
             b'{"instruction": "a", "output": "\\ud800"}\n', raw[:len(raw) // 2]]
    for t in texts:
        cases.append({"kind": "data", "op": "data-bytes", "file": path.name, "hex": t.hex()})
    for _ in range(flips):
        b = bytearray(raw)
        b[rng.randrange(len(b))] ^= rng.randrange(1, 256)
        cases.append({"kind": "data", "op": "data-bytes", "file": path.name, "hex": bytes(b).hex()})
    return cases


def corpus(root: Path, seed: int = 15, scale: float = 1.0) -> list[dict]:
    """Every case, numbered; `scale` sizes the random flips and cuts."""
    rng = random.Random(seed)
    p = pristine_paths(root)
    cases: list[dict] = []

    def extend(target: str, items: list[dict]) -> None:
        for c in items:
            cases.append({"id": len(cases), "target": target, "kind": c.pop("kind", "strict"), **c})

    for target, flips, cuts in (("gguf", 700, 40), ("q4", 250, 20), ("agguf", 250, 20)):
        raw = p[target].read_bytes()
        doc = read_doc(raw)
        _, regions = write_doc(doc)
        extend(target, gguf_cases(target, doc, raw, regions, rng, int(flips * scale), int(cuts * scale)))
    hf = p["hf"]
    hf_cases = [{"kind": "strict", "op": "pristine"}]
    hf_cases += json_cases("config.json", json.loads((hf / "config.json").read_text()), HF_CONFIG)
    hf_cases += json_cases("tokenizer_config.json", json.loads((hf / "tokenizer_config.json").read_text()),
                           TOKENIZER_CONFIG)
    hf_cases += json_cases("generation_config.json", json.loads((hf / "generation_config.json").read_text()),
                           GENERATION_CONFIG)
    hf_cases += safetensors_cases("model.safetensors", (hf / "model.safetensors").read_bytes(), rng,
                                  int(250 * scale), int(20 * scale))
    for fname in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "model.safetensors",
                  "config.json"):
        hf_cases.append({"kind": "lenient" if fname in ("tokenizer_config.json", "generation_config.json")
                         else "strict", "op": "rm", "file": fname})
    tj = (hf / "tokenizer.json").read_bytes()
    for _ in range(int(60 * scale)):
        hf_cases.append({"kind": "lenient", "op": "flip-file", "file": "tokenizer.json",
                         "pos": rng.randrange(len(tj)), "xor": rng.randrange(1, 256), "region": "json"})
    for at in sorted({rng.randrange(1, len(tj)) for _ in range(int(10 * scale))}):
        hf_cases.append({"kind": "strict", "op": "truncate-file", "file": "tokenizer.json", "at": at})
    extend("hf", hf_cases)
    a = p["peft"]
    a_cases = [{"kind": "strict", "op": "pristine"}]
    a_cases += json_cases("adapter_config.json", json.loads((a / "adapter_config.json").read_text()), ADAPTER_CONFIG)
    a_cases += json_cases("nomoat_adapter.json", json.loads((a / "nomoat_adapter.json").read_text()), ADAPTER_META)
    a_cases += safetensors_cases("adapter_model.safetensors", (a / "adapter_model.safetensors").read_bytes(), rng,
                                 int(250 * scale), int(20 * scale))
    a_cases += [{"kind": "strict", "op": "rm", "file": f} for f in ("adapter_config.json", "adapter_model.safetensors")]
    a_cases.append({"kind": "lenient", "op": "rm", "file": "nomoat_adapter.json"})
    extend("peft", a_cases)
    extend("data", data_cases(p["data"], rng, int(40 * scale)))
    return cases


# ---------------------------------------------------------------------------------------------- the worker

MODEL_TARGETS, ADAPTER_TARGETS = ("gguf", "q4", "hf"), ("peft", "agguf")
_docs: dict[str, tuple[Doc, bytes]] = {}


def build_case(root: Path, case: dict, out: Path) -> dict[str, Path]:
    """Write the case's files under `out`; returns the paths its commands use."""
    p = pristine_paths(root)
    t, op = case["target"], case["op"]
    out.mkdir(parents=True, exist_ok=True)
    if t in ("gguf", "q4", "agguf"):
        if t not in _docs:
            raw = p[t].read_bytes()
            _docs[t] = read_doc(raw), raw
        doc, raw = _docs[t]
        path = out / p[t].name
        path.write_bytes(raw if op == "pristine" else apply_gguf(doc, raw, case))
        return {"model": path} if t != "agguf" else {"adapter": path, "base": p["hf"]}
    if t in ("hf", "peft"):
        d = out / p[t].name
        shutil.copytree(p[t], d)
        if op != "pristine":
            apply_file(d, case)
        return {"model": d} if t == "hf" else {"adapter": d, "base": p["hf"]}
    shutil.copy(p["data"], out / p["data"].name)
    if op != "pristine":
        apply_file(out, case)
    return {"data": out / p["data"].name, "base": p["hf"], "out": out / "run"}


def commands(case: dict, paths: dict[str, Path]) -> list[tuple[str, list[str]]]:
    t = case["target"]
    gen = ["-n", "6", "--temperature", "0", "-t", "1"]
    if t in MODEL_TARGETS:
        m = str(paths["model"])
        return [("info", ["info", "-m", m]), ("raw", ["generate", PROMPT, "--raw", "-m", m, *gen]),
                ("chat", ["generate", "hi", "-m", m, *gen])]
    if t in ADAPTER_TARGETS:
        a, base = str(paths["adapter"]), str(paths["base"])
        return [("info", ["adapter", "info", a, "-m", base]),
                ("raw", ["generate", PROMPT, "--raw", "-m", base, "-a", a, *gen])]
    return [("finetune", ["finetune", "--data", str(paths["data"]), "--out", str(paths["out"]), "-m",
                          str(paths["base"]), "--max-steps", "1", "--batch-size", "2", "--seq-len", "64",
                          "--val-fraction", "0", "--rank", "2", "-t", "1"])]


def run_cli(args: list[str]) -> dict[str, Any]:
    """`nomoat ARGS` through the real entry point, in this process: exit code, output, and the traceback of
    anything that escaped it (a refusal must be a NomoatError, which the entry point prints as one line)."""
    from nomoat.cli import main

    sys.argv = ["nomoat", *args]
    out, err = io.StringIO(), io.StringIO()
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    code, exc = 0, None
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - anything else is what the corpus looks for
        code, exc = -1, traceback.format_exc(limit=-6)
    finally:
        sys.stdout, sys.stderr = saved
    e = err.getvalue()
    return {"code": code, "out": out.getvalue()[:2000], "err": e if len(e) < 4000 else e[:2000] + " ... " + e[-1000:],
            "exc": exc}


def logits_of(case: dict, paths: dict[str, Path], chat: bool) -> dict[str, Any]:
    """What the accepted files compute, through the Python API: the logits on IDS, the prompts' token ids
    (tokenizer, chat template, BOS) and a greedy completion's token ids (stop tokens), as one digest."""
    import hashlib

    import torch

    from nomoat.adapters import load_adapter
    from nomoat.errors import NomoatError
    from nomoat.runtime.generate import GenerationConfig, generate_batch
    from nomoat.runtime.loading import load
    from nomoat.runtime.prompts import prompt_ids

    try:
        if case["target"] in MODEL_TARGETS:
            lm = load(paths["model"], threads=1, quant="auto")
        else:
            lm = load(paths["base"], threads=1)
            load_adapter(lm, paths["adapter"])
        with torch.inference_mode():
            x = lm.model(torch.tensor([IDS])).float()
        ids = [prompt_ids(lm, PROMPT, raw=True), prompt_ids(lm, "hi") if chat else []]
        done = generate_batch(lm.model, lm.tokenizer, [ids[1] or ids[0]], GenerationConfig(max_new_tokens=6,
                                                                                         temperature=0))
    except NomoatError as e:
        return {"api_error": str(e)}
    except BaseException:  # noqa: BLE001
        return {"exc": traceback.format_exc(limit=-6)}
    digest = hashlib.sha256(x.numpy().tobytes() + json.dumps([*ids, done[0].token_ids]).encode()).hexdigest()[:16]
    return {"digest": digest, "finite": bool(torch.isfinite(x).all())}


def run_case(root: Path, case: dict, work: Path) -> dict[str, Any]:
    t0 = time.monotonic()
    out = work / f"case-{case['id']}"
    try:
        paths = build_case(root, case, out)
        res: dict[str, Any] = {"id": case["id"], "runs": {}}
        for name, args in commands(case, paths):
            res["runs"][name] = run_cli(args)
        accepted = res["runs"].get("raw", {}).get("code") == 0
        if accepted and case["target"] != "data":
            res["logits"] = logits_of(case, paths, res["runs"].get("chat", {}).get("code") == 0)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    res["seconds"] = round(time.monotonic() - t0, 3)
    return res


def worker(root: Path, extra_bytes: int) -> None:
    """Answer case numbers on stdin with one JSON result line each, under an address-space limit."""
    import resource

    import torch
    import typer.main

    from nomoat.cli import app

    torch.set_num_threads(1)
    chan = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints from libraries must not reach the result channel
    command = typer.main.get_command(app)  # built once: rebuilding the command tree costs 0.1 s a run
    real = typer.main.get_command
    typer.main.get_command = lambda a: command if a is app else real(a)
    cases = json.loads((root / "cases.json").read_text())
    work = root / f"work-{os.getpid()}"
    for c in cases:  # warm up (lazy imports, first allocations) before the limit
        if c["op"] == "pristine" and c["target"] in ("gguf", "q4", "hf", "peft", "data"):
            run_case(root, c, work)
    vsz = int(Path("/proc/self/statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (vsz + extra_bytes, vsz + extra_bytes))
    chan.write(json.dumps({"ready": True, "address_space": vsz + extra_bytes}) + "\n")
    for line in sys.stdin:
        case = cases[int(line)]
        try:
            res = run_case(root, case, work)
        except BaseException:  # noqa: BLE001 - a broken harness step is a result too
            res = {"id": case["id"], "runs": {}, "harness": traceback.format_exc(limit=-6)}
        chan.write(json.dumps(res) + "\n")


def describe(case: dict) -> str:
    """A case in one short line."""
    skip = {"id", "target", "kind", "op", "hex", "text"}
    params = ", ".join(f"{k}={str(v)[:40]!s}" for k, v in case.items() if k not in skip)
    return f"#{case['id']} {case['target']} {case['kind']} {case['op']}({params})"


if __name__ == "__main__":
    cmd, corpus_dir = sys.argv[1], Path(sys.argv[2])
    if cmd == "worker":
        worker(corpus_dir, int(sys.argv[3]))
    else:
        all_cases = json.loads((corpus_dir / "cases.json").read_text())
        one = all_cases[int(sys.argv[3])]
        print(describe(one))
        if cmd == "show":
            print(build_case(corpus_dir, one, corpus_dir / "show"))
        else:
            print(json.dumps(run_case(corpus_dir, one, corpus_dir / "show"), indent=1))
