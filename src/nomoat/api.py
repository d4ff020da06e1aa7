"""The Python API behind every CLI command: load (with adapters), prompt, generate, stream, chat, convert."""

from __future__ import annotations

import resource
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from nomoat.errors import NomoatError
from nomoat.runtime.generate import Completion, GenerationConfig, GenerationStats, generate_batch, stream
from nomoat.runtime.loading import LoadedModel, load
from nomoat.runtime.prompts import prompt_ids

__all__ = ["load", "load_with_adapters", "prompt_ids", "generate", "generate_stream", "Chat", "convert_to_hf",
           "convert_model", "peak_rss_mib", "GenerationConfig", "GenerationStats", "Completion", "LoadedModel"]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_with_adapters(model: str | Path | None = None, adapters: Sequence[Any] = (), *, force: bool = False,
                       activate: bool = True, **load_kw: Any) -> LoadedModel:
    """`load` the model, then attach adapters (`AdapterSpec`s or `[NAME=]PATH[:WEIGHT]` strings), each
    checked against the base's fingerprint unless `force`; `activate=False` loads them switched off."""
    from nomoat.adapters import AdapterSpec, load_adapter

    specs = [a if isinstance(a, AdapterSpec) else AdapterSpec.parse(a, named=True) for a in adapters]
    lm = load(model, **load_kw)
    for sp in specs:
        load_adapter(lm, sp.path, name=sp.name, weight=sp.weight, force=force, activate=activate)
    return lm


def generate_stream(lm: LoadedModel, prompt: str | list[dict[str, Any]], cfg: GenerationConfig | None = None,
                    raw: bool = False, stats: GenerationStats | None = None) -> Iterator[str]:
    """Stream the completion of one prompt (a string or a list of chat messages) as text pieces."""
    return stream(lm.model, lm.tokenizer, prompt_ids(lm, prompt, raw), cfg or GenerationConfig(), stats)


def generate(lm: LoadedModel, prompts: str | list[str], cfg: GenerationConfig | None = None,
             raw: bool = False) -> str | list[str]:
    """Complete one prompt (returns a string) or several in one padded batch (returns a list)."""
    single = isinstance(prompts, str)
    batch = [prompts] if single else list(prompts)
    outs = generate_batch(lm.model, lm.tokenizer, [prompt_ids(lm, p, raw) for p in batch],
                          cfg or GenerationConfig())
    texts = [o.text for o in outs]
    return texts[0] if single else texts


class Chat:
    """A multi-turn conversation with the model's chat template."""

    def __init__(self, lm: LoadedModel, system: str | None = None, cfg: GenerationConfig | None = None) -> None:
        self.lm, self.system, self.cfg = lm, system, cfg or GenerationConfig()
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict[str, str]] = [{"role": "system", "content": self.system}] if self.system else []

    def send(self, text: str, stats: GenerationStats | None = None) -> Iterator[str]:
        """Add a user turn and stream the assistant's reply; the reply joins the history when done."""
        self.messages.append({"role": "user", "content": text})
        pieces = []
        for piece in generate_stream(self.lm, self.messages, self.cfg, stats=stats):
            pieces.append(piece)
            yield piece
        self.messages.append({"role": "assistant", "content": "".join(pieces)})


def convert_to_hf(lm: LoadedModel, out: str | Path, dtype: str = "float32") -> Path:
    """Write the loaded model as a Hugging Face directory (config.json, safetensors, tokenizer files)."""
    from nomoat.formats.export import export_model

    ftype = {"float32": "f32", "fp32": "f32", "float16": "f16", "fp16": "f16", "bfloat16": "bf16", "bf16": "bf16"}
    return export_model(lm, out, ftype.get(dtype, dtype))


def convert_model(model: str | Path | None, to: str, out: str | Path, dtype: str = "float32",
                  gguf_type: str = "f16") -> list[str]:
    """Convert a model file to an HF directory (`to="hf"`, tensors in `dtype`) or GGUF (`gguf_type`).

    Returns what to tell the user: the file written, and a warning when the output is larger than a
    quantized source without being more exact than it (e.g. q8_0 from Q4_1 blocks).
    """
    from nomoat.formats.export import export_model
    from nomoat.formats.gguf_write import FTYPES

    out = Path(out)
    if to == "gguf":
        if out.suffix != ".gguf":
            raise NomoatError(f"--out {out}: a GGUF file name must end in .gguf")
        if gguf_type not in FTYPES:
            raise NomoatError(f"--type {gguf_type!r} is not one of {', '.join(FTYPES)}")
        lm = load(model, quant="none")
        export_model(lm, out, gguf_type)
    elif to == "hf":
        lm = load(model, quant="none")
        convert_to_hf(lm, out, dtype=dtype)
    else:
        raise NomoatError(f"--to {to!r} is not supported (supported: hf, gguf)")
    size = sum(f.stat().st_size for f in out.iterdir()) if out.is_dir() else out.stat().st_size
    src_size = Path(lm.source).stat().st_size if Path(lm.source).is_file() else 0
    lines = [f"wrote {out} ({size / 2**20:.1f} MiB)"]
    quantized_src = {t for t in lm.weight_types.values() if t.startswith(("Q", "I"))}
    if src_size and size > src_size and quantized_src:
        lines.append(f"warning: {out.name} is larger than {Path(lm.source).name} ({src_size / 2**20:.1f} MiB) "
                     f"but no more exact: its weights were already quantized ({', '.join(sorted(quantized_src))}); "
                     "re-quantizing can only keep or lose precision")
    return lines


def describe_adapter(path: str | Path, model: str | Path | None = None) -> list[tuple[str, str]]:
    """(field, value) rows for `nomoat adapter info`: method, rank, targets, size against the base,
    the base's fingerprint and the training provenance. A GGUF adapter is read against `model`'s shapes."""
    from nomoat.adapters import adapter_info
    from nomoat.runtime.loading import open_checkpoint

    ckpt = open_checkpoint(model)
    info = adapter_info(path, ckpt.config())
    meta = info["meta"]
    src = Path(ckpt.path)
    base_bytes = src.stat().st_size if src.is_file() else sum(f.stat().st_size for f in src.iterdir())
    base_params = ckpt.config().num_parameters()
    return [("adapter", info["path"]), ("method", info["method"]), ("rank", str(info["rank"])),
            ("alpha", f"{info['alpha']:g}"), ("targets", ", ".join(info["targets"])),
            ("modules", str(info["modules"])),
            ("parameters", f"{info['parameters']:,} ({100 * info['parameters'] / base_params:.2f}% of the base)"),
            ("size", f"{info['bytes'] / 2**20:.2f} MiB ({100 * info['bytes'] / base_bytes:.1f}% of {src.name}, "
                     f"{base_bytes / 2**20:.0f} MiB)"),
            ("base", str(meta.get("base_name") or meta.get("base_model_name_or_path") or "?")),
            ("base fingerprint", str(meta.get("base_fingerprint", "not recorded"))),
            ("data", f"{meta.get('data', '?')} (sha256 {str(meta.get('data_sha256', '?'))[:16]})"),
            ("trained", f"{meta.get('steps', '?')} steps, {meta.get('tokens_seen', '?')} tokens, "
                        f"{meta.get('wall_seconds', '?')} s"),
            ("final loss", f"train {meta.get('final_train_loss')}, validation {meta.get('final_val_loss')}")]
