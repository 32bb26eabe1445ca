"""`volunteer info`: devices, a speed score for each, and what --device auto picks."""

from __future__ import annotations

import json
import os

import torch

from cli import volunteer as cli
from volunteer import devices as device_module
from volunteer.devices import resolve_device


def test_info_json_lists_the_cpu_with_its_cores_and_a_speed_score(capsys):
    # act
    code = cli.main(["info", "--json"])
    # assert
    assert code == 0
    out, _ = capsys.readouterr()
    document = json.loads(out)  # stdout holds the JSON document and nothing else
    cpu = next(d for d in document["devices"] if d["type"] == "cpu")
    assert cpu["cores"] == os.cpu_count()
    assert cpu["speed_gflops"] > 0
    assert document["default"] == str(resolve_device("auto"))
    if torch.cuda.is_available():
        gpus = [d for d in document["devices"] if d["type"] == "cuda"]
        assert len(gpus) == torch.cuda.device_count()
        assert all(d["name"] and d["memory_gb"] > 0 and d["speed_gflops"] > 0 for d in gpus)


def test_info_prints_one_line_per_device_and_the_auto_choice(capsys):
    # act
    code = cli.main(["info"])
    # assert
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("cpu ") and f"{os.cpu_count()} cores" in lines[0]
    assert "GFLOP/s" in lines[0]
    assert lines[-1] == f"--device auto picks {resolve_device('auto')}"


def test_info_shows_gpus_with_name_and_memory_and_survives_a_broken_one(capsys, monkeypatch):
    # arrange: a machine with two GPUs, the second of which fails its benchmark
    devices = [
        {"type": "cpu", "name": "Test CPU", "cores": 8},
        {"type": "cuda", "index": 0, "name": "NVIDIA H100", "memory_gb": 79.1, "capability": "9.0"},
        {"type": "cuda", "index": 1, "name": "NVIDIA H100", "memory_gb": 79.1, "capability": "9.0"},
    ]

    def score(device: torch.device) -> float:
        if device == torch.device("cuda", 1):
            raise RuntimeError("CUDA error: unspecified launch failure")
        return 50_000.0 if device.type == "cuda" else 20.0

    # the cli loads volunteer.devices (and torch) only when a command needs it
    monkeypatch.setattr(device_module, "describe_devices", lambda: [dict(d) for d in devices])
    monkeypatch.setattr(device_module, "speed_score", score)
    monkeypatch.setattr(device_module, "resolve_device", lambda spec: torch.device("cuda", 0))
    # act
    code = cli.main(["info"])
    # assert
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["cpu", "Test", "CPU,", "8", "cores", "20.0", "GFLOP/s", "(float32", "matmul)"]
    assert lines[1].startswith("cuda:0") and "NVIDIA H100, 79.1 GB" in lines[1]
    assert "50000.0 GFLOP/s" in lines[1]
    assert lines[2].startswith("cuda:1") and "speed unknown: CUDA error" in lines[2]
    assert lines[3] == "--device auto picks cuda:0"
