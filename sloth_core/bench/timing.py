"""Timing and memory measurement for benchmarks: medians of synchronised runs."""

from __future__ import annotations

import math
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
    fn: Callable[[], object],
    device: torch.device | str,
    *,
    warmup: int = 5,
    runs: int = 20,
    min_sample_ms: float = 2.0,
) -> Measurement:
    """Median time per call of ``fn`` over ``runs`` samples, after ``warmup`` calls.

    On a GPU each sample times several calls back to back between two events (enough to
    last ``min_sample_ms``), as a training loop issues them: the host queues the next
    call while the device runs this one, so host overhead counts only where it really
    stalls the device. The peak memory is read around one synchronised call.
    """
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    if device.type != "cuda":
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return Measurement(statistics.median(times), runs, None)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20
    single = max(start.elapsed_time(end), 1e-3)
    inner = max(1, min(50, math.ceil(min_sample_ms / single)))
    times = []
    for _ in range(runs):
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return Measurement(statistics.median(times), runs, peak)


def copy_bandwidth(device: torch.device | str, mib: int = 1024, runs: int = 20) -> float:
    """Measured device copy bandwidth in GB/s (bytes read + written per second)."""
    n = mib * 2**20 // 4
    src = torch.empty(n, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    result = measure(lambda: dst.copy_(src), device, warmup=3, runs=runs)
    return 2 * src.numel() * 4 / (result.median_ms * 1e-3) / 1e9
