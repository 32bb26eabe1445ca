"""The Celery app and its thin tasks.

``celery -A tasks flower`` (or ``worker``) finds ``celery`` here, built on
first use from the environment: ``CROWDTRAIN_BROKER_URL``, else the embedded
Redis that a coordinator command started under ``CROWDTRAIN_HOME``.
"""

from tasks.app import AGGREGATE_QUEUE, TRAIN_QUEUE, make_app
from tasks.config import Settings

__all__ = ["AGGREGATE_QUEUE", "TRAIN_QUEUE", "Settings", "celery", "make_app"]


def __getattr__(name: str):
    # Celery looks up ``tasks.app`` first, but that name is our submodule, so
    # it falls back to ``tasks.celery``: that is the lazily built app.
    if name != "celery":
        raise AttributeError(name)
    from coordinator.embedded import running_url

    settings = Settings.from_env()
    if settings.broker_url is None:
        settings = settings.with_broker(running_url(settings.home) or "redis://localhost:6379/0")
    app = make_app(settings)
    globals()["celery"] = app
    return app
