"""sentinel:// broker URLs: what is read from them and what Celery, kombu and volunteers are given."""

from __future__ import annotations

import pytest

from broker.errors import SettingsError
from broker.sentinel import SentinelAddress
from broker.settings import Settings, safe_url
from coordinator.errors import CredentialsError
from coordinator.runs import credentials
from tasks.app import celery_config, celery_url, make_app
from tasks.poison import GuardedSentinelTransport
from tasks.results import GuardedSentinelBackend

TWO = "sentinel://:pw@s1:26380/2;sentinel://:pw@[::1]/2"


def test_a_sentinel_url_names_every_sentinel_the_database_and_the_data_nodes_login():
    address = SentinelAddress.parse(TWO)
    assert address.sentinels == (("s1", 26380), ("::1", 26379))  # the default sentinel port
    assert (address.db, address.username, address.password, address.master) == (2, None, "pw", "mymaster")


def test_the_master_name_comes_from_the_url_before_the_environment_before_mymaster():
    url = "sentinel://s1:26379/0"
    assert Settings(broker_url=url).sentinel.master == "mymaster"
    assert (
        Settings.from_env(
            env={"CROWDTRAIN_BROKER_URL": url, "CROWDTRAIN_SENTINEL_MASTER": "m2"}
        ).sentinel.master
        == "m2"
    )
    env = {"CROWDTRAIN_BROKER_URL": url + "?master_name=m3", "CROWDTRAIN_SENTINEL_MASTER": "m2"}
    assert Settings.from_env(env=env).sentinel.master == "m3"


@pytest.mark.parametrize(
    "url, says",
    [
        ("sentinel://s1:26379;redis://r:6379/0", "every part is sentinel://"),
        ("sentinel://a:pw@s1:1/0;sentinel://b:pw@s2:2/0", "same user and database"),
        ("sentinel://s1:1/0;sentinel://s2:2/1", "same user and database"),
        ("sentinel://s1:1/zero", "not a number"),
        ("sentinel://s1:1/0?master=x", "master_name=NAME"),
        ("sentinel://s1:99999/0", "out of range"),
        ("sentinel://:1/0", "no host"),
    ],
)
def test_a_bad_sentinel_url_is_refused_with_what_to_write(url, says):
    with pytest.raises(SettingsError, match=says):
        Settings(broker_url=url)


def test_celery_gets_login_and_database_on_every_part_and_no_query():
    # kombu switches to the next part when a sentinel does not answer, keeping that part's login
    settings = Settings(broker_url="sentinel://u:p%40ss@s1:1;sentinel://s2:2/3?master_name=m")
    assert celery_url(settings) == "sentinel://u:p%40ss@s1:1/3;sentinel://u:p%40ss@s2:2/3"
    assert safe_url(celery_url(settings)) == "sentinel://***@s1:1/3;sentinel://***@s2:2/3"


def test_the_apps_use_the_guarded_sentinel_transport_and_backend_told_the_master_and_sentinel_login():
    settings = Settings(
        broker_url="sentinel://:pw@s1:1/0?master_name=m", sentinel_username="watcher", sentinel_password="spw"
    )
    config = celery_config(settings)
    assert config["broker_transport"] is GuardedSentinelTransport
    for options in (config["broker_transport_options"], config["result_backend_transport_options"]):
        assert options["master_name"] == "m"
        assert options["sentinel_kwargs"]["username"] == "watcher"
        assert options["sentinel_kwargs"]["password"] == "spw"
    assert config["broker_transport_options"]["visibility_timeout"] == settings.visibility_timeout
    assert isinstance(make_app(settings).backend, GuardedSentinelBackend)
    assert make_app(settings, volunteer=True).backend.__class__.__name__ == "DisabledBackend"
    # sentinels without a password (the usual case) are asked without the data nodes' login
    plain = celery_config(Settings(broker_url="sentinel://:pw@s1:1/0"))["broker_transport_options"]
    assert "password" not in plain["sentinel_kwargs"]


def test_a_volunteers_url_lists_the_sentinels_with_its_own_login_and_the_master():
    admin = SentinelAddress.parse("sentinel://:admin@s1:1/0;sentinel://s2:2/0?master_name=m").url()
    url = credentials.volunteer_url(admin, "alice", "a/b")
    assert url == "sentinel://alice:a%2Fb@s1:1/0;sentinel://alice:a%2Fb@s2:2/0?master_name=m"
    assert Settings(broker_url=url).sentinel.username == "alice"
    with pytest.raises(CredentialsError, match="sentinel"):
        credentials.volunteer_url(admin, "alice", "pw", host="broker.example.org")


def test_sentinels_that_do_not_answer_are_one_line_naming_the_master_and_the_fix(capsys):
    from cli.coordinator import main
    from tests.conftest import free_port

    code = main(["status", "--broker", f"sentinel://127.0.0.1:{free_port()}/0?master_name=m"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "names a live primary 'm'" in err and "CROWDTRAIN_SENTINEL_MASTER" in err
