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
    graphed: bool = False  # timed as CUDA-graph replays: device time, no host overhead

    def as_dict(self) -> dict:
        return {"median_ms": self.median_ms, "runs": self.runs, "peak_mib": self.peak_mib,
                "graphed": self.graphed}  # fmt: skip


def cuda_graph(fn: Callable[[], object], device: torch.device) -> Callable[[], object] | None:
    """``fn`` captured as a CUDA graph (its replay), or ``None`` if it cannot be captured.

    Code that synchronises with the host (``.item()``, data-dependent shapes) cannot be
    captured; it is then timed as issued, host overhead included.
    """
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    try:
        with torch.cuda.stream(stream):  # capture needs warm caches and a side stream
            for _ in range(3):
                fn()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except Exception:
        torch.cuda.synchronize(device)
        return None
    return graph.replay


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
    graph: bool = False,
) -> Measurement:
    """Median time per call of ``fn`` over ``runs`` samples, after ``warmup`` calls.

    On a GPU each sample times several calls back to back between two events (enough to
    last ``min_sample_ms``), as a training loop issues them: the host queues the next
    call while the device runs this one, so host overhead counts only where it really
    stalls the device. With ``graph`` the calls are CUDA-graph replays where ``fn`` can be
    captured: pure device time, what the kernels cost inside a long training step. The
    peak memory is read around one synchronised, uncaptured call.
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
    replay = cuda_graph(fn, device) if graph else None
    if replay is not None:
        fn = replay
        start.record()
        fn()
        end.record()
        end.synchronize()
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
    return Measurement(statistics.median(times), runs, peak, replay is not None)


def copy_bandwidth(device: torch.device | str, mib: int = 1024, runs: int = 20) -> float:
    """Measured device copy bandwidth in GB/s (bytes read + written per second)."""
    n = mib * 2**20 // 4
    src = torch.empty(n, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    result = measure(lambda: dst.copy_(src), device, warmup=3, runs=runs)
    return 2 * src.numel() * 4 / (result.median_ms * 1e-3) / 1e9
