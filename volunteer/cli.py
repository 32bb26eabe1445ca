"""The ``volunteer`` command: donate this machine's GPU or CPU to training runs."""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from broker import embedded, keys
from broker.arguments import OneLineParser, int_in
from broker.errors import BrokerError
from broker.routing import MAX_MEMORY_GB, queues_for
from broker.settings import Settings
from jobs import BUILTIN_JOBS
from tasks.training import volunteer_app
from volunteer.devices import (
    describe_devices,
    device_class,
    device_memory_gb,
    pool_for,
    resolve_device,
    speed_score,
)
from volunteer.errors import VolunteerError
from volunteer.joining import DEFAULT_TIMEOUT, join, saved_url
from volunteer.worker import VolunteerOptions

if TYPE_CHECKING:
    import torch

log = logging.getLogger("crowdtrain.volunteer")
MAX_CONCURRENCY = 256
MAX_THREADS = 1024
BROKER_FILE_LIMIT = 64 * 1024  # a URL, not a data file


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``volunteer`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.handler(args) or 0
    except (VolunteerError, BrokerError) as e:
        print(f"volunteer {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    """The ``volunteer`` parser: ``start``, ``info`` and ``join``."""
    parser = OneLineParser(prog="volunteer", description="Train shards for crowdtrain runs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser(
        "start",
        help="Pull shard jobs from queue 'train' and train them.",
        description="Pull shard jobs from queue 'train', and from the routed queues of runs "
        "this device qualifies for (init --require, --min-memory-gb), and train them.",
    )
    broker = p.add_mutually_exclusive_group()
    broker.add_argument(
        "--broker",
        default=None,
        help="Redis URL (default: $CROWDTRAIN_BROKER_URL, else the credentials 'volunteer join' saved "
        "under CROWDTRAIN_HOME, else the embedded Redis); a password in it "
        "is visible to other users of this machine: prefer $CROWDTRAIN_BROKER_URL or --broker-file",
    )
    broker.add_argument(
        "--broker-file",
        type=Path,
        default=None,
        metavar="PATH",
        help="a file whose first line is the broker URL (keeps its password out of `ps`)",
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument(
        "--concurrency",
        type=int_in(1, MAX_CONCURRENCY),
        default=1,
        help=f"shards trained at once, 1 to {MAX_CONCURRENCY}",
    )
    p.add_argument(
        "--pool",
        choices=["auto", "prefork", "threads", "solo"],
        default="auto",
        help="Celery pool (auto: prefork on CPU, solo on a GPU, which must never be "
        "forked; threads share torch's RNG, so their shards are not bit-reproducible)",
    )
    p.add_argument(
        "--memory-gb",
        type=int_in(1, MAX_MEMORY_GB),
        default=None,
        help="offer at most this many GB of device memory to runs that ask for it "
        "(init --min-memory-gb); default: all the device has",
    )
    p.add_argument("--name", default=None, help="Celery node name (default: host-pid)")
    p.add_argument(
        "--allow-job",
        action="append",
        default=None,
        metavar="JOB",
        help=f"a job this volunteer may run; repeat (default: built-ins {', '.join(BUILTIN_JOBS)})",
    )
    p.add_argument(
        "--data",
        default=None,
        metavar="PATH",
        help="train on your own data at PATH (a file, folder or glob) for jobs that can read it; "
        "it never leaves this machine: only deltas do",
    )
    p.add_argument(
        "--threads",
        type=int_in(1, MAX_THREADS),
        default=None,
        help=f"torch CPU threads per shard, 1 to {MAX_THREADS}",
    )
    p.set_defaults(handler=start)
    p = sub.add_parser(
        "info",
        help="Detected devices and a short speed score.",
        description="Detected devices and a short speed score.",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=info)
    p = sub.add_parser(
        "join",
        help="Trade an invitation token (coordinator invite) for this volunteer's own credentials.",
        description="Trade an invitation token (coordinator invite) for this volunteer's own "
        "credentials, saved (readable by you only) under CROWDTRAIN_HOME, where 'volunteer start' "
        "finds them when no broker is given.",
    )
    p.add_argument(
        "token", metavar="TOKEN", help="the token 'coordinator invite' printed; - reads it from stdin"
    )
    p.add_argument(
        "--name", default=None, help="the name to volunteer under, for good (default: this host's name)"
    )
    p.add_argument(
        "--timeout",
        type=int_in(1, 3600),
        default=int(DEFAULT_TIMEOUT),
        help=f"seconds to wait for the coordinator's answer (default {DEFAULT_TIMEOUT:g})",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=join_command)
    return parser


def join_command(args: argparse.Namespace) -> int:
    """Ask the coordinator for credentials with an invitation token; save them."""
    token = sys.stdin.readline() if args.token == "-" else args.token
    settings = Settings.from_env()
    name = args.name or _host_name()
    joined = join(settings, token, name, timeout=args.timeout)
    if args.json:
        print(json.dumps(joined, indent=2))
    else:
        print(f"joined as {name}; credentials saved to {joined['credentials']}; now run: volunteer start")
    return 0


def _host_name() -> str:
    """This host's name as a volunteer name: letters, digits, '.', '_' and '-' only, at most 64."""
    cleaned = "".join(c if c.isascii() and (c.isalnum() or c in "._-") else "-" for c in socket.gethostname())
    cleaned = cleaned.strip("._-")[:64] or "volunteer"
    return cleaned if keys.valid_name(cleaned) else "volunteer"


def start(args: argparse.Namespace) -> int:
    """Run a Celery worker on queue 'train' as this volunteer."""
    import torch

    if args.data is not None and not _matches_files(args.data):
        print(f"volunteer start: error: --data {args.data!r} names no readable file", file=sys.stderr)
        return 2
    broker_url = _broker_url(args)
    settings = Settings.from_env(broker_url=broker_url, torch_threads=args.threads)
    if settings.broker_url is None:  # the credentials `volunteer join` saved, else the embedded Redis
        joined = saved_url(settings.home)
        settings = settings.with_broker(joined or embedded.ensure_running(settings.home).url)
    device = resolve_device(args.device)
    # A volunteer with its own credentials is named after its Redis user by default.
    user = settings.sentinel.username if settings.sentinel else urlparse(settings.url).username
    name = args.name or user or f"{socket.gethostname()}-{os.getpid()}"
    if not keys.valid_name(name):
        print(
            f"volunteer start: error: --name {name!r}: {keys.NAME_RULE}",
            file=sys.stderr,
        )
        return 2
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    allowed = frozenset(args.allow_job) if args.allow_job else frozenset(BUILTIN_JOBS)
    pool = pool_for(device) if args.pool == "auto" else args.pool
    memory = _offered_memory(device, pool, args.memory_gb)
    queues = queues_for(device_class(device), memory)
    options = VolunteerOptions(
        name=name, device=str(device), allowed_jobs=allowed, data=args.data, memory_gb=int(memory)
    )
    app = volunteer_app(settings, options)
    log.info(
        "volunteer %s on %s (pool %s, concurrency %d), jobs allowed: %s; taking shards from %s",
        name,
        device,
        pool,
        args.concurrency,
        ", ".join(sorted(allowed)),
        ", ".join(queues),
    )
    app.worker_main(
        [
            "worker",
            "-Q",
            ",".join(queues),
            "-n",
            f"{name}@%h",
            "-P",
            pool,
            "-c",
            str(args.concurrency),
            "-E",
            "--loglevel=INFO",
            "--without-mingle",
            "--without-gossip",
        ]
    )
    return 0


def _offered_memory(device: torch.device, pool: str, cap: int | None) -> float:
    """GB of device memory this volunteer offers: the device's, at most ``--memory-gb``."""
    if device.type == "cuda" and pool == "prefork":
        return float(cap or 0)  # reading it would initialise CUDA before the pool forks
    detected = device_memory_gb(device)
    return min(detected, cap) if cap is not None else detected


def _broker_url(args: argparse.Namespace) -> str | None:
    """The URL of --broker-file (first line) or --broker, warning when --broker shows a password."""
    if args.broker_file is not None:
        return _read_broker_file(args.broker_file)
    if args.broker and urlparse(args.broker).password:
        log.warning(
            "--broker holds a password, which is visible to other users of this machine (ps); "
            "use CROWDTRAIN_BROKER_URL or --broker-file PATH instead"
        )
    broker: str | None = args.broker
    return broker


def _read_broker_file(path: Path) -> str:
    """The first line of ``path``, stripped; an unreadable or empty file is a VolunteerError."""
    try:
        with open(path, "rb") as f:
            head = f.read(BROKER_FILE_LIMIT)
    except OSError as e:
        raise VolunteerError(f"--broker-file {path}: cannot read it ({e.strerror or e})") from None
    lines = head.decode("utf-8", errors="replace").splitlines()
    url = lines[0].strip() if lines else ""
    if not url:
        raise VolunteerError(f"--broker-file {path}: its first line is empty; write the broker URL there")
    return url


def info(args: argparse.Namespace) -> int:
    """Print this machine's devices, a matmul speed score for each, and what auto picks."""
    import torch

    devices = describe_devices()
    for entry in devices:
        try:
            entry["speed_gflops"] = round(speed_score(torch.device(_device_name(entry))), 1)
        except Exception as e:  # a broken driver should not hide the other devices
            entry["speed_error"] = str(e)
    default = str(resolve_device("auto"))
    if args.json:
        print(json.dumps({"devices": devices, "default": default}, indent=2))
        return 0
    rows = [(_device_name(entry), _device_details(entry), _speed(entry)) for entry in devices]
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    for name, details, speed in rows:
        print(f"{name:<{widths[0]}}  {details:<{widths[1]}}  {speed}")
    print(f"--device auto picks {default}")
    return 0


def _device_name(entry: dict) -> str:
    return f"cuda:{entry.get('index', 0)}" if entry["type"] == "cuda" else entry["type"]


def _device_details(entry: dict) -> str:
    parts = [str(entry.get("name", "?"))]
    if entry.get("cores"):
        parts.append(f"{entry['cores']} cores")
    if entry.get("memory_gb"):
        parts.append(f"{entry['memory_gb']} GB")
    if entry.get("capability"):
        parts.append(f"compute capability {entry['capability']}")
    return ", ".join(parts)


def _speed(entry: dict) -> str:
    if "speed_gflops" in entry:
        return f"{entry['speed_gflops']:.1f} GFLOP/s (float32 matmul)"
    return f"speed unknown: {entry.get('speed_error', '?')}"


def _matches_files(path: str) -> bool:
    """True when ``path`` is a readable file, a folder, or a glob matching at least one file."""
    expanded = os.path.expanduser(path)
    if os.path.isdir(expanded) or (os.path.isfile(expanded) and os.access(expanded, os.R_OK)):
        return True
    return any(os.path.isfile(p) for p in glob.glob(expanded, recursive=True))


if __name__ == "__main__":
    sys.exit(main())
