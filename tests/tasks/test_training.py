"""The volunteer's task keeps per-thread state, so ``--pool threads`` shares nothing mutable."""

from __future__ import annotations

import threading

from broker.settings import Settings
from tasks.training import volunteer_app
from volunteer.worker import ShardRunner, VolunteerOptions


def test_each_worker_thread_trains_with_its_own_runner():
    app = volunteer_app(Settings(broker_url="redis://127.0.0.1:1/0"), VolunteerOptions(name="alice"))
    task = app.tasks["train_shard"]
    runners: list[ShardRunner] = []
    threads = [threading.Thread(target=lambda: runners.append(task.runner)) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({id(r) for r in runners}) == 2  # model caches and error feedback are not shared
    assert task.runner is task.runner  # within one thread it is made once
    assert runners[0].options.name == "alice"
