"""Tokens, join requests and saved credentials, without a broker."""

from __future__ import annotations

import json
import stat

import pytest

from broker import keys
from volunteer import joining
from volunteer.errors import VolunteerError

SECRET = "ab" * 32
NONCE = "cd" * 32


def test_a_token_gives_the_broker_address_and_the_secret_and_nothing_else_is_a_token():
    address, secret = joining.parse_token(f"rediss://{keys.JOINER}:{SECRET}@coord.example.org:6380/2\n")
    assert (address, secret) == ("rediss://coord.example.org:6380/2", SECRET)
    for bad in (
        f"redis://alice:{SECRET}@h:6379/0",  # a volunteer URL, not an invitation
        f"redis://{keys.JOINER}:short@h:6379/0",
        f"http://{keys.JOINER}:{SECRET}@h/0",
        "not a url",
    ):
        with pytest.raises(VolunteerError, match="invitation token"):
            joining.parse_token(bad)


def test_a_join_request_parses_only_with_every_field_well_formed():
    assert keys.parse_join_request(keys.join_request(SECRET, NONCE, "alice")) == (SECRET, NONCE, "alice")
    for bad in (
        keys.join_request(SECRET, NONCE, "alice\n"),
        keys.join_request(SECRET, NONCE, "al ice"),
        keys.join_request(SECRET.upper(), NONCE, "alice"),
        keys.join_request(SECRET, NONCE[:-1], "alice"),
        keys.join_request(SECRET, NONCE, "alice") + "|extra",
        "lease|" + SECRET + "|" + NONCE + "|alice",
        "",
    ):
        assert keys.parse_join_request(bad) is None, bad


def test_saved_credentials_are_owner_only_and_never_overwritten(tmp_path):
    path = joining.credentials_path(tmp_path)
    joining._save(path, {"name": "alice", "url": "redis://alice:pw@h:6379/0"})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert joining.saved_url(tmp_path) == "redis://alice:pw@h:6379/0"
    assert joining.saved_url(tmp_path / "elsewhere") is None
    path.write_text(json.dumps({"url": "http://x"}))
    with pytest.raises(VolunteerError, match="no broker URL"):
        joining.saved_url(tmp_path)
