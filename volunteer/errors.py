"""The volunteer's errors: one root, each a problem the person running it can fix."""

from __future__ import annotations


class VolunteerError(Exception):
    """Root of the volunteer's errors; the message names the fix."""


class DeviceError(VolunteerError, ValueError):
    """A ``--device`` that is malformed or not present on this machine."""
