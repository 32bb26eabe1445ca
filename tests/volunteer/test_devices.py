"""Tests for volunteer.devices: --device resolution, hardware description, speed score."""

from __future__ import annotations

import pytest
import torch

from volunteer.devices import describe_devices, pool_for, resolve_device, speed_score
from volunteer.errors import DeviceError

NO_CUDA = not torch.cuda.is_available()
NO_ACCELERATOR = NO_CUDA and not torch.backends.mps.is_available()


def test_cpu_resolves_to_the_cpu() -> None:
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(not NO_ACCELERATOR, reason="this machine has an accelerator")
def test_auto_falls_back_to_the_cpu_without_an_accelerator() -> None:
    assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "CUDA:1"])
def test_cuda_without_a_gpu_is_refused_with_the_fix(spec: str) -> None:
    with pytest.raises(DeviceError, match=r"no CUDA device is available.*use --device cpu or auto"):
        resolve_device(spec)


@pytest.mark.skipif(NO_CUDA, reason="needs CUDA")
def test_cuda_index_beyond_the_gpus_is_refused() -> None:
    with pytest.raises(DeviceError, match="CUDA device"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "cuda:-1", "", "cpu:0", "tpu"])
def test_a_malformed_spec_is_refused_naming_the_choices(spec: str) -> None:
    with pytest.raises(DeviceError, match="auto, cpu, cuda, cuda:N or mps"):
        resolve_device(spec)


def test_device_error_is_a_value_error() -> None:
    assert issubclass(DeviceError, ValueError)


def test_describe_devices_lists_the_cpu_first() -> None:
    devices = describe_devices()

    assert devices[0]["type"] == "cpu"
    assert devices[0]["name"]
    assert devices[0]["cores"] >= 1


def test_speed_score_is_a_positive_gflops_figure() -> None:
    assert speed_score(torch.device("cpu"), seconds=0.05) > 0


def test_speed_score_leaves_the_global_rng_untouched() -> None:
    torch.manual_seed(3)
    expected = torch.rand(2)
    torch.manual_seed(3)

    speed_score(torch.device("cpu"), seconds=0.01)

    assert torch.equal(torch.rand(2), expected)


@pytest.mark.parametrize(
    "device, pool", [("cpu", "prefork"), ("cuda", "solo"), ("cuda:1", "solo"), ("mps", "solo")]
)
def test_pool_for_never_forks_a_gpu_volunteer(device: str, pool: str) -> None:
    assert pool_for(torch.device(device)) == pool
