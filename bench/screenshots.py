"""Screenshots of the arena (before and after a vote) and the leaderboard, from a real `nomoat serve --arena`
on the default model, driven by chromium through Playwright.

    python bench/screenshots.py --adapter sft=PATH --adapter aligned=PATH --db arena.sqlite --out docs

`--db` may hold earlier battles (e.g. a copy of examples/preference_loop.py's), so the leaderboard has data.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

PROMPT = "Convert the date to ISO 8601 (YYYY-MM-DD). Answer with the date only.\nDate: March 3, 1999"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter", action="append", default=[], help="NAME=PATH, repeatable")
    ap.add_argument("--db", required=True)
    ap.add_argument("--out", default="docs")
    ap.add_argument("--chromium", default=os.environ.get("NOMOAT_CHROMIUM", "/usr/bin/chromium"))
    a = ap.parse_args()
    from playwright.sync_api import sync_playwright

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["serve", "--port", str(port), "--arena", a.db, "--arena-max-tokens", "48"]
    for spec in a.adapter:
        args += ["--adapter", spec]
    proc = subprocess.Popen([sys.executable, "-c", "from nomoat.cli import main; main()", *args])
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        out = Path(a.out)
        with sync_playwright() as p:
            b = p.chromium.launch(executable_path=a.chromium, args=["--headless", "--no-sandbox"])
            page = b.new_page(viewport={"width": 1100, "height": 620})
            page.goto(url + "/arena")
            page.wait_for_function("document.getElementById('status').textContent.includes('contestants')")
            page.fill("#input", PROMPT)
            page.press("#input", "Enter")
            page.wait_for_function("!document.getElementById('vote-a').disabled", timeout=120_000)
            page.screenshot(path=str(out / "screenshot-arena-before-vote.png"))
            page.click("#vote-a")
            page.wait_for_function("document.getElementById('name-a').textContent.length > 0")
            page.screenshot(path=str(out / "screenshot-arena-after-vote.png"))
            page.set_viewport_size({"width": 1100, "height": 360})
            page.goto(url + "/leaderboard")
            page.wait_for_selector("#board:not([hidden])")
            page.screenshot(path=str(out / "screenshot-leaderboard.png"))
            b.close()
        print(f"wrote {out}/screenshot-arena-before-vote.png, -after-vote.png, screenshot-leaderboard.png")
    finally:
        proc.terminate()
        proc.wait(30)


if __name__ == "__main__":
    main()
