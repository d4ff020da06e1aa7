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
import math
import struct
from dataclasses import dataclass
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
