"""The blind A/B arena: routes the server mounts at /arena and /leaderboard.

A battle draws two contestants (the served base, adapters, stacks), shuffles their sides, and streams both
answers to the same conversation at once. Nothing the page, its script, the events or any JSON response
carries names a contestant until the vote; the vote reveals them. Votes are accepted once per battle and
only for battles this server created, rate-limited per voter, and stored before they are acknowledged.
Generation is the server's: it hands in a `Contestants` that can stream a reply for a contestant.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import random
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Protocol

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from nomoat.errors import NomoatError
from nomoat.eval.arena_store import AlreadyVoted, ArenaStore, UnknownBattle
from nomoat.eval.questions import Question
from nomoat.eval.ratings import Report, build_report, pair_weights

MAX_PROMPT_CHARS = 16_000


class ArenaFailure(Exception):
    """A request the arena refuses: HTTP status and a message that names no contestant."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Contestants(Protocol):
    """What the server provides: who can fight, and a reply stream for one of them."""

    base: str
    base_fingerprint: str | None

    def names(self) -> list[str]: ...

    def stack(self, name: str) -> dict[str, Any]: ...

    def stream(self, name: str, messages: list[dict[str, str]], max_tokens: int,
               temperature: float | None) -> AsyncIterator[str]: ...


@dataclass
class ArenaSettings:
    db: str
    token: str | None = None  # voters' token, besides the server's API key
    contestants: Sequence[str] = ()  # empty: every model id the server lists
    questions: Sequence[Question] = ()
    max_tokens: int = 512
    temperature: float | None = None  # None: the server's default sampling
    votes_per_minute: float = 60.0  # per voter, with a burst of as many
    seed: int | None = None


class _Buckets:
    """A token bucket per voter."""

    def __init__(self, per_minute: float) -> None:
        self.rate, self.cap = per_minute / 60.0, max(per_minute, 1.0)
        self._state: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, voter: str) -> bool:
        now = time.monotonic()
        with self._lock:
            level, last = self._state.get(voter, (self.cap, now))
            level = min(self.cap, level + (now - last) * self.rate)
            ok = level >= 1.0
            self._state[voter] = (level - 1.0 if ok else level, now)
        return ok


@dataclass
class _Battle:
    id: str
    names: tuple[str, str]
    conv: tuple[list[dict[str, str]], list[dict[str, str]]] = field(default_factory=lambda: ([], []))
    turns: int = 0
    busy: bool = False
    voted: bool = False


class Arena:
    """Battles in progress, the store, pair drawing and the rate limit."""

    def __init__(self, contestants: Contestants, settings: ArenaSettings) -> None:
        self.gen, self.settings = contestants, settings
        self.store = ArenaStore(settings.db)
        names = list(settings.contestants) or contestants.names()
        if len(names) < 2:
            raise NomoatError("the arena needs at least two contestants: serve at least one --adapter")
        if len(set(names)) != len(names):
            raise NomoatError("--arena-models: a contestant is named twice")
        for n in names:
            try:
                contestants.stack(n)
            except Exception:
                raise NomoatError(f"--arena-models: {n!r} is not a model id this server serves; it serves "
                                  f"{', '.join(contestants.names())}") from None
        self.names = names
        self.buckets = _Buckets(settings.votes_per_minute)
        self.rng = random.Random(settings.seed)
        self._live: dict[str, _Battle] = {}
        self._weights: tuple[int, np.ndarray] | None = None
        self._board: tuple[int, Report] | None = None

    # ------------------------------------------------------------------ drawing contestants

    def _pair_weights(self) -> np.ndarray:
        voted = self.store.counts()[1]
        if self._weights is None or self._weights[0] != voted:
            self._weights = (voted, pair_weights(self.names, self.store.battles()))
        return self._weights[1]

    def draw(self) -> tuple[str, str]:
        """Two contestants, weighted towards pairs with few battles and uncertain outcomes; random sides."""
        w = self._pair_weights()
        k = len(self.names)
        iu = np.triu_indices(k, 1)
        p = self.rng.choices(range(len(w)), weights=list(w + 1e-12))[0]
        pair = [self.names[iu[0][p]], self.names[iu[1][p]]]
        self.rng.shuffle(pair)
        return pair[0], pair[1]

    def battle(self, bid: str) -> _Battle:
        b = self._live.get(bid)
        if b is None:
            try:
                row = self.store.get(bid)
            except UnknownBattle:
                raise ArenaFailure(404, "no such battle") from None
            b = _Battle(bid, (row["model_a"], row["model_b"]), (row["conversation_a"], row["conversation_b"]),
                        row["turns"], voted=row["winner"] is not None)
            self._live[bid] = b
        return b

    def new_battle(self, question_id: str | None) -> _Battle:
        a, b = self.draw()
        bid = self.store.create(a, b, self.gen.stack(a), self.gen.stack(b), self.gen.base, self.gen.base_fingerprint,
                                question_id)
        self._live[bid] = _Battle(bid, (a, b))
        return self._live[bid]

    # ------------------------------------------------------------------ one turn: both sides at once

    async def turn_events(self, battle: _Battle, prompt: str, max_tokens: int) -> AsyncIterator[dict[str, Any]]:
        """Events of one turn: `{"side", "delta"}` as either side streams, `{"side", "done"}` (or `"error"`) when a
        side ends; the turn is stored once both ended. Cancelling stops both generations."""
        if battle.busy:
            raise ArenaFailure(409, "this battle is still answering the previous message")
        battle.busy = True
        convs = [c + [{"role": "user", "content": prompt}] for c in battle.conv]
        texts: list[list[str]] = [[], []]
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

        async def pump(k: int) -> None:
            side = "ab"[k]
            try:
                async for piece in self.gen.stream(battle.names[k], convs[k], max_tokens, self.settings.temperature):
                    texts[k].append(piece)
                    await queue.put({"side": side, "delta": piece})
                await queue.put({"side": side, "done": True})
            except ArenaFailure as e:
                await queue.put({"side": side, "error": str(e)})
            except Exception:  # the message must not name the contestant
                await queue.put({"side": side, "error": "generation failed"})

        tasks = [asyncio.ensure_future(pump(k)) for k in (0, 1)]
        ended, failed = 0, False
        try:
            while ended < 2:
                ev = await queue.get()
                if "done" in ev or "error" in ev:
                    ended += 1
                    failed = failed or "error" in ev
                yield ev
            if not failed:
                for k in (0, 1):
                    convs[k].append({"role": "assistant", "content": "".join(texts[k])})
                battle.conv = (convs[0], convs[1])
                battle.turns += 1
                self.store.save_turn(battle.id, convs[0], convs[1], battle.turns)
        finally:
            for t in tasks:
                t.cancel()
            battle.busy = False

    def vote(self, battle: _Battle, vote: str, voter: str) -> dict[str, Any]:
        if battle.busy:
            raise ArenaFailure(409, "wait until both answers are complete before voting")
        if not self.buckets.take(voter):
            raise ArenaFailure(429, "too many votes from this voter; slow down")
        try:
            row = self.store.vote(battle.id, vote, voter, anony=True)
        except AlreadyVoted:
            raise ArenaFailure(409, "this battle already has a vote") from None
        except UnknownBattle:
            raise ArenaFailure(404, "no such battle") from None
        except ValueError as e:
            raise ArenaFailure(400, str(e)) from None
        self._live.pop(battle.id, None)  # later turns reload it from the store
        return {"battle_id": battle.id, "winner": row["winner"], "model_a": row["model_a"], "model_b": row["model_b"],
                "stack_a": row["stack_a"], "stack_b": row["stack_b"], "turn": row["vote_turn"]}

    def report(self) -> Report | None:
        voted = self.store.counts()[1]
        if not voted:
            return None
        if self._board is None or self._board[0] != voted:
            self._board = (voted, build_report(self.store.battles(), resamples=100))
        return self._board[1]


# --------------------------------------------------------------------------- HTTP


def _page(name: str) -> str:
    return (resources.files("nomoat.eval") / "static" / name).read_text(encoding="utf-8")


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _voter(request: Request) -> str:
    """The anonymous voter id the page keeps in local storage; without one, a hash of the client address."""
    v = request.headers.get("x-arena-voter", "").strip()
    if v and len(v) <= 64 and all(c.isalnum() or c in "-_" for c in v):
        return v
    host = request.client.host if request.client else "?"
    return "ip-" + hashlib.sha256(host.encode()).hexdigest()[:16]


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if len(raw) > 4 * MAX_PROMPT_CHARS + 1024:
        raise ArenaFailure(413, "request too large")
    try:
        obj = json.loads(raw or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise ArenaFailure(400, "the body must be a JSON object") from None
    if not isinstance(obj, dict):
        raise ArenaFailure(400, "the body must be a JSON object")
    return obj


def _prompt(obj: dict[str, Any]) -> str:
    p = obj.get("prompt")
    if not isinstance(p, str) or not p.strip():
        raise ArenaFailure(400, "prompt: a non-empty string is required")
    if len(p) > MAX_PROMPT_CHARS:
        raise ArenaFailure(400, f"prompt: at most {MAX_PROMPT_CHARS} characters")
    return p


def arena_routes(contestants: Contestants, settings: ArenaSettings,
                 api_key: str | None) -> tuple[APIRouter, Arena]:
    """The arena's router (page, API, leaderboard) and its state. With an API key or an arena token set,
    every route needs `Authorization: Bearer` with either (the page asks for it and keeps it locally)."""
    arena = Arena(contestants, settings)
    keys = [k for k in (api_key, settings.token) if k]

    def auth(request: Request) -> None:
        if not keys:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(token.strip().encode(), k.encode()) for k in keys):
            raise ArenaFailure(401, "invalid or missing arena token: send 'Authorization: Bearer <token>'")

    pages = APIRouter()
    api = APIRouter(prefix="/arena/api", dependencies=[Depends(auth)])
    arena_html, board_html = _page("arena.html"), _page("leaderboard.html")

    @pages.get("/arena", response_class=HTMLResponse)
    async def arena_page() -> str:
        return arena_html  # holds no names; the API behind it needs the token

    @pages.get("/leaderboard", response_class=HTMLResponse)
    async def leaderboard_page() -> str:
        return board_html

    @api.get("/config")
    async def config() -> dict[str, Any]:
        return {"contestants": len(arena.names), "questions": len(settings.questions),
                "needs_token": bool(keys), "max_tokens": settings.max_tokens}

    @api.get("/question")
    async def question() -> dict[str, Any]:
        if not settings.questions:
            raise ArenaFailure(404, "no question set loaded (start the server with --arena-questions)")
        q = arena.rng.choice(list(settings.questions))
        return {"question_id": q.question_id, "category": q.category, "turns": list(q.turns)}

    def _max_tokens(obj: dict[str, Any]) -> int:
        m = obj.get("max_tokens", settings.max_tokens)
        if not isinstance(m, int) or isinstance(m, bool) or not 1 <= m <= settings.max_tokens:
            raise ArenaFailure(400, f"max_tokens: an integer from 1 to {settings.max_tokens}")
        return m

    async def _answer(battle: _Battle, prompt: str, obj: dict[str, Any]) -> Any:
        max_tokens = _max_tokens(obj)
        events = arena.turn_events(battle, prompt, max_tokens)
        head = {"battle_id": battle.id, "turn": battle.turns + 1}
        if obj.get("stream", True):
            async def sse() -> AsyncIterator[str]:
                yield _sse(head)
                try:
                    async for ev in events:
                        yield _sse(ev)
                    yield _sse({"done": True, "turn": battle.turns})
                except ArenaFailure as e:
                    yield _sse({"error": str(e)})
                finally:
                    await events.aclose()
            return StreamingResponse(sse(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        out = {"a": [], "b": []}
        errors = []
        async for ev in events:
            if "delta" in ev:
                out[ev["side"]].append(ev["delta"])
            elif "error" in ev:
                errors.append(ev["error"])
        if errors:
            raise ArenaFailure(500, errors[0])
        return {**head, "answer_a": "".join(out["a"]), "answer_b": "".join(out["b"])}

    @api.post("/battles")
    async def new_battle(request: Request) -> Any:
        obj = await _body(request)
        prompt = _prompt(obj)
        _max_tokens(obj)
        qid = obj.get("question_id")
        return await _answer(arena.new_battle(None if qid is None else str(qid)[:200]), prompt, obj)

    @api.post("/battles/{bid}/turns")
    async def next_turn(bid: str, request: Request) -> Any:
        obj = await _body(request)
        prompt = _prompt(obj)
        return await _answer(arena.battle(bid), prompt, obj)

    @api.post("/battles/{bid}/vote")
    async def vote(bid: str, request: Request) -> Any:
        obj = await _body(request)
        v = obj.get("winner")
        if v not in ("a", "b", "tie", "bothbad"):
            raise ArenaFailure(400, "winner: one of a, b, tie, bothbad")
        battle = arena.battle(bid)
        return await asyncio.to_thread(arena.vote, battle, v, _voter(request))

    @api.get("/leaderboard")
    async def leaderboard() -> Any:
        report = await asyncio.to_thread(arena.report)
        n, voted = arena.store.counts()
        return {"battles": n, "votes": voted, "report": report.to_json() if report else None}

    router = APIRouter()
    router.include_router(pages)
    router.include_router(api)
    return router, arena


async def arena_failure(request: Request, e: ArenaFailure) -> JSONResponse:
    """The exception handler the server installs for arena routes."""
    return JSONResponse({"error": {"message": str(e), "type": "arena_error", "code": e.status}}, status_code=e.status)
