"""``coordinator status`` lists every worker that answers, now that it stops waiting once all have.

Its ``inspect active_queues`` returns after as many replies as there are Redis connections
listening on a channel pattern (``coordinator.views.status._listeners``): a bound too low would
drop a worker's reply, and show it offline. Volunteers run on least-privilege ACL users, as
strangers would; the aggregator answers too.
"""

from __future__ import annotations

from broker.settings import Settings
from tasks.app import make_app
from tests.conftest import wait_until

TINY = "tests.fixtures.jobs_tiny:make_job"
WORKERS = ["aggregator", "alice", "bob"]


def _answering(broker: str) -> set[str]:
    """Who answers Celery's ping, waited for without any reply limit."""
    app = make_app(Settings(broker_url=broker))
    try:
        replies = app.control.ping(timeout=1.0) or []
    finally:
        app.close()
    return {node.split("@", 1)[0] for reply in replies for node in reply}


def test_status_lists_every_worker_that_answers(admin_processes):
    procs, admin = admin_processes
    procs.aggregator()
    for name in ("alice", "bob"):
        url = procs.json("volunteer-credentials", name)["url"]
        procs.volunteer(name, "--allow-job", TINY, CROWDTRAIN_BROKER_URL=url)
    wait_until(lambda: _answering(procs.broker) >= set(WORKERS), "three workers online", 120, procs)

    assert procs.json("status")["workers_online"] == WORKERS

    # a listener that is no worker (a monitor's, on the events channel): the bound is then too
    # high, and the answer, after the timeout, the same
    monitor = admin.pubsub()
    try:
        monitor.psubscribe("/0.celeryev/*")
        assert procs.json("status")["workers_online"] == WORKERS
    finally:
        monitor.close()
