"""The ``coordinator`` command: parse flags, build objects, call the library.

Known errors become one line on stderr and exit code 2 (DESIGN.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis

from broker.errors import BrokerError
from coordinator import commands, quickstart
from coordinator.errors import CoordinatorError
from coordinator.strategies import STRATEGY_HELP
from jobs import JobError
from serialization import WireFormatError

STRATEGY_FLAGS_HELP = "fedavg | fedavgm | diloco | fedadam | median | trimmed-mean:B | krum:F"
LONG_RUNNING = ("aggregator", "monitor")
COMPRESSION_HELP = "none | fp16 | bf16 | int8 | topk:F | topk:F+int8 (F a fraction, e.g. 0.01)"
# Each package's error root: a mistake the user can fix, shown as one line with exit code 2.
USER_ERRORS: tuple[type[BaseException], ...] = (
    CoordinatorError,
    BrokerError,
    JobError,
    WireFormatError,
    redis.ConnectionError,  # the broker went away mid-command and did not come back
)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``coordinator`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # Long-running workers log their work; one-shot commands speak only on trouble.
    level = logging.INFO if args.command in LONG_RUNNING else logging.WARNING
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        result = args.handler(args)
    except USER_ERRORS as e:
        print(f"coordinator {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"coordinator {args.command}: interrupted", file=sys.stderr)
        return 130
    if getattr(args, "json", False) and result is not None:
        print(json.dumps(result, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coordinator", description="Post training rounds to volunteers and merge their work."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _command(
        sub,
        "quickstart",
        quickstart.quickstart,
        "Run the built-in job end to end on this machine (embedded Redis, local volunteers).",
    )
    p.add_argument("--rounds", type=_positive_int, default=5)
    p.add_argument("--volunteers", type=_positive_int, default=2)
    p.add_argument("--job", default="charlm")
    p.add_argument("--job-arg", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--compression", default="none", help=COMPRESSION_HELP)
    p.add_argument("--strategy", default="fedavg", help=STRATEGY_FLAGS_HELP)
    p.add_argument(
        "--shards", type=_positive_int, default=None, help="shards per round (default: 2 per volunteer)"
    )
    p.add_argument("--local-steps", type=_positive_int, default=30)
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")

    p = _command(sub, "init", commands.init, "Create a run: its job, strategy and model version 0.")
    p.add_argument("--run", required=True)
    p.add_argument("--job", required=True, help="a built-in job (charlm) or package.module:factory")
    p.add_argument(
        "--job-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="keyword argument for the job's factory; the value is JSON if it parses",
    )
    p.add_argument("--strategy", default="fedavg", help=STRATEGY_HELP)
    p.add_argument("--server-lr", type=float, default=None, help="the strategy's learning rate")
    p.add_argument("--momentum", type=float, default=None, help="the strategy's momentum")
    p.add_argument("--clip-norm", type=float, default=None, help="clip each delta to this L2 norm")
    p.add_argument(
        "--max-norm-ratio",
        type=float,
        default=10.0,
        help="reject deltas whose norm exceeds this multiple of the round median",
    )
    p.add_argument("--compression", default="none", help=COMPRESSION_HELP)
    p.add_argument("--local-steps", type=_positive_int, default=20)
    p.add_argument("--lr", type=float, default=3e-3, help="the volunteers' inner learning rate")
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    p.add_argument("--seed", type=int, default=0)
    _round_flags(p, defaults=True)
    p.add_argument("--json", action="store_true")

    p = _command(sub, "post-round", commands.post_round, "Post one round of shard jobs.")
    p.add_argument("--run", required=True)
    _round_flags(p)
    p.add_argument("--wait", action="store_true", help="wait for the round to end")
    p.add_argument("--json", action="store_true")

    p = _command(sub, "run", commands.run, "Post rounds one after another until R have finished.")
    p.add_argument("--run", required=True)
    p.add_argument("--rounds", type=_positive_int, required=True)
    _round_flags(p)
    p.add_argument("--json", action="store_true")

    p = _command(
        sub,
        "aggregator",
        commands.aggregator,
        "The trusted worker on queue 'aggregate': validates and merges rounds.",
    )
    p.add_argument("--name", default=None, help="Celery node name (default aggregator-PID)")
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port")

    p = _command(sub, "status", commands.status, "Runs, rounds, queue depths, volunteers online.")
    p.add_argument("--run", default=None)
    p.add_argument("--json", action="store_true")

    p = _command(sub, "export", commands.export, "Write a model version as float32 safetensors.")
    p.add_argument("--run", required=True)
    p.add_argument("--version", type=int, default=None, help="default: the current version")
    p.add_argument("--out", required=True, type=Path)

    p = _command(sub, "report", commands.report, "Plot eval loss per round and per uplink byte.")
    p.add_argument("--run", required=True)
    p.add_argument("--out", required=True, type=Path)

    p = _command(sub, "monitor", commands.monitor, "Start Flower, Celery's web monitor, on this app.")
    p.add_argument("--port", type=int, default=5555)
    p.add_argument("--basic-auth", default=None, help="user:password for Flower's login")

    p = _command(
        sub,
        "volunteer-credentials",
        commands.volunteer_credentials,
        "Create a volunteer's least-privilege Redis user (Redis 7) and print its broker URL.",
    )
    p.add_argument("name", metavar="NAME", help="the volunteer's name, its 'volunteer start --name'")
    p.add_argument("--revoke", action="store_true", help="delete the user and close its connections")
    p.add_argument(
        "--host", default=None, help="HOST[:PORT] volunteers reach the broker at (default: the broker URL's)"
    )
    p.add_argument("--json", action="store_true")
    return parser


def _command(sub: Any, name: str, handler: Any, help_text: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.add_argument(
        "--broker", default=None, help="Redis URL (default: $CROWDTRAIN_BROKER_URL, else the embedded Redis)"
    )
    p.set_defaults(handler=handler)
    return p


def _round_flags(p: argparse.ArgumentParser, defaults: bool = False) -> None:
    word = "default for the run's rounds: " if defaults else ""
    p.add_argument("--shards", type=_positive_int, default=None, help=f"{word}shard jobs per round")
    p.add_argument(
        "--quorum",
        default=None,
        help=f"{word}accepted shards needed: a count, or a fraction like 0.75 (default all)",
    )
    p.add_argument(
        "--deadline",
        type=_positive_float,
        default=None,
        help=f"{word}seconds before the round is merged with what it has",
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} must be positive")
    return value


if __name__ == "__main__":
    sys.exit(main())
