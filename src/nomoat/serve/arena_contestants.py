"""The server's side of the arena: its model ids as contestants, each reply generated on the engine like any
chat request (same queue, same limits), so battles and API clients share one worker fairly."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from nomoat.errors import NomoatError
from nomoat.eval.arena import ArenaFailure
from nomoat.runtime.generate import GenerationConfig
from nomoat.serve.engine import EngineBusy, Job

if TYPE_CHECKING:
    from nomoat.serve.app import Server


class ServedContestants:
    def __init__(self, srv: Server, sources: dict[str, str] | None = None) -> None:
        self.srv, self.sources = srv, dict(sources or {})
        self.base = srv.registry.base
        self.base_fingerprint: str | None = None
        with contextlib.suppress(NomoatError, OSError, ValueError):
            from nomoat.adapters import base_fingerprint

            self.base_fingerprint = base_fingerprint(srv.lm)

    def names(self) -> list[str]:
        return self.srv.registry.ids()

    def stack(self, name: str) -> dict[str, Any]:
        """The adapters behind a model id: name -> weight and where it was loaded from."""
        return {a: {"weight": w, "source": self.sources.get(a)} for a, w in self.srv.registry.resolve(name).items()}

    async def stream(self, name: str, messages: list[dict[str, str]], max_tokens: int,
                     temperature: float | None = None) -> AsyncIterator[str]:
        from nomoat.serve.app import _Bridge

        srv = self.srv
        try:
            ids = srv.lm.tokenizer.encode_chat(messages)
        except NomoatError:
            raise ArenaFailure(400, "the conversation cannot be put through the chat template") from None
        room = srv.context - len(ids)
        if room < 1:
            raise ArenaFailure(400, f"the conversation ({len(ids)} tokens) fills the model's context; "
                               "start a new battle")
        bridge = _Bridge()
        cfg = GenerationConfig(max_new_tokens=min(max_tokens, room))
        if temperature is not None:
            cfg.temperature = temperature
        job = Job(ids, cfg, srv.registry.resolve(name), bridge.emit)
        try:
            srv.engine.submit(job)
        except EngineBusy:
            raise ArenaFailure(503, "the server is busy; try again shortly") from None
        try:
            while True:
                kind, payload = await bridge.queue.get()
                if kind == "delta":
                    yield str(payload)
                elif kind == "error":
                    raise ArenaFailure(500, "generation failed")
                else:
                    return
        finally:
            job.cancel()
