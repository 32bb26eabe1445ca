"""Type checks for task arguments, which anyone with broker access can forge."""

from __future__ import annotations

import re
from typing import Any

MAX_TEXT = 200
# Run and volunteer names become parts of Redis keys and file names.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_INTS = {"round", "shard", "shards", "version", "attempt"}
_TEXTS = {"run", "volunteer"}
_OPTIONAL_TEXTS = {"token"}


class BadArguments(ValueError):
    """A task message carried arguments of the wrong type or size."""


def checked(**arguments: Any) -> None:
    """Raise BadArguments unless every argument has its expected type and size."""
    for name, value in arguments.items():
        if name in _INTS:
            ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 40
        elif name in _TEXTS:
            ok = isinstance(value, str) and _NAME.match(value) is not None
        elif name in _OPTIONAL_TEXTS:
            ok = value is None or (isinstance(value, str) and len(value) <= MAX_TEXT)
        else:
            raise BadArguments(f"unexpected task argument {name!r}")
        if not ok:
            raise BadArguments(f"task argument {name}={value!r:.60} has the wrong type or size")
