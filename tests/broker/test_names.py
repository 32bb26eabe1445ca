"""One name rule on every side: a trailing newline ("$" lets one through) is never a name."""

from __future__ import annotations

import pytest

from broker import keys
from coordinator.runs.credentials import CredentialsError, check_host, check_name
from tasks.arguments import BadArguments, checked


@pytest.mark.parametrize("name", ["a", "alice", "run-1.v2_b", "x" * 64])
def test_names_every_side_accepts(name: str) -> None:
    assert keys.valid_name(name)
    checked(run=name)
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", "alice\n", "-lead", "a b", "x" * 65, "ünï", "a:b", "a/b"])
def test_names_every_side_refuses(name: str) -> None:
    assert not keys.valid_name(name)
    with pytest.raises(BadArguments):
        checked(run=name)
    with pytest.raises(CredentialsError):
        check_name(name)


def test_a_name_must_be_text() -> None:
    assert not keys.valid_name(7)
    assert not keys.valid_name(None)


def test_a_host_with_a_final_newline_is_refused() -> None:
    assert check_host("redis.example:6379") == "redis.example:6379"
    with pytest.raises(CredentialsError):
        check_host("redis.example:6379\n")
