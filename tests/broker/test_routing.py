"""Capability routing: a run's need names one queue; a volunteer takes exactly the queues it meets."""

from __future__ import annotations

import pytest

from broker.routing import MEMORY_REFUSAL, SPEED_REFUSAL, Need, need_of, queue_need, queues_for, unservable
from broker.run_config import RunConfig


def test_a_run_without_needs_posts_to_train():
    assert need_of(None, None).queue == "train"
    assert RunConfig.from_stored({}).need.queue == "train"  # runs made before routing


def test_memory_needs_round_up_to_a_tier_and_name_the_queue():
    assert need_of(None, 10).queue == "train.12g"
    assert need_of("gpu", 16).queue == "train.gpu.16g"
    assert need_of("gpu", None).queue == "train.gpu"
    assert RunConfig.from_stored(need_of("gpu", 7).as_config()).need == Need("gpu", 8)


@pytest.mark.parametrize(
    ("require", "memory", "words"),
    [("tpu", None, "--require 'tpu'"), (None, 0, "above 0"), (None, 9999, "at most 512 GB")],
)
def test_a_need_that_cannot_be_met_is_refused_with_the_reason(require, memory, words):
    with pytest.raises(ValueError, match=words):
        need_of(require, memory)


def test_a_volunteer_takes_every_queue_it_meets_and_no_other():
    cpu = queues_for("cpu", 12.5)
    assert cpu[0] == "train"
    assert need_of(None, 10).queue in cpu and need_of(None, 12).queue in cpu
    assert need_of(None, 13).queue not in cpu
    assert not any("gpu" in q for q in cpu)
    gpu = queues_for("gpu", 24)
    assert {"train", "train.gpu", "train.gpu.24g", "train.24g"} <= set(gpu)
    assert "train.gpu.32g" not in gpu
    assert len(gpu) == len(set(gpu))


def test_a_queue_names_its_need_and_no_other_name_does():
    assert [queue_need(q) for q in ("train", "train.gpu", "train.8g", "train.gpu.16g")] == [
        Need(), Need("gpu"), Need(None, 8), Need("gpu", 16),
    ]  # fmt: skip
    assert all(queue_need(q) is None for q in ("train.7g", "train.tpu", "aggregate", "train.8g.gpu"))


def test_a_failed_claim_rules_out_every_queue_that_needs_as_much_or_more():
    queues = queues_for("gpu", 24)
    memory = f"{MEMORY_REFUSAL} (wrong product); 0.0 GB proven"
    assert unservable(queues, "train.gpu.8g", memory) == [
        "train.8g", "train.12g", "train.16g", "train.24g",
        "train.gpu.8g", "train.gpu.12g", "train.gpu.16g", "train.gpu.24g",
    ]  # fmt: skip
    assert unservable(queues, "train.gpu", f"{SPEED_REFUSAL} (answered late)") == [
        q for q in queues if q.startswith("train.gpu")
    ]
    # another capability refusal: the refused run's queue alone; never `train`, which needs nothing
    assert unservable(queues, "train.4g", "capability: something new") == ["train.4g"]
    assert unservable(queues, "train", f"{MEMORY_REFUSAL} (x)") == []
    assert unservable(queues, "train.gpu.8g", "share") == []
