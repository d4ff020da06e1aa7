"""Reading GGUF files: metadata to config, tensors to the model's (Hugging Face) names.

The file is memory-mapped by ``gguf.GGUFReader``; tensors are dequantized one at a
time as the model asks for them. The header is checked before the reader maps
anything so that a truncated or hostile file is refused cheaply.
"""

from __future__ import annotations

import contextlib
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nomoat.errors import NomoatError
from nomoat.model.config import LlamaConfig
from nomoat.model.registry import GGUF_AUXILIARY, architecture

GGUF_MAGIC = b"GGUF"
MAX_COUNT = 1 << 20  # more tensors or metadata keys than this is not a model file

_BLOCK = re.compile(r"blk\.(\d+)\.")
# Types whose blocks `gguf.quants.dequantize` understands and we accept.
FLOAT_TYPES = {"F32", "F16", "BF16"}
QUANT_TYPES = {"Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K"}



# No trained weight comes near this (fp16's largest value); a larger or non-finite one is a damaged file, and
# would overflow the logits to inf or NaN rather than fail loudly.
MAX_WEIGHT = 65504.0
# Per-block fp16 scale (and min) fields: (bytes per block, header fields, largest |code| a scale multiplies).
_BLOCK_SCALES = {"Q4_0": (18, 1, 8), "Q4_1": (20, 2, 15), "Q8_0": (34, 1, 128), "Q5_0": (22, 1, 16),
                 "Q5_1": (24, 2, 31)}


def check_weight(w: torch.Tensor, what: str) -> torch.Tensor:
    """`w` if every value is finite and within ±MAX_WEIGHT (one pass, no copy), else a one-line error."""
    if w.numel():
        lo, hi = torch.aminmax(w.detach().reshape(-1))
        if not (-MAX_WEIGHT <= float(lo) and float(hi) <= MAX_WEIGHT):  # NaN fails both
            bad = float(lo) if not -MAX_WEIGHT <= float(lo) else float(hi)
            raise NomoatError(f"{what} holds {bad:g} (weights must be finite and within ±{MAX_WEIGHT:g}): "
                              "a damaged file")
    return w


def check_blocks(raw: np.ndarray, qtype: str, what: str) -> np.ndarray:
    """Quantized blocks whose fp16 scales (and mins) are finite and keep every weight within ±MAX_WEIGHT."""
    if qtype in _BLOCK_SCALES:
        size, fields, codes = _BLOCK_SCALES[qtype]
        heads = np.ascontiguousarray(raw.reshape(-1, size)[:, :2 * fields]).view(np.float16).astype(np.float32)
        bound = np.abs(heads[:, 0]) * codes + (np.abs(heads[:, 1]) if fields == 2 else 0)
        if not bool(np.all(bound <= MAX_WEIGHT)):  # NaN fails too
            raise NomoatError(f"{what} has a block scale of {heads[~(bound <= MAX_WEIGHT)][0, 0]:g} (weights must be "
                              f"finite and within ±{MAX_WEIGHT:g}): a damaged file")
    return raw


def qk_row_order(rows: int, n_head: int) -> torch.Tensor:
    """Row indices that undo llama.cpp's q/k permutation: hf = gguf[order].

    llama.cpp's converter interleaves the two rotary halves of every head
    (GPT-J style); Hugging Face keeps them split (rotate_half).
    """
    idx = torch.arange(rows)
    return idx.reshape(n_head, rows // n_head // 2, 2).transpose(1, 2).reshape(rows)


def qk_permute_rows(rows: int, n_head: int) -> torch.Tensor:
    """Row indices that apply llama.cpp's q/k permutation: gguf = hf[order]."""
    idx = torch.arange(rows)
    return idx.reshape(n_head, 2, rows // n_head // 2).transpose(1, 2).reshape(rows)


def check_header(path: Path) -> None:
    """Refuse non-GGUF or absurd headers before anything is mapped or allocated."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(24)
    except OSError as e:
        raise NomoatError(f"{path}: cannot read ({e.strerror})") from None
    if len(head) < 24 or head[:4] != GGUF_MAGIC:
        raise NomoatError(f"{path}: not a GGUF file (bad magic)")
    version, n_tensors, n_kv = struct.unpack("<IQQ", head[4:24])
    if version not in (2, 3):
        raise NomoatError(f"{path}: unsupported GGUF version {version}")
    if n_tensors > MAX_COUNT or n_kv > MAX_COUNT or n_tensors * 24 + n_kv * 9 > size:
        raise NomoatError(f"{path}: GGUF header declares {n_tensors} tensors and {n_kv} keys: "
                          "truncated or corrupt file")

# GGUF value types -> struct format (scalars); 8 = string, 9 = array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


class _Cursor:
    """Bounds-checked reads from the file's memory map; a read past the end is a truncated file."""

    def __init__(self, buf: memoryview, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise NomoatError(f"{self.path}: truncated or corrupt GGUF header (read of {n} bytes at offset "
                              f"{self.pos} past the end)")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def scalar(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return bytes(self.take(self.scalar("<Q"))).decode("utf-8", errors="replace")

    def _strings(self, count: int) -> list[str]:
        """An array of strings in one tight loop (a vocabulary and its merges are ~100k of them)."""
        buf, pos, end = self.buf, self.pos, len(self.buf)
        unpack = struct.Struct("<Q").unpack_from
        out = []
        for _ in range(count):
            if pos + 8 > end:
                break
            (n,) = unpack(buf, pos)
            pos += 8
            if pos + n > end:
                break
            out.append(str(buf[pos:pos + n], "utf-8", "replace"))
            pos += n
        else:
            self.pos = pos
            return out
        self.pos = pos
        self.take(end + 1 - pos)  # raises: the array runs past the end of the file
        return out

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == 8:
            return self.string()
        if vtype == 9:
            itype, count = self.scalar("<I"), self.scalar("<Q")
            if count > len(self.buf) - self.pos:  # every item takes at least one byte
                raise NomoatError(f"{self.path}: GGUF array of {count} items cannot fit in the file")
            if itype in _SCALARS:
                fmt = _SCALARS[itype]
                size = struct.calcsize(fmt)
                return list(struct.unpack(f"<{count}{fmt[1]}", self.take(size * count)))
            if itype == 8:
                return self._strings(count)
            if itype == 9:  # no model file nests arrays; reading them recursively could go 10^5 deep
                raise NomoatError(f"{self.path}: GGUF array of arrays at offset {self.pos} is not supported")
            raise NomoatError(f"{self.path}: unknown GGUF array item type {itype}")
        raise NomoatError(f"{self.path}: unknown GGUF value type {vtype}")


@dataclass
class GGUFTensor:
    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: np.ndarray  # GGUF order: ne0 (columns) first
    data_offset: int
    n_bytes: int
    data: np.ndarray  # uint8 (rows, bytes per row) for quantized types, typed for float types


def parse_gguf(path: Path) -> tuple[dict[str, Any], dict[str, GGUFTensor]]:
    """Metadata and tensor table of a GGUF file, with tensor data as views of a read-only memory map.

    Written for speed on large vocabularies (the metadata of a 49k-token model parses in ~0.1 s);
    every size is checked against the file before anything is allocated.
    """
    import gguf

    mm = np.memmap(path, dtype=np.uint8, mode="r")
    cur = _Cursor(memoryview(mm), path)
    cur.take(4)
    version, n_tensors, n_kv = cur.scalar("<I"), cur.scalar("<Q"), cur.scalar("<Q")
    fields: dict[str, Any] = {"GGUF.version": version}
    for _ in range(n_kv):
        key = cur.string()
        if key in fields:
            raise NomoatError(f"{path}: metadata key {key} appears twice")
        fields[key] = cur.value(cur.scalar("<I"))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.scalar("<I")
        if not 1 <= n_dims <= 4:
            raise NomoatError(f"{path}: tensor {name} declares {n_dims} dimensions")
        dims = [cur.scalar("<Q") for _ in range(n_dims)]
        if min(dims) < 1:
            raise NomoatError(f"{path}: tensor {name} has a dimension of 0 ({dims})")
        infos.append((name, dims, cur.scalar("<I"), cur.scalar("<Q")))
    align = fields.get("general.alignment", 32)
    if not isinstance(align, int) or isinstance(align, bool) or not 1 <= align <= 1 << 16 or align & (align - 1):
        raise NomoatError(f"{path}: general.alignment = {align!r} is not a power of two")
    start = -(-cur.pos // align) * align
    tensors: dict[str, GGUFTensor] = {}
    for name, dims, ttype, offset in infos:
        if name in tensors:
            raise NomoatError(f"{path}: tensor {name} appears twice")
        try:
            qtype = gguf.GGMLQuantizationType(ttype)
        except ValueError:
            raise NomoatError(f"{path}: tensor {name} has unknown type id {ttype}") from None
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        n_elems = int(np.prod(dims, dtype=np.float64))
        if n_elems > len(mm) * 64 or dims[0] % block:
            raise NomoatError(f"{path}: tensor {name} declares an impossible shape {dims}")
        if offset % align:
            raise NomoatError(f"{path}: tensor {name} starts at offset {offset}, not a multiple of the "
                              f"alignment {align}")
        n_bytes = n_elems // block * type_size
        begin = start + offset
        if begin + n_bytes > len(mm):
            raise NomoatError(f"{path}: tensor {name} runs past the end of the file (truncated)")
        raw = mm[begin:begin + n_bytes]
        rows = n_elems // dims[0]
        if qtype.name in ("F32", "F16"):
            data = raw.view(np.float32 if qtype.name == "F32" else np.float16).reshape(rows, dims[0])
        else:
            data = raw.reshape(rows, dims[0] // block * type_size)
        tensors[name] = GGUFTensor(name, qtype, np.array(dims), begin, n_bytes, data)
    _check_layout(path, tensors, start, align, len(mm))
    return fields, tensors


def _check_layout(path: Path, tensors: dict[str, GGUFTensor], start: int, align: int, size: int) -> None:
    """Tensors must tile the data section as GGUF writers lay it out: in offset order, each padded to the
    alignment, none overlapping. A changed type or shape, an offset pointing into another tensor, or a
    wrong alignment (which shifts where the data section starts) shows up as an overlap or a gap."""
    pos, before = start, "the data section's start"
    for t in sorted(tensors.values(), key=lambda t: t.data_offset):
        if t.data_offset < pos:
            raise NomoatError(f"{path}: tensor {t.name} overlaps {before} (a wrong type, shape or offset)")
        if t.data_offset - pos >= align:
            raise NomoatError(f"{path}: {t.data_offset - pos} unused bytes between {before} and tensor {t.name} "
                              "(a wrong type, shape or offset)")
        pos, before = t.data_offset + t.n_bytes, f"tensor {t.name}"
        pos = -(-pos // align) * align
    if tensors and size - pos >= align:
        raise NomoatError(f"{path}: {size - pos} bytes after the last tensor (a wrong alignment, type or shape)")


class GGUFModelFile:
    """A LLaMA-family GGUF file, memory-mapped."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        check_header(self.path)
        self._dropped: set[str] = set()
        self.fields, self.tensors = parse_gguf(self.path)
        self.arch = self.get("general.architecture", "llama")
        if not isinstance(self.arch, str):
            raise NomoatError(f"{self.path}: general.architecture = {self.arch!r} is not a string")
        self.architecture = architecture(self.arch, str(self.path))
        self._names: dict[str, str] | None = None
        for t in self.tensors.values():
            if t.tensor_type.name not in FLOAT_TYPES | QUANT_TYPES:
                raise NomoatError(f"{self.path}: tensor {t.name} has unsupported type {t.tensor_type.name}")

    def drop_pages(self) -> None:
        """Let the OS take back the file's pages this process has read (once the weights are converted):
        they are file-backed and clean, read again on demand, yet count in the resident size until dropped."""
        import mmap

        for t in self.tensors.values():
            base = t.data
            while base is not None and not isinstance(base, mmap.mmap):
                base = getattr(base, "base", None)
            if base is not None and hasattr(base, "madvise"):
                with contextlib.suppress(OSError, ValueError):
                    base.madvise(mmap.MADV_DONTNEED)
            return  # one map holds every tensor

    def drop_fields(self, keys: tuple[str, ...]) -> None:
        """Forget large metadata (the vocabulary once the tokenizer holds it: ~13 MiB of Python strings for a
        49k vocabulary); a later `get` of any of them reads the header again."""
        for k in keys:
            if k in self.fields:
                del self.fields[k]
                self._dropped.add(k)

    def get(self, key: str, default: Any = None) -> Any:
        if key in self._dropped:
            self.fields, _ = parse_gguf(self.path)
            self._dropped.clear()
        return self.fields.get(key, default)

    def _arch(self, key: str, default: Any = None) -> Any:
        return self.get(f"{self.arch}.{key}", default)

    def _num(self, key: str, kind: type, default: Any = None) -> Any:
        """A numeric `{arch}.{key}` field, or a one-line error naming it when missing or mistyped."""
        v = self._arch(key, default)
        if v is None:
            raise NomoatError(f"{self.path}: metadata field {self.arch}.{key} is missing")
        ok = isinstance(v, int | float) and not isinstance(v, bool) and (kind is float or float(v).is_integer())
        if not ok:
            raise NomoatError(f"{self.path}: metadata field {self.arch}.{key} = {v!r} is not a"
                              + (" number" if kind is float else "n integer"))
        return kind(v)

    def config(self) -> LlamaConfig:
        n_head = self._num("attention.head_count", int)
        hidden = self._num("embedding_length", int)
        tokens = self.get("tokenizer.ggml.tokens") or []
        if not isinstance(tokens, list):
            raise NomoatError(f"{self.path}: tokenizer.ggml.tokens must be an array of strings")
        vocab = self._num("vocab_size", int, len(tokens) or None)
        rope_scaling = None
        if self._arch("rope.scaling.type") == "linear":
            rope_scaling = {"rope_type": "linear", "factor": self._num("rope.scaling.factor", float)}
        head_dim = self._num("attention.key_length", int, 0) or (hidden // n_head if n_head > 0 else 0)
        rope_dims = self._num("rope.dimension_count", int, head_dim)
        if rope_dims != head_dim:
            raise NomoatError(f"{self.path}: {self.arch}.rope.dimension_count = {rope_dims}, but the heads have "
                              f"{head_dim} dimensions (partial rotary is not supported)")
        try:
            cfg = LlamaConfig(
                vocab_size=vocab,
                hidden_size=hidden,
                intermediate_size=self._num("feed_forward_length", int),
                num_hidden_layers=self._num("block_count", int),
                num_attention_heads=n_head,
                num_key_value_heads=self._num("attention.head_count_kv", int, n_head),
                head_dim=head_dim,
                rms_norm_eps=self._num("attention.layer_norm_rms_epsilon", float, 1e-5),
                rope_theta=self._num("rope.freq_base", float, 10000.0),
                rope_scaling=rope_scaling,
                max_position_embeddings=self._num("context_length", int, 2048),
                tie_word_embeddings="output.weight" not in self.tensors,
                bos_token_id=self.get("tokenizer.ggml.bos_token_id"),
                eos_token_id=self.get("tokenizer.ggml.eos_token_id"),
                name=str(self.get("general.name", self.path.stem)),
            )
        except NomoatError as e:
            raise NomoatError(f"{self.path}: {e}") from None
        if len(tokens) > cfg.vocab_size:
            raise NomoatError(f"{self.path}: {self.arch}.vocab_size is {cfg.vocab_size} but the tokenizer has "
                              f"{len(tokens)} tokens")
        # The layer count against the tensors, before anything is sized by it (2^24 layers would take minutes).
        layers = {int(m.group(1)) for m in map(_BLOCK.match, self.tensors) if m}
        if layers != set(range(cfg.num_hidden_layers)):
            raise NomoatError(f"{self.path}: {self.arch}.block_count = {cfg.num_hidden_layers}, but the file holds "
                              f"tensors for {len(layers)} layers (blk.0 .. blk.{max(layers, default=-1)}): "
                              "layers missing or extra")
        if "rope_freqs.weight" in self.tensors:  # llama3-style scaling stored as per-frequency divisors
            factors = self.raw_float("rope_freqs.weight")
            if factors.numel() != cfg.head_dim // 2 or not bool(torch.isfinite(factors).all() and (factors > 0).all()):
                raise NomoatError(f"{self.path}: rope_freqs.weight must hold {cfg.head_dim // 2} positive finite "
                                  "divisors (one per rotary frequency)")
            cfg.extra["rope_freq_factors"] = factors.tolist()
        return cfg

    def raw_float(self, gguf_name: str) -> torch.Tensor:
        import gguf

        t = self.tensors[gguf_name]
        data = t.data
        if t.tensor_type.name in FLOAT_TYPES:
            arr = gguf.quants.dequantize(data, t.tensor_type) if t.tensor_type.name == "BF16" else data
            arr = np.array(arr, dtype=np.float32)  # a private copy: the map is read-only
        else:
            arr = gguf.quants.dequantize(data, t.tensor_type)
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))
        return check_weight(torch.from_numpy(np.ascontiguousarray(arr).reshape(shape)),
                            f"{self.path}: tensor {gguf_name}")

    def block_data(self, hf_name: str) -> np.ndarray:
        """A quantized tensor's raw blocks (uint8 rows), their scales checked: for kernels that take the codes
        as they are (Q4_0/Q4_1 to int4, Q8_0 embeddings)."""
        t = self.tensors[self.hf_names()[hf_name]]
        return check_blocks(t.data, t.tensor_type.name, f"{self.path}: tensor {t.name}")

    def hf_names(self) -> dict[str, str]:
        """HF name -> GGUF name for every weight the model uses; a tensor it has no use for is an error."""
        if self._names is None:
            out = {}
            for name in self.tensors:
                hf = self.architecture.gguf_to_hf_name(name)
                if hf is None and name not in GGUF_AUXILIARY:
                    raise NomoatError(f"{self.path}: tensor {name} is not part of a {self.arch} model")
                layer = re.match(r"blk\.(\d+)\.", name)
                blocks = self._arch("block_count")
                if layer and isinstance(blocks, int) and int(layer.group(1)) >= blocks:
                    raise NomoatError(f"{self.path}: tensor {name} is beyond {self.arch}.block_count = {blocks}")
                if hf is not None:
                    out[hf] = name
            self._names = out
        return self._names

    def row_order(self, hf_name: str, cfg: LlamaConfig) -> torch.Tensor | None:
        """The q/k un-permutation for this tensor, or None."""
        heads = self.architecture.qk_heads(hf_name, cfg)
        return qk_row_order(heads * cfg.head_dim, heads) if heads is not None else None

    def load_float(self, hf_name: str, cfg: LlamaConfig) -> torch.Tensor:
        w = self.raw_float(self.hf_names()[hf_name])
        order = self.row_order(hf_name, cfg)
        return w[order].contiguous() if order is not None else w

    def shape(self, hf_name: str) -> tuple[int, ...]:
        """The tensor's shape in the model's (row-major, HF) order, read from the header alone."""
        return tuple(int(d) for d in reversed(self.tensors[self.hf_names()[hf_name]].shape.tolist()))

    def qtype(self, hf_name: str) -> str:
        return self.tensors[self.hf_names()[hf_name]].tensor_type.name

    def tokenizer_metadata(self) -> dict[str, Any]:
        keys = ("model", "pre", "tokens", "token_type", "merges", "scores", "bos_token_id", "eos_token_id",
                "eot_token_id", "eom_token_id", "unknown_token_id", "padding_token_id", "add_bos_token",
                "add_eos_token", "add_space_prefix")
        meta = {k: self.get(f"tokenizer.ggml.{k}") for k in keys}
        meta["chat_template"] = self.get("tokenizer.chat_template")
        return meta
