"""A volunteer training one of four slices peaks at under half what a whole-model shard peaks.

Both measured in this test, on one volunteer process (solo pool: its tasks run
in the process measured), after a warm-up shard of a tiny model, with
``bench/memory_job.py``'s flat model of 50M float32 parameters in 8 tensors
(200 MB), one local step, ``--compression none``. The sliced shard is measured
first; the whole-model shard after it, when freed pages of the first may serve
it: if anything, that lowers the whole-model peak, against the ratio asserted.
"""

from __future__ import annotations

from tests.fixtures.memory import peak_bytes, reset_peak

JOB = "bench.memory_job:make_job"
PARAMS = 50_000_000


def test_a_sliced_shard_peaks_under_half_a_whole_model_shard(processes):
    processes.aggregator()
    volunteer = processes.volunteer("vol", "--pool", "solo", "--concurrency", "1", "--allow-job", JOB)
    processes.wait_online("aggregator", "vol")
    common = ["--job", JOB, "--job-arg", "tensors=8"]
    common += ["--compression", "none", "--verify", "none", "--local-steps", "1", "--deadline", "300"]
    peaks = {}
    # a first shard of a tiny model pays the process's first-task costs (imports, torch's first
    # step, thread pools) before anything is measured
    for run, params, slices in (("warm", 1000, 1), ("quarter", PARAMS, 4), ("whole", PARAMS, 1)):
        flags = ["--job-arg", f"params={params}", "--slices", str(slices), "--shards", str(slices)]
        processes.json("init", "--run", run, *common, *flags)
        idle = reset_peak(volunteer.pid)
        # one shard: slice 0 of the sliced run, the whole model of the other
        posted = processes.json("post-round", "--run", run, "--shards", "1", "--wait")
        assert posted["rounds"][0]["accepted"] == 1, processes.log_tail()
        peaks[run] = peak_bytes(volunteer.pid) - idle
    model = 4 * PARAMS
    quarter, whole = peaks["quarter"], peaks["whole"]
    print(
        f"volunteer peak above idle, 50M parameters: slice 1 of 4 {quarter >> 20} MiB = "
        f"{quarter / model:.2f}x, whole model {whole >> 20} MiB = {whole / model:.2f}x, "
        f"ratio {quarter / whole:.2f}"
    )
    assert peaks["quarter"] < 0.5 * peaks["whole"], peaks
