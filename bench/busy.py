"""A context that keeps K CPU-bound processes spinning, to measure a tool beside other work on the machine."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator


@contextlib.contextmanager
def busy(k: int) -> Iterator[None]:
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(k)]
    try:
        time.sleep(0.5 if k else 0)  # let them take their cores
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()
