"""Timers and memory figures shared by the engine, the offline runner and the benchmark.

`devices` is one torch.device or several (a model that accelerate spread over GPUs: `Loaded.devices`):
timing waits for every one of them, and memory figures are summed over them, with a per-device
breakdown under "devices" when more than one GPU is involved.
"""

from __future__ import annotations

import time
from typing import Iterable, Union

import torch

Devices = Union[torch.device, Iterable[torch.device]]


def _cuda(devices: Devices) -> list[torch.device]:
    items = [devices] if isinstance(devices, torch.device) else list(devices)
    out: list[torch.device] = []
    for d in items:
        if d.type == "cuda" and d.index is None:
            d = torch.device("cuda", torch.cuda.current_device())
        if d.type == "cuda" and d not in out:
            out.append(d)
    return out


def sync(devices: Devices) -> None:
    """Wait for queued GPU work on every device so that a host timer measures it."""
    for d in _cuda(devices):
        torch.cuda.synchronize(d)


def now() -> float:
    return time.perf_counter()


def _one(d: torch.device) -> dict:
    return {
        "allocated_bytes": torch.cuda.memory_allocated(d),
        "reserved_bytes": torch.cuda.memory_reserved(d),
        "peak_bytes": torch.cuda.max_memory_allocated(d),
    }


def gpu_memory(devices: Devices) -> dict:
    """Allocated / reserved / peak bytes on the CUDA devices (zeros on the CPU), summed; with several
    GPUs, also "devices": {"cuda:N": {allocated, reserved, peak}} (the sum of peaks is an upper bound
    on a simultaneous peak)."""
    cuda = _cuda(devices)
    per = {str(d): _one(d) for d in cuda}
    total = {k: sum(m[k] for m in per.values()) for k in ("allocated_bytes", "reserved_bytes", "peak_bytes")}
    if len(per) > 1:
        total["devices"] = per
    return total


def reset_peak(devices: Devices) -> None:
    for d in _cuda(devices):
        torch.cuda.reset_peak_memory_stats(d)


def mib(n: int | float) -> float:
    return round(n / 2**20, 1)
