"""The coordinator's errors: one root, each a mistake the user can fix.

The CLI turns any ``CoordinatorError`` (with the other packages' roots) into
one line on stderr and exit code 2.
"""

from __future__ import annotations

import re

import redis

BROKER_FULL = "the broker's Redis is full (maxmemory): free memory or raise maxmemory"
# Redis's refusal at maxmemory is "OOM command not allowed ..."; redis-py makes that an
# OutOfMemoryError, but Redis 6 wraps a script's refusal in "Error running script ...: -OOM ...".
_OOM = re.compile(r"(^|[\s:-])OOM\b")


class CoordinatorError(Exception):
    """Root of the coordinator's errors; the message names the fix."""


class UsageError(CoordinatorError, ValueError):
    """A flag value or combination that cannot work."""


class QuorumError(UsageError):
    """--quorum is neither a shard count nor a fraction in (0, 1]."""


class CredentialsError(UsageError):
    """Volunteer credentials cannot be made or removed."""


class StrategyError(CoordinatorError, ValueError):
    """A bad strategy spec or option, or deltas/state that do not fit the model."""


class RunExists(CoordinatorError, ValueError):
    """A run of that name exists already."""


class RoundOpen(CoordinatorError, RuntimeError):
    """The run already has a round in progress."""


class BrokerFull(CoordinatorError):
    """Redis refused a write because it reached its maxmemory; nothing half-done was left."""


class PrivacyBudgetSpent(UsageError):
    """One more round would take the run's ε above its --dp-epsilon budget."""


def is_broker_full(error: BaseException | None) -> bool:
    """True for Redis's "OOM command not allowed" refusal, also inside a pipeline's or a script's.

    kombu's publish batch raises its own error from the pipeline's: the cause is looked at too.
    """
    if error is None:
        return False
    if isinstance(error, redis.exceptions.OutOfMemoryError):  # redis-py strips the "OOM " prefix
        return True
    if isinstance(error, redis.ResponseError) and _OOM.search(str(error)):
        return True
    return is_broker_full(error.__cause__)
