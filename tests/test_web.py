"""The web chat at `/` and the arena at `/arena` in a real headless browser (Debian's chromium driven by
Playwright): pick a model, send messages, watch the reply stream in, keep multi-turn history, stop a reply
midway; in the arena, watch two anonymous answers stream, vote, see the names, go on to a second turn."""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from conftest import make_tiny_lm

from nomoat.lora import LoraConfig, add_adapter, lora_modules
from nomoat.serve import ServerSettings, create_app, make_server

CHROMIUM = os.environ.get("NOMOAT_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]

if not Path(CHROMIUM).exists():
    pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")


LONG = 6000  # tokens the stop test asks for


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    # A long context, so that a generation the stop button must cut lasts seconds, not a fraction of one.
    lm = make_tiny_lm(seed=3, max_position_embeddings=LONG + 128)
    add_adapter(lm.model, LoraConfig(r=4, alpha=8, targets="q,v"), name="pirate")
    g = torch.Generator().manual_seed(1)
    for _, mod in lora_modules(lm.model):
        with torch.no_grad():
            mod.lora_B["pirate"].copy_(0.5 * torch.randn(mod.lora_B["pirate"].shape, generator=g))
    yield from _serve(create_app(lm, "tiny", {"pirate": 1.0}, ServerSettings(max_tokens_limit=LONG)))


def _serve(app) -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = make_server(app, port=port)
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    while not srv.started:
        assert t.is_alive()
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    t.join(30)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with sync_api.sync_playwright() as p:
        try:
            b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        except Exception as e:  # a chromium that Playwright cannot drive
            pytest.skip(f"cannot start {CHROMIUM} with Playwright: {str(e).splitlines()[0]}")
        yield b
        b.close()


def greedy(url: str, model: str, messages: list[dict], max_tokens: int) -> dict:
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=60).json()


# Counts the updates of every assistant reply, to tell a streamed reply from one that arrives whole.
COUNT_UPDATES = """() => {
  window.updates = [];
  new MutationObserver((ms) => { for (const m of ms) {
    const el = m.target.closest ? m.target : m.target.parentElement;
    const msg = el.closest('.msg.assistant');
    if (msg) window.updates.push(msg.querySelector('.text').textContent);
  } }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
}"""


def test_chat_page_streams(server: str, browser, tmp_path: Path) -> None:
    page = browser.new_page(viewport={"width": 1000, "height": 700})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    bodies: list[dict] = []
    page.on("request", lambda r: bodies.append(json.loads(r.post_data)) if r.method == "POST" else None)
    page.goto(server + "/")
    page.wait_for_function("document.querySelectorAll('#model option').length === 2")
    assert page.eval_on_selector_all("#model option", "os => os.map(o => o.value)") == ["tiny", "pirate"]
    page.select_option("#model", "pirate")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "24")

    turns = ["Hello there!", "And what else?"]
    history: list[dict] = []
    for i, text in enumerate(turns):
        page.fill("#input", text)
        page.press("#input", "Enter")
        page.wait_for_function(f"document.querySelectorAll('.msg.assistant').length === {i + 1}")
        page.wait_for_function("!document.getElementById('send').disabled", timeout=60_000)
        shown = page.eval_on_selector_all(".msg.assistant .text", "es => es.map(e => e.textContent)")[i]
        history.append({"role": "user", "content": text})
        want = greedy(server, "pirate", history, 24)["choices"][0]["message"]["content"]
        assert shown == want
        history.append({"role": "assistant", "content": want})
    # The second request carried the whole conversation.
    assert bodies[-1]["messages"] == history[:3] and bodies[-1]["stream"] is True
    assert bodies[-1]["model"] == "pirate"
    assert "completion tokens" in page.inner_text("#status")
    shot = tmp_path / "screenshot-web-chat.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("NOMOAT_SCREENSHOT_DIR"):
        shutil.copy(shot, Path(os.environ["NOMOAT_SCREENSHOT_DIR"]) / shot.name)
    assert not errors
    page.close()


def test_stop_button(server: str, browser) -> None:
    prompt = [{"role": "user", "content": "Go on forever."}]
    assert greedy(server, "tiny", prompt, LONG)["choices"][0]["finish_reason"] == "length"
    before = httpx.get(server + "/health").json()["cancelled"]
    page = browser.new_page()
    page.goto(server + "/")
    page.wait_for_function("document.querySelectorAll('#model option').length === 2")
    page.select_option("#model", "tiny")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", str(LONG))
    page.fill("#input", prompt[0]["content"])
    page.evaluate(COUNT_UPDATES)
    page.click("#send")
    # The reply grows piece by piece on the page (a long generation, so chunks cannot all coalesce).
    page.wait_for_function("new Set(window.updates).size > 3")
    page.click("#stop")
    page.wait_for_selector(".msg.assistant .note")
    assert "stopped" in page.inner_text(".msg.assistant .note")
    assert not page.is_disabled("#send") and page.is_disabled("#stop")
    deadline = time.monotonic() + 10
    while httpx.get(server + "/health").json()["cancelled"] == before:
        assert time.monotonic() < deadline, "stopping in the page did not cancel the generation"
        time.sleep(0.05)
    page.close()


# --------------------------------------------------------------------------- the arena


@pytest.fixture(scope="module")
def arena_server(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    from nomoat.eval.arena import ArenaSettings
    from nomoat.eval.questions import load_questions

    lm = make_tiny_lm(seed=3, max_position_embeddings=1024)
    add_adapter(lm.model, LoraConfig(r=4, alpha=8, targets="q,v"), name="pirate")
    g = torch.Generator().manual_seed(1)
    for _, mod in lora_modules(lm.model):
        with torch.no_grad():
            mod.lora_B["pirate"].copy_(0.5 * torch.randn(mod.lora_B["pirate"].shape, generator=g))
    db = tmp_path_factory.mktemp("arena") / "arena.sqlite"
    arena = ArenaSettings(str(db), max_tokens=48, questions=load_questions("builtin"), seed=1, temperature=0)
    app = create_app(lm, "tiny", {"pirate": 1.0}, ServerSettings(max_tokens_limit=64), arena=arena)
    for url in _serve(app):
        yield url, db


COUNT_SIDE_UPDATES = """() => {
  window.sideUpdates = {a: [], b: []};
  for (const side of ['a', 'b']) {
    new MutationObserver(() => { const m = document.querySelectorAll('#log-' + side + ' .msg.assistant');
      if (m.length) window.sideUpdates[side].push(m[m.length - 1].textContent); })
      .observe(document.getElementById('log-' + side), {subtree: true, childList: true, characterData: true});
  }
}"""


def _shot(page, tmp_path: Path, name: str) -> None:
    shot = tmp_path / name
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("NOMOAT_SCREENSHOT_DIR"):
        shutil.copy(shot, Path(os.environ["NOMOAT_SCREENSHOT_DIR"]) / shot.name)


def test_arena_page_blind_vote_reveal_and_second_turn(arena_server, browser, tmp_path: Path) -> None:
    from nomoat.eval.battles import read_battles

    url, db = arena_server
    page = browser.new_page(viewport={"width": 1100, "height": 700})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url + "/arena")
    page.wait_for_function("document.getElementById('status').textContent.includes('contestants')")
    assert not page.is_hidden("#question")  # a question set is loaded: the page offers its questions
    page.evaluate(COUNT_SIDE_UPDATES)
    page.fill("#input", "Tell me about the sea.")
    page.press("#input", "Enter")
    page.wait_for_function("!document.getElementById('vote-a').disabled", timeout=60_000)
    for side in ("a", "b"):
        assert page.evaluate(f"new Set(window.sideUpdates.{side}).size") > 1  # streamed, not whole
        assert page.inner_text(f"#log-{side} .msg.assistant")
    assert page.inner_text("#name-a") == page.inner_text("#name-b") == ""
    html = page.content()
    assert "pirate" not in html and ">tiny<" not in html
    _shot(page, tmp_path, "screenshot-arena-before-vote.png")

    page.click("#vote-a")
    page.wait_for_function("document.getElementById('name-a').textContent.length > 0")
    revealed = {page.inner_text("#name-a").strip("· "), page.inner_text("#name-b").strip("· ")}
    assert revealed == {"tiny", "pirate"}
    assert "You voted: A is better" in page.inner_text("#result")
    assert page.is_disabled("#vote-b")
    _shot(page, tmp_path, "screenshot-arena-after-vote.png")

    page.fill("#input", "And the mountains?")
    page.press("#input", "Enter")
    page.wait_for_function("document.querySelectorAll('#log-b .msg.assistant').length === 2 && "
                           "!document.getElementById('send').disabled", timeout=60_000)
    (b,) = read_battles(db)
    assert b["winner"] == "model_a" and page.inner_text("#name-a").strip("· ") == b["model_a"]
    assert [m["content"] for m in b["conversation_a"] if m["role"] == "user"] == ["Tell me about the sea."]
    assert b["conversation_b"][1]["content"] == page.inner_text("#log-b .msg.assistant >> nth=0")

    page.goto(url + "/leaderboard")
    page.wait_for_selector("#board:not([hidden])")
    rows = page.eval_on_selector_all("#board tbody tr", "rs => rs.map(r => r.children[1].textContent)")
    assert rows == [b["model_a"], b["model_b"]]
    _shot(page, tmp_path, "screenshot-leaderboard.png")
    assert not errors, errors
    page.close()
