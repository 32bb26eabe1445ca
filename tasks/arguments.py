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
_SLOT_FIELDS = {"object": 1024, "url": 8192}  # an upload slot in a blob store: field -> longest


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
        elif name == "upload":
            ok = value is None or _is_slot(value)
        else:
            raise BadArguments(f"unexpected task argument {name!r}")
        if not ok:
            raise BadArguments(f"task argument {name}={value!r:.60} has the wrong type or size")


def _is_slot(value: Any) -> bool:
    """An upload slot: an object name and the http(s) URL that may write it, nothing else."""
    return (
        isinstance(value, dict)
        and value.keys() == _SLOT_FIELDS.keys()
        and all(isinstance(value[k], str) and 0 < len(value[k]) <= n for k, n in _SLOT_FIELDS.items())
        and value["url"].startswith(("http://", "https://"))
    )
