"""The errors of the wire format: one root, so callers catch a single type."""

from __future__ import annotations

__all__ = ["UnknownCodec", "WireFormatError"]


class WireFormatError(ValueError):
    """A payload (or codec spec) that does not follow the wire format."""


class UnknownCodec(WireFormatError):
    """A codec spec that names no known codec or has bad parameters."""
