"""Turning a prompt into token ids: the model's chat template unless raw text is asked for."""

from __future__ import annotations

from typing import Any

from nomoat.errors import NomoatError
from nomoat.runtime.loading import LoadedModel


def prompt_ids(lm: LoadedModel, prompt: str | list[dict[str, Any]], raw: bool = False,
               system: str | None = None) -> list[int]:
    """Token ids for a prompt: the chat template is applied unless `raw` or the model has none."""
    tok = lm.tokenizer
    if isinstance(prompt, str):
        # A prompt no context can hold is refused before tokenizing (which costs ~200 bytes a character).
        most = lm.config.max_position_embeddings * tok.max_token_chars + 4096
        if len(prompt) > most:
            raise NomoatError(f"the prompt is {len(prompt)} characters, more than this model's context of "
                              f"{lm.config.max_position_embeddings} tokens can hold")
    if isinstance(prompt, list):
        return tok.encode_chat(prompt)
    if raw or not tok.has_chat_template:
        return tok.encode(prompt, add_special_tokens=True)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return tok.encode_chat(messages)
