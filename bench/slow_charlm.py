"""charlm with a sleep per training step, so one machine can host volunteers of different speeds.

A volunteer started with ``CROWDTRAIN_BENCH_STEP_SECONDS=S`` spends S more seconds on every
step; the coordinator's evaluation is not slowed. For ``bench/heterogeneous.py``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

from jobs.charlm import CharLMJob
from jobs.charlm import make_job as make_charlm


class SlowCharLM:
    """Everything of charlm, with each training batch costing the volunteer's extra seconds."""

    def __init__(self, job: CharLMJob) -> None:
        self._job = job

    def __getattr__(self, name: str) -> Any:
        return getattr(self._job, name)

    def shard(self, index: int, count: int) -> Iterator[Any]:
        delay = float(os.environ.get("CROWDTRAIN_BENCH_STEP_SECONDS", "0"))
        for batch in self._job.shard(index, count):
            time.sleep(delay)
            yield batch


def make_job(**kwargs: Any) -> SlowCharLM:
    """Factory with charlm's ``--job-arg`` knobs."""
    return SlowCharLM(make_charlm(**kwargs))
