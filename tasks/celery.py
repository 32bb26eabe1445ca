"""The app that ``celery -A tasks ...`` finds (Flower, ``inspect ping``, a plain worker).

Celery looks for ``tasks.app``, which is a module here, then for this module's
``app``. It is built from the environment: ``CROWDTRAIN_BROKER_URL``, else the
embedded Redis a coordinator command started under ``CROWDTRAIN_HOME``, and it
knows both sides' tasks.
"""

from __future__ import annotations

import socket

from broker.embedded import running_url
from broker.settings import Settings
from tasks import aggregation, training
from tasks.app import CrowdtrainApp, make_app
from volunteer.worker import VolunteerOptions

FALLBACK_BROKER = "redis://localhost:6379/0"


def _app_from_environment() -> CrowdtrainApp:
    settings = Settings.from_env()
    if settings.broker_url is None:
        settings = settings.with_broker(running_url(settings.home) or FALLBACK_BROKER)
    app = make_app(settings)
    app.conf.crowdtrain_volunteer = VolunteerOptions(name=socket.gethostname())
    training.register(app)
    aggregation.register(app)
    return app


app = _app_from_environment()
