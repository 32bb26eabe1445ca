"""One function per ``coordinator`` sub-command: wiring between flags and the library."""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from rich.console import Console
from safetensors import SafetensorError

from broker import embedded, keys, run_config
from broker.client import check_reachable, data_nodes, node_client, redis_client
from broker.errors import UnknownRun
from broker.keys import AGGREGATE_QUEUE
from broker.objects import STORE_ENV, Location, ObjectStore
from broker.routing import need_of
from broker.run_config import RunConfig, default_inner_state
from broker.settings import Settings
from coordinator.errors import PrivacyBudgetSpent, RunExists, UsageError
from coordinator.merging import privacy
from coordinator.merging.aggregator import Aggregator
from coordinator.merging.strategies import make_strategy
from coordinator.rounds import announcements, asynchronous, janitor
from coordinator.rounds.posting import parse_quorum, wait_round
from coordinator.rounds.posting import post_round as _post_round
from coordinator.runs import (
    checkpoints,
    credentials,
    fusion,
    identities,
    invitations,
    ledger,
    revocation,
    slicing,
)
from coordinator.runs import restore as restoring
from coordinator.runs.context import upload_bound
from coordinator.runs.creation import build_model, create_run
from coordinator.store import Store
from coordinator.views.documents import round_record, run_document
from coordinator.views.metrics import serve_metrics
from coordinator.views.progress import RoundProgress, rounds_table
from coordinator.views.status import collect_status, print_status
from jobs import Job, load_job, parse_job_args
from serialization import TensorDict, dumps, loads, parse_codec
from tasks.aggregation import aggregator_app
from tasks.app import CrowdtrainApp, make_app


def _check_work(config: RunConfig) -> None:
    """``--work-check`` replays shards: the job's data, a fresh inner optimizer, rounds, no DP."""
    if not config.work_check:
        return
    if config.inner_state == "keep":
        raise UsageError(
            "--work-check replays a shard from a fresh inner optimizer: use it with --inner-state reset"
        )
    if config.data == "volunteer":
        raise UsageError(
            "--work-check replays the job's shards; volunteers' own data (--data volunteer) cannot be"
            " replayed"
        )
    if config.is_async:
        raise UsageError("--work-check replays a round's shards: use it with --mode sync")
    if config.is_private:
        raise UsageError("--work-check judges one volunteer's delta by itself, which DP runs do not allow")
    if config.is_sliced:
        raise UsageError("--work-check replays whole-model shards: use it with --slices 1")


log = logging.getLogger("crowdtrain.coordinator")


@dataclass
class Connection:
    """A broker to talk to: settings, crowdtrain's store and the Celery app."""

    settings: Settings
    store: Store
    app: CrowdtrainApp


def broker_settings(args: argparse.Namespace) -> Settings:
    """Use --broker / $CROWDTRAIN_BROKER_URL, else start or reuse the embedded Redis."""
    settings = Settings.from_env(broker_url=getattr(args, "broker", None))
    if settings.broker_url is None:
        settings = settings.with_broker(embedded.ensure_running(settings.home).url)
    return settings


def connect(args: argparse.Namespace, check: bool = True) -> Connection:
    """Settings, store and a task-less app (it sends tasks by name) for a one-shot command."""
    settings = broker_settings(args)
    if check:
        check_reachable(settings)
    return Connection(settings, Store(redis_client(settings)), make_app(settings))


def init(args: argparse.Namespace) -> dict[str, Any]:
    """Validate everything first, then store the run and model version 0."""
    if not keys.valid_name(args.run):
        raise UsageError(f"--run {args.run!r}: {keys.NAME_RULE}")
    job_args = parse_job_args(args.job_arg)
    settings = _checked_settings(args)
    try:
        need = need_of(settings.require, settings.min_memory_gb)
    except ValueError as e:
        raise UsageError(str(e)) from None
    blob_store = _blob_store(getattr(args, "blob_store", None))
    branch = None
    if getattr(args, "source", None) is not None:  # init --from RUN[:VERSION]: a branch of RUN
        conn = connect(args)
        branch = fusion.branch_source(conn.store, conn.settings.home, args.source, args.job, job_args)
        args.job, job_args = branch.job, branch.job_args
    elif args.job is None:
        raise UsageError("--job is needed: a built-in job or package.module:factory (or --from RUN)")
    job = load_job(args.job, job_args)
    conn = connect(args)
    if args.run in conn.store.runs():
        raise RunExists(f"run {args.run!r} exists already; choose another --run name")
    fusion.refuse_ensemble_name(conn.store, args.run)
    folder = checkpoints.run_dir(conn.settings.home, args.run)
    force = getattr(args, "force", False)
    if folder.exists() and not force:
        raise RunExists(
            f"{folder} exists: bring that run back with 'coordinator restore --run {args.run}', "
            "or pass --force to move the folder aside and start afresh"
        )
    if branch is None:
        weights, blob, initial = build_model(job, args.job, args.run)
    else:
        weights, initial = fusion.branch_model(job, branch, args.run, _job_files(job))
        blob = dumps(weights, {"run": args.run, "version": 0})
    settings = settings.replace(**need.as_config())
    parts = slicing.settings(job, weights, settings)
    if folder.exists():
        moved = checkpoints.move_aside(conn.settings.home, args.run)
        print(f"moved {folder} aside to {moved}", file=sys.stderr)
    codec = parse_codec(settings.compression)
    config = settings.replace(
        job=args.job,
        job_args=job_args,
        initial=initial,
        # volunteers build version 0 from the job's seed instead of fetching it, if the bytes match
        initial_digest=hashlib.sha256(blob).hexdigest(),
        created_at=time.time(),
        branched_from={"run": branch.run, "version": branch.version} if branch else None,
        # the store caps each upload slot at the bound the aggregator checks uploads against
        **({"blob_store": blob_store, "upload_bound": upload_bound(weights, codec)} if blob_store else {}),
        **parts,  # slices, shard_memory_gb; a sliced run's routing and slice_tensors
    )
    create_run(conn.store, conn.settings.home, args.run, config, blob, weights, _job_files(job))
    document = {
        "run": args.run,
        "job": args.job,
        "strategy": args.strategy,
        "compression": codec.name,
        "initial": {"model_version": 0, **initial},
    }
    if branch is not None:
        document["branched_from"] = {"run": branch.run, "version": branch.version}
    if not args.json:
        origin = f", branched from {branch.run} version {branch.version}" if branch else ""
        print(
            f"created run {args.run!r}: job {args.job}, strategy {args.strategy}, "
            f"compression {codec.name}, initial eval_loss {initial.get('eval_loss', 0):.4f}{origin}"
        )
    return document


def _blob_store(flag: str | None) -> str | None:
    """The run's blob store (--blob-store, else $CROWDTRAIN_BLOB_STORE), checked by a write; None: Redis."""
    url = flag or os.environ.get(STORE_ENV) or None
    if url is None:
        return None
    location = Location.parse(url)
    ObjectStore(location).check()
    return location.url


def _checked_settings(args: argparse.Namespace) -> RunConfig:
    """init's flags as a run's settings, checked together and with their derived defaults filled in."""
    given = RunConfig(
        **{name: getattr(args, name) for name in run_config.flag_names() if hasattr(args, name)}
    )
    codec = parse_codec(given.compression)
    # a sliced run's downlink is lossless unless asked (and then refused: coordinator.runs.slicing)
    downlink = parse_codec(given.downlink_compression or ("none" if given.is_sliced else codec.name))
    make_strategy(
        given.strategy, server_lr=given.server_lr, momentum=given.momentum, clip_norm=given.clip_norm
    )
    parse_quorum(given.quorum, given.shards)
    privacy.check_settings(given)
    if given.replicate and given.is_private:
        raise UsageError("--replicate judges one volunteer's delta by itself, which DP runs do not allow")
    _check_mode(given)
    settings = given.replace(
        compression=codec.name,
        downlink_compression=downlink.name,
        max_staleness=given.staleness_limit if given.is_async else None,
        inner_state=given.inner_state or default_inner_state(given.strategy, given.work_check),
    )
    if settings.is_sliced:  # before a model is built: what a sliced run does not work with
        slicing.refuse(settings)
    _check_work(given)
    return settings


def _check_mode(config: RunConfig) -> None:
    """An async run needs --buffer and goes without replication and DP; a sync one takes neither flag."""
    if not config.is_async:
        if config.buffer is not None or config.max_staleness is not None:
            raise UsageError("--buffer and --max-staleness are for --mode async")
        return
    if config.buffer is None:
        raise UsageError("--mode async needs --buffer K: the accepted deltas that make one new version")
    if config.replicate:
        raise UsageError("--replicate compares two trainings of one round's shard: use it with --mode sync")
    if config.is_private:
        raise UsageError("differential privacy (--dp-clip) accounts per round: use it with --mode sync")


def _job_files(job: Job) -> dict[str, str]:
    """Files a run keeps beside its checkpoints: the job's tokenizer, if it has one."""
    tokenizer = getattr(job, "tokenizer_json", None)
    return {"tokenizer.json": tokenizer()} if callable(tokenizer) else {}


def post_round(args: argparse.Namespace) -> dict[str, Any]:
    conn = connect(args)
    _check_known(conn, args.run)
    config = conn.store.run_config(args.run)
    if config.is_async:
        raise UsageError(
            f"run {args.run!r} is asynchronous (no rounds to post): "
            f"use 'coordinator run --run {args.run} --rounds R'"
        )
    info = _post(conn, args, config)
    if not args.wait:
        if not args.json:
            print(
                f"posted round {info['round']} of {args.run}: {info['shards']} shards, "
                f"quorum {info['quorum']}, deadline {info['deadline_seconds']:.0f}s"
            )
        return info
    _wait(conn.store, args.run, info["round"], info["shards"], args.json)
    return run_document(conn.store, args.run, [info["round"]])


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Finish R rounds, first waiting for one left open by an interrupted run."""
    conn = connect(args)
    _check_known(conn, args.run)
    config = conn.store.run_config(args.run)
    if config.is_async:
        return _run_async(conn, args)
    numbers: list[int] = []
    current = conn.store.rounds.current(args.run)
    if current and current["status"] in ("open", "aggregating"):
        _wait(conn.store, args.run, current["round"], int(current["shards"]), args.json)
        numbers.append(current["round"])
    stopped = None
    while len(numbers) < args.rounds:
        try:
            info = _post(conn, args, config)
        except PrivacyBudgetSpent as e:
            log.warning("%s: stopping", e)
            stopped = "privacy budget"
            break
        record = _wait(conn.store, args.run, info["round"], info["shards"], args.json)
        if record["status"] == "failed":
            log.warning("round %d failed: no volunteer delta was accepted before the deadline", info["round"])
        numbers.append(info["round"])
    document = run_document(conn.store, args.run, numbers)
    if stopped:
        document["stopped"] = stopped
    if not args.json:
        Console().print(rounds_table(document))
    return document


def _run_async(conn: Connection, args: argparse.Namespace) -> dict[str, Any]:
    """An asynchronous run: jobs kept outstanding until R new versions; one report entry per version."""

    def progress(info: dict[str, Any]) -> None:
        if not args.json:
            log.debug("buffer %s: %s/%s accepted", info["round"], info.get("accepted"), info.get("quorum"))

    numbers = asynchronous.drive(conn.store, conn.app, args.run, args.rounds, progress)
    document = run_document(conn.store, args.run, numbers)
    if not args.json:
        Console().print(rounds_table(document))
    return document


def abort_round(args: argparse.Namespace) -> dict[str, Any]:
    """End the run's open or aggregating round: it fails with reason "aborted"."""
    conn = connect(args)
    conn.store.run_config(args.run)  # an unknown run is named as such
    number = conn.store.rounds.count(args.run)
    if not number or conn.store.rounds.abort(args.run, number) != "aborted":
        state = conn.store.rounds.status(args.run, number) if number else None
        latest = f"round {number} is {state}" if state else "it has no rounds"
        raise UsageError(f"run {args.run!r} has no round in progress ({latest}); nothing to abort")
    record = round_record(conn.store, args.run, number)
    _note(lambda: ledger.round_ended(conn.settings.home, args.run, record), f"round {number}")
    if not args.json:
        print(f"aborted round {number} of {args.run}: failed, reason 'aborted'")
    return {"run": args.run, "round": number, "status": "failed", "reason": "aborted"}


def aggregator(args: argparse.Namespace) -> None:
    """Run the trusted worker; the intake and the deadline watcher run beside it in threads."""
    settings = broker_settings(args)
    # the trusted side writes credit and reputation to each run's ledger on disk as it gives them
    store = Store(redis_client(settings), ledger=ledger.Ledger(settings.home))
    trusted = Aggregator(
        store,
        settings.home,
        name=args.name or "aggregator",
        keep_versions=settings.keep_versions,
        cache_bytes=settings.merge_cache_mb << 20,
    )
    app = aggregator_app(settings, trusted)
    if args.metrics_port:
        try:
            serve_metrics(store, args.metrics_port, app, address=args.metrics_address)
        except OSError as e:
            raise UsageError(
                f"--metrics-address {args.metrics_address} --metrics-port {args.metrics_port}: "
                f"cannot listen there ({e.strerror or e})"
            ) from None
    stop = threading.Event()
    try:  # so least-privilege volunteers (EVALSHA only) work right after a Redis restart
        credentials.preload_scripts(store.redis)
    except redis.RedisError as e:
        log.warning("could not preload kombu's Lua scripts (%s); volunteers load them on demand", e)

    def send(task: str, task_args: list) -> None:
        app.send_task(task, args=task_args, queue=AGGREGATE_QUEUE)

    trusted.send = send  # a sliced round's planner asks the other aggregators to merge slices

    def post(task: str, kwargs: dict[str, Any], queue: str) -> None:
        # a volunteer may not write the result backend: its task stores none
        app.send_task(task, kwargs=kwargs, queue=queue, ignore_result=task == "train_shard")

    # Volunteers announce their uploads on a list; this thread validates them in batches.
    inbox = announcements.Inbox(store, trusted.intake, post)
    threading.Thread(target=announcements.serve, args=(inbox, stop), daemon=True, name="intake").start()

    # Uploads are swept once per visibility timeout: a lost announcement is made good
    # on the time scale that a dead worker's unacknowledged one comes back.
    sweep = max(1.0, settings.visibility_timeout)
    threading.Thread(
        target=janitor.watch, args=(store, send, stop, sweep, trusted.contexts), daemon=True, name="watcher"
    ).start()
    # Invitation tokens are traded for credentials here: only the trusted side may create users.
    joins = invitations.Joins(store, _volunteer_broker(settings), replicas=lambda: _replicas(settings))
    threading.Thread(target=invitations.serve, args=(joins, stop), daemon=True, name="joins").start()
    # Runs on disk that Redis lost are reported (and with --restore rebuilt from disk).
    lookout = (store, settings.home, stop, app, getattr(args, "restore", False), settings.keep_versions)
    threading.Thread(target=restoring.watch, args=lookout, daemon=True, name="lost-runs").start()
    name = args.name or f"aggregator-{os.getpid()}"
    try:
        app.worker_main(
            [
                "worker",
                "-Q",
                AGGREGATE_QUEUE,
                "-P",
                "solo",
                "-n",
                f"{name}@%h",
                "-E",
                "--loglevel=INFO",
                "--without-mingle",
                "--without-gossip",
            ]
        )
    finally:
        stop.set()


def status(args: argparse.Namespace) -> dict[str, Any]:
    conn = connect(args)
    lost = restoring.lost_runs(conn.store, conn.settings.home)
    if args.run is not None:
        _check_known(conn, args.run)
    document = collect_status(conn.store, conn.app, args.run)
    document["lost_runs"] = [run for run in lost if args.run in (None, run)]
    if not args.json:
        print_status(document)
    return document


def export(args: argparse.Namespace) -> None:
    """Write a version as float32 safetensors, from Redis or, once it left Redis, from its checkpoint."""
    conn = connect(args)
    current = _current_version(conn, args.run)
    version = current if args.version is None else args.version
    if not 0 <= version <= current:
        raise UsageError(f"--version {version}: run {args.run!r} has versions 0 to {current}")
    weights = _version_weights(conn, args.run, version)
    try:
        checkpoints.export_float32(weights, args.out, {"run": args.run, "version": str(version)})
    except (OSError, SafetensorError) as e:
        raise UsageError(f"--out {args.out}: cannot write it ({e})") from None
    print(f"wrote version {version} of {args.run} to {args.out}")


def sample(args: argparse.Namespace) -> dict[str, Any]:
    """Print text the run's model of a version generates after ``--prompt``: what the compute bought."""
    conn = connect(args)
    current = _current_version(conn, args.run)
    config = _run_config(conn, args.run)
    job = load_job(config.job, config.job_args)
    generate = getattr(job, "generate", None)
    if not callable(generate):
        raise UsageError(f"job {config.job!r} of run {args.run!r} does not generate text")
    version = current if args.version is None else args.version
    if not 0 <= version <= current:
        raise UsageError(f"--version {version}: run {args.run!r} has versions 0 to {current}")
    model = job.build_model()
    model.load_state_dict(_version_weights(conn, args.run, version))
    text = generate(model, args.prompt, args.tokens, temperature=args.temperature, seed=args.seed)
    if not args.json:
        print(text)
    return {"run": args.run, "version": version, "prompt": args.prompt, "text": text}


def _current_version(conn: Connection, run: str) -> int:
    """The run's current version: Redis's, or the latest on disk for a run Redis does not know."""
    try:
        return conn.store.version(run)
    except UnknownRun:
        return restoring.run_record(conn.settings.home, run)[1]


def _run_config(conn: Connection, run: str) -> RunConfig:
    try:
        return conn.store.run_config(run)
    except UnknownRun:
        return restoring.run_record(conn.settings.home, run)[0]


def _check_known(conn: Connection, run: str) -> None:
    """A run Redis lost is named as such, with the command that brings it back."""
    if keys.NAME.fullmatch(run) and restoring.is_lost(conn.store, conn.settings.home, run):
        raise UnknownRun(
            f"run {run!r} is on disk but Redis does not know it (its data was lost?): "
            f"bring it back with 'coordinator restore --run {run}'"
        )


def _version_weights(conn: Connection, run: str, version: int) -> TensorDict:
    blob = conn.store.model_blob(run, version)
    if blob is not None:
        weights, _ = loads(blob)
        return weights
    try:
        return checkpoints.load_version(conn.settings.home, run, version)
    except (OSError, SafetensorError) as e:
        folder = checkpoints.run_dir(conn.settings.home, run)
        raise UsageError(
            f"version {version} of run {run!r} is no longer in Redis and its checkpoint "
            f"under {folder} cannot be read ({e})"
        ) from None


def report(args: argparse.Namespace) -> None:
    # matplotlib takes most of a second to import: only this command pays for it
    from coordinator.views.report import plot_run

    conn = connect(args)
    home = conn.settings.home
    if args.run in conn.store.runs():
        rounds = list(range(1, conn.store.rounds.count(args.run) + 1))
        document = restoring.fill_expired(run_document(conn.store, args.run, rounds), home, args.run)
    else:  # a run Redis does not know (lost, or on another broker): from its record on disk
        document = restoring.disk_document(home, args.run)
    plot_run(document, args.out)
    print(f"wrote {args.out}")


def restore(args: argparse.Namespace) -> dict[str, Any]:
    """Rebuild runs Redis lost from their record on disk (``--run NAME`` or ``--all``)."""
    conn = connect(args)
    home = conn.settings.home
    names = restoring.lost_runs(conn.store, home) if args.all else [args.run]
    restored = []
    for name in names:
        entry = restoring.restore_run(conn.store, home, name, conn.app, conn.settings.keep_versions)
        restored.append(entry)
        if not args.json:
            again = f", round {entry['reposted_round']} posted again" if entry["reposted_round"] else ""
            print(
                f"restored run {name!r} from {checkpoints.run_dir(home, name)}: version "
                f"{entry['model_version']}, {entry['rounds']} rounds, {entry['volunteers']} volunteers{again}"
            )
    if not names and not args.json:
        print(f"no run to restore: every run under {home / 'runs'} is in Redis")
    return {"restored": restored}


def monitor(args: argparse.Namespace) -> int:
    """Flower is ``celery -A tasks flower``; we only point it at the right broker."""
    conn = connect(args)
    _check_listen(args.address, args.port)
    env = {**os.environ, "CROWDTRAIN_BROKER_URL": conn.settings.url}
    # Our task arguments are small and readable: show them in the task list.
    env.setdefault("FLOWER_TASKS_COLUMNS", "name,uuid,state,args,kwargs,result,received,runtime,worker")
    # Flower's login comes from $FLOWER_BASIC_AUTH (in env), never from its command line (`ps`).
    command = [sys.executable, "-m", "celery", "-A", "tasks", "flower"]
    command += [f"--port={args.port}", f"--address={args.address}"]
    process = subprocess.Popen(command, env=env)
    try:
        code = process.wait()
        return 128 - code if code < 0 else code  # killed by signal N: the shell's 128 + N
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(10)


def _check_listen(address: str, port: int) -> None:
    """Refuse at once an address and port that cannot be listened on (in use, not this host's)."""
    try:
        family, kind, proto, _, where = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(where)
    except OSError as e:
        raise UsageError(
            f"--address {address} --port {port}: cannot listen there ({e.strerror or e})"
        ) from None


def volunteer_credentials(args: argparse.Namespace) -> dict[str, Any]:
    """Create or revoke one volunteer's Redis ACL user on the broker (admin connection)."""
    conn = connect(args)
    made = credentials.command(
        conn.store.redis,
        _volunteer_broker(conn.settings),
        args.name,
        revoke=args.revoke,
        host=args.host,
        quiet=args.json,
        replicas=_replicas(conn.settings),
    )
    if not args.revoke:  # `coordinator volunteers` shows how old each identity is
        identities.reinstate(conn.store.redis, args.name, "credentials")
    return made


def _volunteer_broker(settings: Settings) -> str:
    """The broker URL volunteers' credentials name: behind Sentinel, the sentinels'."""
    return settings.url if settings.sentinel is None else settings.sentinel.url()


def _replicas(settings: Settings) -> list[redis.Redis]:
    """Behind Sentinel, a client of each live replica: they get each ACL user too (ACLs do not replicate)."""
    if settings.sentinel is None:
        return []
    return [node_client(settings, node) for node in data_nodes(settings)[1:]]


def invite(args: argparse.Namespace) -> dict[str, Any]:
    """Store an invitation and print its token (admin connection)."""
    conn = connect(args)
    return invitations.command(
        conn.store.redis, conn.settings.url, args.uses, args.expires, args.host, quiet=args.json
    )


def volunteers(args: argparse.Namespace) -> dict[str, Any]:
    """List volunteer identities as the trusted side records them."""
    conn = connect(args)
    document = identities.collect(conn.store, conn.app)
    if not args.json:
        identities.print_volunteers(document)
    return document


def revoke(args: argparse.Namespace) -> dict[str, Any]:
    """Revoke one volunteer: its Redis user, connections, uploads, leases and un-merged copies."""
    conn = connect(args)
    result = revocation.revoke(conn.store, args.name, _replicas(conn.settings))
    if not args.json:
        print(
            f"revoked volunteer {args.name!r}: {result['uploads_deleted']} upload(s) deleted, "
            f"{result['leases_released']} lease(s) released, {result['accepted_withdrawn']} accepted "
            "copy(ies) withdrawn"
        )
    return result


def _post(conn: Connection, args: argparse.Namespace, config: RunConfig) -> dict[str, Any]:
    shards = args.shards or config.shards
    quorum = parse_quorum(args.quorum if args.quorum is not None else config.quorum, shards)
    deadline = float(args.deadline or config.deadline)
    privacy.check_round(config, conn.store.version(args.run), shards, quorum)
    info = _post_round(conn.store, conn.app, args.run, shards, quorum, deadline)
    posted = {
        "run": args.run,
        "round": info["round"],
        "shards": shards,
        "quorum": quorum,
        "deadline_seconds": deadline,
        "base_version": info["base_version"],
    }
    # so that restore can post it again if Redis loses it open
    _note(lambda: ledger.round_opened(conn.settings.home, args.run, posted), f"round {info['round']}")
    return posted


def _note(write: Callable[[], None], what: str) -> None:
    """Write a round's record on disk; a disk that refuses is a warning (the round is in Redis already)."""
    try:
        write()
    except OSError as e:
        log.warning("%s is in Redis, but its record on disk could not be written (%s)", what, e)


def _wait(store: Store, run_name: str, number: int, shards: int, quiet: bool) -> dict[str, Any]:
    with RoundProgress(run_name, number, shards, quiet=quiet) as progress:
        return wait_round(store, run_name, number, progress.update)
