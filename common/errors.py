"""Errors as the one line bricks' messages quote them."""

from __future__ import annotations


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The first line of `exc`'s message (its type's name when it has none), cut at `limit`
    characters."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line[:limit] if limit else line
