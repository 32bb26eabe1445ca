"""The errors a user can cause, which the CLIs turn into one line and exit 2."""

from __future__ import annotations

import redis

from coordinator.embedded import EmbeddedRedisError
from coordinator.jobs import JobError
from coordinator.rounds import QuorumError
from coordinator.store import RoundOpen, RunExists, UnknownRun
from coordinator.strategies import StrategyError
from serialization import WireFormatError
from tasks.config import SettingsError


class UsageError(ValueError):
    """A flag value or combination that cannot work."""


class BrokerUnreachable(ConnectionError):
    """The Redis broker did not answer."""


USER_ERRORS: tuple[type[BaseException], ...] = (
    UsageError, BrokerUnreachable, EmbeddedRedisError, JobError, QuorumError, RoundOpen,
    RunExists, UnknownRun, StrategyError, WireFormatError, SettingsError,
    redis.ConnectionError,  # the broker went away mid-command and did not come back
)
