"""Timers and memory figures shared by the engine, the offline runner and the benchmark."""

from __future__ import annotations

import time

import torch


def sync(device: torch.device) -> None:
    """Wait for queued GPU work so that a host timer measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def now() -> float:
    return time.perf_counter()


def gpu_memory(device: torch.device) -> dict:
    """Allocated / reserved / peak bytes on a CUDA device (zeros on the CPU)."""
    if device.type != "cuda":
        return {"allocated_bytes": 0, "reserved_bytes": 0, "peak_bytes": 0}
    return {
        "allocated_bytes": torch.cuda.memory_allocated(device),
        "reserved_bytes": torch.cuda.memory_reserved(device),
        "peak_bytes": torch.cuda.max_memory_allocated(device),
    }


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def mib(n: int | float) -> float:
    return round(n / 2**20, 1)
