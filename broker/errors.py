"""Errors of the shared broker layer: settings, the embedded server, reaching Redis."""

from __future__ import annotations


class BrokerError(Exception):
    """Root of the broker layer's errors; the message names the fix."""


class SettingsError(BrokerError, ValueError):
    """A setting has a value that cannot work."""


class EmbeddedRedisError(BrokerError, RuntimeError):
    """The bundled redis-server could not be started."""


class BrokerUnreachable(BrokerError, ConnectionError):
    """The Redis broker did not answer."""


class UnknownRun(BrokerError, LookupError):
    """No run of that name exists on this broker."""
