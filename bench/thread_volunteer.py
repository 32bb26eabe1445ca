"""A crowdtrain volunteer on Celery's thread pool (``volunteer start`` picks prefork on CPU).

    python bench/thread_volunteer.py --broker URL --threads 8 --name NAME --allow-job JOB

The same app and task as ``volunteer start`` (``tasks.app.make_app`` with
``app.crowdtrain_volunteer``), only the pool differs: ``-P threads -c N``, so N shards run in
one process and share its model cache (``bench/scale.py`` uses it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    import torch

    from coordinator.jobs import BUILTIN_JOBS
    from tasks.app import TRAIN_QUEUE, make_app
    from tasks.config import Settings
    from volunteer.worker import VolunteerOptions

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--broker", required=True)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--name", default="bench-threads")
    p.add_argument("--allow-job", action="append", default=[])
    args = p.parse_args()
    torch.set_num_threads(1)
    app = make_app(Settings.from_env(broker_url=args.broker))
    allowed = frozenset(args.allow_job) | frozenset(BUILTIN_JOBS)
    app.crowdtrain_volunteer = VolunteerOptions(name=args.name, device="cpu", allowed_jobs=allowed)
    app.worker_main(["worker", "-Q", TRAIN_QUEUE, "-n", f"{args.name}@%h", "-P", "threads",
                     "-c", str(args.threads), "-E", "--loglevel=WARNING", "--without-mingle",
                     "--without-gossip"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
