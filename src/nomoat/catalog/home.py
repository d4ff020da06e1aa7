"""Where the catalog lives: `NOMOAT_HOME`, else the platform's per-user data directory.

Written by hand (platformdirs is not a dependency): XDG_DATA_HOME or ~/.local/share on Linux and
other Unix, ~/Library/Application Support on macOS, %LOCALAPPDATA% on Windows.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ENV = "NOMOAT_HOME"


def home_dir() -> Path:
    """The catalog's home directory (not created here)."""
    env = os.environ.get(ENV)
    if env:
        return Path(env).expanduser()
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return Path(base) / "nomoat"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "nomoat"
    xdg = os.environ.get("XDG_DATA_HOME")
    # The XDG spec: a relative XDG_DATA_HOME is invalid and must be ignored.
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".local" / "share"
    return base / "nomoat"
