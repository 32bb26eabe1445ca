"""A crowdtrain volunteer on Celery's thread pool (``volunteer start`` picks prefork on CPU).

    python bench/thread_volunteer.py --broker URL --threads 8 --name NAME --allow-job JOB

The same app and task as ``volunteer start`` (``tasks.training.volunteer_app``), only the
pool differs: ``-P threads -c N``, so N shards run in one process and share its model cache
(``bench/scale.py`` uses it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    import torch

    from broker.keys import TRAIN_QUEUE
    from broker.settings import Settings
    from jobs import BUILTIN_JOBS
    from tasks.training import volunteer_app
    from volunteer.worker import VolunteerOptions

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--broker", required=True)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--name", default="bench-threads")
    p.add_argument("--allow-job", action="append", default=[])
    args = p.parse_args()
    torch.set_num_threads(1)
    allowed = frozenset(args.allow_job) | frozenset(BUILTIN_JOBS)
    options = VolunteerOptions(name=args.name, device="cpu", allowed_jobs=allowed)
    app = volunteer_app(Settings.from_env(broker_url=args.broker), options)
    app.worker_main(
        [
            "worker",
            "-Q",
            TRAIN_QUEUE,
            "-n",
            f"{args.name}@%h",
            "-P",
            "threads",
            "-c",
            str(args.threads),
            "-E",
            "--loglevel=WARNING",
            "--without-mingle",
            "--without-gossip",
        ]
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
