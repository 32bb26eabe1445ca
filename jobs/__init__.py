"""Jobs: what a run trains (model, data shards, loss, evaluation), used by both sides."""

from jobs.interface import (
    OUTPUT_KINDS,
    Job,
    JobError,
    batch_size,
    outputs_of,
    parameter_groups,
    reads_local_data,
    reuses_model,
    seeded,
)
from jobs.loader import BUILTIN_JOBS, load_job, parse_job_args

__all__ = [
    "BUILTIN_JOBS",
    "OUTPUT_KINDS",
    "Job",
    "JobError",
    "batch_size",
    "load_job",
    "outputs_of",
    "parameter_groups",
    "parse_job_args",
    "reads_local_data",
    "reuses_model",
    "seeded",
]
