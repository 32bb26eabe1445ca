"""A run's settings: one typed table, declared once, read everywhere.

``coordinator init`` writes a run's settings (msgpack under ``ct:run:RUN:config``
in Redis, ``config.json`` beside its checkpoints); the aggregator, the
volunteers, quickstart and every command read them back as a ``RunConfig``.
Each setting is one field below with its type, default, check and help
(``setting``); init's flags are built from the same fields
(``add_init_flags``), so a default cannot disagree between the side that
writes a run and the sides that read it.

The stored form is unchanged (the same keys, as plain msgpack/JSON), so runs
written by earlier versions still load: a key such a run lacks takes the
setting's ``absent`` value, what that version did without it (``verify``:
``none``; ``inner_state``: ``reset``), which is not always today's default.
A key this version does not know is kept as it was (``extras``).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from broker.arguments import float_in, int_in
from broker.routing import DEVICE_CLASSES, MEMORY_TIERS_GB, Need

MAX_SHARDS = 10_000
MAX_LOCAL_STEPS = 1_000_000
MAX_DEADLINE = 7 * 24 * 3600.0
MAX_SEED = 2**63 - 1
# init's compression: top-k of the large tensors, the rest lossless, chosen on a matrix of jobs
# (bench/defaults.py) and the bytes to a target loss (docs/BENCHMARKS.md sections 4 and 12).
DEFAULT_COMPRESSION = "topk:0.01+int2@4096"
DEFAULT_STRATEGY = "fedavg"
DEFAULT_SHARDS = 4
DEFAULT_DEADLINE = 600.0
DEFAULT_LEASE_SECONDS = 20.0
DEFAULT_MAX_SHARE = 0.5  # of a round's shards, while two or more volunteers are online
# Above this many voices a probed round judges a sample (``init --probe-voices``). Measured
# (docs/BENCHMARKS.md, "Sampled probe judging"): a judged voice costs 2x (the small jobs) to
# 11x (charlm, 0.86M parameters) and 41x (gpt nano) what an unjudged one does; 32 judged
# charlm voices take about 7 s of a core, beside about 19 s for 1,000 voices' decodes and
# sketches, and every sample still holds 16 trusted voices.
DEFAULT_PROBE_VOICES = 32
# The fewest: the sample's medians rest on at least MIN_PROBE_VOICES / 2 trusted voices.
MIN_PROBE_VOICES = 8
DEFAULT_MAX_STALENESS = 8
DEFAULT_DP_DELTA = 1e-5
DEFAULT_DP_CLIP_LR = 0.2
VERIFY_MODES = ("probe", "none")
OUTLIER_MODES = ("keep", "drop")  # --outliers: coordinator.merging.sybils.outliers
MODES = ("sync", "async")
OPTIMIZERS = ("adamw", "sgd")
INNER_STATES = ("keep", "reset")
DATA_SOURCES = ("coordinator", "volunteer")
# Outer strategies with momentum, for which a volunteer's inner optimizer starts afresh each
# shard by default (--inner-state): measured with bench/inner_state.py (docs/BENCHMARKS.md,
# "Inner optimizer state"), keeping it helped fedavg (0.968x the loss) and hurt diloco (1.034x).
OUTER_MOMENTUM = ("diloco", "fedavgm", "fedadam")
COMPRESSION_HELP = (
    "none | fp16 | bf16 | int8 | topk:F | topk:F+int8 | topk:F+int4 | topk:F+int2 (F a fraction, e.g. 0.01), "
    "optionally with a size policy @N[:SMALL]: tensors of fewer than N elements go SMALL (none, fp16, "
    "bf16 or int8; default none), e.g. topk:0.01+int2@4096"
)
_MISSING = object()


@dataclass(frozen=True)
class Setting:
    """How one run setting is given on init's command line and read back from a stored run."""

    help: str = ""
    flag: bool = True  # init has a flag for it
    option: str | None = None  # the flag's spelling, when it is not --NAME-WITH-DASHES
    parse: Callable[[str], Any] | None = None  # the flag's argparse type: its check
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    absent: Any = _MISSING  # what a stored run without the key means (default: the default)
    kind: type | None = None  # what a stored number is made (msgpack keeps 30.0 as 30 where JSON did)


def setting(default: Any, **how: Any) -> Any:
    """A ``RunConfig`` field: its default and how it is parsed, checked and documented."""
    spec = Setting(**how)
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"setting": spec})
    return field(default=default, metadata={"setting": spec})


@dataclass(frozen=True)
class RunConfig:
    """A run's settings as ``init`` stored them; every reader goes through this."""

    # --- what is trained, and how a volunteer trains it
    job: str = setting("", flag=False, help="a built-in job or package.module:factory")
    job_args: dict[str, Any] = setting({}, flag=False, help="keyword arguments of the job's factory")
    local_steps: int = setting(
        10, parse=int_in(1, MAX_LOCAL_STEPS), help=f"optimizer steps per shard, 1 to {MAX_LOCAL_STEPS}"
    )
    lr: float = setting(
        3e-3, kind=float, parse=float_in(0, 10), help="the volunteers' inner learning rate, > 0 and <= 10"
    )
    optimizer: str = setting("adamw", choices=OPTIMIZERS, help="the volunteers' inner optimizer")
    inner_state: str | None = setting(
        None,
        absent="reset",
        choices=INNER_STATES,
        help="keep: a volunteer's inner optimizer goes on from the state its previous shard of the "
        "run left (moments, step count); reset: from zero every shard. Default: keep, or reset "
        f"with an outer strategy that has momentum ({', '.join(OUTER_MOMENTUM)}) or --work-check, "
        "as measured",
    )
    shard_seconds: float | None = setting(
        None,
        kind=float,
        parse=float_in(0, MAX_DEADLINE),
        help="time budget of a shard: train until this many seconds have passed or --local-steps "
        "are done, whichever is first (at least one step); deltas weigh by the samples they trained",
    )
    data: str = setting(
        "coordinator",
        choices=DATA_SOURCES,
        help="whose data shards train on: the job's own shards, or only volunteers' own data "
        "(volunteer start --data); a volunteer with --data uses its own data either way",
    )
    seed: int = setting(0, parse=int_in(0, MAX_SEED), help="the seed of the model and of the shards' data")
    # --- the wire
    compression: str = setting(
        DEFAULT_COMPRESSION,
        help=COMPRESSION_HELP + f" (default {DEFAULT_COMPRESSION}: tensors of 4096 elements or more "
        "(one top-k block) top-k, smaller ones (biases, norm gains, a small model) lossless; chosen on a "
        "matrix of jobs, docs/BENCHMARKS.md section 12)",
    )
    downlink_compression: str | None = setting(
        None,
        metavar="SPEC",
        help="how each new version is also published, as an update from the one before, for "
        "volunteers that hold it (default: --compression; a lossless spec publishes whole models only)",
    )
    # --- the merge
    strategy: str = setting(DEFAULT_STRATEGY, help="the outer strategy")
    server_lr: float | None = setting(
        None, kind=float, parse=float_in(0, 100), help="the strategy's learning rate, > 0 and <= 100"
    )
    momentum: float | None = setting(
        None,
        kind=float,
        parse=float_in(0, 1, low_ok=True, high_ok=False),
        help="the strategy's momentum, 0 <= m < 1",
    )
    clip_norm: float | None = setting(
        None, kind=float, parse=float_in(0, float("inf")), help="clip each delta to this L2 norm (> 0)"
    )
    max_norm_ratio: float = setting(
        10.0,
        kind=float,
        parse=float_in(0, 1e6),
        help="reject deltas whose norm exceeds this multiple of the round median (> 0 and <= 1e6)",
    )
    min_voices: int = setting(
        1,
        parse=int_in(1, MAX_SHARDS),
        metavar="K",
        help="merge a round (or asynchronous buffer) only with deltas of at least K volunteers; "
        "one that ends with fewer fails, the model unchanged (default 1)",
    )
    # --- judging and proof of work
    verify: str = setting(
        "probe",
        absent="none",
        choices=VERIFY_MODES,
        help="probe: weigh each volunteer's delta by its effect on a fixed probe set and reject "
        "those far less useful than the round's others (default); none: norms and strategy only",
    )
    probe_voices: int = setting(
        DEFAULT_PROBE_VOICES,
        parse=int_in(MIN_PROBE_VOICES, MAX_SHARDS),
        metavar="N",
        help="with --verify probe, judge every voice of a round of at most N voices; above N, every "
        "new or low-reputation voice plus a random sample of the rest, drawn once the uploads are in "
        f"({MIN_PROBE_VOICES} <= N <= {MAX_SHARDS}, default {DEFAULT_PROBE_VOICES}: docs/SECURITY.md)",
    )
    replicate: float = setting(
        0.0,
        kind=float,
        parse=float_in(0, 1, low_ok=True),
        metavar="F",
        help="post this fraction of each round's shards twice, to two volunteers, and compare "
        "the deltas; on a mismatch the one the probe likes less is rejected (0 <= F <= 1)",
    )
    work_check: float = setting(
        0.0,
        kind=float,
        parse=float_in(0, 1, low_ok=True),
        metavar="RATE",
        help="replay a random sample of shards on the aggregator and reject those whose delta does not "
        "match the claimed training ('work'): RATE of a known volunteer's shards, more of a new one's "
        "(0 <= RATE <= 1, default 0: off; needs --inner-state reset and the job's own data; GPU "
        "volunteers then train in float32)",
    )
    outliers: str = setting(
        "keep",
        choices=OUTLIER_MODES,
        help="drop: merge at weight 0 the voices outside each round's densest majority by cosine "
        "distance (FLAME-style, rounds of 3 or more voices): bounds a backdoor trained on data of "
        "its own, leaves some honest voices' data unused each round; keep: merge every voice (default)",
    )
    # --- rounds
    shards: int = setting(
        DEFAULT_SHARDS,
        parse=int_in(1, MAX_SHARDS),
        help=f"default for the run's rounds: shard jobs per round, 1 to {MAX_SHARDS}",
    )
    quorum: str | int | float | None = setting(
        None,  # checked against --shards by coordinator.rounds.posting.parse_quorum
        help="default for the run's rounds: accepted shards needed: a count, or a fraction like 0.75 "
        "(default all)",
    )
    deadline: float = setting(
        DEFAULT_DEADLINE,
        kind=float,
        parse=float_in(0, MAX_DEADLINE),
        help="default for the run's rounds: seconds before the round is merged with what it has "
        f"(> 0, at most {MAX_DEADLINE:.0f})",
    )
    lease_seconds: float = setting(
        DEFAULT_LEASE_SECONDS,
        kind=float,
        parse=float_in(0, MAX_DEADLINE),
        option="--lease",
        metavar="SECONDS",
        help="how long a volunteer holds a shard it was given without renewing it (it renews every "
        "third of this while it trains); a shard whose lease lapses is offered again at once, one "
        "that nobody takes after min(10, SECONDS/2) s too, and one whose lease is refused (the fair "
        "share, a failed capability claim) at once, at most once per shard per that period "
        f"(default {DEFAULT_LEASE_SECONDS:g})",
    )
    max_share: float = setting(
        DEFAULT_MAX_SHARE,
        kind=float,
        parse=float_in(0, 1),
        metavar="F",
        help="the most of a round's shards one volunteer may hold while another volunteer is online: "
        f"ceil(F * shards), at least 1 and never all of them; 1: no limit (0 < F <= 1, default "
        f"{DEFAULT_MAX_SHARE:g})",
    )
    mode: str = setting(
        "sync",
        choices=MODES,
        help="sync: rounds, each merged once its quorum is in; async: no round barrier, every "
        "--buffer accepted deltas make a version whatever version they were trained on (FedBuff)",
    )
    buffer: int | None = setting(
        None,
        parse=int_in(1, MAX_SHARDS),
        metavar="K",
        help="async: accepted deltas per new version (needed with --mode async)",
    )
    max_staleness: int | None = setting(
        None,
        parse=int_in(0, 10**6),
        metavar="S",
        help=f"async: reject a delta trained more than S versions ago (default {DEFAULT_MAX_STALENESS}); "
        "younger ones weigh samples / sqrt(1 + staleness)",
    )
    # --- where shards go, and models bigger than a volunteer
    require: str | None = setting(
        None,
        choices=DEVICE_CLASSES,
        help="train this run's shards only on volunteers with an accelerator (CUDA or MPS)",
    )
    min_memory_gb: float | None = setting(
        None,
        kind=float,
        parse=float_in(0, MEMORY_TIERS_GB[-1]),
        metavar="X",
        help="train this run's shards only on volunteers whose device has at least X GB "
        f"(rounded up to one of {', '.join(map(str, MEMORY_TIERS_GB))})",
    )
    slices: int = setting(
        1,
        parse=int_in(1, MAX_SHARDS),
        metavar="S",
        help="split the model's trainable tensors into S slices balanced by parameter count; shard i "
        "of a round trains slice i mod S only, so a volunteer needs memory for the model and one "
        "slice's gradients and optimizer state (default 1: the whole model)",
    )
    shard_memory_gb: float | None = setting(None, kind=float, flag=False, help="GB one shard needs")
    slice_tensors: list[list[str]] | None = setting(None, flag=False, help="each slice's tensor names")
    # --- differential privacy (docs/PRIVACY.md)
    dp_clip: float | None = setting(
        None,
        kind=float,
        parse=float_in(0, 1e6),
        metavar="C",
        help="clip each volunteer's delta of a round to this L2 norm",
    )
    dp_noise: float | None = setting(
        None,
        kind=float,
        parse=float_in(0, 1e6, low_ok=True),
        metavar="Z",
        help="Gaussian noise of standard deviation Z*C on the sum of clipped deltas",
    )
    dp_delta: float = setting(
        DEFAULT_DP_DELTA,
        kind=float,
        parse=float_in(0, 1, high_ok=False),
        metavar="D",
        help=f"the delta of (epsilon, delta)-DP (default {DEFAULT_DP_DELTA:g})",
    )
    dp_epsilon: float | None = setting(
        None,
        kind=float,
        parse=float_in(0, 1e6),
        metavar="E",
        help="privacy budget: no round may take epsilon above E",
    )
    dp_population: int | None = setting(
        None,
        parse=int_in(1, 10**9),
        metavar="N",
        help="volunteers a round samples from: sampling rate q = quorum/N (default q = 1)",
    )
    dp_quantile: float | None = setting(
        None,
        kind=float,
        parse=float_in(0, 1, high_ok=False),
        metavar="Q",
        help="adaptive clipping (Andrew et al. 2021): move C each round toward the Q-quantile of the "
        "voices' norms, --dp-clip being its start; the noised count it needs is accounted in epsilon",
    )
    dp_clip_lr: float | None = setting(
        None,
        kind=float,
        parse=float_in(0, 10),
        metavar="ETA",
        help=f"adaptive clipping's rate ({DEFAULT_DP_CLIP_LR:g})",
    )
    dp_count_noise: float | None = setting(
        None,
        kind=float,
        parse=float_in(0, 1e6),
        metavar="S",
        help="noise std on the count of unclipped voices (default: the round's quorum / 20)",
    )
    # --- where the run's blobs live (init --blob-store)
    blob_store: str | None = setting(None, flag=False, help="the run's S3 location")
    upload_bound: int | None = setting(None, flag=False, help="the largest upload the store accepts")
    # --- what init recorded
    initial: dict[str, float] = setting({}, flag=False, help="version 0's evaluation")
    initial_digest: str | None = setting(None, flag=False, help="sha256 of version 0's wire bytes")
    created_at: float | None = setting(None, kind=float, flag=False, help="when init ran")
    branched_from: dict[str, Any] | None = setting(None, flag=False, help="init --from's run and version")
    fused_from: dict[str, Any] | None = setting(None, flag=False, help="fuse --method average's members")
    # keys this version does not know, kept as they were stored
    extras: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_stored(cls, stored: Mapping[str, Any]) -> RunConfig:
        """A run's settings from its stored form; absent keys as the version that wrote it meant them.

        ValueError if ``stored`` is no mapping of settings (a damaged config.json).
        """
        if not isinstance(stored, Mapping) or not all(isinstance(k, str) for k in stored):
            raise ValueError("a run's settings are a mapping of names to values")
        known = {f.name: f for f in _settings()}
        values: dict[str, Any] = {}
        for name, spec in known.items():
            how: Setting = spec.metadata["setting"]
            if name in stored:
                values[name] = _as_kind(stored[name], how.kind)
            elif how.absent is not _MISSING:
                values[name] = how.absent
        extras = {k: v for k, v in stored.items() if k not in known}
        return cls(**values, extras=extras)

    def stored(self) -> dict[str, Any]:
        """The plain form ``init`` writes (msgpack in Redis, JSON on disk): every setting and the extras."""
        plain = {f.name: getattr(self, f.name) for f in _settings()}
        return {**plain, **self.extras}

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with ``changes`` (names of settings)."""
        return dataclasses.replace(self, **changes)

    # --- what several readers derive from the settings, derived once
    @property
    def is_async(self) -> bool:
        return self.mode == "async"

    @property
    def buffer_size(self) -> int:
        """An asynchronous run's --buffer (init refuses --mode async without one)."""
        if self.buffer is None:
            raise ValueError("an asynchronous run's settings have no buffer")
        return self.buffer

    @property
    def is_sliced(self) -> bool:
        return self.slices > 1

    @property
    def is_private(self) -> bool:
        return self.dp_clip is not None

    @property
    def keeps_inner_state(self) -> bool:
        return self.inner_state == "keep"

    @property
    def autocast(self) -> bool:
        """Whether a CUDA volunteer may train under bf16 autocast: not when shards are replayed
        (``--work-check``), whose float32 replay bf16's rounding drifts too far from."""
        return not self.work_check

    @property
    def need(self) -> Need:
        """What the run asks of the volunteers that train it (runs made before routing ask nothing)."""
        return Need(self.require, int(self.min_memory_gb or 0))

    @property
    def staleness_limit(self) -> int:
        return DEFAULT_MAX_STALENESS if self.max_staleness is None else self.max_staleness


def default_inner_state(strategy: str, work_check: float = 0.0) -> str:
    """``keep`` unless the outer strategy has momentum of its own, or shards are replayed (then ``reset``)."""
    if work_check or strategy.split(":")[0] in OUTER_MOMENTUM:
        return "reset"
    return "keep"


def _settings() -> tuple[dataclasses.Field, ...]:
    return tuple(f for f in dataclasses.fields(RunConfig) if "setting" in f.metadata)


def _as_kind(value: Any, kind: type | None) -> Any:
    """A stored number as its setting's type (an int where a float is meant, as msgpack keeps 30.0)."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def setting_of(name: str) -> Setting:
    """How the setting ``name`` is parsed and documented."""
    spec: Setting = next(f for f in _settings() if f.name == name).metadata["setting"]
    return spec


def default_of(name: str) -> Any:
    """The setting's default: what ``init`` gives a run that does not name it."""
    return getattr(RunConfig(), name)


def flag_names() -> tuple[str, ...]:
    """The settings init takes as flags, in the table's order."""
    return tuple(f.name for f in _settings() if f.metadata["setting"].flag)


def add_init_flags(
    parser: argparse.ArgumentParser | Any,
    names: tuple[str, ...],
    helps: Mapping[str, str] | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> None:
    """Add ``--NAME`` for each setting in ``names`` to ``parser``, as the table declares it.

    ``helps`` and ``defaults`` replace a setting's own for one command: post-round's
    ``--shards`` defaults to None, "what the run has", not to init's default.
    """
    for name in names:
        how = setting_of(name)
        options: dict[str, Any] = {
            "default": (defaults or {}).get(name, default_of(name)),
            "help": (helps or {}).get(name, how.help),
        }
        if how.parse is not None:
            options["type"] = how.parse
        if how.choices is not None:
            options["choices"] = how.choices
        if how.metavar is not None:
            options["metavar"] = how.metavar
        parser.add_argument(how.option or "--" + name.replace("_", "-"), dest=name, **options)
