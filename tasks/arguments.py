"""Type checks for task arguments, which anyone with broker access can forge."""

from __future__ import annotations

import re
from typing import Any

from broker import keys

MAX_TEXT = 200
# Run and volunteer names become parts of Redis keys and file names.
_INTS = {"round", "shard", "shards", "version", "attempt"}
_TEXTS = {"run", "volunteer"}
_OPTIONAL_TEXTS = {"token"}
_SLOT_TEXTS = {"object": 1024, "url": 8192}  # an upload slot in a blob store: field -> longest
_FORM_FIELDS, _FORM_VALUE = 16, 8192  # its presigned POST form: most fields, longest value
_FORM_KEY = re.compile(r"[A-Za-z0-9-]{1,64}")  # a form field's name: safe inside a multipart header


class BadArguments(ValueError):
    """A task message carried arguments of the wrong type or size."""


def checked(**arguments: Any) -> None:
    """Raise BadArguments unless every argument has its expected type and size."""
    for name, value in arguments.items():
        if name in _INTS:
            ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 40
        elif name in _TEXTS:
            ok = keys.valid_name(value)
        elif name in _OPTIONAL_TEXTS:
            ok = value is None or (isinstance(value, str) and len(value) <= MAX_TEXT)
        elif name == "upload":
            ok = value is None or _is_slot(value)
        else:
            raise BadArguments(f"unexpected task argument {name!r}")
        if not ok:
            raise BadArguments(f"task argument {name}={value!r:.60} has the wrong type or size")


def _is_slot(value: Any) -> bool:
    """An upload slot: an object name, the http(s) URL and the signed form fields that may write it."""
    if not (isinstance(value, dict) and value.keys() == {*_SLOT_TEXTS, "fields"}):
        return False
    fields = value["fields"]
    return (
        all(isinstance(value[k], str) and 0 < len(value[k]) <= n for k, n in _SLOT_TEXTS.items())
        and value["url"].startswith(("http://", "https://"))
        and isinstance(fields, dict)
        and len(fields) <= _FORM_FIELDS
        and all(
            isinstance(k, str) and isinstance(v, str) and _FORM_KEY.fullmatch(k) and len(v) <= _FORM_VALUE
            for k, v in fields.items()
        )
        and fields.get("key") == value["object"]
        and not any(c in v for v in fields.values() for c in "\r\n")
    )
