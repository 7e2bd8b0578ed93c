"""Timing and memory measurement for benchmarks: medians of synchronised runs."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Measurement:
    """Median time of ``runs`` calls and the peak memory one call adds above its inputs."""

    median_ms: float
    runs: int
    peak_mib: float | None  # None on the CPU, where the allocator keeps no peak

    def as_dict(self) -> dict:
        return {"median_ms": self.median_ms, "runs": self.runs, "peak_mib": self.peak_mib}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    fn: Callable[[], object], device: torch.device | str, *, warmup: int = 5, runs: int = 20
) -> Measurement:
    """Run ``fn`` ``warmup`` times, then time ``runs`` calls, each synchronised."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    peak = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20
    times = []
    for _ in range(runs):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return Measurement(statistics.median(times), runs, peak)


def copy_bandwidth(device: torch.device | str, mib: int = 1024, runs: int = 20) -> float:
    """Measured device copy bandwidth in GB/s (bytes read + written per second)."""
    n = mib * 2**20 // 4
    src = torch.empty(n, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    result = measure(lambda: dst.copy_(src), device, warmup=3, runs=runs)
    return 2 * src.numel() * 4 / (result.median_ms * 1e-3) / 1e9
