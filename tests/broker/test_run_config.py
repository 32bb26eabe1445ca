"""A run's settings: one table that init's flags, the stored form and every reader share."""

from __future__ import annotations

import json

import msgpack
import pytest

from broker import run_config
from broker.run_config import RunConfig
from cli.coordinator import build_parser


def test_a_run_written_before_a_setting_existed_reads_as_that_version_ran_it():
    # what an early init stored: no verify, no inner state, no leases, no slices
    old = {"job": "charlm", "job_args": {}, "strategy": "fedavg", "compression": "none", "local_steps": 5}
    old |= {"lr": 0.003, "shards": 4, "quorum": None, "deadline": 60, "seed": 0}
    config = RunConfig.from_stored(old)
    assert config.verify == "none"  # probe judging came later: such a run was never probed
    assert config.inner_state == "reset" and not config.keeps_inner_state
    assert config.lease_seconds == run_config.DEFAULT_LEASE_SECONDS and config.slices == 1
    assert config.deadline == 60.0 and isinstance(config.deadline, float)  # msgpack kept 60.0 as 60
    assert config.need.queue == "train" and not config.is_async and not config.is_private


def test_the_stored_form_round_trips_and_keeps_what_this_version_does_not_know():
    config = RunConfig(job="charlm", lr=0.01, mode="async", buffer=3, max_staleness=2)
    stored = config.stored() | {"from_a_later_version": [1, 2]}
    again = RunConfig.from_stored(msgpack.unpackb(msgpack.packb(stored)))
    assert again == config and again.extras == {"from_a_later_version": [1, 2]}
    assert json.loads(json.dumps(again.stored())) == stored  # config.json holds the same
    assert again.is_async and again.buffer_size == 3 and again.staleness_limit == 2


def test_damaged_settings_are_a_value_error_not_a_crash_later():
    for damaged in ([1, 2], "text", {1: "x"}):
        with pytest.raises(ValueError, match="mapping"):
            RunConfig.from_stored(damaged)  # type: ignore[arg-type]


def test_inits_flags_default_to_the_table_and_parse_with_its_checks():
    parser = build_parser()
    args = parser.parse_args(["init", "--run", "r", "--job", "charlm"])
    for name in run_config.flag_names():
        assert getattr(args, name) == run_config.default_of(name), name
    args = parser.parse_args(["init", "--run", "r", "--lease", "7", "--dp-clip", "1.5", "--slices", "2"])
    assert (args.lease_seconds, args.dp_clip, args.slices) == (7.0, 1.5, 2)
    for bad in (["--lr", "0"], ["--probe-voices", "2"], ["--verify", "maybe"], ["--max-share", "1.5"]):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args(["init", "--run", "r", *bad])
        assert exit_info.value.code == 2, bad


def test_post_round_leaves_what_it_is_not_given_to_the_run():
    args = build_parser().parse_args(["post-round", "--run", "r"])
    assert (args.shards, args.quorum, args.deadline) == (None, None, None)
    assert build_parser().parse_args(["post-round", "--run", "r", "--shards", "9"]).shards == 9


def test_every_setting_says_what_it_is():
    for name in run_config.flag_names():
        assert run_config.setting_of(name).help, name
