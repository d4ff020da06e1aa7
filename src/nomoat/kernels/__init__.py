"""Native CPU kernels (``native.c``), compiled on first use for this machine's instruction set.

The library is built with the system C compiler into a cache directory keyed by the source, the
compiler, the flags, the CPU's features and torch's version, so a stale build is never loaded: any
change makes a new key. Without a compiler, or on a CPU without AVX2/F16C/FMA, or with
``NOMOAT_NATIVE=0``, `library()` returns None and callers keep torch's kernels.
``NOMOAT_NATIVE_ISA=avx2`` builds the AVX2 variant on an AVX-512 machine (to measure the lower class).

What it holds: `library()` (the loaded library or None, with `status()` saying why), and thin
callers `q4_matmul`, `q8_matmul`, `Decoder` over it. No file format knowledge lives here.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

__all__ = ["library", "status", "build_path", "q4_matmul", "q8_matmul", "int8_rows", "int8_rescale", "Decoder",
           "NativeLayer"]

_SOURCE = Path(__file__).with_name("native.c")
_status = "not built yet"


def cache_dir() -> Path:
    if os.environ.get("NOMOAT_KERNEL_CACHE"):
        return Path(os.environ["NOMOAT_KERNEL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nomoat" / "kernels"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return platform.processor()


def _isa_flags() -> list[str]:
    want = os.environ.get("NOMOAT_NATIVE_ISA", "native").strip().lower()
    if want == "avx2":
        return ["-mavx2", "-mfma", "-mf16c"]
    return ["-march=native"]


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


def _gomp_dir() -> str | None:
    """torch's own libgomp, so the kernels share its OpenMP runtime (one thread pool, one spin policy)."""
    lib = Path(torch.__file__).parent / "lib"
    return str(lib) if (lib / "libgomp.so.1").exists() else None


def _source() -> bytes:
    return _SOURCE.read_bytes()


def _flags() -> list[str]:
    # NOMOAT_NATIVE_CFLAGS: extra flags for measurement builds (e.g. -DNM_PROFILE); part of the cache key.
    extra = os.environ.get("NOMOAT_NATIVE_CFLAGS", "").split()
    flags = ["-O3", "-fPIC", "-shared", "-fopenmp", "-fno-math-errno", *_isa_flags(), *extra]
    gomp = _gomp_dir()
    if gomp:
        flags += [f"-L{gomp}", f"-Wl,-rpath,{gomp}"]
    return flags


@functools.cache
def _compiler_version(cc: str) -> str:
    return subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout


def _writable(d: Path) -> bool:
    try:
        d.mkdir(parents=True, exist_ok=True)
        return os.access(d, os.W_OK)
    except OSError:
        return False


def build_path(cc: str | None = None) -> Path:
    """Where this machine's build lives: a name made from everything that changes the binary."""
    cc = cc or _compiler() or "cc"
    parts = [_source(), _compiler_version(cc).encode() if shutil.which(cc) else b"", " ".join(_flags()).encode(),
             _cpu_flags().encode(), torch.__version__.encode()]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:20]
    return cache_dir() / f"native-{key}.so"


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels for this CPU, or None (see `status()`)."""
    global _status
    if os.environ.get("NOMOAT_NATIVE", "1").strip() in ("0", "false", "no", "off"):
        _status = "off (NOMOAT_NATIVE=0)"
        return None
    if platform.machine() not in ("x86_64", "AMD64") or not sys.platform.startswith("linux"):
        _status = f"unavailable: built for Linux x86-64, this is {sys.platform} {platform.machine()}"
        return None
    cc = _compiler()
    if cc is None:
        _status = "unavailable: no C compiler (install gcc to enable)"
        return None
    try:
        target = build_path(cc)
    except (OSError, subprocess.SubprocessError) as e:
        _status = f"unavailable: {cc} --version failed ({e})"
        return None
    if not target.exists() and not _writable(target.parent):
        # A read-only home (a container, a shared account): build where this user can write.
        target = Path(tempfile.gettempdir()) / f"nomoat-kernels-{os.getuid()}" / target.name
    if not target.exists():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                out = Path(tmp) / target.name
                run = subprocess.run([cc, *_flags(), str(_SOURCE), "-o", str(out), "-lm"], capture_output=True,
                                     text=True, timeout=300)
                if run.returncode != 0:
                    last = (run.stderr.strip().splitlines() or ["?"])[-1]
                    _status = f"unavailable: the C build failed ({last[:200]})"
                    return None
                os.replace(out, target)  # atomic: a concurrent build of the same key writes the same bytes
        except (OSError, subprocess.SubprocessError) as e:
            _status = f"unavailable: could not build in {target.parent} ({e})"
            return None
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as e:
        _status = f"unavailable: {target} does not load ({e})"
        return None
    lib.nm_isa.restype = ctypes.c_char_p
    vp, i32 = ctypes.c_void_p, ctypes.c_int
    lib.nm_q4_matmul.argtypes = [vp, vp, vp, i32, i32, vp, i32, vp, i32]
    lib.nm_q8_matmul.argtypes = [vp, vp, i32, i32, vp, i32, vp, i32]
    lib.nm_decode.argtypes = [vp, vp, i32, vp, vp, vp, vp, vp, i32]
    lib.nm_int8_rows.argtypes = [vp, i32, i32, i32, vp, i32, vp, vp, i32]
    lib.nm_int8_rescale.argtypes = [vp, i32, i32, vp, vp, vp, i32]
    _status = f"on ({lib.nm_isa().decode()}, built in {target.parent})"
    return lib


def status() -> str:
    """One line: whether the native kernels run, and why not."""
    library()
    return _status


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def q4_matmul(x: torch.Tensor, nib: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """x (rows, k) float32 contiguous @ W.T for Q4 weights: nib (n, k/2) uint8, d and m (n, k/32) fp16."""
    lib = library()
    assert lib is not None
    n, k = nib.shape[0], nib.shape[1] * 2
    y = torch.empty(x.shape[0], n, dtype=torch.float32)
    if lib.nm_q4_matmul(_ptr(nib), _ptr(d), _ptr(m), n, k, _ptr(x), x.shape[0], _ptr(y), torch.get_num_threads()):
        raise MemoryError("q4_matmul: out of memory")
    return y


def q8_matmul(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (rows, k) float32 contiguous @ W.T for Q8_0 weights: codes (n, k) int8, scales (n, k/32) fp16."""
    lib = library()
    assert lib is not None
    n, k = codes.shape
    y = torch.empty(x.shape[0], n, dtype=torch.float32)
    if lib.nm_q8_matmul(_ptr(codes), _ptr(scales), n, k, _ptr(x), x.shape[0], _ptr(y), torch.get_num_threads()):
        raise MemoryError("q8_matmul: out of memory")
    return y


def int8_rows(x: torch.Tensor, qmax: int, col: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of x (m, k) float32 with unit column stride, times `col` (k,) if given, as int8 codes within +-qmax
    and per-row scales (m, 1): one pass to find each row's range, one to round (torch needs five)."""
    lib = library()
    assert lib is not None and x.dtype == torch.float32 and x.stride(1) == 1
    m, k = x.shape
    q = torch.empty(m, k, dtype=torch.int8)
    s = torch.empty(m, 1, dtype=torch.float32)
    lib.nm_int8_rows(_ptr(x), m, k, x.stride(0), _ptr(col) if col is not None else None, qmax, _ptr(q), _ptr(s),
                     torch.get_num_threads())
    return q, s


def int8_rescale(acc: torch.Tensor, row: torch.Tensor, col: torch.Tensor | None = None) -> torch.Tensor:
    """acc (m, n) int32 contiguous * col (n,) * row (m, 1), as float32, in one pass."""
    lib = library()
    assert lib is not None and acc.dtype == torch.int32 and acc.is_contiguous()
    out = torch.empty(acc.shape, dtype=torch.float32)
    lib.nm_int8_rescale(_ptr(acc), acc.shape[0], acc.shape[1], _ptr(col) if col is not None else None, _ptr(row),
                        _ptr(out), torch.get_num_threads())
    return out


class _Q4(ctypes.Structure):
    _fields_ = [("nib", ctypes.c_void_p), ("d", ctypes.c_void_p), ("m", ctypes.c_void_p),
                ("n", ctypes.c_int), ("k", ctypes.c_int)]


class _Lora(ctypes.Structure):
    _fields_ = [("A", ctypes.c_void_p), ("Bt", ctypes.c_void_p), ("w", ctypes.c_void_p), ("scale", ctypes.c_float),
                ("r", ctypes.c_int), ("part", ctypes.c_int)]


class _Layer(ctypes.Structure):
    _fields_ = [("qkv", _Q4), ("o", _Q4), ("gate_up", _Q4), ("down", _Q4), ("ln1", ctypes.c_void_p),
                ("ln2", ctypes.c_void_p), ("k_cache", ctypes.c_void_p), ("v_cache", ctypes.c_void_p),
                ("lora", ctypes.c_void_p), ("n_lora", ctypes.c_int)]


LORA_PARTS = ("q", "k", "v", "o", "gate", "up", "down")
MAX_RANK = 1024  # native.c's bound on an update's rank


class _Shape(ctypes.Structure):
    _fields_ = [("layers", ctypes.c_int), ("hidden", ctypes.c_int), ("heads", ctypes.c_int),
                ("kv_heads", ctypes.c_int), ("head_dim", ctypes.c_int), ("ffn", ctypes.c_int),
                ("capacity", ctypes.c_int), ("eps", ctypes.c_float), ("kv_half", ctypes.c_int)]


class NativeLayer:
    """One decoder layer's tensors as the fused step reads them (Q4 triples: nib, d, m)."""

    def __init__(self, qkv, o, gate_up, down, ln1: torch.Tensor, ln2: torch.Tensor) -> None:
        self.mats = (qkv, o, gate_up, down)
        self.ln1, self.ln2 = ln1.float().contiguous(), ln2.float().contiguous()


class Decoder:
    """The fused one-token step over every layer for a batch of sequences, bound to one KV buffer
    pair [layers, slots, kv_heads, capacity, head_dim] (float32 or float16, contiguous): row b uses slot b.
    head_dim must be a multiple of 16, at most 128.

    Holds references to every tensor it points at, so nothing it reads can be freed under it.
    """

    def __init__(self, layers: list[NativeLayer], shape: dict, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 norm: torch.Tensor) -> None:
        self.lib = library()
        assert self.lib is not None
        if k_cache.dtype not in (torch.float32, torch.float16) or v_cache.dtype != k_cache.dtype or not (
                k_cache.is_contiguous() and v_cache.is_contiguous()):
            raise ValueError("the fused step needs a contiguous float32 or float16 KV cache")
        self.layers, self.k_cache, self.v_cache = layers, k_cache, v_cache
        self.norm = norm.float().contiguous()
        self.shape = _Shape(len(layers), shape["hidden"], shape["heads"], shape["kv_heads"], shape["head_dim"],
                            shape["ffn"], k_cache.shape[3], shape["eps"], int(k_cache.dtype == torch.float16))
        arr = (_Layer * len(layers))()
        for i, ly in enumerate(layers):
            mats = [_Q4(_ptr(t[0]), _ptr(t[1]), _ptr(t[2]), t[0].shape[0], t[0].shape[1] * 2) for t in ly.mats]
            arr[i] = _Layer(*mats, _ptr(ly.ln1), _ptr(ly.ln2), _ptr(k_cache[i]), _ptr(v_cache[i]), None, 0)
        self.arr = arr
        self.lora_key: object = None  # what the bound updates were made from (set by the caller)
        self.lora_params: list[torch.Tensor] = []
        self.lora_versions = 0
        self.lora_weights: dict[str, torch.Tensor] = {}
        self._lora_refs: list = []

    def set_loras(self, per_layer: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, str]]]) -> None:
        """Each layer's low-rank updates: (A (r, k), Bt (r, n), w (rows,), scale, part) float32 contiguous, part one
        of LORA_PARTS; the step adds w[b] * scale * Bt.T @ (A @ x_b) to the part's output for each row b. The
        tensors are read in place (w may change between steps) and kept alive here."""
        refs = []
        for i, items in enumerate(per_layer):
            arr = (_Lora * max(len(items), 1))()
            for j, (A, Bt, w, scale, part) in enumerate(items):
                if A.shape[0] > MAX_RANK or A.dtype != torch.float32 or Bt.dtype != torch.float32:
                    raise ValueError("native decode step: an update of rank > 1024 or not float32")
                arr[j] = _Lora(_ptr(A), _ptr(Bt), _ptr(w), float(scale), A.shape[0], LORA_PARTS.index(part))
            refs.append((arr, items))
            self.arr[i].lora = ctypes.cast(arr, ctypes.c_void_p) if items else None
            self.arr[i].n_lora = len(items)
        self._lora_refs = refs

    def bound_to(self, k_cache: torch.Tensor) -> bool:
        return k_cache.data_ptr() == self.k_cache.data_ptr() and k_cache.shape == self.k_cache.shape

    def step(self, x: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x (rows, hidden) float32: each row's token embedding in, its final normed hidden state out (in
        place); pos (rows,) int32: each row's position in its slot; cos/sin: the rotary tables (contiguous,
        a row per position, longer than every position)."""
        if not (pos.dtype == torch.int32 and x.is_contiguous() and cos.is_contiguous() and sin.is_contiguous()):
            raise ValueError("native decode step: bad argument layout")
        rc = self.lib.nm_decode(ctypes.byref(self.shape), self.arr, x.shape[0], _ptr(pos), _ptr(cos), _ptr(sin),
                                _ptr(self.norm), _ptr(x), torch.get_num_threads())
        if rc:
            raise MemoryError("native decode step: out of memory")
        return x
