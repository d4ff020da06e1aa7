"""`nomoat serve` against hostile requests: sampling values that overflow (400, not 500), oversized bodies (413),
`/health` without the key, and Host / Origin allow-lists against cross-site requests and DNS rebinding, while
the web chat and the arena keep working from their own origin."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
from test_bad_input import assert_one_line_error, run_cli
from test_serve import Live, start_server, stop_server
from test_serve import files as files  # noqa: F401  (the module-scoped model + adapters fixture)
from test_serve import load_with_adapters as load_served

from nomoat.eval.arena import ArenaSettings
from nomoat.serve import ServerSettings

LIMIT = 16_384  # the test server's --max-request-bytes


@pytest.fixture(scope="module")
def live(files, tmp_path_factory) -> Iterator[Live]:  # noqa: F811
    lm = load_served(*files)
    settings = ServerSettings(max_tokens_limit=64, max_request_bytes=LIMIT, api_key="k3y",
                              allow_origins=("https://app.example.com",))
    db = tmp_path_factory.mktemp("arena") / "arena.sqlite"
    srv = start_server(lm, "tiny", {"support": 1.0, "pirate": 1.0}, settings,
                       arena=ArenaSettings(str(db), max_tokens=8, votes_per_minute=5000, seed=0),
                       adapter_sources={k: str(v) for k, v in files[1].items()})
    yield srv
    stop_server(srv)


KEY = {"Authorization": "Bearer k3y"}


def _chat(**extra) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **extra}


@pytest.mark.parametrize("field,value", [("temperature", 1e-300), ("temperature", 5e-6), ("repetition_penalty", 1e-40),
                                         ("repetition_penalty", 1e40), ("seed", 2**70), ("seed", -(2**70)),
                                         ("top_k", 2**70), ("temperature", "NaN"), ("top_p", "Infinity")])
@pytest.mark.parametrize("route", ["chat/completions", "completions"])
def test_extreme_sampling_values_are_a_bad_request(live: Live, route: str, field: str, value) -> None:
    body = _chat() if route == "chat/completions" else {"model": "tiny", "prompt": "hi", "max_tokens": 2}
    if isinstance(value, str):  # NaN / Infinity: not JSON, but Python's json and some clients write them
        raw = json.dumps(body)[:-1] + f', "{field}": {value}}}'  # type: ignore[attr-defined]
        r = httpx.post(f"{live.url}/v1/{route}", content=raw, headers={**KEY, "content-type": "application/json"})
    else:
        r = httpx.post(f"{live.url}/v1/{route}", json={**body, field: value}, headers=KEY)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field
    # The boundaries themselves are served.
    ok = {"temperature": 1e-5, "repetition_penalty": 0.01, "seed": 2**64 - 1, "top_k": 1 << 24, "top_p": 1.0}[field]
    assert httpx.post(f"{live.url}/v1/{route}", json={**body, field: ok}, headers=KEY, timeout=60).status_code == 200


def test_oversized_bodies_are_413(live: Live) -> None:
    big = _chat(messages=[{"role": "user", "content": "x" * (2 * LIMIT)}])
    r = httpx.post(live.url + "/v1/chat/completions", json=big, headers=KEY)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"model": "tiny", "messages": [{"role": "user", "content": "'
        for _ in range(8):
            yield b"x" * (LIMIT // 4)
        yield b'"}]}'

    json_type = {**KEY, "content-type": "application/json"}
    r = httpx.post(live.url + "/v1/chat/completions", content=chunks(), headers=json_type)
    assert r.status_code == 413, r.text
    r = httpx.post(live.url + "/arena/api/battles", content=chunks(), headers=KEY)
    assert r.status_code == 413, r.text
    assert httpx.post(live.url + "/v1/chat/completions", json=_chat(), headers=KEY, timeout=60).status_code == 200


def test_health_says_only_alive_without_the_key(live: Live) -> None:
    assert httpx.get(live.url + "/health").json() == {"status": "ok"}
    assert httpx.get(live.url + "/health", headers={"Authorization": "Bearer nope"}).json() == {"status": "ok"}
    full = httpx.get(live.url + "/health", headers=KEY).json()
    assert full["status"] == "ok" and full["adapters"] == ["support", "pirate"] and "completed" in full


def test_health_without_a_server_key_is_complete(files) -> None:  # noqa: F811
    srv = start_server(load_served(*files), "tiny", {"support": 1.0}, ServerSettings())
    try:
        assert httpx.get(srv.url + "/health").json()["adapters"] == ["support"]
    finally:
        stop_server(srv)


@pytest.mark.parametrize("host,ok", [("evil.example", False), ("evil.example:8000", False), ("localhost", True),
                                     ("LOCALHOST:1234", True), ("chat.localhost", True), ("127.0.0.1", True),
                                     ("[::1]:80", True), ("192.168.1.20:8000", True), ("app.example.com", True),
                                     ("example.com", False), ("my-box.local:8000", True), ("gpu.internal", True),
                                     ("local.evil.example", False)])
def test_host_allow_list(live: Live, host: str, ok: bool) -> None:
    """A DNS-rebinding page reaches 127.0.0.1 under its own name: that Host is refused on every route."""
    for method, path in (("GET", "/v1/models"), ("GET", "/"), ("GET", "/health"), ("GET", "/arena")):
        r = httpx.request(method, live.url + path, headers={**KEY, "Host": host})
        if ok:
            assert r.status_code == 200, (path, r.text)
        else:
            assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed", (path, r.text)


@pytest.mark.parametrize("origin,ok,cors", [("http://evil.example", False, False), ("null", False, False),
                                            ("http://localhost.evil.example", False, False),
                                            ("http://localhost:3000", True, True),
                                            ("http://127.0.0.1:5173", True, True),
                                            ("https://app.example.com", True, True),
                                            ("https://app.example.com:444", False, False)])
def test_origin_allow_list(live: Live, origin: str, ok: bool, cors: bool) -> None:
    """A cross-site request is refused before it runs, even a 'simple' one the browser would send without
    asking (text/plain POST), and with the key too; allowed pages get CORS headers."""
    post = httpx.post(live.url + "/v1/chat/completions", content=json.dumps(_chat()),
                      headers={**KEY, "Origin": origin, "content-type": "text/plain"}, timeout=60)
    preflight = httpx.options(live.url + "/v1/chat/completions",
                              headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                                       "Access-Control-Request-Headers": "authorization,content-type"})
    vote = httpx.post(live.url + "/arena/api/battles", json={"prompt": "hi", "stream": False},
                      headers={**KEY, "Origin": origin}, timeout=60)
    for r in (post, preflight, vote):
        if ok:
            assert r.status_code == 200, r.text
            assert (r.headers.get("access-control-allow-origin") == origin) == cors
        else:
            assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed", r.text


def test_own_pages_work_from_their_own_origin(live: Live) -> None:
    """The web chat and the arena, as a browser on the server's own origin sends them (Origin on POSTs)."""
    own = live.url
    host = own.removeprefix("http://")
    for name in ("localhost", "127.0.0.1"):
        origin = own.replace("127.0.0.1", name)
        h = {"Origin": origin, "Host": host.replace("127.0.0.1", name)}
        for page in ("/", "/arena", "/leaderboard"):
            assert httpx.get(own + page, headers=h).status_code == 200
        assert httpx.get(own + "/v1/models", headers={**h, **KEY}).status_code == 200
        chat = httpx.post(own + "/v1/chat/completions", json={**_chat(), "stream": True}, headers={**h, **KEY},
                          timeout=60)
        assert chat.status_code == 200 and "[DONE]" in chat.text
        battle = httpx.post(own + "/arena/api/battles", json={"prompt": "hi", "stream": False},
                            headers={**h, **KEY}, timeout=60)
        assert battle.status_code == 200, battle.text
        vote = httpx.post(f"{own}/arena/api/battles/{battle.json()['battle_id']}/vote", json={"winner": "tie"},
                          headers={**h, **KEY})
        assert vote.status_code == 200, vote.text
        assert httpx.get(own + "/arena/api/leaderboard", headers={**h, **KEY}).status_code == 200


def test_a_name_the_server_is_bound_to_is_allowed(files) -> None:  # noqa: F811
    srv = start_server(load_served(*files), "tiny", {}, ServerSettings(host="my-box.lan"))
    try:
        assert httpx.get(srv.url + "/v1/models", headers={"Host": "my-box.lan:8000"}).status_code == 200
        assert httpx.get(srv.url + "/v1/models", headers={"Host": "other-box.lan"}).status_code == 403
        r = httpx.get(srv.url + "/v1/models", headers={"Host": "my-box.lan:8000", "Origin": "http://my-box.lan:8000"})
        assert r.status_code == 200
    finally:
        stop_server(srv)


@pytest.mark.parametrize("args,why", [(["serve", "--allow-origin", "ftp://x"], "--allow-origin"),
                                      (["serve", "--allow-origin", "https://x.com/path"], "--allow-origin"),
                                      (["generate", "hi", "--temperature", "1e-300"], "--temperature"),
                                      (["generate", "hi", "--temperature", "nan"], "--temperature"),
                                      (["generate", "hi", "--repeat-penalty", "1e-40"], "--repeat-penalty"),
                                      (["generate", "hi", "--seed", str(2**70)], "--seed")])
def test_cli_refuses_the_same_values(args: list[str], why: str, monkeypatch, capsys) -> None:
    """Refused before any model is loaded."""
    code, out, err = run_cli(args, monkeypatch, capsys)
    assert_one_line_error(code, err, why)
