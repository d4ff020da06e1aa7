"""Judges: any OpenAI-compatible chat endpoint (over HTTP, with retries and backoff), or a nomoat model run
in-process. Both answer a list of chat messages with a `JudgeReply`, logprobs included when asked for.

The only network access in the judging path is to the URL the user gives (`--judge URL`).
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from nomoat.errors import NomoatError
from nomoat.eval.judge_cache import JudgeReply

TOP_LOGPROBS = 5  # alternatives asked for per token with --soft
API_KEY_VARS = ("NOMOAT_JUDGE_API_KEY", "OPENAI_API_KEY")


class JudgeInputError(NomoatError):
    """The judge refused this one request (e.g. too long for its context); the run records it and goes on."""


@dataclass(frozen=True)
class JudgeSettings:
    """How each judgment is asked for: temperature, reply length, logprobs, and run-level options."""

    temperature: float = 0.0
    max_tokens: int = 256
    soft: bool = False  # ask for logprobs and read the verdict's probability
    repeat: int = 1  # judge every comparison this many times (at `temperature`) to measure the spread
    parallel: int = 4

    def check(self) -> None:
        if not 0 <= self.temperature <= 2:
            raise NomoatError(f"--judge-temperature must be in [0, 2], got {self.temperature}")
        if self.max_tokens < 1:
            raise NomoatError(f"--judge-max-tokens must be at least 1, got {self.max_tokens}")
        if self.repeat < 1:
            raise NomoatError(f"--repeat must be at least 1, got {self.repeat}")
        if self.parallel < 1:
            raise NomoatError(f"--parallel must be at least 1, got {self.parallel}")


class Judge(Protocol):
    """A judge model: `name` identifies it in cache keys and verdict records."""

    name: str
    max_parallel: int | None  # requests it can usefully take at once (None: no limit of its own)

    def __call__(self, messages: list[dict[str, str]], settings: JudgeSettings, seed: int | None) -> JudgeReply:
        ...


class EndpointJudge:
    """A model behind an OpenAI-compatible `/chat/completions` (OpenAI, vLLM, llama.cpp, `nomoat serve`).

    Retries 429, 5xx and connection errors with exponential backoff (honouring `Retry-After`); a 400
    for one input is recorded for that judgment only; any other refusal (a bad key, an unknown model)
    ends the run with a one-line error.
    """

    max_parallel = None

    def __init__(self, url: str, model: str, api_key: str | None = None, timeout: float = 300.0, retries: int = 6,
                 backoff: float = 0.5, sleep: Callable[[float], None] = time.sleep, transport: Any = None) -> None:
        url = url.rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise NomoatError(f"--judge {url!r}: expected an http(s):// URL of an OpenAI-compatible API, or 'local'")
        self.url = url.removesuffix("/chat/completions")
        self.model, self.name = model, model
        self.api_key = api_key
        self.timeout, self.retries, self.backoff, self.sleep = timeout, retries, backoff, sleep
        self.transport = transport  # an httpx transport (tests); None: the network
        self._local = threading.local()
        self._clients: list[Any] = []
        self._lock = threading.Lock()

    def _client(self):
        import httpx

        c = getattr(self._local, "client", None)
        if c is None:  # one connection pool per worker thread
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            c = self._local.client = httpx.Client(timeout=self.timeout, headers=headers, transport=self.transport)
            with self._lock:
                self._clients.append(c)
        return c

    def close(self) -> None:
        with self._lock:
            for c in self._clients:
                c.close()
            self._clients.clear()

    def __call__(self, messages: list[dict[str, str]], settings: JudgeSettings, seed: int | None) -> JudgeReply:
        import httpx

        body: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": settings.temperature,
                                "max_tokens": settings.max_tokens}
        if settings.soft:
            body |= {"logprobs": True, "top_logprobs": TOP_LOGPROBS}
        if seed is not None and settings.temperature > 0:
            body["seed"] = seed
        where = f"--judge {self.url}"
        last = ""
        for attempt in range(self.retries + 1):
            wait = min(30.0, self.backoff * 2 ** attempt) * (0.5 + random.random() / 2)
            try:
                r = self._client().post(self.url + "/chat/completions", json=body)
            except httpx.TransportError as e:
                last = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            else:
                if r.status_code == 200:
                    return _parse_reply(r, where)
                last = f"HTTP {r.status_code}: {_error_message(r)}"
                if r.status_code != 429 and r.status_code < 500:
                    if r.status_code in (400, 413, 422):
                        raise JudgeInputError(f"{where}: {last}")
                    raise NomoatError(f"{where}: {last}")
                retry_after = r.headers.get("retry-after", "")
                if retry_after.replace(".", "", 1).isdigit():
                    wait = min(60.0, float(retry_after))
            if attempt < self.retries:
                self.sleep(wait)
        raise NomoatError(f"{where}: gave up after {self.retries + 1} attempts ({last})")


def _error_message(r) -> str:
    try:
        err = r.json().get("error")
        msg = err.get("message") if isinstance(err, dict) else err
    except (ValueError, AttributeError):
        msg = None
    return " ".join(str(msg or r.text or r.reason_phrase).split())[:300]


def _parse_reply(r, where: str) -> JudgeReply:
    try:
        choice = r.json()["choices"][0]
        text = choice["message"].get("content") or ""
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        raise NomoatError(f"{where}: the reply is not an OpenAI chat completion: {r.text[:200]!r}") from None
    lp = choice.get("logprobs")
    content = lp.get("content") if isinstance(lp, dict) else None
    return JudgeReply(str(text), content if isinstance(content, list) else None)


class LocalJudge:
    """A nomoat model run in this process as the judge (one judgment at a time: the model is not shared
    between threads)."""

    max_parallel = 1

    def __init__(self, lm, name: str) -> None:
        from nomoat.runtime.logprobs import TokenText

        self.lm, self.name = lm, name
        self._text = TokenText(lm.tokenizer)
        self._lock = threading.Lock()

    def __call__(self, messages: list[dict[str, str]], settings: JudgeSettings, seed: int | None) -> JudgeReply:
        from nomoat.runtime.generate import GenerationConfig, stream
        from nomoat.runtime.prompts import prompt_ids

        cfg = GenerationConfig(max_new_tokens=settings.max_tokens, temperature=settings.temperature, seed=seed,
                               logprobs=TOP_LOGPROBS if settings.soft else None)
        with self._lock:
            ids = prompt_ids(self.lm, messages)
            if len(ids) >= self.lm.config.max_position_embeddings:
                raise JudgeInputError(f"the judge prompt is {len(ids)} tokens; the judge's context is "
                                      f"{self.lm.config.max_position_embeddings}")
            pieces = list(stream(self.lm.model, self.lm.tokenizer, ids, cfg))
        if not settings.soft:
            return JudgeReply("".join(pieces))
        tt = self._text
        content = [{"token": tt.text(e.token), "logprob": e.logprob,
                    "top_logprobs": [{"token": tt.text(i), "logprob": lp} for i, lp in e.top]}
                   for p in pieces for e in getattr(p, "logprobs", ())]
        return JudgeReply("".join(pieces), content)


def make_judge(judge: str, judge_model: str | None = None, judge_path: str | Path | None = None,
               api_key: str | None = None) -> Judge:
    """The judge a command line names: `local` (the default model, or `judge_path`) or an endpoint URL.

    Raises:
        NomoatError: naming the option at fault.
    """
    if judge == "local":
        from nomoat.adapters import base_fingerprint
        from nomoat.runtime.loading import load

        lm = load(judge_path, quant="auto")
        return LocalJudge(lm, f"local:{lm.name}:{base_fingerprint(lm)}")
    if judge_path is not None:
        raise NomoatError("--judge-path goes with --judge local")
    if not judge.startswith(("http://", "https://")):
        raise NomoatError(f"--judge {judge!r}: expected an http(s):// URL of an OpenAI-compatible API, or 'local'")
    if not judge_model:
        raise NomoatError("--judge-model is required with an endpoint: the model id the server should run")
    key = api_key or next((os.environ[v] for v in API_KEY_VARS if os.environ.get(v)), None)
    return EndpointJudge(judge, judge_model, key)
