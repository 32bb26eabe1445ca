"""The two command lines, ``coordinator`` and ``volunteer``, and the commands behind them.

They sit above every other package: the only code that wires the library
(coordinator/, volunteer/) to the Celery apps in tasks/. Nothing imports them.
"""
