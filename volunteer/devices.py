"""Device detection for volunteers: resolve ``--device``, describe hardware, score speed.

``resolve_device`` and ``pool_for`` avoid initialising CUDA (they use
``torch.cuda.is_available`` / ``device_count`` only), so a CPU volunteer may
still fork its prefork pool afterwards. ``describe_devices`` and
``speed_score`` on a GPU do initialise it; call them from ``volunteer info`` or
inside a worker that never forks.
"""

from __future__ import annotations

import os
import platform
import re
import time

import torch

from volunteer.errors import DeviceError

_SPEC_HINT = "use auto, cpu, cuda, cuda:N or mps"
_MATMUL_SIZE = 512
_MAX_ITERATIONS = 100_000


def resolve_device(spec: str) -> torch.device:
    """Turn ``--device auto|cpu|cuda|cuda:N|mps`` into a device that exists here."""
    text = spec.strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", 0)
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "mps":
        if not _mps_available():
            raise DeviceError(
                f"--device {spec}: no Apple MPS device is available on this machine; use --device cpu or auto"
            )
        return torch.device("mps")
    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    if match is None:
        raise DeviceError(f"--device {spec!r} is not a device: {_SPEC_HINT}")
    if not torch.cuda.is_available():
        raise DeviceError(
            f"--device {spec}: no CUDA device is available on this machine; use --device cpu or auto"
        )
    index = int(match.group(1) or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceError(
            f"--device {spec}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}"
        )
    return torch.device("cuda", index)


def describe_devices() -> list[dict]:
    """List this machine's CPU and accelerators, for ``volunteer info`` and status."""
    devices: list[dict] = [{"type": "cpu", "name": _cpu_name(), "cores": os.cpu_count()}]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            devices.append(
                {
                    "type": "cuda",
                    "index": index,
                    "name": props.name,
                    "memory_gb": round(props.total_memory / 2**30, 1),
                    "capability": f"{props.major}.{props.minor}",
                }
            )
    if _mps_available():
        devices.append({"type": "mps", "name": "Apple GPU (MPS)"})
    return devices


def speed_score(device: torch.device, seconds: float = 0.5) -> float:
    """GFLOP/s of a float32 matmul loop on ``device``, run for about ``seconds``."""
    n = _MATMUL_SIZE
    gen = torch.Generator().manual_seed(0)  # private: the global RNG stays untouched
    a = torch.rand(n, n, generator=gen).to(device)
    b = torch.rand(n, n, generator=gen).to(device)
    torch.matmul(a, b)  # warm-up: kernels, allocator
    _synchronize(device)
    iterations = 0
    started = time.perf_counter()
    elapsed = 0.0
    while elapsed < seconds and iterations < _MAX_ITERATIONS:
        for _ in range(8):  # a few per clock read: cheap GPUs would otherwise time the clock
            torch.matmul(a, b)
        iterations += 8
        _synchronize(device)
        elapsed = time.perf_counter() - started
    return 2 * n**3 * iterations / max(elapsed, 1e-9) / 1e9


def device_class(device: torch.device) -> str:
    """``gpu`` for an accelerator (CUDA or MPS), else ``cpu``: what ``init --require`` names."""
    return "cpu" if device.type == "cpu" else "gpu"


def device_memory_gb(device: torch.device) -> float:
    """GB of memory a shard on ``device`` can use: the GPU's own, else the machine's RAM.

    On CUDA this initialises CUDA in the calling process (no pool may fork
    after it); Apple's MPS shares the machine's RAM.
    """
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / 2**30
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):  # not a POSIX system that reports it
        return 0.0


def pool_for(device: torch.device) -> str:
    """The Celery pool for a volunteer on ``device``: never fork a process that uses a GPU."""
    if device.type == "cpu":
        return "prefork"
    # One process trains one shard at a time: CUDA does not survive fork, and the
    # trainer seeds the per-process global RNG, which threads would share.
    return "solo"


def _mps_available() -> bool:
    """True where Apple's Metal backend exists and works."""
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def _synchronize(device: torch.device) -> None:
    """Wait for queued kernels so the timer measures work, not launches."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _cpu_name() -> str:
    """A readable CPU model name (``platform.processor`` is often empty on Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"
