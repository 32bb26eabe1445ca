"""Coordinator, aggregator and a volunteer over rediss:// with a CA and client certificates."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from broker.settings import Settings
from tasks.app import celery_config
from tests.conftest import Processes
from tests.fixtures.servers import TLSRedisServer, make_certs

TINY = "tests.fixtures.jobs_tiny:make_job"


@pytest.fixture
def tls(tmp_path: Path, monkeypatch) -> Iterator[tuple[Processes, TLSRedisServer]]:
    """A TLS-only Redis 7 that requires client certificates, and processes that have them."""
    certs = make_certs(tmp_path / "certs")
    server = TLSRedisServer(tmp_path / "redis-tls", certs).start()
    monkeypatch.setenv("CROWDTRAIN_TLS_CA", str(certs["ca_cert"]))
    monkeypatch.setenv("CROWDTRAIN_TLS_CERT", str(certs["client_cert"]))
    monkeypatch.setenv("CROWDTRAIN_TLS_KEY", str(certs["client_key"]))
    procs = Processes(tmp_path / "home", server.url)
    yield procs, server
    procs.stop_all()
    server.stop()


def test_a_round_completes_over_tls_with_client_certificates(tls):
    # arrange
    procs, server = tls
    procs.aggregator()
    procs.volunteer("alice", "--allow-job", TINY)
    procs.json(
        "init", "--run", "secure", "--job", TINY, "--local-steps", "3", "--shards", "2", "--deadline", "60"
    )
    # act
    document = procs.json("run", "--run", "secure", "--rounds", "1")
    # assert
    assert document["rounds"][0]["status"] == "done", procs.log_tail()
    assert document["rounds"][0]["accepted"] == 2
    assert int(server.client().get("ct:run:secure:version")) == 1


def test_the_tls_server_refuses_plain_text_and_clients_without_a_certificate(tls):
    _, server = tls
    certs = server.certs
    with pytest.raises(redis.ConnectionError):
        redis.Redis(port=server.port, socket_timeout=2).ping()  # plain redis://
    with pytest.raises(redis.ConnectionError):  # TLS, the right CA, but no client certificate
        redis.Redis.from_url(
            server.url, ssl_ca_certs=str(certs["ca_cert"]), ssl_cert_reqs="required", socket_timeout=2
        ).ping()
    with pytest.raises(redis.ConnectionError):  # a client that does not trust the server's CA
        redis.Redis.from_url(
            server.url,
            ssl_certfile=str(certs["client_cert"]),
            ssl_keyfile=str(certs["client_key"]),
            ssl_cert_reqs="required",
            socket_timeout=2,
        ).ping()


def test_celery_gets_the_ca_and_client_certificate_for_broker_and_results():
    settings = Settings(
        broker_url="rediss://broker:6380/0", tls_ca="/ca.pem", tls_cert="/c.pem", tls_key="/k.pem"
    )
    config = celery_config(settings)
    for key in ("broker_use_ssl", "redis_backend_use_ssl"):
        assert config[key]["ssl_ca_certs"] == "/ca.pem"
        assert config[key]["ssl_certfile"] == "/c.pem"
        assert config[key]["ssl_keyfile"] == "/k.pem"
    assert "broker_use_ssl" not in celery_config(Settings(broker_url="redis://broker:6379/0"))
