"""What both command lines share: a parser whose usage errors are one line, and bounded number types.

Below both CLIs (``coordinator`` and ``volunteer``), so neither copies the other's.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import NoReturn


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (no usage block) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        """Print ``PROG: error: MESSAGE (see PROG --help)`` and exit 2."""
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def int_in(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: a whole number from ``low`` to ``high``."""

    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is out of range: use {low} to {high}")
        return value

    return parse


def float_in(low: float, high: float, low_ok: bool = False, high_ok: bool = True) -> Callable[[str], float]:
    """An argparse type: a finite number between ``low`` and ``high`` (inclusive where ``*_ok``)."""
    lower = f">= {low:g}" if low_ok else f"> {low:g}"
    upper = "" if math.isinf(high) else (f" and <= {high:g}" if high_ok else f" and < {high:g}")

    def parse(text: str) -> float:
        try:
            value = float(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        above = value >= low if low_ok else value > low
        below = value <= high if high_ok else value < high
        if not (above and below):
            raise argparse.ArgumentTypeError(f"{value:g} is out of range: must be {lower}{upper}")
        return value

    return parse
