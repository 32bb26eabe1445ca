"""Fixtures of the integration tests: real servers, real worker processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.conftest import Processes
from tests.fixtures.servers import password_server


@pytest.fixture
def admin_processes(tmp_path: Path) -> Iterator[tuple[Processes, redis.Redis]]:
    """Processes on a Redis 7 whose admin (default) user has a password."""
    server = password_server(tmp_path / "redis7")
    procs = Processes(tmp_path / "home", server.url)
    yield procs, server.client()
    procs.stop_all()
    server.stop()
