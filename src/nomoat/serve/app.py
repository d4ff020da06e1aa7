"""The OpenAI-compatible HTTP server: /v1/models, /v1/chat/completions, /v1/completions, /health and a web chat.

One base model serves every request; the request's `model` field picks the base (`smollm2`), one
adapter (`support`), or a stack (`support+pirate`). Generation runs on the engine's single worker
thread; this module only validates, queues, and relays tokens (as server-sent events when streaming).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import json
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from importlib import resources
from typing import Any

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from nomoat.errors import NomoatError
from nomoat.eval.arena import ArenaFailure, ArenaSettings, arena_failure, arena_routes
from nomoat.runtime.generate import GenerationConfig, GenerationStats
from nomoat.runtime.loading import LoadedModel
from nomoat.runtime.logprobs import TokenText
from nomoat.serve.engine import Engine, EngineBusy, Job
from nomoat.serve.guard import LOCAL_ORIGIN, Guard, GuardMiddleware, normalize_origin
from nomoat.serve.logprobs import CompletionLogprobs, chat_logprobs
from nomoat.serve.schemas import ApiError, ChatCompletionRequest, CompletionRequest, _Sampling, error_body

MAX_LISTED = 64  # model ids listed at most (every subset of adapters is selectable either way)


@dataclass
class ServerSettings:
    api_key: str | None = None
    max_tokens_limit: int = 2048
    max_request_bytes: int = 1 << 20
    max_context: int = 0  # 0: the model's context length
    max_active: int = 8
    max_queue: int = 64
    max_stop: int = 4
    host: str = "127.0.0.1"  # the bound address: a name here is an allowed Host
    allow_origins: tuple[str, ...] = ()  # web origins allowed besides the server's own and localhost pages

    def check(self) -> None:
        """Refuse settings out of range, naming the command-line option."""
        for opt, value, low in (("--max-tokens-limit", self.max_tokens_limit, 1),
                                ("--max-request-bytes", self.max_request_bytes, 1024),
                                ("--max-context", self.max_context, 0), ("--max-active", self.max_active, 1)):
            if value < low:
                raise NomoatError(f"{opt} {value} is out of range (at least {low})")
        for origin in self.allow_origins:
            normalize_origin(origin)


def check_listen(host: str, port: int) -> None:
    """Fail now, in one line, if the server could not listen on host:port (before loading the model)."""
    import socket

    if not 0 <= port <= 65535:
        raise NomoatError(f"--port {port} is out of range")
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as e:
        raise NomoatError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


class ModelRegistry:
    """Names a client may send as `model`: the base, each adapter, and `+`-joined stacks of adapters."""

    def __init__(self, base: str, adapters: dict[str, float]) -> None:
        for name in adapters:
            if not name or "+" in name or name == base:
                raise NomoatError(f"adapter name {name!r} must be non-empty, without '+', and differ from the "
                                  f"base model's name {base!r}")
        self.base, self.adapters = base, dict(adapters)

    def ids(self) -> list[str]:
        out = [self.base]
        names = list(self.adapters)
        for k in range(1, len(names) + 1):
            for combo in itertools.combinations(names, k):
                if len(out) >= MAX_LISTED:
                    return out
                out.append("+".join(combo))
        return out

    def card_fields(self, model: str) -> dict[str, Any]:
        """Extra fields of a /v1/models entry (a live catalog's registry adds each adapter's base and parent)."""
        return {}

    def resolve(self, model: str) -> dict[str, float]:
        """Adapter weights for a model id, in the order they were loaded; ApiError 404 if unknown."""
        parts = model.split("+")
        if parts[0] == self.base:
            parts = parts[1:]
        if (parts or model != self.base) and (not parts or len(set(parts)) != len(parts)
                                              or any(p not in self.adapters for p in parts)):
            shown = self.ids()
            more = "" if len(shown) < MAX_LISTED else ", ..."
            raise ApiError(404, f"model {model!r} not found; available: {', '.join(shown)}{more}",
                           param="model", code="model_not_found")
        return {n: w for n, w in self.adapters.items() if n in parts}


class _Bridge:
    """Carries the engine thread's events onto the request's event loop."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def emit(self, kind: str, payload: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening any more
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, payload))


def _validation_error(e: ValidationError) -> ApiError:
    err = e.errors()[0]
    if err["type"] == "json_invalid":
        return ApiError(400, f"malformed JSON body: {err['msg']}", code="invalid_json")
    loc = ".".join(str(x) for x in err["loc"])
    return ApiError(400, f"{loc or 'body'}: {err['msg']}", param=loc or None, code=err["type"])


async def _read(request: Request, model: type[_Sampling], limit: int) -> Any:
    size = request.headers.get("content-length", "")
    too_big = ApiError(413, f"request body exceeds {limit} bytes", code="request_too_large")
    if size.isdigit() and int(size) > limit:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_big
    try:
        return model.model_validate_json(bytes(body))
    except ValidationError as e:
        raise _validation_error(e) from None


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class Server:
    """State shared by the routes: the model, its adapters, the engine and the limits."""

    def __init__(self, lm: LoadedModel, registry: ModelRegistry, settings: ServerSettings) -> None:
        self.lm, self.registry, self.settings = lm, registry, settings
        self.engine = Engine(lm, settings.max_active, settings.max_queue)
        ctx = lm.config.max_position_embeddings
        self.context = min(ctx, settings.max_context) if settings.max_context else ctx
        self._token_text: TokenText | None = None

    @property
    def token_text(self) -> TokenText:
        # Built on the first logprobs request: it reads the whole vocabulary once.
        if self._token_text is None:
            self._token_text = TokenText(self.lm.tokenizer)
        return self._token_text

    @staticmethod
    def _logprobs(req: _Sampling) -> int | None:
        """Alternatives per token the request asks for, or None when it asks for no logprobs."""
        if isinstance(req, ChatCompletionRequest):
            if req.logprobs:
                return req.top_logprobs or 0
            if req.top_logprobs:
                raise ApiError(400, "top_logprobs: requires logprobs: true", param="top_logprobs")
            return None
        return req.logprobs

    def _config(self, req: _Sampling, n_prompt: int, prompt_param: str, max_tokens: int | None) -> GenerationConfig:
        """Decoding settings for a request, within the server's limits.

        Sampling fields a request leaves out take `nomoat generate`'s defaults (temperature 0.8, top_k 40,
        top_p 0.95), and max_tokens defaults to what the limit and the context leave.
        """
        if req.n not in (None, 1):
            raise ApiError(400, "n: only n=1 is supported", param="n")
        for p in ("presence_penalty", "frequency_penalty"):
            if getattr(req, p):
                raise ApiError(400, f"{p}: not supported (use repetition_penalty)", param=p)
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > self.settings.max_stop:
            raise ApiError(400, f"stop: at most {self.settings.max_stop} sequences", param="stop")
        limit = self.settings.max_tokens_limit
        if n_prompt >= self.context:
            raise ApiError(400, f"the prompt is {n_prompt} tokens; this model's context is {self.context} tokens",
                           param=prompt_param, code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = min(limit, self.context - n_prompt)
        elif max_tokens > limit:
            raise ApiError(400, f"max_tokens: {max_tokens} exceeds this server's limit of {limit}",
                           param="max_tokens")
        elif n_prompt + max_tokens > self.context:
            raise ApiError(400, f"the prompt ({n_prompt} tokens) plus max_tokens ({max_tokens}) exceeds this "
                           f"model's context of {self.context} tokens", param="max_tokens",
                           code="context_length_exceeded")
        d = GenerationConfig()
        return GenerationConfig(
            max_new_tokens=max_tokens,
            temperature=d.temperature if req.temperature is None else req.temperature,
            top_k=d.top_k if req.top_k is None else req.top_k,
            top_p=d.top_p if req.top_p is None else req.top_p,
            repetition_penalty=req.repetition_penalty or d.repetition_penalty, seed=req.seed,
            stop=tuple(s for s in stop if s), logprobs=self._logprobs(req))

    def chat_ids(self, req: ChatCompletionRequest) -> list[int]:
        tok = self.lm.tokenizer
        if not tok.has_chat_template:
            raise ApiError(400, "this model has no chat template; use /v1/completions", param="messages")
        msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        try:
            return tok.encode_chat(msgs)
        except NomoatError as e:
            raise ApiError(400, f"messages: {e}", param="messages") from None

    def completion_ids(self, req: CompletionRequest) -> list[int]:
        if req.echo or req.suffix or (req.best_of or 1) != 1:
            raise ApiError(400, "echo, suffix and best_of are not supported", param="prompt")
        p = req.prompt
        if isinstance(p, list) and p and isinstance(p[0], int):
            ids = [int(i) for i in p]
            vocab = self.lm.config.vocab_size
            if any(not 0 <= i < vocab for i in ids):
                raise ApiError(400, f"prompt: token ids must be in [0, {vocab})", param="prompt")
        else:
            texts = [p] if isinstance(p, str) else list(p)  # type: ignore[arg-type]
            if len(texts) != 1:
                raise ApiError(400, "prompt: exactly one prompt per request is supported", param="prompt")
            ids = self.lm.tokenizer.encode(texts[0], add_special_tokens=True)
        if not ids:
            raise ApiError(400, "prompt: the prompt is empty", param="prompt")
        return ids

    async def run(self, request: Request, req: _Sampling, ids: list[int], chat: bool, max_tokens: int | None):
        adapters = self.registry.resolve(req.model)
        cfg = self._config(req, len(ids), "messages" if chat else "prompt", max_tokens)
        bridge = _Bridge()
        job = Job(ids, cfg, adapters, bridge.emit)
        try:
            self.engine.submit(job)
        except EngineBusy as e:
            raise ApiError(503, str(e), type="server_error", code="server_busy") from None
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        meta = {"id": rid, "created": int(time.time()), "model": req.model}
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self._stream(job, bridge, meta, chat, usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return JSONResponse(await self._collect(request, job, bridge, meta, chat))

    @staticmethod
    def _usage(job: Job) -> dict[str, int]:
        p, c = len(job.ids), job.stats.generated_tokens
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    async def _collect(self, request: Request, job: Job, bridge: _Bridge, meta: dict[str, Any],
                       chat: bool) -> dict[str, Any]:
        watcher = asyncio.ensure_future(_until_disconnect(request))
        pieces: list[str] = []
        entries: list[Any] = []
        try:
            while True:
                get = asyncio.ensure_future(bridge.queue.get())
                await asyncio.wait({get, watcher}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    job.cancel()
                    raise ApiError(499, "client disconnected", code="client_disconnected")
                kind, payload = get.result()
                if kind == "delta":
                    pieces.append(payload)
                    entries.extend(getattr(payload, "logprobs", ()))
                elif kind == "error":
                    raise ApiError(500, payload, type="server_error")
                else:
                    break
        finally:
            watcher.cancel()
            job.cancel()  # a no-op once finished
        text, st = "".join(pieces), job.stats
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": st.finish_reason}
        if job.cfg.logprobs is not None:
            choice["logprobs"] = (chat_logprobs(self.token_text, entries) if chat
                                  else CompletionLogprobs(self.token_text)(entries))
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        obj = "chat.completion" if chat else "text_completion"
        return {**meta, "object": obj, "choices": [choice], "usage": self._usage(job), "system_fingerprint": None}

    async def _stream(self, job: Job, bridge: _Bridge, meta: dict[str, Any], chat: bool,
                      usage: bool) -> AsyncIterator[str]:
        obj = "chat.completion.chunk" if chat else "text_completion"
        legacy = CompletionLogprobs(self.token_text) if job.cfg.logprobs is not None and not chat else None

        def chunk(text: str | None, finish: str | None = None, role: bool = False) -> dict[str, Any]:
            c: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish}
            if job.cfg.logprobs is not None and text is not None and not role:
                # A delta carries the logprobs of the tokens it was decoded from (`nomoat.runtime.logprobs.Piece`).
                entries = getattr(text, "logprobs", ())
                c["logprobs"] = chat_logprobs(self.token_text, entries) if chat else legacy(entries)
            if chat:
                c["delta"] = ({"role": "assistant", "content": ""} if role else
                              {} if text is None else {"content": text})
            else:
                c["text"] = text or ""
            return {**meta, "object": obj, "choices": [c], "system_fingerprint": None}

        try:
            if chat:
                yield _sse(chunk("", role=True))
            while True:
                kind, payload = await bridge.queue.get()
                if kind == "delta":
                    yield _sse(chunk(payload))
                    continue
                if kind == "error":
                    yield _sse(error_body(payload, "server_error"))
                else:
                    st: GenerationStats = payload
                    yield _sse(chunk(None, st.finish_reason))
                    if usage:
                        yield _sse({**meta, "object": obj, "choices": [], "usage": self._usage(job)})
                yield "data: [DONE]\n\n"
                return
        finally:
            job.cancel()  # the client went away (or we are done): stop generating


def _index_html() -> str:
    return (resources.files("nomoat.serve") / "static" / "index.html").read_text(encoding="utf-8")


def create_app(lm: LoadedModel, base_name: str, adapters: dict[str, float] | None = None,
               settings: ServerSettings | None = None, arena: ArenaSettings | None = None,
               adapter_sources: dict[str, str] | None = None) -> FastAPI:
    """The ASGI app serving `lm` with its loaded adapters (name -> weight when selected); with `arena`, the
    blind A/B arena at /arena and its leaderboard at /leaderboard."""
    settings = settings or ServerSettings()
    srv = Server(lm, ModelRegistry(base_name, adapters or {}), settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        srv.engine.start()
        try:
            yield
        finally:
            srv.engine.stop()

    app = FastAPI(title="nomoat", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = srv
    guard = Guard.for_server(settings.host, settings.allow_origins, settings.max_request_bytes)
    # CORS headers for the cross-origin pages the guard lets through (localhost pages, --allow-origin).
    app.add_middleware(CORSMiddleware, allow_origins=sorted(guard.origins), allow_origin_regex=LOCAL_ORIGIN,
                       allow_methods=["GET", "POST"], allow_headers=["authorization", "content-type", "x-arena-voter"])
    app.add_middleware(GuardMiddleware, guard=guard)  # added last: runs first

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(e.detail), code=str(e.status_code)), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _request_error(request: Request, e: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body(f"invalid request: {e.errors()[0].get('msg')}"), status_code=400)

    def has_key(request: Request) -> bool:
        key = settings.api_key
        if not key:
            return True
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())

    def auth(request: Request) -> None:
        if not has_key(request):
            raise ApiError(401, "invalid or missing API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(auth)])

    def model_card(mid: str) -> dict[str, Any]:
        parts = [p for p in mid.split("+") if p != srv.registry.base]
        return {"id": mid, "object": "model", "created": 0, "owned_by": "nomoat", "root": srv.registry.base,
                "adapters": parts, **srv.registry.card_fields(mid)}

    @v1.get("/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(m) for m in srv.registry.ids()]}

    @v1.get("/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        srv.registry.resolve(model_id)
        return model_card(model_id)

    @v1.post("/chat/completions")
    async def chat_completions(request: Request) -> Any:
        req = await _read(request, ChatCompletionRequest, settings.max_request_bytes)
        srv.registry.resolve(req.model)
        return await srv.run(request, req, srv.chat_ids(req), True, req.max_completion_tokens or req.max_tokens)

    @v1.post("/completions")
    async def completions(request: Request) -> Any:
        req = await _read(request, CompletionRequest, settings.max_request_bytes)
        srv.registry.resolve(req.model)
        return await srv.run(request, req, srv.completion_ids(req), False, req.max_tokens)

    app.include_router(v1)
    if arena is not None:
        from nomoat.serve.arena_contestants import ServedContestants

        router, app.state.arena = arena_routes(ServedContestants(srv, adapter_sources), arena, settings.api_key)
        app.add_exception_handler(ArenaFailure, arena_failure)  # type: ignore[arg-type]
        app.include_router(router)

    @app.get("/health")
    async def health(request: Request) -> dict[str, Any]:
        if not has_key(request):  # liveness only: adapter names and counters are for key holders
            return {"status": "ok"}
        e = srv.engine
        return {"status": "ok", "model": srv.registry.base, "adapters": list(srv.registry.adapters),
                "active": e.active, "queued": e.queued, "completed": e.completed, "cancelled": e.cancelled,
                "failed": e.failed}

    page = _index_html()

    @app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return page

    return app


class _Server(uvicorn.Server):
    """uvicorn's server, but SIGINT/SIGTERM end it gracefully with exit status 0 (no re-raised signal)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        sigs = (signal.SIGINT, signal.SIGTERM)
        old = {s: signal.signal(s, self._on_signal) for s in sigs}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def _on_signal(self, sig: int, frame: Any) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C: stop waiting for in-flight requests
        self.should_exit = True


def make_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning",
                graceful_seconds: float = 10.0) -> uvicorn.Server:
    """A uvicorn server for `app`; `.run()` blocks until SIGINT/SIGTERM or `.should_exit = True`."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=int(graceful_seconds), lifespan="on")
    return _Server(config)


def base_name_for(lm: LoadedModel) -> str:
    """The base model's id: `smollm2` for the embedded default, else a slug of the file or directory name."""
    import re
    from pathlib import Path

    from nomoat.runtime.loading import default_model_path

    with contextlib.suppress(NomoatError, OSError):
        if Path(lm.source).resolve() == default_model_path().resolve():
            return "smollm2"
    stem = Path(lm.source).name.split(".")[0] or lm.name
    return re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-") or "model"
