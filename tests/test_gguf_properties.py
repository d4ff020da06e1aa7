"""Property tests (Hypothesis) of the GGUF metadata parser: arbitrary bytes, structured but wrong headers and
damaged copies of the tiny model's header never raise anything but NomoatError, never allocate much more
than the file's size, and never take long."""

from __future__ import annotations

import struct
import time
import traceback
import tracemalloc
from pathlib import Path

import pytest
from conftest import make_tiny_lm, write_tiny_gguf
from fuzz_corpus import ARR, BOOL, F32, F64, I32, KV, STR, U32, U64, Doc, TInfo, read_doc, write_doc

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from nomoat.errors import NomoatError  # noqa: E402
from nomoat.formats.gguf_read import GGUFModelFile, check_header, parse_gguf  # noqa: E402
from nomoat.formats.tokenizer import Tokenizer  # noqa: E402
from nomoat.runtime.loading import check_shapes  # noqa: E402

SECONDS = 5.0  # generous: tracemalloc slows Python several times
PEAK_BYTES = 64 << 20
PROPS = settings(max_examples=200, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                        HealthCheck.function_scoped_fixture])
_dir: list[Path] = []


def _path(tmp_path_factory) -> Path:
    if not _dir:
        _dir.append(tmp_path_factory.mktemp("props"))
    return _dir[0] / "case.gguf"


def parse_all(path: Path, raw: bytes) -> None:
    """Everything that reads a model GGUF's header, as `nomoat info` and loading do, up to the tensor data."""
    path.write_bytes(raw)
    tracemalloc.start()
    t0 = time.monotonic()
    try:
        check_header(path)
        parse_gguf(path)
        f = GGUFModelFile(path)
        cfg = f.config()
        check_shapes(f, cfg)
        Tokenizer.from_gguf_metadata(f.tokenizer_metadata(), str(path))
    except NomoatError as e:
        assert "\n" not in str(e) and str(path) in str(e), str(e)
    except Exception as e:  # shown short: the file is in the falsifying example
        where = traceback.extract_tb(e.__traceback__)[-1]
        pytest.fail(f"{type(e).__name__}: {e} at {Path(where.filename).name}:{where.lineno}", pytrace=False)
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert time.monotonic() - t0 < SECONDS
    assert peak < PEAK_BYTES + 50 * len(raw), f"peak {peak} bytes for a file of {len(raw)}"


class Pristine:
    """The tiny model's GGUF bytes (a plain object, so that a failing example does not print them)."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw

    def __repr__(self) -> str:
        return "<tiny.gguf>"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Pristine:
    path = write_tiny_gguf(make_tiny_lm(), tmp_path_factory.mktemp("pristine") / "tiny.gguf")
    parse_all(path.with_name("warm.gguf"), path.read_bytes())  # first-use costs out of the timed examples
    return Pristine(path.read_bytes())


def _header(n_tensors: int, n_kv: int, version: int = 3) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)


@PROPS
@given(data=st.one_of(st.binary(max_size=512),
                      st.builds(lambda v, n, k, rest: _header(n, k, v) + rest,
                                st.sampled_from([1, 2, 3, 4, 2**32 - 1]),
                                st.one_of(st.integers(0, 8), st.integers(0, 2**64 - 1)),
                                st.one_of(st.integers(0, 8), st.integers(0, 2**64 - 1)),
                                st.binary(max_size=2048))))
def test_arbitrary_bytes(tmp_path_factory, data: bytes) -> None:
    parse_all(_path(tmp_path_factory), data)


KEYS = ["general.architecture", "general.alignment", "general.name", "llama.block_count", "llama.context_length",
        "llama.embedding_length", "llama.feed_forward_length", "llama.attention.head_count",
        "llama.attention.head_count_kv", "llama.rope.dimension_count", "llama.attention.layer_norm_rms_epsilon",
        "llama.rope.freq_base", "llama.vocab_size", "llama.attention.key_length", "llama.rope.scaling.type",
        "llama.rope.scaling.factor", "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens",
        "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.scores", "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.chat_template"]
NAMES = ["token_embd.weight", "output_norm.weight", "output.weight", "blk.0.attn_q.weight", "blk.0.attn_norm.weight",
         "blk.0.ffn_down.weight", "blk.1.attn_k.weight", "blk.99.attn_v.weight", "rope_freqs.weight", "x"]
_strings = st.one_of(st.sampled_from(["llama", "gpt2", "default", "a b", "", "{{ x }}", "{% for %}"]),
                     st.text(max_size=8))


def _scalar(vtype: int):
    lo, hi = {0: (0, 255), 1: (-128, 127), 2: (0, 65535), 3: (-32768, 32767), 4: (0, 2**32 - 1),
              5: (-(2**31), 2**31 - 1), 10: (0, 2**64 - 1), 11: (-(2**63), 2**63 - 1)}.get(vtype, (0, 0))
    if vtype in (6, 12):
        return st.floats(allow_nan=True, allow_infinity=True, width=32 if vtype == 6 else 64)
    if vtype == BOOL:
        return st.booleans()
    if vtype == STR:
        return _strings
    return st.integers(lo, hi)


@st.composite
def kv_entry(draw) -> KV:
    key = draw(st.one_of(st.sampled_from(KEYS), st.text(max_size=6)))
    vtype = draw(st.one_of(st.sampled_from([0, 1, 4, 5, 6, 7, 8, 10, 11, 12, 9]), st.integers(13, 2**32 - 1)))
    if vtype == ARR:
        itype = draw(st.one_of(st.sampled_from([0, 4, 5, 6, 7, 8]), st.just(ARR), st.integers(13, 40)))
        if itype == ARR:  # nested arrays: raw bytes, possibly deep
            depth = draw(st.one_of(st.sampled_from([1, 2, 3000]), st.integers(1, 100_000)))
            return KV(key, ARR, struct.pack("<IQ", ARR, 1) * depth + struct.pack("<IQ", U32, 0))
        if itype > 12:
            return KV(key, ARR, struct.pack("<IQ", itype, draw(st.integers(0, 2**64 - 1))))
        items = draw(st.lists(_scalar(itype), max_size=40))
        return KV(key, ARR, items, itype)
    if vtype > 12:
        return KV(key, vtype, draw(st.binary(max_size=16)))
    return KV(key, vtype, draw(_scalar(vtype)))


@st.composite
def tensor_entry(draw) -> tuple[TInfo, bytes]:
    name = draw(st.sampled_from(NAMES))
    dims = draw(st.lists(st.one_of(st.sampled_from([0, 1, 32, 64, 300]), st.integers(0, 2**64 - 1)),
                         min_size=0, max_size=5))
    ttype = draw(st.one_of(st.sampled_from([0, 1, 2, 8, 30]), st.integers(0, 2**32 - 1)))
    offset = draw(st.one_of(st.sampled_from([0, 32, 64, 4096]), st.integers(0, 2**64 - 1)))
    return TInfo(name, dims, ttype, offset), draw(st.binary(max_size=256))


@PROPS
@given(kvs=st.lists(kv_entry(), max_size=12), tensors=st.lists(tensor_entry(), max_size=6),
       counts=st.tuples(st.one_of(st.none(), st.integers(0, 2**64 - 1)), st.one_of(st.none(), st.integers(0, 40))),
       tail=st.binary(max_size=64))
def test_structured_but_wrong_headers(tmp_path_factory, kvs, tensors, counts, tail) -> None:
    doc = Doc(kvs, [t for t, _ in tensors], [d for _, d in tensors], n_tensors=counts[0], n_kv=counts[1], tail=tail)
    raw, _ = write_doc(doc)
    parse_all(_path(tmp_path_factory), raw)


@PROPS
@given(edits=st.lists(st.tuples(st.integers(0, 6000), st.integers(1, 255)), min_size=1, max_size=4),
       cut=st.one_of(st.none(), st.integers(0, 380_000)))
def test_damaged_copies_of_the_tiny_model(tmp_path_factory, pristine: Pristine, edits, cut) -> None:
    """Byte flips in the metadata and tensor table (the first 6000 bytes), and truncations anywhere."""
    raw = bytearray(pristine.raw)
    for pos, x in edits:
        raw[pos] ^= x
    parse_all(_path(tmp_path_factory), bytes(raw[:cut] if cut is not None else raw))


@PROPS
@given(key=st.sampled_from(KEYS), vtype=st.sampled_from([U32, I32, F32, F64, U64, BOOL, STR]), data=st.data())
def test_each_field_with_any_typed_value(tmp_path_factory, pristine: Pristine, key: str, vtype: int, data) -> None:
    """The tiny model with one field replaced (or added) with a value of any type."""
    doc = read_doc(pristine.raw)
    value = data.draw(_scalar(vtype) if vtype != STR else _strings)
    kv = [k for k in doc.kv if k.key != key] + [KV(key, vtype, value)]
    raw, _ = write_doc(Doc(kv, doc.tensors, doc.data))
    parse_all(_path(tmp_path_factory), raw)
