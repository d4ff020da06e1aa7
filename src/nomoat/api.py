"""The Python API behind every CLI command: load, prompt, generate, stream, chat, convert."""

from __future__ import annotations

import resource
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nomoat.generate import Completion, GenerationConfig, GenerationStats, generate_batch, stream
from nomoat.loading import LoadedModel, load

__all__ = ["load", "prompt_ids", "generate", "generate_stream", "Chat", "convert_to_hf", "peak_rss_mib",
           "GenerationConfig", "GenerationStats", "Completion", "LoadedModel"]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prompt_ids(lm: LoadedModel, prompt: str | list[dict[str, Any]], raw: bool = False,
               system: str | None = None) -> list[int]:
    """Token ids for a prompt: the chat template is applied unless `raw` or the model has none."""
    tok = lm.tokenizer
    if isinstance(prompt, list):
        return tok.encode_chat(prompt)
    if raw or not tok.has_chat_template:
        return tok.encode(prompt, add_special_tokens=True)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return tok.encode_chat(messages)


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
    from nomoat.formats.hf import write_hf_dir
    from nomoat.loading import DTYPES

    tensors = {k: v for k, v in lm.model.state_dict().items()}
    return write_hf_dir(out, lm.config, tensors, lm.tokenizer, dtype=DTYPES[dtype])
