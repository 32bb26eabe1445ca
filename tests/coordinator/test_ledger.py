"""A run's record on disk: the ledger adds up, rounds read back, folders moved aside are no runs."""

from __future__ import annotations

import torch

from broker.run_config import RunConfig
from cli.quickstart import _folders, _fresh_run_name
from coordinator.runs import checkpoints, ledger
from coordinator.runs.restore import runs_on_disk


def test_the_ledger_sums_credit_keeps_the_latest_reputation_and_skips_a_line_cut_short(tmp_path):
    book = ledger.Ledger(tmp_path)
    book.credit("a", "ann", {"shards_done": 2, "accepted": 2, "samples": 64}, seconds=1.5, device="cpu")
    book.reputations("a", {"ann": 0.6})
    book.credit("a", "ann", {"rejected": 1})
    book.reputations("b", {"ann": 0.4})  # another run judged her later
    with open(tmp_path / "runs" / "a" / ledger.LEDGER, "a") as f:
        f.write('{"kind": "credit", "volunteer": "ann", "counts": {"accepted": 9')  # a crash mid-line

    credit = ledger.credit_of(tmp_path, ["a"])["ann"]
    assert credit.counts == {"shards_done": 2, "accepted": 2, "samples": 64, "rejected": 1}
    assert credit.train_seconds == 1.5 and credit.device == "cpu" and credit.reputation == 0.6
    assert ledger.credit_of(tmp_path, ["a", "b"])["ann"].reputation == 0.4


def test_a_round_reads_back_as_open_until_its_end_is_recorded(tmp_path):
    ledger.round_opened(tmp_path, "a", {"round": 1, "shards": 2, "quorum": 2, "deadline_seconds": 60.0})
    ledger.round_ended(tmp_path, "a", {"round": 1, "status": "done", "model_version": 1})
    ledger.round_opened(tmp_path, "a", {"round": 2, "shards": 4, "quorum": 3, "deadline_seconds": 60.0})

    rounds = ledger.rounds_of(tmp_path, "a")
    assert rounds[1]["status"] == "done" and rounds[1]["model_version"] == 1
    assert rounds[2]["status"] == "open" and (rounds[2]["shards"], rounds[2]["quorum"]) == (4, 3)
    ledger.round_opened(tmp_path, "a", {"round": 1, "shards": 2})  # a stray repeat changes nothing
    assert ledger.rounds_of(tmp_path, "a")[1]["status"] == "done"


def test_a_version_comes_back_in_its_saved_order_and_a_moved_folder_is_no_run(tmp_path):
    weights = {"z.weight": torch.arange(3.0), "a.bias": torch.ones(2)}
    checkpoints.save_version(
        tmp_path, "r", 0, weights, None, RunConfig(job="tiny"), state={"voice_norms": [1.0]}
    )
    assert list(checkpoints.load_version(tmp_path, "r", 0)) == ["z.weight", "a.bias"]
    assert checkpoints.load_state(tmp_path, "r", 0) == {"voice_norms": [1.0]}
    assert runs_on_disk(tmp_path) == ["r"]

    moved = checkpoints.move_aside(tmp_path, "r")

    assert moved.name.startswith("r.moved-") and (moved / "model-v000000.safetensors").exists()
    assert runs_on_disk(tmp_path) == [] and not (tmp_path / "runs" / "r").exists()
    # quickstart picks a name that neither Redis nor a folder has
    checkpoints.save_version(tmp_path, "quickstart", 0, weights, None, RunConfig(job="tiny"))
    assert _fresh_run_name(["quickstart-2", *_folders(tmp_path)]) == "quickstart-3"


def test_a_forfeit_in_one_run_clears_the_credit_earned_before_it_in_every_run(tmp_path):
    book = ledger.Ledger(tmp_path)
    book.credit("a", "mallory", {"shards_done": 3, "accepted": 3, "samples": 96})
    book.reputations("a", {"mallory": 0.8})
    book.forfeit("b", "mallory")  # caught by a work check in run b
    book.credit("a", "mallory", {"shards_done": 1, "accepted": 1, "samples": 32})

    credit = ledger.credit_of(tmp_path, ["a", "b"])["mallory"]
    assert credit.counts == {"shards_done": 4, "accepted": 1, "samples": 32}
    assert credit.reputation == 0.0
    assert (
        ledger.credit_of(tmp_path, ["a"])["mallory"].counts["accepted"] == 4
    )  # run a alone knows no forfeit
