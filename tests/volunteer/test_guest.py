"""The guest's parts without a broker: preferences, rules, throttle, checkpoints, socket, service."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from cli import volunteer as cli
from jobs import load_job
from tests.conftest import wait_until
from volunteer import control, service
from volunteer.board import Board
from volunteer.checkpoint import Checkpoints, ShardKey
from volunteer.etiquette import RESUME_CHARGE, Battery, Governor, Reading, Signals, Throttle
from volunteer.preferences import PreferenceError, Preferences, in_window, load, parse_hours
from volunteer.trainer import ShardDropped, train_shard

CPU = torch.device("cpu")
TINY = "tests.fixtures.jobs_tiny:make_job"


# --- the board -------------------------------------------------------------------
def _withdraw_in_a_trainer(board: Board) -> None:
    now = time.monotonic()
    board.withdraw("train.8g", "capability: memory claim failed (wrong product)", now + 60)
    board.withdraw("train.gpu", "capability: speed claim failed (answered late)", now - 1)  # over
    board.withdraw("train.8g", "capability: memory claim failed (no answer in time)", now + 90)


def test_a_queue_a_trainer_withdraws_is_read_by_the_main_process_until_its_time_is_up():
    import multiprocessing

    board = Board(slots=2)
    trainer = multiprocessing.get_context("fork").Process(target=_withdraw_in_a_trainer, args=(board,))
    trainer.start()
    trainer.join(30)
    assert trainer.exitcode == 0
    now = time.monotonic()
    ((queue, reason, until),) = board.withdrawn(now)  # one entry per queue: the latest
    assert (queue, reason) == ("train.8g", "capability: memory claim failed (no answer in time)")
    assert now + 80 < until <= now + 90
    assert board.withdrawn(now + 91) == []
    assert not board.paused and board.reasons() == []  # the pause flag is not touched


# --- preferences ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["--cpu-limit", "0"], "--cpu-limit 0"),
        (["--cpu-limit", "101"], "--cpu-limit 101"),
        (["--hours", "25-3"], "--hours 25-3"),
        (["--hours", "night"], "--hours 'night'"),
        (["--idle-minutes", "-1"], "--idle-minutes -1"),
        (["--config", "BROKEN"], "is not valid TOML"),
        (["--config", "UNKNOWN"], "unknown setting 'cpu_limt'"),
    ],
)
def test_a_bad_preference_is_one_line_and_exit_2_before_anything_starts(
    tmp_path, monkeypatch, capsys, argv, names
):
    # arrange: no broker anywhere; a bad preference must stop start before it looks for one
    (tmp_path / "BROKEN").write_text("cpu-limit = [unclosed\n")
    (tmp_path / "UNKNOWN").write_text("cpu_limt = 30\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CROWDTRAIN_HOME", str(tmp_path / "home"))
    # act
    code = cli.main(["start", "--broker", "redis://127.0.0.1:1/0", "--device", "cpu", *argv])
    # assert
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and names in err, err
    assert not (tmp_path / "home").exists()  # nothing written


def test_the_toml_file_gives_preferences_and_options_win(tmp_path):
    (tmp_path / "volunteer.toml").write_text(
        'cpu-limit = 50\nhours = "22-7"\nexclusive-app = ["steam"]\npause-on-battery = true\n'
    )
    prefs = load(None, tmp_path, {"cpu_limit": 25.0, "exclusive_apps": (), "pause_on_battery": None})
    assert prefs == Preferences(
        cpu_limit=25.0, hours=(22, 7), exclusive_apps=("steam",), pause_on_battery=True
    )
    assert load(None, tmp_path / "none", {}) == Preferences()  # no file: no rules


def test_the_hours_window_crosses_midnight():
    night = parse_hours("22-7")
    assert [h for h in range(24) if in_window(night, h)] == [0, 1, 2, 3, 4, 5, 6, 22, 23]
    assert all(in_window(parse_hours("0-24"), h) for h in range(24))
    with pytest.raises(PreferenceError):
        parse_hours("7-7")


# --- the governor -----------------------------------------------------------------
def test_on_battery_it_pauses_and_on_mains_waits_for_the_charge():
    governor = Governor(Preferences(pause_on_battery=True))
    states = [
        governor.reasons(Reading(battery=Battery(percent, plugged)))
        for percent, plugged in [(90, True), (60, False), (61, True), (RESUME_CHARGE, True), (50, True)]
    ]
    assert states == [[], ["battery"], ["battery"], [], []]
    assert governor.reasons(Reading(battery=None)) == []  # no battery: a desktop


def test_every_rule_that_holds_is_a_reason_in_a_fixed_order():
    prefs = Preferences(
        idle_minutes=5, pause_when_busy=50, exclusive_apps=("Game",), hours=(22, 7), pause_on_battery=True
    )
    governor = Governor(prefs, manual=True)
    reading = Reading(
        battery=Battery(40, False), idle_seconds=10, others_cpu=80, running=frozenset({"game"}), hour=12
    )
    assert governor.reasons(reading) == ["manual", "battery", "busy", "idle", "hours", "exclusive-app"]
    governor.manual = False
    calm = Reading(battery=Battery(100, True), idle_seconds=600, others_cpu=10, running=frozenset(), hour=23)
    assert Governor(prefs).reasons(calm) == []


def test_other_processes_cpu_use_makes_the_machine_busy():
    # arrange: the test's own processes keep every core busy (the volunteer's own use would not count)
    governor = Governor(Preferences(pause_when_busy=40))
    signals = Signals(governor.prefs, own=lambda: [os.getpid()])
    signals.read()
    burners = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(psutil.cpu_count() or 1)
    ]
    try:
        # act
        reading = wait_until(lambda: _busy(signals), "the burners to show", 30, poll=0.5)
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
    # assert
    assert reading.others_cpu > 40 and governor.reasons(reading) == ["busy"]


def _busy(signals: Signals) -> Reading | None:
    reading = signals.read()
    return reading if (reading.others_cpu or 0) > 60 else None


def test_the_throttle_holds_a_loop_to_its_share_of_cpu_time():
    throttle = Throttle(share=0.25, cpus=1)
    began_cpu, began = time.process_time(), time.monotonic()
    while time.monotonic() - began < 2.0:
        end = time.process_time() + 0.01
        while time.process_time() < end:
            pass
        throttle.pace(stop=lambda: False)
    share = (time.process_time() - began_cpu) / (time.monotonic() - began)
    assert 0.15 < share <= 0.30, share


def test_cpu_used_while_the_throttle_sleeps_is_charged_too():
    """torch's worker threads spin on after each step, inside the throttle's sleep: that time counts."""

    def burn(seconds: float) -> None:
        end = time.thread_time() + seconds
        while time.thread_time() < end:
            pass

    throttle = Throttle(share=0.25, cpus=1)
    began_cpu, began = time.process_time(), time.monotonic()
    while time.monotonic() - began < 2.0:
        burn(0.01)
        spinner = threading.Thread(target=burn, args=(0.02,))  # runs while the loop sleeps
        spinner.start()
        throttle.pace(stop=lambda: False)
        spinner.join()
    share = (time.process_time() - began_cpu) / (time.monotonic() - began)
    assert share <= 0.30, share


# --- checkpoints ------------------------------------------------------------------
def test_a_shard_saved_at_a_pause_and_resumed_in_a_new_process_trains_the_same_delta(tmp_path):
    job = load_job(TINY, allowed={TINY})
    weights = job.build_model().state_dict()
    common = dict(shard=0, shards=2, steps=6, lr=1e-2, device=CPU, seed=7)
    straight = train_shard(job, weights, **common)
    store, key = Checkpoints(tmp_path), ShardKey("r", 1, 0, 0)

    def stop_at_3(done, state):
        if done == 3:
            store.save(key, state())
            raise ShardDropped("killed while paused")
        return 0.0

    with pytest.raises(ShardDropped):
        train_shard(job, weights, **common, gate=stop_at_3)
    # act: a fresh model (a restarted process) goes on from the file
    resumed = train_shard(job, weights, **common, resume=store.load(key))
    # assert
    assert resumed.steps == straight.steps == 6 and resumed.samples == straight.samples
    for name in straight.delta:
        assert torch.equal(resumed.delta[name], straight.delta[name]), name
    assert store.load(ShardKey("r", 1, 0, 1)) is None  # another base version: not this shard's


# --- the control socket -----------------------------------------------------------
def test_the_control_socket_is_its_owners_alone_and_survives_a_malformed_request(tmp_path):
    server = control.ControlServer(tmp_path, "alice", lambda request: {"name": "alice", "state": "waiting"})
    server.start()
    try:
        place = control.folder(tmp_path)
        assert stat.S_IMODE(place.stat().st_mode) == 0o700
        assert stat.S_IMODE(server.path.stat().st_mode) == 0o600
        assert control.private(place) and control.private(server.path)
        for junk in (b"not json\n", b'{"command": "shutdown"}\n', b"[" * 3000 + b"\n", b"\xff\xfe\n"):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect(str(server.path))
                sock.sendall(junk)
                reply = sock.makefile("rb").read()
            assert reply.count(b"\n") == 1 and "error" in json.loads(reply), reply
        assert control.request(server.path, "status") == {"name": "alice", "state": "waiting"}
        assert control.running(tmp_path) == [server.path]
    finally:
        server.stop()
    with pytest.raises(control.ControlError):
        control.running(tmp_path)


def test_status_with_no_volunteer_running_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CROWDTRAIN_HOME", str(tmp_path))
    assert cli.main(["status", "--json"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and "no volunteer is running" in err


# --- the service ------------------------------------------------------------------
def test_install_service_prints_a_systemd_user_unit_that_restarts_on_failure(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("CROWDTRAIN_HOME", str(tmp_path / "home"))
    code = cli.main(["install-service", "--print", "--name", "alice", "--cpu-limit", "50", "--hours", "22-7"])
    unit = capsys.readouterr().out
    assert code == 0
    assert "cli.volunteer start --name alice --cpu-limit 50 --hours 22-7" in unit
    assert "Restart=on-failure" in unit and "WantedBy=default.target" in unit
    assert f'Environment="CROWDTRAIN_HOME={tmp_path / "home"}"' in unit
    assert not (tmp_path / "config").exists()  # --print writes nothing


def test_install_and_uninstall_service_write_and_remove_the_unit_in_the_users_config(tmp_path, monkeypatch):
    home = tmp_path / "home"
    unit = service.for_platform("linux", home, ["--name", "bob"], {}, str(tmp_path / "config"))
    path = unit.install(home)
    assert path == tmp_path / "config" / "systemd" / "user" / service.UNIT
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert unit.link is not None and unit.link.resolve() == path.resolve()
    assert unit.uninstall() == path and not path.exists() and not os.path.lexists(unit.link)
    agent = service.for_platform("darwin", home, ["--name", "bob"], {}, None)
    assert "<key>KeepAlive</key>" in agent.text and agent.path.name == "org.crowdtrain.volunteer.plist"


def test_install_service_refuses_bad_start_options_with_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    assert cli.main(["install-service", "--cpu-limit", "0"]) == 2
    assert "--cpu-limit 0" in capsys.readouterr().err
    assert not Path(tmp_path / "config").exists()
