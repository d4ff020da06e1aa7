"""What `nomoat info` says about a model file: shape, tensor types, size, and how it would run here."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from nomoat.errors import NomoatError
from nomoat.formats.gguf_read import check_header, parse_gguf
from nomoat.model.registry import ARCHITECTURES
from nomoat.runtime.cpu import detect_cpu, plan_for
from nomoat.runtime.loading import check_shapes, default_model_path, open_checkpoint, quantizes, weight_plan


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file()) if path.is_dir() else path.stat().st_size


def _unsupported_gguf(path: Path) -> NomoatError | None:
    """For a GGUF of an architecture nomoat does not run: an error that first says what the file is."""
    check_header(path)
    fields, tensors = parse_gguf(path)
    arch = fields.get("general.architecture", "llama")
    if not isinstance(arch, str) or arch in ARCHITECTURES:
        return None  # a mistyped architecture is GGUFModelFile's to report
    what = ", ".join(f"{k.removeprefix('general.')} {fields[k]}" for k in ("general.name", "general.size_label",
                                                                           "general.file_type") if k in fields)
    return NomoatError(f"{path}: a GGUF {arch} model ({what}{', ' if what else ''}{len(tensors)} tensors, "
                       f"{path.stat().st_size / 2**20:.1f} MiB); architecture {arch!r} is not supported "
                       f"(supported: {', '.join(ARCHITECTURES)})")


def describe_model(model: str | Path | None, quant: str = "auto") -> list[tuple[str, str]]:
    """(field, value) rows: name, path, format, architecture, shape, tensor types, file size, how the
    weights would run under `quant`, and the CPU path chosen for this machine with its reasons."""
    path = Path(model) if model is not None else default_model_path()
    if path.is_file():
        err = _unsupported_gguf(path)
        if err is not None:
            raise err
    ckpt = open_checkpoint(path)
    cfg = ckpt.config()
    check_shapes(ckpt, cfg)  # what loading refuses from the header alone, info refuses too
    types = Counter(ckpt.qtype(n) for n in ckpt.hf_names())
    if quantizes(ckpt, quant):
        runs = ", ".join(f"{k} x{v}" for k, v in Counter(str(p) for p in weight_plan(ckpt, quant).values())
                         .most_common())
    else:
        runs = "float weights (bf16/fp32 matmuls)"
    cpu = plan_for(detect_cpu())
    rows = [
        ("model", cfg.name or path.name), ("path", str(path.resolve())),
        ("format", "GGUF" if path.is_file() else "Hugging Face directory"),
        ("architecture", ckpt.arch), ("parameters", f"{cfg.num_parameters() / 1e6:.1f} M"),
        ("layers", str(cfg.num_hidden_layers)), ("hidden size", str(cfg.hidden_size)),
        ("FFN size", str(cfg.intermediate_size)),
        ("heads / KV heads", f"{cfg.num_attention_heads} / {cfg.num_key_value_heads} (head dim {cfg.head_dim})"),
        ("vocabulary", str(cfg.vocab_size)), ("context", str(cfg.max_position_embeddings)),
        ("RoPE base", f"{cfg.rope_theta:g}" + (f", scaling {cfg.rope_scaling}" if cfg.rope_scaling else "")),
        ("tied embeddings", "yes" if cfg.tie_word_embeddings else "no"),
        ("tensor types", ", ".join(f"{k} x{v}" for k, v in types.most_common())),
        ("file size", f"{_size(path) / 2**20:.1f} MiB"),
        (f"runs as (--quant {quant})", runs),
        ("CPU", detect_cpu().describe()),
    ]
    rows += [(name, value) for name, value in (line.split(": ", 1) for line in cpu.lines())]
    return rows


