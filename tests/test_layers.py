"""The layers a newcomer reads in docs/ARCHITECTURE.md hold in running processes too."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT

# What a volunteer process imports, and the side it must never load.
VOLUNTEER_ENTRY_POINTS = ["cli.volunteer", "volunteer.worker", "tasks.training"]
SHARED = ["serialization", "jobs", "broker"]


def loaded_after_import(module: str) -> list[str]:
    code = f"import sys, {module}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    return out.stdout.split()


@pytest.mark.parametrize("module", VOLUNTEER_ENTRY_POINTS)
def test_a_volunteer_process_never_loads_coordinator_code(module):
    loaded = loaded_after_import(module)
    assert module in loaded
    assert [m for m in loaded if m == "coordinator" or m.startswith("coordinator.")] == []
    assert "tasks.aggregation" not in loaded


@pytest.mark.parametrize("module", SHARED)
def test_the_shared_layers_load_neither_side_nor_celery_wiring(module):
    loaded = loaded_after_import(module)
    sides = [m for m in loaded if m.split(".")[0] in ("coordinator", "volunteer", "tasks")]
    assert sides == []
