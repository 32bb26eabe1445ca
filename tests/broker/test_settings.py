"""Settings from the environment: each CROWDTRAIN_* variable parsed once, bad values refused clearly."""

from __future__ import annotations

import pytest

from broker.errors import SettingsError
from broker.keys import KEEP_VERSIONS
from broker.settings import Settings


def test_model_versions_kept_in_redis_default_to_the_key_schema_and_follow_the_environment():
    assert Settings.from_env(env={}).keep_versions == KEEP_VERSIONS
    assert Settings.from_env(env={"CROWDTRAIN_KEEP_VERSIONS": "7"}).keep_versions == 7


@pytest.mark.parametrize("value", ["0", "-2", "three"])
def test_a_bad_keep_versions_is_one_clear_error(value):
    with pytest.raises(SettingsError, match="CROWDTRAIN_"):
        Settings.from_env(env={"CROWDTRAIN_KEEP_VERSIONS": value})
