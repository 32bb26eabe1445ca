"""Type checks for task arguments, which anyone with broker access can forge."""

from __future__ import annotations

from typing import Any

MAX_TEXT = 200
_INTS = {"round", "shard", "shards", "version"}
_TEXTS = {"run", "volunteer"}
_OPTIONAL_TEXTS = {"token", "failure"}


class BadArguments(ValueError):
    """A task message carried arguments of the wrong type or size."""


def checked(**arguments: Any) -> None:
    """Raise BadArguments unless every argument has its expected type and size."""
    for name, value in arguments.items():
        if name in _INTS:
            ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 40
        elif name in _TEXTS:
            ok = isinstance(value, str) and 0 < len(value) <= MAX_TEXT
        elif name in _OPTIONAL_TEXTS:
            ok = value is None or (isinstance(value, str) and len(value) <= MAX_TEXT)
        else:
            raise BadArguments(f"unexpected task argument {name!r}")
        if not ok:
            raise BadArguments(f"task argument {name}={value!r:.60} has the wrong type or size")
