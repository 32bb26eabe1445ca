"""quickstart: one command trains end to end and leaves nothing running."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, TINY_CHARLM, png_pixels, wait_until

# the report of a run without privacy: two panels, 11 x 4.4 inches at 110 dpi (coordinator.views.report)
REPORT_PIXELS = (484, 1210)


def _processes_mentioning(marker: str) -> list[int]:
    """Pids whose command line or environment names ``marker`` (our temp home)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            text = (entry / "cmdline").read_bytes() + (entry / "environ").read_bytes()
        except OSError:
            continue
        if marker.encode() in text:
            found.append(int(entry.name))
    return found


def _quickstart(home: Path, *flags: str) -> subprocess.Popen:
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), "CROWDTRAIN_HOME": str(home)}
    env["OMP_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"]  # one torch thread a process (tests/conftest.py)
    return subprocess.Popen(
        [sys.executable, "-m", "cli.coordinator", "quickstart", *flags],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=home.parent,
    )


def test_quickstart_trains_writes_the_report_and_stops_everything(tmp_path):
    home = tmp_path / "home"
    process = _quickstart(
        home, "--rounds", "2", "--volunteers", "1", "--local-steps", "5", *TINY_CHARLM, "--json"
    )
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    document = json.loads(out)
    assert [r["model_version"] for r in document["rounds"]] == [1, 2]
    assert document["rounds"][-1]["eval_loss"] < document["initial"]["eval_loss"]
    assert Path(document["report"]) == home / "runs" / "quickstart" / "report.png"
    assert Path(document["report"]).stat().st_size > 10_000
    assert png_pixels(Path(document["report"])).shape[:2] == REPORT_PIXELS
    # quickstart's own exit is the event: it waits for every process it started before it ends
    assert _processes_mentioning(str(home)) == []


def test_quickstart_interrupted_with_ctrl_c_stops_everything_it_started(tmp_path):
    home = tmp_path / "home"
    process = _quickstart(home, "--rounds", "50", "--volunteers", "2", *TINY_CHARLM)
    wait_until(
        lambda: _first_version(home) or process.poll() is not None,
        "quickstart to save version 1",
        poll=0.2,
    )
    assert process.poll() is None, process.stderr.read()[-3000:]
    process.send_signal(signal.SIGINT)
    assert process.wait(60) == 130
    assert _processes_mentioning(str(home)) == []  # as above: stopped before quickstart ended


def _first_version(home: Path) -> bool:
    return any((home / "runs").glob("quickstart/model-v000001.safetensors"))
