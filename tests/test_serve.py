"""`nomoat serve` over HTTP with the official `openai` client: models, chat, completions, streaming, adapters
selected per request, concurrency without cross-talk, cancellation, bad input, API keys, and the CLI."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_lm

from nomoat.adapters import load_adapter, save_adapter
from nomoat.api import convert_to_hf, prompt_ids
from nomoat.lora import LoraConfig, add_adapter, lora_modules, remove_adapter, set_active, strip_lora
from nomoat.runtime.generate import GenerationConfig, GenerationStats, stream
from nomoat.runtime.loading import LoadedModel, load
from nomoat.serve import ServerSettings, create_app, make_server
from nomoat.serve.engine import Engine, Job

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

ADAPTERS = {"support": LoraConfig(r=4, alpha=8, targets="q,v"), "pirate": LoraConfig(r=2, alpha=4, targets="all")}
MODELS = ["tiny", "support", "pirate", "support+pirate"]
LIMIT = 900  # the test server's --max-tokens-limit
CTX = 1024  # the tiny model's context


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_adapters(lm: LoadedModel, out: Path, specs: dict[str, LoraConfig], base_name: str) -> dict[str, Path]:
    """Save random LoRA adapters (non-zero B) for `lm` under `out`; the model is left without them."""
    g = torch.Generator().manual_seed(1)
    paths = {}
    for name, cfg in specs.items():
        add_adapter(lm.model, cfg, name=name)
        for _, mod in lora_modules(lm.model):
            if name in mod.lora_B:
                with torch.no_grad():  # A too: the global RNG would make the adapters differ from run to run
                    mod.lora_A[name].copy_(torch.randn(mod.lora_A[name].shape, generator=g) / mod.in_features ** 0.5)
                    mod.lora_B[name].copy_(0.5 * torch.randn(mod.lora_B[name].shape, generator=g))
        paths[name] = save_adapter(lm.model, out / name, cfg, base_name, {}, name=name)
        remove_adapter(lm.model, name)
    strip_lora(lm.model)
    return paths


@dataclass
class Live:
    url: str
    app: object
    server: object
    thread: threading.Thread

    def client(self, key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def health(self) -> dict:
        return httpx.get(self.url + "/health").json()


def start_server(lm: LoadedModel, base: str, adapters: dict[str, float], settings: ServerSettings,
                 **create_kw) -> Live:
    app = create_app(lm, base, adapters, settings, **create_kw)
    port = free_port()
    server = make_server(app, port=port)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    return Live(f"http://127.0.0.1:{port}", app, server, thread)


def stop_server(live: Live) -> None:
    live.server.should_exit = True
    live.thread.join(30)
    assert not live.thread.is_alive()


def load_with_adapters(model_dir: Path, paths: dict[str, Path]) -> LoadedModel:
    lm = load(model_dir)
    for name, p in paths.items():
        load_adapter(lm, p, name=name, activate=False)
    return lm


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("serve")
    lm = make_tiny_lm(seed=3, max_position_embeddings=CTX)
    paths = random_adapters(lm, root, ADAPTERS, "tiny-llama")
    return convert_to_hf(lm, root / "model"), paths


@pytest.fixture(scope="module")
def ref_lm(files) -> LoadedModel:
    """A second copy of the model and adapters: the reference answers never touch the server's model."""
    return load_with_adapters(*files)


@pytest.fixture(scope="module")
def live(files) -> Iterator[Live]:
    lm = load_with_adapters(*files)
    settings = ServerSettings(max_tokens_limit=LIMIT, max_request_bytes=32_768)
    srv = start_server(lm, "tiny", {"support": 1.0, "pirate": 1.0}, settings)
    yield srv
    stop_server(srv)


def reference(lm: LoadedModel, model: str, prompt: str | list[dict], max_tokens: int, raw: bool = False,
              base: str = "tiny") -> tuple[str, GenerationStats, int]:
    """What `nomoat generate --temperature 0` gives: (text, stats, prompt tokens)."""
    set_active(lm.model, {n: 1.0 for n in model.split("+") if n != base})
    ids = prompt_ids(lm, prompt, raw=raw)
    st = GenerationStats()
    text = "".join(stream(lm.model, lm.tokenizer, ids, GenerationConfig(max_new_tokens=max_tokens, temperature=0), st))
    return text, st, len(ids)


def chat(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


def test_models_list(live: Live) -> None:
    c = live.client()
    assert [m.id for m in c.models.list()] == MODELS
    assert c.models.retrieve("support+pirate").id == "support+pirate"
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("nope")
    assert live.health()["status"] == "ok"
    page = httpx.get(live.url + "/")
    assert page.status_code == 200 and "nomoat chat" in page.text


@pytest.mark.parametrize("model", MODELS)
def test_chat_greedy_equals_generate(live: Live, ref_lm: LoadedModel, model: str) -> None:
    prompt = "What is the capital of France?"
    want, st, n_prompt = reference(ref_lm, model, chat(prompt), 16)
    r = live.client().chat.completions.create(model=model, messages=chat(prompt), max_tokens=16, temperature=0)
    assert r.model == model and r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want
    assert r.choices[0].finish_reason == st.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_prompt, st.generated_tokens)
    assert r.usage.total_tokens == n_prompt + st.generated_tokens


def test_adapters_change_the_answer(ref_lm: LoadedModel) -> None:
    # Guards the test above: each model id must really give a different model.
    answers = {m: reference(ref_lm, m, chat("Hello there!"), 12)[0] for m in MODELS}
    assert len(set(answers.values())) == len(MODELS), answers


def test_stack_order_does_not_matter(live: Live) -> None:
    c = live.client()
    a, b = (c.chat.completions.create(model=m, messages=chat("hi"), max_tokens=8, temperature=0)
            for m in ("support+pirate", "pirate+support"))
    assert a.choices[0].message.content == b.choices[0].message.content
    assert c.chat.completions.create(model="tiny+support", messages=chat("hi"), max_tokens=2).model == "tiny+support"


def test_streaming_chat(live: Live, ref_lm: LoadedModel) -> None:
    want, st, n_prompt = reference(ref_lm, "pirate", chat("Tell me a story."), 20)
    chunks = list(live.client().chat.completions.create(
        model="pirate", messages=chat("Tell me a story."), max_tokens=20, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [st.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == st.generated_tokens
    assert chunks[-1].usage.prompt_tokens == n_prompt
    assert all(c.id == chunks[0].id and c.object == "chat.completion.chunk" for c in chunks)


def test_sse_wire_format(live: Live) -> None:
    body = {"model": "tiny", "messages": chat("hi"), "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", live.url + "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize("streaming", [False, True])
def test_completion(live: Live, ref_lm: LoadedModel, streaming: bool) -> None:
    prompt = "The quick brown fox"
    want, st, n_prompt = reference(ref_lm, "support", prompt, 12, raw=True)
    c = live.client()
    if streaming:
        chunks = list(c.completions.create(model="support", prompt=prompt, max_tokens=12, temperature=0, stream=True))
        assert "".join(ch.choices[0].text for ch in chunks) == want
        assert chunks[-1].choices[0].finish_reason == st.finish_reason
    else:
        r = c.completions.create(model="support", prompt=prompt, max_tokens=12, temperature=0)
        assert r.object == "text_completion" and r.choices[0].text == want
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_prompt, st.generated_tokens)


def test_stop_and_seed(live: Live) -> None:
    c = live.client()
    full = c.completions.create(model="tiny", prompt="Hello world", max_tokens=30, temperature=0).choices[0].text
    stop = full[6:9]
    cut = c.completions.create(model="tiny", prompt="Hello world", max_tokens=30, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[:full.find(stop)] and cut.choices[0].finish_reason == "stop"
    sampled = [c.chat.completions.create(model="support", messages=chat("hi"), max_tokens=12, temperature=1.0,
                                         top_p=0.9, seed=7).choices[0].message.content for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_parallel_streams_equal_alone(live: Live) -> None:
    c = live.client()
    jobs = [(MODELS[i % 3], f"Question {i}: what is {i} plus {i}?") for i in range(8)]

    def ask(job: tuple[str, str]) -> tuple[str, str]:
        model, prompt = job
        pieces, finish = [], None
        for ch in c.chat.completions.create(model=model, messages=chat(prompt), max_tokens=24, temperature=0,
                                            stream=True):
            pieces.append(ch.choices[0].delta.content or "")
            finish = ch.choices[0].finish_reason or finish
        return "".join(pieces), finish

    alone = [ask(j) for j in jobs]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, jobs))
    assert together == alone
    assert len({a for a, _ in alone}) > 1
    assert live.health()["active"] == 0


LONG = 6000  # tokens of a generation that only a disconnect should end: seconds on the tiny model


@pytest.fixture(scope="module")
def long_files(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("serve-long")
    lm = make_tiny_lm(seed=3, max_position_embeddings=LONG + 128)
    paths = random_adapters(lm, root, {"support": ADAPTERS["support"]}, "tiny-llama")
    return convert_to_hf(lm, root / "model"), paths


def test_client_disconnect_cancels(long_files) -> None:
    ref_lm = load_with_adapters(*long_files)
    # A prompt that, greedy, runs to max_tokens: only the disconnect can end it early.
    prompt = next((p for p in ("Go on forever.", "Keep going.", "Tell me more.", "Count.", "Again and again.")
                   if reference(ref_lm, "support", chat(p), LONG)[1].finish_reason == "length"), None)
    assert prompt is not None, "no candidate prompt runs to max_tokens on the tiny model"
    live = start_server(load_with_adapters(*long_files), "tiny", {"support": 1.0},
                        ServerSettings(max_tokens_limit=LONG))
    try:
        before = live.health()
        body = {"model": "support", "messages": chat(prompt), "max_tokens": LONG, "stream": True,
                "temperature": 0}
        with httpx.stream("POST", live.url + "/v1/chat/completions", json=body) as r:
            next(r.iter_lines())
        _wait_health(live, lambda h: not h["active"] and h["cancelled"] == before["cancelled"] + 1)
        # Without streaming too: a client that gives up once its generation runs stops it.
        data = json.dumps(body | {"stream": False}).encode()
        host, port = live.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
            _wait_health(live, lambda h: h["active"] == 1)
        _wait_health(live, lambda h: not h["active"] and h["cancelled"] == before["cancelled"] + 2)
        assert live.health()["completed"] == before["completed"]
        r = live.client().chat.completions.create(model="support", messages=chat("hi"), max_tokens=2)
        assert r.usage.completion_tokens <= 2
    finally:
        stop_server(live)


def _wait_health(live: Live, ok, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not ok(h := live.health()):
        assert time.monotonic() < deadline, h
        time.sleep(0.01)


def _msgs(n: int) -> list[dict]:
    return [{"role": "user", "content": "hello " * n}]


BAD = [
    ("malformed JSON", b'{"model": "tiny", "messages": [', 400, "invalid_json"),
    ("not an object", b'[1, 2]', 400, None),
    ("missing messages", {"model": "tiny"}, 400, "messages"),
    ("empty messages", {"model": "tiny", "messages": []}, 400, "messages"),
    ("messages not a list", {"model": "tiny", "messages": "hi"}, 400, "messages"),
    ("bad role", {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
    ("temperature a string", {"model": "tiny", "messages": _msgs(1), "temperature": "hot"}, 400, "temperature"),
    ("max_tokens a string", {"model": "tiny", "messages": _msgs(1), "max_tokens": "5"}, 400, "max_tokens"),
    ("max_tokens zero", {"model": "tiny", "messages": _msgs(1), "max_tokens": 0}, 400, "max_tokens"),
    ("top_p out of range", {"model": "tiny", "messages": _msgs(1), "top_p": 1.5}, 400, "top_p"),
    ("missing model", {"messages": _msgs(1)}, 400, "model"),
    ("unknown model", {"model": "gpt-4", "messages": _msgs(1)}, 404, "model"),
    ("unknown stack", {"model": "support+nope", "messages": _msgs(1)}, 404, "model"),
    ("repeated adapter", {"model": "support+support", "messages": _msgs(1)}, 404, "model"),
    ("n=2", {"model": "tiny", "messages": _msgs(1), "n": 2}, 400, "n"),
    ("max_tokens over limit", {"model": "tiny", "messages": _msgs(1), "max_tokens": LIMIT + 1}, 400, "max_tokens"),
    ("prompt over context", {"model": "tiny", "messages": _msgs(CTX)}, 400, "messages"),
    ("prompt + max_tokens over context", {"model": "tiny", "messages": _msgs(50), "max_tokens": LIMIT}, 400,
     "max_tokens"),
    ("body too large", {"model": "tiny", "messages": _msgs(8000)}, 413, "request_too_large"),
    ("too many stops", {"model": "tiny", "messages": _msgs(1), "stop": list("abcde")}, 400, "stop"),
]


@pytest.mark.parametrize("body,status,where", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input(live: Live, body, status: int, where: str | None) -> None:
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else \
        {"json": body}
    r = httpx.post(live.url + "/v1/chat/completions", **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and "\n" not in err["message"]
    if where is not None:
        assert where in (err["param"], err["code"]), err
    if status == 404:
        assert "tiny, support, pirate, support+pirate" in err["message"]
    # ...and the server keeps serving.
    ok = httpx.post(live.url + "/v1/chat/completions", json={"model": "tiny", "messages": _msgs(1), "max_tokens": 1})
    assert ok.status_code == 200


def test_bad_completion_input(live: Live) -> None:
    url = live.url + "/v1/completions"
    for prompt in (["a", "b"], "", [1, 10**6], None, "x"):
        body = {"model": "tiny", "echo": prompt == "x"} | ({} if prompt is None else {"prompt": prompt})
        r = httpx.post(url, json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", (body, r.text)
    assert httpx.get(live.url + "/v1/nothing").json()["error"]["message"]
    assert httpx.get(live.url + "/v1/chat/completions").status_code == 405
    with pytest.raises(openai.BadRequestError, match="context"):
        live.client().completions.create(model="tiny", prompt="hi " * CTX, max_tokens=1)


def test_api_key(files) -> None:
    lm = load_with_adapters(*files)
    srv = start_server(lm, "tiny", {"support": 1.0}, ServerSettings(api_key="s3cret"))
    try:
        url = srv.url + "/v1/models"
        assert httpx.get(url).status_code == 401
        assert httpx.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(url, headers={"Authorization": "s3cret"}).status_code == 401
        r = httpx.post(srv.url + "/v1/chat/completions", json={"model": "tiny", "messages": _msgs(1)})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(url, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(srv.url + "/health").status_code == 200
        with pytest.raises(openai.AuthenticationError):
            srv.client("wrong").models.list()
        r = srv.client("s3cret").chat.completions.create(model="support", messages=_msgs(1), max_tokens=2)
        assert r.usage.completion_tokens <= 2
    finally:
        stop_server(srv)


def test_engine_cancel_and_stop(ref_lm: LoadedModel) -> None:
    engine = Engine(ref_lm, max_active=2)
    events: list[tuple[str, object]] = []
    done = threading.Event()

    def emit(kind: str, payload: object) -> None:
        events.append((kind, payload))
        if kind == "delta":
            job.cancel()
        else:
            done.set()

    cfg = GenerationConfig(max_new_tokens=300, temperature=0)
    job = Job(prompt_ids(ref_lm, "hello"), cfg, {"support": 1.0}, emit)
    engine.start()
    engine.submit(job)
    assert done.wait(30)
    # The engine looks at the cancel flag before every step: no delta after the first, no "done".
    assert [k for k, _ in events] == ["delta", "error"] and events[-1][1] == "generation cancelled"
    assert job.stats.generated_tokens < cfg.max_new_tokens
    assert engine.cancelled == 1
    engine.stop()
    assert engine._thread is None


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from nomoat.cli import main; main()", *args]


def test_cli_generate_equals_server(live: Live, files) -> None:
    model_dir, paths = files
    prompt = "Hello there!"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(_cli("generate", "--model", str(model_dir), "--adapter", str(paths["support"]),
                              "--temperature", "0", "-n", "14", "--threads", "1", prompt),
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    r = live.client().chat.completions.create(model="support", messages=chat(prompt), max_tokens=14, temperature=0)
    assert out.stdout == r.choices[0].message.content + "\n"


def test_cli_serve_and_sigterm(files) -> None:
    model_dir, paths = files
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    bad = subprocess.run(_cli("serve", "--model", str(model_dir), "--adapter", "x=/no/such/dir"),
                         capture_output=True, text=True, timeout=300, env=env)
    assert bad.returncode == 1 and "no such adapter" in bad.stderr and "Traceback" not in bad.stderr
    proc = subprocess.Popen(_cli("serve", "--model", str(model_dir), "--adapter", f"support={paths['support']}",
                                 "--port", str(port), "--threads", "1", "--name", "mini"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not come up"
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        models = httpx.get(url + "/v1/models").json()["data"]
        assert [m["id"] for m in models] == ["mini", "support"]
        r = httpx.post(url + "/v1/chat/completions", json={"model": "mini+support", "messages": _msgs(1),
                                                             "max_tokens": 3}).json()
        assert r["usage"]["completion_tokens"] <= 3
        # SIGTERM with a reply streaming: the server lets it finish, then exits cleanly.
        lines: list[str] = []
        started = threading.Event()

        def read() -> None:
            body = {"model": "support", "messages": _msgs(1), "max_tokens": 200, "stream": True, "temperature": 0}
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    lines.append(line)
                    started.set()

        reader = threading.Thread(target=read)
        reader.start()
        assert started.wait(30)
        proc.send_signal(signal.SIGTERM)
        reader.join(60)
        assert [line for line in lines if line][-1] == "data: [DONE]"
        assert proc.wait(60) == 0
        assert "stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_default_model_greedy_over_api(default_lm: LoadedModel, tmp_path: Path) -> None:
    """The real default model with a random adapter: the API's greedy answers equal nomoat's own."""
    lm = default_lm
    paths = random_adapters(lm, tmp_path, {"helper": LoraConfig(r=4, alpha=8, targets="q,v")}, "smollm2")
    load_adapter(lm, paths["helper"], name="helper", activate=False)
    try:
        prompt = chat("What is the capital of France?")
        want = {m: reference(lm, m, prompt, 12, base="smollm2") for m in ("smollm2", "helper")}
        srv = start_server(lm, "smollm2", {"helper": 1.0}, ServerSettings())
        try:
            c = srv.client()
            for model, (text, st, n_prompt) in want.items():
                r = c.chat.completions.create(model=model, messages=prompt, max_tokens=12, temperature=0)
                assert r.choices[0].message.content == text
                assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_prompt, st.generated_tokens)
            assert want["smollm2"][0] != want["helper"][0]
            assert "Paris" in want["smollm2"][0]
        finally:
            stop_server(srv)
    finally:
        remove_adapter(lm.model, "helper")
        strip_lora(lm.model)  # the session's shared model goes back as it was
