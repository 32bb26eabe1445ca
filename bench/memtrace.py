"""Run a crowdtrain command with its memory-heavy steps traced: RSS on entry and exit of each.

    python bench/memtrace.py OUT.jsonl MODULE [ARGS...]

For ``bench/memory.py --trace``. Before ``MODULE`` runs as ``__main__`` (``cli.coordinator``
or ``cli.volunteer``), the functions in ``STEPS`` are wrapped so that each call appends two
JSON lines to OUT.jsonl: ``{"step", "event": "enter"|"exit", "thread", "rss", "hwm", "t"}`` (KiB, from
``/proc/self/status``; ``hwm`` is the process's peak so far). A step whose exit ``hwm`` is
above its entry ``hwm`` reached a new peak inside. Names imported into a module
(``coordinator.merging.aggregator.loads``) are wrapped there, where the step calls them.
"""

from __future__ import annotations

import functools
import importlib
import json
import runpy
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# (module, attribute path) of every step traced, on both sides.
STEPS: tuple[tuple[str, str], ...] = (
    ("coordinator.merging.aggregator", "Aggregator.aggregate"),
    ("coordinator.merging.aggregator", "Aggregator._screen"),
    ("coordinator.merging.aggregator", "Aggregator._merge"),
    ("coordinator.merging.aggregator", "Aggregator._publishable"),
    ("coordinator.merging.aggregator", "Aggregator._voice"),
    ("coordinator.merging.aggregator", "Aggregator._delta"),
    ("coordinator.merging.aggregator", "loads"),
    ("coordinator.merging.aggregator", "publish"),
    ("coordinator.merging.aggregator", "read_residual"),
    ("coordinator.merging.aggregator", "checkpoints.save_version"),
    ("coordinator.runs.context", "RunContexts._build"),
    ("coordinator.runs.context", "RunContexts.model_blob"),
    ("coordinator.rounds.intake", "Intake.validate"),
    ("coordinator.rounds.intake", "_check"),
    ("coordinator.store", "Store.get_upload"),
    ("coordinator.store", "Store.take_upload"),
    ("coordinator.store", "Store.model_blob"),
    ("coordinator.store", "Store.stage_model"),
    ("coordinator.store", "Store.stage_update"),
    ("coordinator.store", "Store.downlink_residual"),
    ("coordinator.merging.strategies", "Strategy.aggregate"),
    ("broker.blobs", "write"),
    ("serialization.codecs", "BlockTopKCodec.encode_into"),
    ("serialization.codecs", "SparseCodec.decode"),
    ("volunteer.worker", "ShardRunner.run"),
    ("volunteer.worker", "ShardRunner._model"),
    ("volunteer.worker", "ShardRunner._built_here"),
    ("volunteer.worker", "ShardRunner._upload"),
    ("volunteer.worker", "train_shard"),
    ("volunteer.worker", "loads"),
    ("volunteer.worker", "apply_update"),
    ("volunteer.worker", "ShardRunner._from_updates"),
    ("volunteer.feedback", "ErrorFeedback.encode_stream"),
    ("volunteer.store", "VolunteerStore.model_blob"),
    ("volunteer.store", "VolunteerStore.put_upload"),
    ("bench.memory_job", "MemoryJob.build_model"),
    ("bench.memory_job", "MemoryJob.evaluate"),
    ("torch.optim", "AdamW.step"),
)

_lock = threading.Lock()


def status_kib() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in KiB."""
    found: dict[str, int] = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                found[line[:5]] = int(line.split()[1])
    return found.get("VmRSS", 0), found.get("VmHWM", 0)


def install(out: Path, side: str) -> None:
    """Wrap the steps of ``side`` (a module prefix; all when empty) to log to ``out``."""
    sink = open(out, "a", buffering=1)

    def log(step: str, event: str) -> None:
        rss, hwm = status_kib()
        thread = threading.current_thread().name
        line = json.dumps(
            {"step": step, "event": event, "thread": thread, "rss": rss, "hwm": hwm, "t": time.time()}
        )
        with _lock:
            sink.write(line + "\n")

    for module_name, path in STEPS:
        if side and not module_name.startswith((side, "bench", "torch", "broker", "serialization")):
            continue
        module = importlib.import_module(module_name)
        *owners, attr = path.split(".")
        owner: Any = module
        for name in owners:
            owner = getattr(owner, name)
        original = owner.__dict__.get(attr) if isinstance(owner, type) else None
        original = original or getattr(owner, attr)
        label = f"{module_name.rsplit('.', 1)[-1]}:{path}"
        setattr(owner, attr, _wrap(original, label, log))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    out, module = Path(args[0]), args[1]
    install(out, module.split(".")[0] if module.split(".")[0] in ("coordinator", "volunteer") else "")
    sys.argv = [module, *args[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    return 0


def _wrap(function: Callable[..., Any], label: str, log: Callable[[str, str], None]) -> Callable[..., Any]:
    @functools.wraps(function)
    def traced(*args: Any, **kwargs: Any) -> Any:
        log(label, "enter")
        try:
            return function(*args, **kwargs)
        finally:
            log(label, "exit")

    return traced


if __name__ == "__main__":
    raise SystemExit(main())
