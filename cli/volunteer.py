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
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from broker import embedded, keys
from broker.arguments import OneLineParser, int_in
from broker.errors import BrokerError
from broker.routing import MAX_MEMORY_GB
from broker.settings import Settings
from volunteer import control, preferences, service
from volunteer.errors import VolunteerError
from volunteer.etiquette import RESUME_CHARGE
from volunteer.joining import DEFAULT_TIMEOUT, join, saved_url

# torch, Celery and the jobs load only where a command needs them (start, info), so that
# volunteer pause|resume|status answer at once.

if TYPE_CHECKING:
    import torch

log = logging.getLogger("crowdtrain.volunteer")
MAX_CONCURRENCY = 256
MAX_THREADS = 1024
BROKER_FILE_LIMIT = 64 * 1024  # a URL, not a data file


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``volunteer`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
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
    """The ``volunteer`` parser: ``start``, ``info``, ``join``, the controls and the service."""
    parser = OneLineParser(prog="volunteer", description="Train shards for crowdtrain runs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser(
        "start",
        help="Pull shard jobs from queue 'train' and train them.",
        description="Pull shard jobs from queue 'train', and from the routed queues of runs "
        "this device qualifies for (init --require, --min-memory-gb), and train them.",
    )
    add_start_options(p)
    p.set_defaults(handler=start)
    for command, text in (
        ("pause", "Pause the volunteers running here: training stops within 2 s, the shard is kept."),
        ("resume", "Resume the volunteers running here (those paused by volunteer pause)."),
        ("status", "What the volunteers running here do: training, waiting or paused, and why."),
    ):
        p = sub.add_parser(command, help=text, description=text)
        p.add_argument("--name", default=None, help="only this volunteer (default: every one running here)")
        p.add_argument("--json", action="store_true")
        p.set_defaults(handler=command_volunteers)
    p = sub.add_parser(
        "install-service",
        help="Start the volunteer at login and restart it on failure (a per-user service).",
        description="Write a systemd user unit (Linux) or a launchd agent (macOS) that runs "
        "`volunteer start` with these options at login and restarts it on failure.",
    )
    p.add_argument("--print", action="store_true", help="show the service file and write nothing")
    add_start_options(p)
    p.set_defaults(handler=install_service)
    p = sub.add_parser(
        "uninstall-service",
        help="Remove the per-user service that install-service wrote.",
        description="Stop and remove the per-user service that install-service wrote.",
    )
    p.set_defaults(handler=uninstall_service)
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


def add_start_options(p: argparse.ArgumentParser) -> None:
    """The options of ``volunteer start`` (``install-service`` takes the same)."""
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
        help="a job this volunteer may run; repeat (default: the built-in jobs, charlm and gpt)",
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
    add_manners(p)


def add_manners(p: argparse.ArgumentParser) -> None:
    """The owner's preferences (``volunteer.preferences``): options of ``start``, over the TOML file's."""
    group = p.add_argument_group("manners (also in CROWDTRAIN_HOME/volunteer.toml; these options win)")
    group.add_argument(
        "--config", type=Path, default=None, metavar="PATH", help="read preferences from this TOML file"
    )
    group.add_argument(
        "--cpu-limit",
        type=float,
        default=None,
        metavar="PCT",
        help="use at most PCT%% of the machine's CPU time (all cores), held by pausing between steps",
    )
    group.add_argument(
        "--idle-minutes",
        type=float,
        default=None,
        metavar="M",
        help="train only after M minutes without keyboard or mouse input (macOS; Linux under X11 "
        "with xprintidle)",
    )
    group.add_argument(
        "--pause-when-busy",
        type=float,
        default=None,
        metavar="PCT",
        help="pause while other processes use more than PCT%% of the machine's CPU time",
    )
    group.add_argument(
        "--pause-on-battery",
        action="store_true",
        default=None,
        help=f"pause on battery; on mains again, train from {RESUME_CHARGE:g}%% charge",
    )
    group.add_argument(
        "--exclusive-app",
        action="append",
        default=None,
        metavar="NAME",
        help="pause while a program of this name runs (repeat for more)",
    )
    group.add_argument(
        "--hours", default=None, metavar="START-END", help="train only in this daily window, e.g. 22-7"
    )
    group.add_argument(
        "--max-upload-mbps", type=float, default=None, metavar="X", help="upload at most X Mbit/s on average"
    )


def manners(args: argparse.Namespace, home: Path) -> preferences.Preferences:
    """The preferences in force for ``start``: the TOML file's with the command line's over them."""
    options = {
        "cpu_limit": args.cpu_limit,
        "idle_minutes": args.idle_minutes,
        "pause_when_busy": args.pause_when_busy,
        "pause_on_battery": args.pause_on_battery,
        "exclusive_apps": tuple(args.exclusive_app or ()),
        "hours": preferences.parse_hours(args.hours) if args.hours is not None else None,
        "max_upload_mbps": args.max_upload_mbps,
    }
    return preferences.load(args.config, home, options)


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

    from broker.client import redis_client
    from broker.routing import queues_for
    from jobs import BUILTIN_JOBS
    from tasks.training import volunteer_app
    from volunteer.board import Board
    from volunteer.devices import device_class, pool_for, resolve_device
    from volunteer.guest import Guest, Watch
    from volunteer.store import VolunteerStore
    from volunteer.worker import VolunteerOptions

    if args.data is not None and not _matches_files(args.data):
        print(f"volunteer start: error: --data {args.data!r} names no readable file", file=sys.stderr)
        return 2
    broker_url = _broker_url(args)
    settings = Settings.from_env(broker_url=broker_url, torch_threads=args.threads)
    prefs = manners(args, settings.home)
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
    guest = Guest(
        prefs,
        Board(slots=2 * args.concurrency + 2),
        home=settings.home / "volunteer" / name,
        trainers=args.concurrency if pool == "prefork" else 1,  # a pool of threads shares one process's time
        battery_file=_path_from_env("CROWDTRAIN_BATTERY_FILE"),
        idle_file=_path_from_env("CROWDTRAIN_IDLE_FILE"),
    )
    options = VolunteerOptions(
        name=name,
        device=str(device),
        allowed_jobs=allowed,
        data=args.data,
        memory_gb=int(memory),
        guest=guest,
    )
    store = VolunteerStore(redis_client(settings), name)
    watch = Watch(guest, name, own=_own_processes, credit=store.credit)
    server = control.ControlServer(settings.home, name, watch.command)
    server.start()  # before anything else runs: a second volunteer of this name stops here
    app = volunteer_app(settings, options, watch)
    log.info(
        "volunteer %s on %s (pool %s, concurrency %d), jobs allowed: %s; taking shards from %s",
        name,
        device,
        pool,
        args.concurrency,
        ", ".join(sorted(allowed)),
        ", ".join(queues),
    )
    log.info("manners: %s; control: volunteer pause|resume|status (socket %s)", prefs.describe(), server.path)
    watch.start()
    try:
        _work(app, queues, name, pool, args.concurrency)
    finally:
        watch.stop()
        server.stop()
    return 0


def _work(app: Any, queues: list[str], name: str, pool: str, concurrency: int) -> None:
    """The Celery worker, until it is stopped."""
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
            str(concurrency),
            "-E",
            "--loglevel=INFO",
            "--without-mingle",
            "--without-gossip",
        ]
    )


def command_volunteers(args: argparse.Namespace) -> int:
    """``volunteer pause|resume|status``: ask each volunteer running here (or ``--name``) over its socket."""
    home = Settings.from_env().home
    replies = []
    for path in control.running(home, args.name):
        try:
            replies.append(control.request(path, args.command))
        except (OSError, ValueError) as e:
            raise control.ControlError(f"volunteer {path.stem!r} did not answer: {e}") from None
    for reply in replies:
        if "error" in reply:
            raise control.ControlError(f"volunteer refused: {reply['error']}")
    if args.json:
        single = args.name is not None or len(replies) == 1
        print(json.dumps(replies[0] if single else replies, indent=2))
        return 0
    for reply in replies:
        print(_describe(reply))
    return 0


def _describe(status: dict[str, Any]) -> str:
    """One line per volunteer: its state, why, and the shard in hand."""
    line = f"{status['name']}: {status['state']}"
    if status.get("reason"):
        line += f" ({', '.join(status.get('reasons') or [status['reason']])})"
    if status.get("run") is not None:
        line += (
            f", {status['run']} round {status.get('round')} shard {status['shard']} "
            f"step {status.get('step')}/{status.get('steps')}"
        )
    line += f", {status.get('shards_done', 0)} shards done here"
    credit = status.get("credit")
    if credit:
        line += f", {credit['accepted']} accepted ({credit['samples']} samples)"
    return line


def install_service(args: argparse.Namespace) -> int:
    """Write (or ``--print``) the per-user service that starts this volunteer at login."""
    start_argv = list(args.argv[args.argv.index("install-service") + 1 :])
    start_argv = [a for a in start_argv if a != "--print"]  # the same options start would get
    manners(args, Settings.from_env().home)  # bad preferences: exit 2 here, nothing written
    home = Settings.from_env().home.resolve()
    unit = service.for_platform(
        sys.platform, home, start_argv, service.environment(os.environ), os.environ.get("XDG_CONFIG_HOME")
    )
    if args.print:
        print(unit.text, end="")
        return 0
    path = unit.install(home)
    print(f"wrote {path}; {unit.enable_hint}")
    return 0


def uninstall_service(args: argparse.Namespace) -> int:
    """Remove the per-user service, if there is one."""
    unit = service.for_platform(sys.platform, Path(), [], {}, os.environ.get("XDG_CONFIG_HOME"))
    path = unit.uninstall()
    print(f"removed {path}" if path is not None else "no volunteer service was installed")
    return 0


def _own_processes() -> list[int]:
    """This process and every process under it (the pool): whose CPU use is this volunteer's own."""
    import psutil

    me = psutil.Process()
    try:
        return [me.pid, *(child.pid for child in me.children(recursive=True))]
    except psutil.Error:
        return [me.pid]


def _path_from_env(variable: str) -> Path | None:
    value = os.environ.get(variable)
    return Path(value) if value else None


def _offered_memory(device: torch.device, pool: str, cap: int | None) -> float:
    """GB of device memory this volunteer offers: the device's, at most ``--memory-gb``."""
    from volunteer.devices import device_memory_gb

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

    from volunteer.devices import describe_devices, resolve_device, speed_score

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
