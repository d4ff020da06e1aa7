"""Catalog names: `NAME[:TAG]`, the rules they follow and how they are read back."""

from __future__ import annotations

import re
from dataclasses import dataclass

from nomoat.errors import NomoatError

DEFAULT_TAG = "latest"
DEFAULT_MODEL = "default"  # the embedded model: always there, never stored
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,99}")
_TAG = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class Ref:
    """A catalog name with an optional tag (`dates`, `dates:v1`)."""

    name: str
    tag: str | None = None

    def __str__(self) -> str:
        return f"{self.name}:{self.tag}" if self.tag else self.name

    @property
    def full(self) -> str:
        return f"{self.name}:{self.tag or DEFAULT_TAG}"


def parse_ref(text: str) -> Ref | None:
    """`NAME[:TAG]` as a Ref, or None when the text cannot be a catalog name (a path, a weight, ...)."""
    name, sep, tag = text.partition(":")
    if not _NAME.fullmatch(name) or (sep and not (_TAG.fullmatch(tag) and not _is_number(tag))):
        return None
    return Ref(name, tag or None)


def check_new_name(text: str, what: str = "--name") -> Ref:
    """A name a user wants to give: letters first, then letters, digits, '.', '_' or '-'; the tag must not
    read as a number, since `NAME:0.5` already means "NAME with weight 0.5" wherever adapters are stacked."""
    name, _, tag = text.partition(":")
    if not _NAME.fullmatch(name):
        raise NomoatError(f"{what} {text!r}: a name starts with a letter and uses only letters, digits, '.', "
                          "'_' and '-' (at most 100 characters)")
    if tag and not _TAG.fullmatch(tag):
        raise NomoatError(f"{what} {text!r}: a tag uses only letters, digits, '.', '_' and '-'")
    if tag and _is_number(tag):
        raise NomoatError(f"{what} {text!r}: the tag {tag!r} reads as a number (NAME:0.5 is a weight); "
                          f"use e.g. v{tag}")
    return Ref(name, tag or DEFAULT_TAG)
