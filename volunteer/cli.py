"""The ``volunteer`` command: donate this machine's GPU or CPU to training runs."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import socket
import sys
from collections.abc import Sequence
from urllib.parse import urlparse

import redis
from celery.signals import worker_ready

from broker import embedded
from broker.client import redis_client
from broker.errors import BrokerError
from broker.keys import TRAIN_QUEUE
from broker.settings import Settings
from jobs import BUILTIN_JOBS
from tasks.training import volunteer_app
from volunteer.devices import describe_devices, pool_for, resolve_device, speed_score
from volunteer.errors import VolunteerError
from volunteer.store import VolunteerStore
from volunteer.worker import VolunteerOptions

log = logging.getLogger("crowdtrain.volunteer")
VOLUNTEER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


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
    parser = argparse.ArgumentParser(prog="volunteer", description="Train shards for crowdtrain runs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser(
        "start",
        help="Pull shard jobs from queue 'train' and train them.",
        description="Pull shard jobs from queue 'train' and train them.",
    )
    p.add_argument(
        "--broker", default=None, help="Redis URL (default: $CROWDTRAIN_BROKER_URL, else the embedded Redis)"
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--concurrency", type=int, default=1, help="shards trained at once")
    p.add_argument(
        "--pool",
        choices=["auto", "prefork", "threads", "solo"],
        default="auto",
        help="Celery pool (auto: prefork on CPU, solo on a GPU, which must never be "
        "forked; threads share torch's RNG, so their shards are not bit-reproducible)",
    )
    p.add_argument("--name", default=None, help="Celery node name (default: host-pid)")
    p.add_argument(
        "--allow-job",
        action="append",
        default=None,
        metavar="JOB",
        help=f"a job this volunteer may run; repeat (default: built-ins {', '.join(BUILTIN_JOBS)})",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per shard")
    p.set_defaults(handler=start)
    p = sub.add_parser(
        "info",
        help="Detected devices and a short speed score.",
        description="Detected devices and a short speed score.",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=info)
    return parser


def start(args: argparse.Namespace) -> int:
    """Run a Celery worker on queue 'train' as this volunteer."""
    import torch

    settings = Settings.from_env(broker_url=args.broker, torch_threads=args.threads)
    if settings.broker_url is None:
        settings = settings.with_broker(embedded.ensure_running(settings.home).url)
    device = resolve_device(args.device)
    # A volunteer with its own credentials is named after its Redis user by default.
    name = args.name or urlparse(settings.url).username or f"{socket.gethostname()}-{os.getpid()}"
    if not VOLUNTEER_NAME.match(name):
        print(
            f"volunteer start: error: --name {name!r}: use 1-64 letters, digits, '.', '_' or '-'",
            file=sys.stderr,
        )
        return 2
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    allowed = frozenset(args.allow_job) if args.allow_job else frozenset(BUILTIN_JOBS)
    _announce_when_ready(VolunteerStore(redis_client(settings), name), device.type)
    app = volunteer_app(settings, VolunteerOptions(name=name, device=str(device), allowed_jobs=allowed))
    pool = pool_for(device) if args.pool == "auto" else args.pool
    log.info(
        "volunteer %s on %s (pool %s, concurrency %d), jobs allowed: %s",
        name,
        device,
        pool,
        args.concurrency,
        ", ".join(sorted(allowed)),
    )
    app.worker_main(
        [
            "worker",
            "-Q",
            TRAIN_QUEUE,
            "-n",
            f"{name}@%h",
            "-P",
            pool,
            "-c",
            str(max(1, args.concurrency)),
            "-E",
            "--loglevel=INFO",
            "--without-mingle",
            "--without-gossip",
        ]
    )
    return 0


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


def _announce_when_ready(store: VolunteerStore, device: str) -> None:
    """Register the volunteer once its worker is connected (Celery retries the broker until then)."""

    def announce(**_: object) -> None:
        try:
            store.describe(device)
        except redis.RedisError as e:
            log.warning("could not register volunteer %s: %s", store.name, e)

    worker_ready.connect(announce, weak=False)


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


if __name__ == "__main__":
    sys.exit(main())
