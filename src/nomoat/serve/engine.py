"""The engine: one worker thread owns the model and decodes every running request together.

Torch modules are not safe to share between concurrent forward passes, so every forward pass runs on
this one thread. Requests join a continuous batch (`nomoat.runtime.batching.BatchDecoder`) as slots free
up: each step advances every running request by one token in one forward pass, whatever its position
and adapter stack, and prefills waiting prompts in chunks between those steps.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nomoat.errors import NomoatError
from nomoat.runtime.batching import BatchDecoder
from nomoat.runtime.generate import GenerationConfig, GenerationStats
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
        self._stopping = threading.Event()
        self.batch = BatchDecoder(lm.model, lm.tokenizer, max_active)
        self._jobs: dict[int, Job] = {}
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

    def _admit(self) -> bool:
        """Move queued jobs into free slots; blocks while idle. False once stopped."""
        while self.batch.free > 0:
            try:
                job = self._queue.get(block=not len(self.batch))
            except queue.Empty:
                return True
            if job is None or self._stopping.is_set():
                if job is not None:
                    self._finish(job, "cancelled")
                return False
            if job.cancelled.is_set():
                self._finish(job, "cancelled")
                continue
            try:
                self.batch.add(id(job), job.ids, job.cfg, job.adapters, job.stats)
            except NomoatError as e:
                self._finish(job, "error", str(e))
                continue
            self._jobs[id(job)] = job
        return True

    def _finish(self, job: Job, how: str, payload: Any = None) -> None:
        self._jobs.pop(id(job), None)
        if how == "done":
            self.completed += 1
            job.emit("done", job.stats)
        elif how == "error":
            self.failed += 1
            job.emit("error", payload)
        else:
            self.cancelled += 1
            job.emit("error", "generation cancelled")

    def _drop_all(self, how: str, payload: Any = None) -> None:
        for key, job in list(self._jobs.items()):
            self.batch.cancel(key)
            self._finish(job, how, payload)

    def _loop(self) -> None:
        alive = True
        while alive:
            alive = self._admit()
            if not alive:
                # Stopping: cut what runs and drain the queue.
                self._drop_all("cancelled")
                while True:
                    try:
                        job = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if job is not None:
                        self._finish(job, "cancelled")
                break
            for key, job in list(self._jobs.items()):
                if job.cancelled.is_set():
                    self.batch.cancel(key)
                    self._finish(job, "cancelled")
            job = None  # noqa: F841  (see _deliver)
            self.active = len(self.batch)
            if not len(self.batch):
                continue
            try:
                events = self.batch.step()
            except Exception as e:  # a failed forward pass fails the requests in it, not the server
                self._drop_all("error", f"generation failed: {e}")
                continue
            self._deliver(events)
            self.active = len(self.batch)

    def _deliver(self, events: list) -> None:
        # A method of its own so that no finished job stays referenced by the loop's locals (an unloaded
        # adapter's weights are freed once nothing holds a request that used them).
        for ev in events:
            job = self._jobs.get(ev.key)
            if job is None:
                continue
            if job.cancelled.is_set():  # nothing more reaches a request once it is cancelled
                self.batch.cancel(ev.key)
                self._finish(job, "cancelled")
                continue
            for piece in ev.pieces:
                job.emit("delta", piece)
            if ev.finished:
                self._finish(job, "done")
