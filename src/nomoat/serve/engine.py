"""The engine: one worker thread owns the model and interleaves the decoding of queued requests.

Torch modules are not safe to share between concurrent forward passes with different adapters, so
every forward pass runs on this one thread. Active requests take turns a token at a time (each keeps
its own KV cache inside `nomoat.runtime.generate.stream`), and the adapters a request asked for are switched
in with `set_active` right before its turn, so requests never see each other's adapters.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from nomoat.lora import set_active
from nomoat.runtime.generate import GenerationConfig, GenerationStats, stream
from nomoat.runtime.loading import LoadedModel

Emit = Callable[[str, Any], None]  # ("delta", text) | ("done", stats) | ("error", message)


class EngineBusy(Exception):
    """The request queue is full."""


@dataclass
class Job:
    """One generation request: prompt ids, decoding settings, adapters, and where its output goes."""

    ids: list[int]
    cfg: GenerationConfig
    adapters: dict[str, float]
    emit: Emit
    stats: GenerationStats = field(default_factory=GenerationStats)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


class Engine:
    """Runs jobs on one worker thread; up to `max_active` decode together, the rest wait in a queue."""

    def __init__(self, lm: LoadedModel, max_active: int = 8, max_queue: int = 64) -> None:
        self.lm, self.max_active = lm, max_active
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._thread: threading.Thread | None = None
        self._current: tuple[tuple[str, float], ...] | None = None
        self._stopping = threading.Event()
        self.active = 0
        self.completed = 0
        self.cancelled = 0
        self.failed = 0

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="nomoat-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cut every running and queued job and end the worker."""
        self._stopping.set()
        if self._thread is not None:
            try:
                self._queue.put_nowait(None)
            except queue.Full:
                pass
            self._thread.join(timeout)
            self._thread = None

    def submit(self, job: Job) -> None:
        if self._stopping.is_set():
            raise EngineBusy("the server is shutting down")
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise EngineBusy(f"too many queued requests ({self._queue.maxsize}); retry later") from None

    def _switch(self, adapters: dict[str, float]) -> None:
        key = tuple(adapters.items())
        if key != self._current:
            set_active(self.lm.model, adapters)
            self._current = key

    def _admit(self, running: list[tuple[Job, Iterator[str]]]) -> bool:
        """Move queued jobs into the running set; blocks while idle. False once stopped."""
        while len(running) < self.max_active:
            try:
                job = self._queue.get(block=not running)
            except queue.Empty:
                return True
            if job is None or self._stopping.is_set():
                if job is not None:
                    self._finish(job, "cancelled")
                return False
            if job.cancelled.is_set():
                self._finish(job, "cancelled")
                continue
            running.append((job, stream(self.lm.model, self.lm.tokenizer, job.ids, job.cfg, job.stats)))
        return True

    def _finish(self, job: Job, how: str, payload: Any = None) -> None:
        if how == "done":
            self.completed += 1
            job.emit("done", job.stats)
        elif how == "error":
            self.failed += 1
            job.emit("error", payload)
        else:
            self.cancelled += 1
            job.emit("error", "generation cancelled")

    def _loop(self) -> None:
        running: list[tuple[Job, Iterator[str]]] = []
        alive = True
        while alive or running:
            alive = alive and self._admit(running)
            if not alive:
                # Stopping: cut what runs and drain the queue.
                for job, gen in running:
                    gen.close()  # type: ignore[attr-defined]
                    self._finish(job, "cancelled")
                running.clear()
                while True:
                    try:
                        job = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if job is not None:
                        self._finish(job, "cancelled")
                break
            self.active = len(running)
            # Jobs with the same adapters take their turns back to back: one switch per group per round.
            running.sort(key=lambda it: tuple(it[0].adapters.items()))
            for item in list(running):
                job, gen = item
                if job.cancelled.is_set():
                    gen.close()  # type: ignore[attr-defined]
                    running.remove(item)
                    self._finish(job, "cancelled")
                    continue
                try:
                    self._switch(job.adapters)
                    piece = next(gen)
                except StopIteration:
                    running.remove(item)
                    self._finish(job, "done")
                    continue
                except Exception as e:  # one bad request must not stop the others
                    running.remove(item)
                    self._finish(job, "error", f"generation failed: {e}")
                    continue
                job.emit("delta", piece)
            self.active = len(running)
