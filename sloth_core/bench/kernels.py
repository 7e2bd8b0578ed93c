"""``sloth bench kernels``: every op, forward + backward, against eager and compiled torch.

Systems, all in one run on the same inputs:
- ``sloth``: what the op registry resolves to (the installed kernel set, if any);
- ``eager``: the core's torch reference;
- ``compile``: ``torch.compile`` of the reference;
- ``bitsandbytes``: its own ``dequantize_4bit``, for ``dequantize_nf4``.
"""

from __future__ import annotations

import gc
import importlib.util
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from sloth_core.bench.kernel_cases import (
    Shapes,
    all_cases,
    saved_activation_bytes,
    saved_bytes_after_norm,
)
from sloth_core.bench.timing import copy_bandwidth, cuda_graph, measure
from sloth_core.ops import OpRegistry


@dataclass
class SystemResult:
    system: str
    provider: str
    median_ms: float | None = None
    peak_mib: float | None = None
    gbps: float | None = None
    saved_mib: float | None = None
    saved_after_norm_mib: float | None = None
    graphed: bool = False
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class CaseResult:
    name: str
    op: str
    results: list[SystemResult] = field(default_factory=list)

    def get(self, system: str) -> SystemResult | None:
        return next((r for r in self.results if r.system == system and r.error is None), None)

    def speedup(self, baseline: str = "eager") -> float | None:
        mine, base = self.get("sloth"), self.get(baseline)
        if mine is None or base is None or not mine.median_ms:
            return None
        assert base.median_ms is not None  # measured: get() skips the failed
        return base.median_ms / mine.median_ms

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "op": self.op,
            "results": [r.as_dict() for r in self.results],
            "speedup_vs_eager": self.speedup("eager"),
            "speedup_vs_compile": self.speedup("compile"),
            "speedup_vs_baselines": {
                r.system: self.speedup(r.system)
                for r in self.results
                if r.system not in ("sloth", "eager", "compile")
            },
        }


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_kernel_bench(
    registry: OpRegistry,
    shapes: Shapes,
    *,
    runs: int = 20,
    warmup: int = 5,
    compile: bool = True,
    only: set[str] | None = None,
    progress: Any = None,
    graph: bool = True,
) -> dict[str, Any]:
    """Time every case; returns plain data (also what ``--json`` writes)."""
    device = torch.device(shapes.device)
    nf4 = importlib.util.find_spec("bitsandbytes") is not None and device.type == "cuda"
    bandwidth = copy_bandwidth(device) if device.type == "cuda" else None
    cases = [(n, b) for n, b in all_cases(shapes, nf4=nf4) if not only or n in only]
    results = []
    for name, build in cases:
        case = build()
        impl = registry.resolve(case.op, device, shapes.dtype)
        reference = registry.reference(case.op)
        systems: list[tuple[str, str, Any]] = [("sloth", impl.provider, impl.fn),
                                               ("eager", "torch", reference)]  # fmt: skip
        if compile:
            systems.append(("compile", "torch.compile", torch.compile(reference)))
        systems += [(name, name, fn) for name, fn in case.baselines.items()]
        # Graph replays only where every system captures, so no ratio mixes device time
        # with time that includes host overhead.
        graph_case = (
            graph
            and device.type == "cuda"
            and all(cuda_graph(partial(case.run, fn), device) is not None for _, _, fn in systems)
        )
        result = CaseResult(name, case.op)
        for system, provider, fn in systems:
            entry = SystemResult(system, provider)
            try:
                m = measure(partial(case.run, fn), device, warmup=warmup, runs=runs,
                            graph=graph_case)  # fmt: skip
                entry.median_ms, entry.peak_mib, entry.graphed = m.median_ms, m.peak_mib, m.graphed
                if case.min_bytes:
                    entry.gbps = case.min_bytes / (m.median_ms * 1e-3) / 1e9
                if case.params and system != "compile":
                    entry.saved_mib = saved_activation_bytes(case, fn) / 2**20
                if case.from_norm is not None and system in ("sloth", "eager"):
                    norm = (registry.resolve("rms_norm", device, shapes.dtype).fn
                            if system == "sloth" else registry.reference("rms_norm"))  # fmt: skip
                    entry.saved_after_norm_mib = saved_bytes_after_norm(case, fn, norm) / 2**20
            except Exception as exc:  # one failing system must not lose the others' figures
                entry.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            result.results.append(entry)
            if progress is not None:
                progress(name, entry)
        results.append(result)
        del case
        _free()
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "shapes": {
            k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in shapes.__dict__.items()
        },
        "copy_bandwidth_gbps": bandwidth,
        "runs": runs,
        "graph": graph,
        "cases": [r.as_dict() for r in results],
    }


def markdown(report: dict[str, Any], command: str) -> str:
    """The report as the table docs/benchmarks.md carries, with the exact command."""
    bw = report["copy_bandwidth_gbps"]
    lines = [
        f"Device: {report['device']}, torch {report['torch']}; shapes {report['shapes']}; "
        f"median of {report['runs']} samples, forward + backward; "
        + (
            "CUDA-graph replays (device time) where capturable, marked *; "
            "the others as issued back to back."
            if report.get("graph")
            else "as issued."
        ),
        f"Measured copy bandwidth: {bw:.0f} GB/s." if bw else "",
        "",
        f"    {command}",
        "",
        "| op | sloth (impl) ms | eager ms | compile ms | vs eager | vs compile | "
        "% copy bw | peak MiB sloth / eager | saved MiB sloth / eager | "
        "saved beyond its producer MiB sloth / eager |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def fmt(value, spec=".3f"):
        return "-" if value is None else format(value, spec)

    def ms(r):
        return (
            "-"
            if not r or r.get("error")
            else fmt(r.get("median_ms")) + ("*" if r.get("graphed") else "")
        )

    for case in report["cases"]:
        by = {r["system"]: r for r in case["results"]}
        mine, eager, comp = by.get("sloth", {}), by.get("eager", {}), by.get("compile", {})
        pct = mine.get("gbps") / bw * 100 if bw and mine.get("gbps") else None
        extras = [r for r in case["results"] if r["system"] not in ("sloth", "eager", "compile")]
        note = "".join(
            f" ({r['system']} {ms(r)} ms, peak {fmt(r.get('peak_mib'), '.0f')} MiB)" for r in extras
        )
        lines.append(
            f"| {case['name']}{note} | {ms(mine)} ({mine.get('provider')}) | "
            f"{ms(eager)} | {ms(comp)} | "
            f"{fmt(case['speedup_vs_eager'], '.2f')}x | "
            f"{fmt(case['speedup_vs_compile'], '.2f')}x | {fmt(pct, '.0f')} | "
            f"{fmt(mine.get('peak_mib'), '.0f')} / {fmt(eager.get('peak_mib'), '.0f')} | "
            f"{fmt(mine.get('saved_mib'), '.0f')} / {fmt(eager.get('saved_mib'), '.0f')} | "
            f"{fmt(mine.get('saved_after_norm_mib'), '.0f')} / "
            f"{fmt(eager.get('saved_after_norm_mib'), '.0f')} |"
        )
    return "\n".join(lines) + "\n"
