"""The web chat at `/` in a real headless browser (Debian's chromium driven by Playwright): pick a model, send
messages, watch the reply stream in, keep multi-turn history, and stop a reply midway."""

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
    app = create_app(lm, "tiny", {"pirate": 1.0}, ServerSettings(max_tokens_limit=LONG))
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
