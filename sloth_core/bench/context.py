"""``sloth bench train --max-context``: the longest sequence each system trains at batch 1.

For each system, the search (``max_fitting``) doubles the sequence length from a start
while one training step fits, then bisects between the last length that fit and the
first that did not, down to a granularity (256 tokens by default). Each probe is one
LoRA step (same model, LoRA and optimizer as ``sloth bench train``) **in its own
process**: an out-of-memory error leaves the allocator of the process it happened in in a
state no later probe should inherit.

"Fits" means the step ran and its peak stayed within the memory budget:

- CUDA: the budget defaults to the device's total memory; the probe caps its allocator
  at the budget (``torch.cuda.set_per_process_memory_fraction``) and checks
  ``torch.cuda.max_memory_allocated()`` (weights included) against it.
- CPU: without a budget a probe fits if it runs. With one, the measure is the growth of
  the process's peak resident set (``ru_maxrss``) from just before the model loads to
  after the step: it counts weights, activations and optimizer state as the GPU measure
  does, plus whatever the host allocator keeps, so it is an upper bound.

A probe that fails for another reason than memory stops that system's search and is
reported as its error: a bug is not a context limit.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sloth_core.bench.train import (
    SHAPES,
    SystemSkipped,
    make_model,
    resolve_systems,
    run_worker,
    versions,
)

GIB = 2**30


class ProbeError(RuntimeError):
    """A probe failed for a reason other than running out of memory."""


@dataclass
class Search:
    best: int  # the longest length that fit; 0 when not even the start did
    probes: list[tuple[int, bool]] = field(default_factory=list)


def max_fitting(fits: Callable[[int], bool], *, start: int, cap: int,
                granularity: int = 256) -> Search:  # fmt: skip
    """The longest length ``<= cap`` for which ``fits`` holds, assuming it is monotone:
    ``start``, ``2 start``, ``4 start``, ... (the last one clipped to ``cap``) until one
    does not fit, then bisection until the bracket is at most ``granularity`` wide.
    Lengths probed past the start are multiples of ``granularity`` (or ``cap``)."""
    if start < 1 or granularity < 1 or cap < start:
        raise ValueError(f"need 1 <= start <= cap and granularity >= 1 (start {start}, "
                         f"cap {cap}, granularity {granularity})")  # fmt: skip
    search = Search(0)

    def probe(seq: int) -> bool:
        ok = bool(fits(seq))
        search.probes.append((seq, ok))
        return ok

    if not probe(start):
        return search
    good, bad = start, None
    while bad is None and good < cap:
        seq = min(2 * good, cap)
        if probe(seq):
            good = seq
        else:
            bad = seq
    while bad is not None and bad - good > granularity:
        mid = (good + bad) // 2 // granularity * granularity
        if mid <= good:
            mid = good + granularity
        if probe(mid):
            good = mid
        else:
            bad = mid
    search.best = good
    return search


def run_probe(system: str, model_dir: Path, *, seq: int, device: str,
              quantization: str | None, budget_gib: float | None) -> dict[str, Any]:  # fmt: skip
    """One LoRA training step at batch 1 and ``seq`` tokens: the body of a probe process."""
    import resource

    import torch

    from sloth_core.bench.train import _load

    cuda = device.startswith("cuda")
    if cuda:
        total = torch.cuda.get_device_properties(device).total_memory
        budget = total if budget_gib is None else min(budget_gib * GIB, total)
        torch.cuda.set_per_process_memory_fraction(budget / total, device)
    # What the loader imports lazily, imported first: code is not what the budget measures.
    import peft  # noqa: F401
    import transformers  # noqa: F401

    from sloth_core import FastLanguageModel  # noqa: F401

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    try:
        model, _ = _load(system, model_dir, device, quantization)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=2e-4)
        generator = torch.Generator().manual_seed(1234)
        ids = torch.randint(0, model.config.vocab_size, (1, seq), generator=generator)
        ids = ids.to(device)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        if cuda:
            torch.cuda.synchronize()
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        # Some kernels (Triton, bitsandbytes) raise a plain RuntimeError when out of memory.
        if not isinstance(exc, torch.OutOfMemoryError) and "out of memory" not in str(exc):
            raise
        return {"seq": seq, "fits": False, "reason": f"out of memory: {str(exc)[:200]}"}
    if cuda:
        peak = torch.cuda.max_memory_allocated(device)
        budget_gib = budget / GIB
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    peak_gib = peak / GIB
    fits = budget_gib is None or peak_gib <= budget_gib
    out = {"seq": seq, "fits": fits, "peak_gib": peak_gib, "loss": loss.item()}
    if not fits:
        out["reason"] = f"peak {peak_gib:.2f} GiB over the budget of {budget_gib:.2f} GiB"
    return out


def probe_in_process(system: str, model_dir: Path, *, seq: int, device: str,
                     quantization: str | None, budget_gib: float | None,
                     timeout: float) -> dict[str, Any]:  # fmt: skip
    """``run_probe`` in a fresh process. A process killed by a signal (the kernel's OOM
    killer on the host) did not fit; any other failure raises ``ProbeError``."""
    out = run_worker("sloth_core.bench.context", [
        system, str(model_dir), str(seq), device, quantization or "none",
        "none" if budget_gib is None else repr(budget_gib)], timeout=timeout)  # fmt: skip
    if "fits" in out or "skipped" in out:
        return out
    if out.get("returncode", 0) < 0:
        return {"seq": seq, "fits": False, "reason": f"killed by signal {-out['returncode']}"}
    raise ProbeError(out.get("error", "probe printed no result"))


def run_max_context(shape: str, *, systems: str | tuple[str, ...], model_dir: Path,
                    device: str, quantization: str | None = None,
                    budget_gib: float | None = None, start: int = 1024, cap: int = 262144,
                    granularity: int = 256, timeout: float = 1800) -> dict[str, Any]:  # fmt: skip
    """For each system, the longest sequence it trains one step at, batch 1, within
    ``budget_gib`` (see the module docstring for what counts on CUDA and on the CPU)."""
    run, skipped = resolve_systems(systems)
    model_dir = make_model(shape, Path(model_dir), device=device)
    results: list[dict[str, Any]] = []
    for system in run:
        probes: list[dict[str, Any]] = []

        def fits(seq: int, system: str = system, probes: list = probes) -> bool:
            out = probe_in_process(system, model_dir, seq=seq, device=device,
                                   quantization=quantization, budget_gib=budget_gib,
                                   timeout=timeout)  # fmt: skip
            if "skipped" in out:
                raise SystemSkipped(out["skipped"])
            probes.append(out)
            return out["fits"]

        entry: dict[str, Any] = {"system": system, "probes": probes}
        try:
            entry["max_seq"] = max_fitting(fits, start=start, cap=cap,
                                           granularity=granularity).best  # fmt: skip
            entry["capped"] = entry["max_seq"] == cap
        except SystemSkipped as exc:
            entry = {"system": system, "skipped": str(exc)}
        except ProbeError as exc:
            entry["error"] = str(exc)
        results.append(entry)
    results += skipped
    base = next((r for r in results if r["system"] == "hf" and r.get("max_seq")), None)
    for r in results:
        if base and "max_seq" in r:
            r["context_vs_hf"] = r["max_seq"] / base["max_seq"]
    return {"kind": "max_context", "shape": shape, "config": SHAPES[shape], "batch": 1,
            "device": device, "quantization": quantization, "budget_gib": budget_gib,
            "budget_measure": ("torch.cuda.max_memory_allocated" if device.startswith("cuda")
                               else "peak RSS growth"),
            "start": start, "cap": cap, "granularity": granularity, "versions": versions(),
            "results": results}  # fmt: skip


def markdown(report: dict[str, Any], command: str) -> str:
    """The max-context report as a docs/benchmarks.md table, with the exact command."""
    budget = report["budget_gib"]
    if budget is not None:
        budget_text = f"{budget:g} GiB"
    elif report["device"].startswith("cuda"):
        budget_text = "the device's total memory"
    else:
        budget_text = "none (a probe fits if it runs)"
    lines = [f"Shape `{report['shape']}`, batch 1, "
             f"{'bf16' if not report.get('quantization') else report['quantization']} base "
             f"weights, budget {budget_text} (measured as {report['budget_measure']}), "
             f"{report['device']}; lengths from {report['start']} doubling to at most "
             f"{report['cap']}, then bisection to {report['granularity']} tokens.",
             "", f"    {command}", "",
             "| system | max context (tokens) | vs hf | peak GiB at max | probes |",
             "|---|---|---|---|---|"]  # fmt: skip
    for r in report["results"]:
        if r.get("skipped") or r.get("error"):
            what = f"skipped: {r['skipped']}" if r.get("skipped") else f"error: {r['error']}"
            lines.append(f"| {r['system']} | {what[:120]} | | | |")
            continue
        at_max = [p for p in r["probes"] if p["fits"] and p["seq"] == r["max_seq"]]
        peak = at_max[0].get("peak_gib") if at_max else None
        lines.append(
            f"| {r['system']} | {length_cell(r, report['start'])} | "
            f"{'-' if 'context_vs_hf' not in r else format(r['context_vs_hf'], '.2f') + 'x'} | "
            f"{'-' if peak is None else format(peak, '.2f')} | {len(r['probes'])} |"
        )  # fmt: skip
    return "\n".join(lines) + "\n"


def length_cell(result: dict[str, Any], start: int) -> str:
    if not result["max_seq"]:
        return f"none (not even {start})"
    return f"{result['max_seq']}{' (cap)' if result.get('capped') else ''}"


def _worker(argv: list[str]) -> None:
    system, model_dir, seq, device, quantization, budget = argv
    try:
        out = run_probe(system, Path(model_dir), seq=int(seq), device=device,
                        quantization=None if quantization == "none" else quantization,
                        budget_gib=None if budget == "none" else float(budget))  # fmt: skip
    except SystemSkipped as exc:
        out = {"system": system, "skipped": str(exc)}
    print(json.dumps(out))


if __name__ == "__main__":  # one probe, in its own process (see probe_in_process)
    _worker(sys.argv[1:])
