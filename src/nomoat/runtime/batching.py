"""Continuous batching: many sequences decode together in one forward pass per step.

A sequence joins at any step: its prompt is prefilled in its own cache, in chunks between decoding steps
(short ones while others decode, so a long prompt does not stall them), then moved into a row of the
shared slot cache. Every step feeds each running row its last token at its own position, with its own
adapter stack (rows sharing an adapter compute its low-rank product together); a row leaves when its
sequence ends and the last row moves into its place, keeping the batch packed. Sampling, stop strings and
logprobs are each sequence's own (`Decoding`), so a request decodes the same alone or batched.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from nomoat.formats.tokenizer import Tokenizer
from nomoat.lora import check_loaded, set_row_adapters
from nomoat.model import KVCache, LlamaForCausalLM, SlotCache
from nomoat.runtime.generate import Decoding, GenerationConfig, GenerationStats

PREFILL_ALONE = 512  # prompt tokens per prefill chunk when nothing else is decoding
PREFILL_BESIDE = 64  # ... and while other sequences decode (a shorter stall for them per step)


@dataclass
class _Seq:
    key: Any
    dec: Decoding
    adapters: dict[str, float]
    cache: KVCache | None = None  # while prefilling
    filled: int = 0
    started: float = 0.0
    decode_started: float = 0.0
    prompt_seconds: float = 0.0


@dataclass
class Event:
    """What a step did for one sequence: its new text pieces, and whether it has finished."""

    key: Any
    pieces: list[str] = field(default_factory=list)
    finished: bool = False
    stats: GenerationStats | None = None


class BatchDecoder:
    """Runs up to `slots` sequences at once on `model`; one thread drives it (`add`, `cancel`, `step`)."""

    def __init__(self, model: LlamaForCausalLM, tok: Tokenizer, slots: int = 8) -> None:
        self.model, self.tok, self.slots = model, tok, slots
        self.cache = SlotCache(model.config, slots, dtype=model.kv_dtype)
        self.prefilling: deque[_Seq] = deque()
        self.running: list[_Seq] = []

    def __len__(self) -> int:
        return len(self.prefilling) + len(self.running)

    @property
    def free(self) -> int:
        return self.slots - len(self)

    def add(self, key: Any, prompt_ids: list[int], cfg: GenerationConfig, adapters: dict[str, float],
            stats: GenerationStats | None = None) -> None:
        """Queue a sequence for prefilling. Raises NomoatError for bad settings or a prompt past the context."""
        if self.free <= 0:
            raise RuntimeError("no free slot")
        if adapters:
            check_loaded(self.model, adapters)
        seq = _Seq(key, Decoding(self.model.config, self.tok, prompt_ids, cfg, stats), dict(adapters))
        seq.started = time.perf_counter()
        self.prefilling.append(seq)

    def cancel(self, key: Any) -> bool:
        """Drop a sequence wherever it is; True if it was here."""
        for s in self.prefilling:
            if s.key == key:
                self.prefilling.remove(s)
                return True
        for i, s in enumerate(self.running):
            if s.key == key:
                self._remove([i])
                return True
        return False

    def _remove(self, rows: list[int]) -> None:
        # Highest first: the last row moved into a freed one is never itself a row being removed.
        for i in sorted(rows, reverse=True):
            last = len(self.running) - 1
            if i != last:
                self.cache.move(last, i)
                self.running[i] = self.running[last]
            self.running.pop()
        if not self.running and not self.prefilling:
            self.cache.shrink()

    def _adapters(self, stacks: list[dict[str, float]]) -> None:
        set_row_adapters(self.model, stacks, check=False)  # checked in `add`

    def _finish(self, seq: _Seq, ev: Event) -> None:
        ev.pieces += seq.dec.finish()
        ev.finished = True
        st = seq.dec.stats
        st.prompt_seconds = seq.prompt_seconds
        st.decode_seconds = time.perf_counter() - seq.decode_started if seq.decode_started else 0.0
        ev.stats = st

    @torch.inference_mode()
    def _prefill_chunk(self, events: list[Event]) -> None:
        seq = self.prefilling[0]
        ids = seq.dec.prompt_ids
        if seq.dec.done:  # max_new_tokens 0: nothing to compute
            self.prefilling.popleft()
            ev = Event(seq.key)
            self._finish(seq, ev)
            events.append(ev)
            return
        if seq.cache is None:
            seq.cache = KVCache(self.model.config, 1, len(ids), dtype=self.model.kv_dtype)
        chunk = PREFILL_BESIDE if self.running else PREFILL_ALONE
        end = min(len(ids), seq.filled + chunk)
        t0 = time.perf_counter()
        self._adapters([seq.adapters])
        try:
            logits = self.model(torch.tensor([ids[seq.filled:end]]), cache=seq.cache, last_only=True)[:, -1]
        finally:
            set_row_adapters(self.model, None)
        seq.prompt_seconds += time.perf_counter() - t0
        seq.filled = end
        if end < len(ids):
            return
        self.prefilling.popleft()
        seq.decode_started = time.perf_counter()
        ev = Event(seq.key, seq.dec.push(logits))
        if seq.dec.done:
            self._finish(seq, ev)
        else:
            self.cache.load(len(self.running), seq.cache, len(ids))
            self.running.append(seq)
        seq.cache = None
        events.append(ev)

    @torch.inference_mode()
    def _decode(self, events: list[Event]) -> None:
        rows = self.running
        tokens = torch.tensor([[s.dec.token] for s in rows])
        self._adapters([s.adapters for s in rows])
        try:
            logits = self.model(tokens, cache=self.cache)[:, -1]
        finally:
            set_row_adapters(self.model, None)
        done = []
        for i, s in enumerate(rows):
            ev = Event(s.key, s.dec.push(logits[i:i + 1]))
            if s.dec.done:
                self._finish(s, ev)
                done.append(i)
            events.append(ev)
        self._remove(done)

    def step(self) -> list[Event]:
        """One round: a prefill chunk for the next waiting sequence, then one token for every running one."""
        events: list[Event] = []
        if self.prefilling:
            self._prefill_chunk(events)
        if self.running:
            self._decode(events)
        return events
