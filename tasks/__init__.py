"""The Celery wiring: the app and the thin tasks that call into the packages below.

``tasks.app`` builds an app without tasks; ``tasks.training`` (volunteers) and
``tasks.aggregation`` (the trusted aggregator) add their side's tasks;
``tasks.celery`` is what ``celery -A tasks flower`` finds.
"""

from tasks.app import CrowdtrainApp, make_app

__all__ = ["CrowdtrainApp", "make_app"]
