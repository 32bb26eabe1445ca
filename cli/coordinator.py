"""The ``coordinator`` command: parse flags, build objects, call the library.

Known errors become one line on stderr and exit code 2 (README, "When things go wrong").
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis

from broker import run_config
from broker.arguments import OneLineParser, float_in, int_in
from broker.errors import BrokerError
from broker.run_config import COMPRESSION_HELP, MAX_SHARDS
from cli import commands, fusion_commands, quickstart
from coordinator.errors import BROKER_FULL, CoordinatorError, is_broker_full
from coordinator.merging.strategies import STRATEGY_HELP
from coordinator.runs import invitations
from coordinator.runs.fusion import METHODS as FUSION_METHODS
from jobs import JobError
from serialization import WireFormatError

STRATEGY_FLAGS_HELP = "fedavg | fedavgm | diloco | fedadam | median | trimmed-mean:B | krum:F"
LONG_RUNNING = ("aggregator", "monitor")
# init's flags, each declared once in broker.run_config (its type, default, check and help)
DP_SETTINGS = tuple(name for name in run_config.flag_names() if name.startswith("dp_"))
INIT_SETTINGS = tuple(name for name in run_config.flag_names() if name not in DP_SETTINGS)
# Each package's error root: a mistake the user can fix, shown as one line with exit code 2.
USER_ERRORS: tuple[type[BaseException], ...] = (
    CoordinatorError,
    BrokerError,
    JobError,
    WireFormatError,
    redis.ConnectionError,  # the broker went away mid-command and did not come back
)
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}\Z){_LABEL}(\.{_LABEL})*")
MAX_ROUNDS = 100_000
MAX_VOLUNTEERS = 64


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``coordinator`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)  # a usage error exits 2 with one line (OneLineParser)
    # Long-running workers log their work; one-shot commands speak only on trouble.
    level = logging.INFO if args.command in LONG_RUNNING else logging.WARNING
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        result = args.handler(args)
    except USER_ERRORS as e:
        return _fail(args.command, str(e))
    except redis.ResponseError as e:
        if not is_broker_full(e):
            raise
        return _fail(args.command, BROKER_FULL)
    except KeyboardInterrupt:
        print(f"coordinator {args.command}: interrupted", file=sys.stderr)
        return 130
    if isinstance(result, int):  # a child's exit status (monitor)
        return result
    if getattr(args, "json", False) and result is not None:
        print(json.dumps(result, indent=2))
    return 0


def _fail(command: str, message: str) -> int:
    """Print one error line on stderr; exit status 2."""
    print(f"coordinator {command}: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    """The ``coordinator`` parser with every sub-command and its bounded flags."""
    parser = OneLineParser(
        prog="coordinator", description="Post training rounds to volunteers and merge their work."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _command(
        sub,
        "quickstart",
        quickstart.quickstart,
        "Run the built-in job end to end on this machine (embedded Redis, local volunteers).",
    )
    p.add_argument("--rounds", type=int_in(1, MAX_ROUNDS), default=5, help=f"1 to {MAX_ROUNDS}")
    p.add_argument(
        "--volunteers",
        type=int_in(1, MAX_VOLUNTEERS),
        default=2,
        help=f"local volunteer processes, 1 to {MAX_VOLUNTEERS}",
    )
    p.add_argument("--job", default="charlm")
    p.add_argument("--job-arg", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--compression", default="none", help=COMPRESSION_HELP)
    p.add_argument("--strategy", default="fedavg", help=STRATEGY_FLAGS_HELP)
    p.add_argument(
        "--shards",
        type=int_in(1, MAX_SHARDS),
        default=None,
        help=f"shards per round, 1 to {MAX_SHARDS} (default: 2 per volunteer)",
    )
    _local_steps_flag(p, default=30)
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")

    p = _command(sub, "init", commands.init, "Create a run: its job, strategy and model version 0.")
    p.add_argument("--run", required=True)
    p.add_argument(
        "--job",
        default=None,
        help="a built-in job (charlm) or package.module:factory (needed without --from)",
    )
    p.add_argument(
        "--from",
        dest="source",
        default=None,
        metavar="RUN[:VERSION]",
        help="branch RUN: version 0 of the new run is RUN's current version (or VERSION); same job and "
        "architecture, the parent's --job-arg values unless given again, its own other settings",
    )
    p.add_argument(
        "--job-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="keyword argument for the job's factory; the value is JSON if it parses",
    )
    run_config.add_init_flags(p, INIT_SETTINGS, helps={"strategy": STRATEGY_HELP})
    p.add_argument(
        "--blob-store",
        default=None,
        metavar="URL",
        help="keep the run's models, updates and uploads in an S3-compatible object store, "
        "s3://BUCKET/PREFIX, reached with the usual AWS_* settings (default: $CROWDTRAIN_BLOB_STORE, "
        "else Redis); volunteers need no credentials (presigned URLs)",
    )
    run_config.add_init_flags(
        p.add_argument_group("differential privacy (DP-FedAvg; docs/PRIVACY.md)"), DP_SETTINGS
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="if CROWDTRAIN_HOME/runs/NAME exists (a run Redis lost: see 'coordinator restore'), "
        "move it aside to NAME.moved-UTCSTAMP and start afresh; nothing is deleted",
    )
    p.add_argument("--json", action="store_true")

    p = _command(sub, "post-round", commands.post_round, "Post one round of shard jobs.")
    p.add_argument("--run", required=True)
    _round_flags(p)
    p.add_argument("--wait", action="store_true", help="wait for the round to end")
    p.add_argument("--json", action="store_true")

    p = _command(
        sub,
        "run",
        commands.run,
        "Post rounds one after another until R have finished (async runs: keep --shards jobs "
        "outstanding until R new versions are out).",
    )
    p.add_argument("--run", required=True)
    p.add_argument("--rounds", type=int_in(1, MAX_ROUNDS), required=True, help=f"1 to {MAX_ROUNDS}")
    _round_flags(p)
    p.add_argument("--json", action="store_true")

    p = _command(
        sub,
        "abort-round",
        commands.abort_round,
        "End the run's open or aggregating round by hand: it fails with reason 'aborted'.",
    )
    p.add_argument("--run", required=True)
    p.add_argument("--json", action="store_true")

    p = _command(
        sub,
        "aggregator",
        commands.aggregator,
        "The trusted worker on queue 'aggregate': validates and merges rounds.",
    )
    p.add_argument("--name", default=None, help="Celery node name (default aggregator-PID)")
    p.add_argument(
        "--metrics-port", type=_port, default=None, help="serve Prometheus metrics on this port (1-65535)"
    )
    p.add_argument(
        "--metrics-address",
        type=_address,
        default="127.0.0.1",
        help="the address /metrics listens on (default 127.0.0.1; 0.0.0.0 for every interface)",
    )
    p.add_argument(
        "--restore",
        action="store_true",
        help="rebuild runs that are on disk but not in Redis (its data was lost), as "
        "'coordinator restore' does, at start and whenever one is found; without it they are reported",
    )

    p = _command(
        sub,
        "restore",
        commands.restore,
        "Rebuild a run Redis lost from its record under CROWDTRAIN_HOME/runs/NAME: the current version, "
        "strategy state, credit and reputation, the next round number; a round lost open is posted again.",
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--run", default=None)
    which.add_argument("--all", action="store_true", help="every run on disk that Redis does not know")
    p.add_argument("--json", action="store_true")

    p = _command(sub, "status", commands.status, "Runs, rounds, queue depths, volunteers online.")
    p.add_argument("--run", default=None)
    p.add_argument("--json", action="store_true")

    p = _command(
        sub,
        "export",
        fusion_commands.export,
        "Write a model version as float32 safetensors (an ensemble: a folder of its members' files "
        "and manifest.json).",
    )
    p.add_argument("--run", required=True)
    p.add_argument("--version", type=int_in(0, 10**9), default=None, help="default: the current version")
    p.add_argument("--out", required=True, type=Path)

    p = _command(
        sub,
        "sample",
        fusion_commands.sample,
        "Print text the run's (or ensemble's) model generates after a prompt.",
    )
    p.add_argument("--run", required=True)
    p.add_argument("--version", type=int_in(0, 10**9), default=None, help="default: the current version")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument(
        "--tokens", type=int_in(1, 100_000), default=100, help="how many tokens to add (default 100)"
    )
    p.add_argument(
        "--temperature",
        type=float_in(0.0, 100.0, low_ok=True),
        default=0.8,
        help="0: always the likeliest (default 0.8)",
    )
    p.add_argument("--seed", type=int_in(0, 2**63 - 1), default=0, help="the same seed gives the same text")
    p.add_argument("--json", action="store_true")

    _fusion_commands(sub)

    p = _command(sub, "report", commands.report, "Plot eval loss per round and per uplink byte.")
    p.add_argument("--run", required=True)
    p.add_argument("--out", required=True, type=Path)

    p = _command(
        sub,
        "monitor",
        commands.monitor,
        "Start Flower, Celery's web monitor, on this app. Flower reads its login from "
        "$FLOWER_BASIC_AUTH (user:password), which is passed through unchanged.",
    )
    p.add_argument("--port", type=_port, default=5555, help="Flower's port (1-65535, default 5555)")
    p.add_argument(
        "--address",
        type=_address,
        default="127.0.0.1",
        help="the address Flower listens on (default 127.0.0.1; 0.0.0.0 for every interface)",
    )

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

    p = _command(
        sub,
        "invite",
        commands.invite,
        "Print an invitation token that 'volunteer join TOKEN' trades for its own credentials (Redis 7).",
    )
    p.add_argument(
        "--uses",
        type=int_in(1, invitations.MAX_USES),
        default=invitations.DEFAULT_USES,
        metavar="N",
        help=f"how many volunteers may join with it, 1 to {invitations.MAX_USES} (default 1)",
    )
    p.add_argument(
        "--expires",
        type=float_in(0, invitations.MAX_EXPIRES),
        default=invitations.DEFAULT_EXPIRES,
        metavar="SECONDS",
        help=f"seconds until it expires (default {invitations.DEFAULT_EXPIRES:.0f}: 7 days)",
    )
    p.add_argument(
        "--host", default=None, help="HOST[:PORT] volunteers reach the broker at (default: the broker URL's)"
    )
    p.add_argument("--json", action="store_true")

    p = _command(
        sub,
        "volunteers",
        commands.volunteers,
        "Volunteer identities: reputation, accepted shards, age, online, revoked.",
    )
    p.add_argument("--json", action="store_true")

    p = _command(
        sub,
        "revoke",
        commands.revoke,
        "Remove a volunteer's credentials (closing its connections) and its pending work.",
    )
    p.add_argument("name", metavar="NAME", help="the volunteer's name")
    p.add_argument("--json", action="store_true")
    return parser


def _fusion_commands(sub: Any) -> None:
    """``fuse`` and ``evaluate``: merge runs by weights or outputs, and measure any run or ensemble."""
    p = _command(
        sub,
        "fuse",
        fusion_commands.fuse,
        "Merge runs: average makes a run whose version 0 is the weighted mean of their weights; "
        "ensemble makes a model whose output is the weighted mixture of theirs.",
    )
    p.add_argument(
        "--runs",
        required=True,
        metavar="A,B[,...]",
        help="two or more runs; RUN:V pins version V, a bare RUN uses (ensemble: follows) its current one",
    )
    p.add_argument("--out", required=True, metavar="NAME", help="the new run's (average) or ensemble's name")
    p.add_argument("--method", required=True, choices=FUSION_METHODS)
    p.add_argument(
        "--weights",
        default=None,
        metavar="w1,w2,...|posterior",
        help="one non-negative weight per run, normalised (default equal); ensemble only: 'posterior', "
        "each member weighed by its posterior given the context so far (Branch-Train-Merge)",
    )
    p.add_argument("--json", action="store_true")

    p = _command(
        sub,
        "evaluate",
        fusion_commands.evaluate,
        "Eval loss (and accuracy where the job has it) of a run or an ensemble.",
    )
    p.add_argument("--run", required=True, help="a run or an ensemble")
    p.add_argument(
        "--version", type=int_in(0, 10**9), default=None, help="a run's version (default: current)"
    )
    p.add_argument(
        "--data",
        default=None,
        metavar="PATH",
        help="evaluate on the text at PATH (a file, folder or glob) instead of the job's eval set",
    )
    p.add_argument("--json", action="store_true")


def _command(sub: Any, name: str, handler: Any, help_text: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.add_argument(
        "--broker", default=None, help="Redis URL (default: $CROWDTRAIN_BROKER_URL, else the embedded Redis)"
    )
    p.set_defaults(handler=handler)
    return p


def _local_steps_flag(p: argparse.ArgumentParser, default: int) -> None:
    run_config.add_init_flags(p, ("local_steps",), defaults={"local_steps": default})


def _round_flags(p: argparse.ArgumentParser) -> None:
    """post-round's and run's --shards, --quorum, --deadline: an absent one is the run's own setting."""
    names = ("shards", "quorum", "deadline")
    helps = {
        name: run_config.setting_of(name).help.removeprefix("default for the run's rounds: ")
        + " (default: the run's)"
        for name in names
    }
    run_config.add_init_flags(p, names, helps=helps, defaults=dict.fromkeys(names))


_port = int_in(1, 65535)


def _address(text: str) -> str:
    """An argparse type: an IP address or a host name to listen on."""
    value = text.strip()
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        pass
    if not _HOSTNAME.fullmatch(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not an IP address or host name")
    return value


if __name__ == "__main__":
    sys.exit(main())
