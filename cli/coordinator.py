"""The ``coordinator`` command: parse flags, build objects, call the library.

Known errors become one line on stderr and exit code 2 (README, "When things go wrong").
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis

from broker.arguments import OneLineParser, float_in, int_in
from broker.errors import BrokerError
from broker.routing import DEVICE_CLASSES, MEMORY_TIERS_GB
from cli import commands, fusion_commands, quickstart
from coordinator.errors import BROKER_FULL, CoordinatorError, is_broker_full
from coordinator.merging.sampling import DEFAULT_PROBE_VOICES, MIN_PROBE_VOICES
from coordinator.merging.strategies import STRATEGY_HELP
from coordinator.merging.verification import VERIFY_MODES
from coordinator.rounds.asynchronous import DEFAULT_MAX_STALENESS, MODES
from coordinator.runs import invitations
from coordinator.runs.fusion import METHODS as FUSION_METHODS
from jobs import JobError
from serialization import WireFormatError

STRATEGY_FLAGS_HELP = "fedavg | fedavgm | diloco | fedadam | median | trimmed-mean:B | krum:F"
LONG_RUNNING = ("aggregator", "monitor")
# init's defaults: top-k of the large tensors, the rest lossless, chosen on a matrix of jobs
# (bench/defaults.py) and the bytes to a target loss (docs/BENCHMARKS.md sections 4 and 12).
DEFAULT_COMPRESSION = "topk:0.01+int2@4096"
DEFAULT_LOCAL_STEPS = 10
COMPRESSION_HELP = (
    "none | fp16 | bf16 | int8 | topk:F | topk:F+int8 | topk:F+int4 | topk:F+int2 (F a fraction, e.g. 0.01), "
    "optionally with a size policy @N[:SMALL]: tensors of fewer than N elements go SMALL (none, fp16, "
    "bf16 or int8; default none), e.g. topk:0.01+int2@4096"
)
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
MAX_SHARDS = 10_000
MAX_LOCAL_STEPS = 1_000_000
MAX_DEADLINE = 7 * 24 * 3600.0
MAX_ROUNDS = 100_000
MAX_VOLUNTEERS = 64
MAX_SEED = 2**63 - 1


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
    p.add_argument("--strategy", default="fedavg", help=STRATEGY_HELP)
    p.add_argument(
        "--server-lr",
        type=float_in(0, 100),
        default=None,
        help="the strategy's learning rate, > 0 and <= 100",
    )
    p.add_argument(
        "--momentum",
        type=float_in(0, 1, low_ok=True, high_ok=False),
        default=None,
        help="the strategy's momentum, 0 <= m < 1",
    )
    p.add_argument(
        "--clip-norm", type=float_in(0, math.inf), default=None, help="clip each delta to this L2 norm (> 0)"
    )
    p.add_argument(
        "--max-norm-ratio",
        type=float_in(0, 1e6),
        default=10.0,
        help="reject deltas whose norm exceeds this multiple of the round median (> 0 and <= 1e6)",
    )
    p.add_argument(
        "--compression",
        default=DEFAULT_COMPRESSION,
        help=COMPRESSION_HELP + f" (default {DEFAULT_COMPRESSION}: tensors of 4096 elements or more "
        "(one top-k block) top-k, smaller ones (biases, norm gains, a small model) lossless; chosen on a "
        "matrix of jobs, docs/BENCHMARKS.md section 12)",
    )
    p.add_argument(
        "--downlink-compression",
        default=None,
        metavar="SPEC",
        help="how each new version is also published, as an update from the one before, for "
        "volunteers that hold it (default: --compression; a lossless spec publishes whole models only)",
    )
    _local_steps_flag(p, default=DEFAULT_LOCAL_STEPS)
    p.add_argument(
        "--blob-store",
        default=None,
        metavar="URL",
        help="keep the run's models, updates and uploads in an S3-compatible object store, "
        "s3://BUCKET/PREFIX, reached with the usual AWS_* settings (default: $CROWDTRAIN_BLOB_STORE, "
        "else Redis); volunteers need no credentials (presigned URLs)",
    )
    p.add_argument(
        "--shard-seconds",
        type=float_in(0, MAX_DEADLINE),
        default=None,
        help="time budget of a shard: train until this many seconds have passed or --local-steps "
        "are done, whichever is first (at least one step); deltas weigh by the samples they trained",
    )
    p.add_argument(
        "--verify",
        choices=VERIFY_MODES,
        default="probe",
        help="probe: weigh each volunteer's delta by its effect on a fixed probe set and reject "
        "those far less useful than the round's others (default); none: norms and strategy only",
    )
    p.add_argument(
        "--probe-voices",
        type=int_in(MIN_PROBE_VOICES, MAX_SHARDS),
        default=DEFAULT_PROBE_VOICES,
        metavar="N",
        help="with --verify probe, judge every voice of a round of at most N voices; above N, every "
        "new or low-reputation voice plus a random sample of the rest, drawn once the uploads are in "
        f"({MIN_PROBE_VOICES} <= N <= {MAX_SHARDS}, default {DEFAULT_PROBE_VOICES}: docs/SECURITY.md)",
    )
    p.add_argument(
        "--slices",
        type=int_in(1, MAX_SHARDS),
        default=1,
        metavar="S",
        help="split the model's trainable tensors into S slices balanced by parameter count; shard i "
        "of a round trains slice i mod S only, so a volunteer needs memory for the model and one "
        "slice's gradients and optimizer state (default 1: the whole model)",
    )
    p.add_argument(
        "--min-voices",
        type=int_in(1, MAX_SHARDS),
        default=1,
        metavar="K",
        help="merge a round (or asynchronous buffer) only with deltas of at least K volunteers; "
        "one that ends with fewer fails, the model unchanged (default 1)",
    )
    p.add_argument(
        "--replicate",
        type=float_in(0, 1, low_ok=True),
        default=0.0,
        metavar="F",
        help="post this fraction of each round's shards twice, to two volunteers, and compare "
        "the deltas; on a mismatch the one the probe likes less is rejected (0 <= F <= 1)",
    )
    p.add_argument(
        "--work-check",
        type=float_in(0, 1, low_ok=True),
        default=0.0,
        metavar="RATE",
        help="replay a random sample of shards on the aggregator and reject those whose delta does not "
        "match the claimed training ('work'): RATE of a known volunteer's shards, more of a new one's "
        "(0 <= RATE <= 1, default 0: off; needs --inner-state reset and the job's own data)",
    )
    p.add_argument(
        "--lease",
        type=float_in(0, MAX_DEADLINE),
        default=None,
        metavar="SECONDS",
        help="how long a volunteer holds a shard it was given without renewing it (it renews every "
        "third of this while it trains); a shard whose lease lapses is offered again at once, one "
        "that nobody takes after min(10, SECONDS/2) s too (default 20)",
    )
    p.add_argument(
        "--max-share",
        type=float_in(0, 1),
        default=None,
        metavar="F",
        help="the most of a round's shards one volunteer may hold while another volunteer is online: "
        "ceil(F * shards), at least 1 and never all of them; 1: no limit (0 < F <= 1, default 0.5)",
    )
    p.add_argument(
        "--require",
        choices=DEVICE_CLASSES,
        default=None,
        help="train this run's shards only on volunteers with an accelerator (CUDA or MPS)",
    )
    p.add_argument(
        "--min-memory-gb",
        type=float_in(0, MEMORY_TIERS_GB[-1]),
        default=None,
        metavar="X",
        help="train this run's shards only on volunteers whose device has at least X GB "
        f"(rounded up to one of {', '.join(map(str, MEMORY_TIERS_GB))})",
    )
    p.add_argument(
        "--lr", type=float_in(0, 10), default=3e-3, help="the volunteers' inner learning rate, > 0 and <= 10"
    )
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    p.add_argument(
        "--inner-state",
        choices=["keep", "reset"],
        default=None,
        help="keep: a volunteer's inner optimizer goes on from the state its previous shard of the "
        "run left (moments, step count); reset: from zero every shard. Default: keep, or reset "
        f"with an outer strategy that has momentum ({', '.join(commands.OUTER_MOMENTUM)}), as measured",
    )
    _privacy_flags(p)
    p.add_argument(
        "--data",
        choices=["coordinator", "volunteer"],
        default="coordinator",
        help="whose data shards train on: the job's own shards, or only volunteers' own data "
        "(volunteer start --data); a volunteer with --data uses its own data either way",
    )
    p.add_argument("--seed", type=int_in(0, MAX_SEED), default=0)
    p.add_argument(
        "--mode",
        choices=MODES,
        default="sync",
        help="sync: rounds, each merged once its quorum is in; async: no round barrier, every "
        "--buffer accepted deltas make a version whatever version they were trained on (FedBuff)",
    )
    p.add_argument(
        "--buffer",
        type=int_in(1, MAX_SHARDS),
        default=None,
        metavar="K",
        help="async: accepted deltas per new version (needed with --mode async)",
    )
    p.add_argument(
        "--max-staleness",
        type=int_in(0, 10**6),
        default=None,
        metavar="S",
        help=f"async: reject a delta trained more than S versions ago (default {DEFAULT_MAX_STALENESS}); "
        "younger ones weigh samples / sqrt(1 + staleness)",
    )
    _round_flags(p, defaults=True)
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


def _privacy_flags(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("differential privacy (DP-FedAvg; docs/PRIVACY.md)")
    group.add_argument(
        "--dp-clip",
        type=float_in(0, 1e6),
        default=None,
        metavar="C",
        help="clip each volunteer's delta of a round to this L2 norm",
    )
    group.add_argument(
        "--dp-noise",
        type=float_in(0, 1e6, low_ok=True),
        default=None,
        metavar="Z",
        help="Gaussian noise of standard deviation Z*C on the sum of clipped deltas",
    )
    group.add_argument(
        "--dp-delta",
        type=float_in(0, 1, high_ok=False),
        default=1e-5,
        metavar="D",
        help="the delta of (epsilon, delta)-DP (default 1e-5)",
    )
    group.add_argument(
        "--dp-epsilon",
        type=float_in(0, 1e6),
        default=None,
        metavar="E",
        help="privacy budget: no round may take epsilon above E",
    )
    group.add_argument(
        "--dp-population",
        type=int_in(1, 10**9),
        default=None,
        metavar="N",
        help="volunteers a round samples from: sampling rate q = quorum/N (default q = 1)",
    )
    group.add_argument(
        "--dp-quantile",
        type=float_in(0, 1, high_ok=False),
        default=None,
        metavar="Q",
        help="adaptive clipping (Andrew et al. 2021): move C each round toward the Q-quantile of the "
        "voices' norms, --dp-clip being its start; the noised count it needs is accounted in epsilon",
    )
    group.add_argument(
        "--dp-clip-lr",
        type=float_in(0, 10),
        default=None,
        metavar="ETA",
        help="adaptive clipping's rate (0.2)",
    )
    group.add_argument(
        "--dp-count-noise",
        type=float_in(0, 1e6),
        default=None,
        metavar="S",
        help="noise std on the count of unclipped voices (default: the round's quorum / 20)",
    )


def _local_steps_flag(p: argparse.ArgumentParser, default: int) -> None:
    p.add_argument(
        "--local-steps",
        type=int_in(1, MAX_LOCAL_STEPS),
        default=default,
        help=f"optimizer steps per shard, 1 to {MAX_LOCAL_STEPS}",
    )


def _round_flags(p: argparse.ArgumentParser, defaults: bool = False) -> None:
    word = "default for the run's rounds: " if defaults else ""
    p.add_argument(
        "--shards",
        type=int_in(1, MAX_SHARDS),
        default=None,
        help=f"{word}shard jobs per round, 1 to {MAX_SHARDS}",
    )
    p.add_argument(
        "--quorum",
        default=None,
        help=f"{word}accepted shards needed: a count, or a fraction like 0.75 (default all)",
    )
    p.add_argument(
        "--deadline",
        type=float_in(0, MAX_DEADLINE),
        default=None,
        help=f"{word}seconds before the round is merged with what it has (> 0, at most {MAX_DEADLINE:.0f})",
    )


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
