"""``sloth bench train --max-context``: the longest sequence each system trains at batch 1.

For each system, the search (``max_fitting``) doubles the sequence length from a start
while one training step fits, then bisects between the last length that fit and the
first that did not, down to a granularity (256 tokens by default). Each probe is one
LoRA step (same model, LoRA and optimizer as ``sloth bench train``). A system's probes
run in a process of their own that loads the model once (:class:`Prober`): between steps
the allocator is emptied and the peak reset, and a length that does not fit after
earlier probes is probed again in a fresh process, whose answer stands, so no probe's
answer depends on what ran before it in its process.

"Fits" means the step ran and its peak stayed within the memory budget:

- CUDA: the budget defaults to the device's total memory; the probe caps its allocator
  at the budget (``torch.cuda.set_per_process_memory_fraction``) and checks
  ``torch.cuda.max_memory_allocated()`` (weights included) against it.
- CPU: without a budget a probe fits if it runs. With one, the measure is the step's peak
  resident set (Linux's ``VmHWM``, reset before each step) less the resident set just
  before the model loaded: it counts weights, activations and optimizer state as the GPU
  measure does, plus whatever the host allocator keeps, so it is an upper bound (where
  the peak cannot be reset, the growth of ``ru_maxrss``).

A probe that fails for another reason than memory stops that system's search and is
reported as its error: a bug is not a context limit.

Long searches span several runs (one probe of an 8B model at 128k tokens takes a minute,
and a machine may be lent for ten): with a journal (``--journal``) every answer is
appended to a JSON-lines file as it comes, and a later run with the same journal, shape,
quantization, budget, device and versions takes those answers instead of probing again.
With a time limit (``--time-limit-s``) the search stops before it, and the system's result
says how far it got (``incomplete``, the bracket so far) instead of a length.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sloth_core.bench.train import (
    SHAPES,
    SystemSkipped,
    make_model,
    resolve_systems,
    system_env,
    versions,
)

GIB = 2**30


class ProbeError(RuntimeError):
    """A probe failed for a reason other than running out of memory."""


class ProbeTimeout(ProbeError):
    """A probe did not answer in the time it was given."""


class SearchIncomplete(Exception):
    """The time limit came before the search ended."""


class Journal:
    """The answers of earlier probes, one JSON line per probe in ``path``, each with the
    ``key`` of the run that made it (shape, quantization, budget, device, versions): the
    answers of runs with the same key are reused, the others ignored. Lines are appended
    and synced as answers come, so a run cut short keeps every answer it got; a line cut
    in the middle (the process killed while writing) is skipped with a warning."""

    def __init__(self, path: Path, key: dict[str, Any]) -> None:
        self.path, self.key = Path(path), json.loads(json.dumps(key))  # as read back
        self.known: dict[tuple[str, int], dict[str, Any]] = {}
        if not self.path.exists():
            return
        for number, line in enumerate(self.path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                system, seq, answer = entry["system"], int(entry["seq"]), entry["answer"]
            except (ValueError, KeyError, TypeError) as exc:
                warnings.warn(f"{self.path}:{number}: not a probe's answer, skipped ({exc})",
                              stacklevel=2)  # fmt: skip
                continue
            if entry.get("key") == self.key:
                self.known[(system, seq)] = answer

    def get(self, system: str, seq: int) -> dict[str, Any] | None:
        return self.known.get((system, seq))

    def record(self, system: str, seq: int, answer: dict[str, Any]) -> None:
        self.known[(system, seq)] = answer
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"key": self.key, "system": system, "seq": seq, "answer": answer})
        with self.path.open("a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())


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


class _Probe:
    """The body of a probe process: the model loaded once, then one LoRA training step at
    batch 1 per length asked (same model, LoRA and optimizer as ``sloth bench train``)."""

    def __init__(self, system: str, model_dir: Path, *, device: str,
                 quantization: str | None, budget_gib: float | None) -> None:  # fmt: skip

        import torch

        from sloth_core.bench.train import _load

        self.cuda = device.startswith("cuda")
        self.device, self.budget_gib = device, budget_gib
        if self.cuda:
            total = torch.cuda.get_device_properties(device).total_memory
            budget = total if budget_gib is None else min(budget_gib * GIB, total)
            # The fraction is set per card, and wants its index ("cuda" names none).
            index = torch.device(device).index
            index = torch.cuda.current_device() if index is None else index
            torch.cuda.set_per_process_memory_fraction(budget / total, index)
            self.budget_gib = budget / GIB
        # What the loader imports lazily, imported first: code is not what the budget measures.
        import peft  # noqa: F401
        import transformers  # noqa: F401

        from sloth_core import FastLanguageModel  # noqa: F401

        # CPU: the growth from here (the resident set now, or, where the peak cannot be
        # reset, the peak so far, imports' included) to each step's peak.
        self.resettable = _reset_peak_rss()
        self.rss_before = _rss("VmRSS") if self.resettable else _peak_rss()
        self.load_error: str | None = None
        try:
            self.model, _ = _load(system, model_dir, device, quantization)
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if not _out_of_memory(exc):
                raise
            self.load_error = f"out of memory while loading: {str(exc)[:200]}"
            return
        self.model.train()

    def step(self, seq: int) -> dict[str, Any]:
        """One training step of ``seq`` tokens: whether it fitted, and its peak."""
        import torch

        from sloth_core.train.optim import default_adamw

        if self.load_error:
            return {"seq": seq, "fits": False, "reason": self.load_error}
        model = self.model
        # Each step starts as in a fresh process: no gradients, no optimizer state, the
        # allocator's cache returned, the peak measured from here.
        model.zero_grad(set_to_none=True)
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        else:
            _reset_peak_rss()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = default_adamw(params, lr=2e-4)
        try:
            generator = torch.Generator().manual_seed(1234)
            ids = torch.randint(0, model.config.vocab_size, (1, seq), generator=generator)
            ids = ids.to(self.device)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            if self.cuda:
                torch.cuda.synchronize()
            value = loss.item()
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if not _out_of_memory(exc):
                raise
            return {"seq": seq, "fits": False, "reason": f"out of memory: {str(exc)[:200]}"}
        finally:
            del optimizer
            model.zero_grad(set_to_none=True)
        if self.cuda:
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _peak_rss() - self.rss_before
        peak_gib = peak / GIB
        fits = self.budget_gib is None or peak_gib <= self.budget_gib
        out = {"seq": seq, "fits": fits, "peak_gib": peak_gib, "loss": value}
        if not fits:
            out["reason"] = f"peak {peak_gib:.2f} GiB over the budget of {self.budget_gib:.2f} GiB"
        return out


def _out_of_memory(exc: BaseException) -> bool:
    import torch

    # Some kernels (Triton, bitsandbytes) raise a plain RuntimeError when out of memory.
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc)


def _reset_peak_rss() -> bool:
    """Linux: the peak resident set (VmHWM) back to the current one, so that a step's peak
    is its own; whether that worked. Where it is refused the peak keeps the earlier
    probes' (an over-estimate: a failure it causes is re-probed in a fresh process, see
    :class:`Prober`)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _rss("VmHWM") > 0


def _rss(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (the peak) of /proc/self/status in bytes; 0 without it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _peak_rss() -> int:
    """The process's peak resident set in bytes (VmHWM, which :func:`_reset_peak_rss`
    resets; ``ru_maxrss`` where /proc is missing)."""
    import resource

    return _rss("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _Worker:
    """A probe process (``python -m sloth_core.bench.context``): it loads the model, then
    answers each length written to its stdin with one JSON line."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        import queue
        import subprocess
        import tempfile
        import threading

        self.stderr = tempfile.TemporaryFile(mode="w+")
        env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sloth_core.bench.context", *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True,
            env=env,
        )  # fmt: skip
        self.probes = 0
        self.lines: queue.Queue[str | None] = queue.Queue()

        def read(stream=self.proc.stdout, lines=self.lines) -> None:
            for line in stream:
                if line.startswith("{"):  # other output is not the answer
                    lines.put(line)
            lines.put(None)  # the process closed its stdout: it ended

        threading.Thread(target=read, daemon=True).start()

    def probe(self, seq: int, timeout: float) -> dict[str, Any]:
        """The answer for ``seq``; ``{"error", "returncode"}`` if the process ended first."""
        import queue

        assert self.proc.stdin is not None  # opened with stdin=PIPE
        try:
            self.proc.stdin.write(f"{seq}\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # it ended already: the reader says so below
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            self.close()
            raise ProbeTimeout(f"a probe of {seq} tokens took over {timeout:g} s") from None
        if line is None:
            returncode = self.proc.wait()
            self.stderr.seek(0)
            tail = self.stderr.read().strip().splitlines()
            raised = [t for t in tail if "Error" in t]
            return {"error": " | ".join(raised[-1:] or tail[-5:])[-800:]
                    or f"exit status {returncode}", "returncode": returncode}  # fmt: skip
        self.probes += 1
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                if self.proc.stdin is not None:
                    self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except Exception:  # noqa: BLE001 - whatever went wrong, it goes
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()


class Prober:
    """``fits(seq)`` for one system, its probes served by one process that loads the model
    once and trains a step per length (the allocator emptied and the peak reset between
    steps), instead of one process per probe.

    A length that does not fit in a process that ran earlier probes is probed again in a
    fresh process, whose answer stands: what an earlier step left behind (allocator
    fragmentation, caches) may only make a later one fail, never fit, so every length
    reported as fitting or not is what a process of its own would report. The process that
    answered serves the following probes. A process killed by a signal (the host's OOM
    killer) did not fit; any other failure raises :class:`ProbeError`.
    """

    def __init__(self, system: str, model_dir: Path, *, device: str,
                 quantization: str | None, budget_gib: float | None,
                 timeout: float) -> None:  # fmt: skip
        system, self.env = system_env(system)  # sloth[VAR=value]: sloth, VAR set
        self.args = [system, str(model_dir), device, quantization or "none",
                     "none" if budget_gib is None else repr(budget_gib)]  # fmt: skip
        self.timeout = timeout
        self.worker: _Worker | None = None
        #: How many processes the probes took.
        self.processes = 0

    def __call__(self, seq: int, deadline: float | None = None) -> dict[str, Any]:
        """The answer for ``seq``; with a ``deadline`` (``time.monotonic()``), a probe
        still running then is stopped and :class:`SearchIncomplete` raised."""
        warm = self.worker is not None and self.worker.probes > 0
        out = self._probe(seq, deadline)
        if warm and out.get("fits") is False:
            self.close()  # confirmed, or overruled, by a process of its own
            out = {**self._probe(seq, deadline), "reprobed": True}
        return out

    def _probe(self, seq: int, deadline: float | None) -> dict[str, Any]:
        timeout = self.timeout
        if deadline is not None:
            timeout = min(timeout, deadline - time.monotonic())
            if timeout <= 0:
                raise SearchIncomplete(f"the time limit came before the probe of {seq}")
        if self.worker is None:
            self.worker = _Worker(self.args, self.env)
            self.processes += 1
        try:
            out = self.worker.probe(seq, timeout)
        except ProbeTimeout:
            self.close()
            if timeout < self.timeout:  # the run's time limit, not the probe's, cut it
                raise SearchIncomplete(f"the time limit came during the probe of {seq}") from None
            raise
        if "fits" in out or "skipped" in out:
            return out
        self.close()
        if out.get("returncode", 0) < 0:
            return {"seq": seq, "fits": False, "reason": f"killed by signal {-out['returncode']}"}
        raise ProbeError(out.get("error", "probe printed no result"))

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()
            self.worker = None


def run_max_context(shape: str, *, systems: str | tuple[str, ...], model_dir: Path,
                    device: str, quantization: str | None = None,
                    budget_gib: float | None = None, start: int = 1024, cap: int = 262144,
                    granularity: int = 256, timeout: float = 1800,
                    journal: Path | None = None, time_limit_s: float | None = None,
                    progress: Callable[[str, dict[str, Any]], None] | None = None,
                    ) -> dict[str, Any]:  # fmt: skip
    """For each system, the longest sequence it trains one step at, batch 1, within
    ``budget_gib`` (see the module docstring for what counts on CUDA and on the CPU).
    ``journal``: a file of answers to reuse and extend; ``time_limit_s``: seconds from now
    after which no probe runs; ``progress(system, answer)`` is called after each probe."""
    deadline = None if time_limit_s is None else time.monotonic() + time_limit_s
    run, skipped = resolve_systems(systems)
    model_dir = make_model(shape, Path(model_dir), device=device)
    device_name = _device_name(device)
    book = None
    if journal is not None:
        key = {
            "shape": shape,
            "config": SHAPES[shape],
            "quantization": quantization,
            "budget_gib": budget_gib,
            "device": device_name,
            "versions": versions(),
        }
        book = Journal(journal, key)
    results: list[dict[str, Any]] = []
    for system in run:
        probes: list[dict[str, Any]] = []
        prober = Prober(system, model_dir, device=device, quantization=quantization,
                        budget_gib=budget_gib, timeout=timeout)  # fmt: skip

        def fits(seq: int, system: str = system, prober: Prober = prober,
                 probes: list = probes) -> bool:  # fmt: skip
            out = book.get(system, seq) if book is not None else None
            if out is not None:
                out = {**out, "journal": True}
            else:
                out = prober(seq, deadline)
                if "skipped" in out:
                    raise SystemSkipped(out["skipped"])
                if book is not None:
                    book.record(system, seq, out)
            probes.append(out)
            if progress is not None:
                progress(system, out)
            return out["fits"]

        entry: dict[str, Any] = {"system": system, "probes": probes}
        try:
            entry["max_seq"] = max_fitting(fits, start=start, cap=cap,
                                           granularity=granularity).best  # fmt: skip
            entry["capped"] = entry["max_seq"] == cap
        except SystemSkipped as exc:
            entry = {"system": system, "skipped": str(exc)}
        except SearchIncomplete as exc:
            low = max((p["seq"] for p in probes if p["fits"]), default=0)
            high = min((p["seq"] for p in probes if not p["fits"]), default=None)
            entry.update(
                incomplete=True,
                bounds=[low, high],
                error=(
                    f"search incomplete: {exc}; fits at {low or 'no length yet'}"
                    + (f", not at {high}" if high else "")
                    + (f" (run again with the journal {journal} to go on)" if journal else "")
                ),
            )
        except ProbeError as exc:
            entry["error"] = str(exc)
        finally:
            prober.close()
        if "skipped" not in entry:
            entry["processes"] = prober.processes
        results.append(entry)
    results += skipped
    base = next((r for r in results if r["system"] == "hf" and r.get("max_seq")), None)
    for r in results:
        if base and "max_seq" in r:
            r["context_vs_hf"] = r["max_seq"] / base["max_seq"]
    return {"kind": "max_context", "shape": shape, "config": SHAPES[shape], "batch": 1,
            "device": device, "device_name": device_name, "quantization": quantization,
            "budget_gib": budget_gib,
            "budget_measure": ("torch.cuda.max_memory_allocated" if device.startswith("cuda")
                               else "peak RSS growth"),
            "start": start, "cap": cap, "granularity": granularity, "versions": versions(),
            "journal": None if journal is None else str(journal),
            "results": results}  # fmt: skip


def _device_name(device: str) -> str:
    """The card's name (a journal's answers hold for that card only), or ``cpu``."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return device


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
             f"{report.get('device_name') or report['device']}; lengths from {report['start']} "
             f"doubling to at most {report['cap']}, then bisection to {report['granularity']} "
             "tokens.",
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
            f"| {r['system']} | {length_cell(r, r.get('start', report['start']))} | "
            f"{'-' if 'context_vs_hf' not in r else format(r['context_vs_hf'], '.2f') + 'x'} | "
            f"{'-' if peak is None else format(peak, '.2f')} | {len(r['probes'])} |"
        )  # fmt: skip
    return "\n".join(lines) + "\n"


def length_cell(result: dict[str, Any], start: int) -> str:
    if not result["max_seq"]:
        return f"none (not even {start})"
    return f"{result['max_seq']}{' (cap)' if result.get('capped') else ''}"


def _serve(argv: list[str]) -> None:
    """A probe process: load, then answer each length read from stdin (see :class:`Prober`)."""
    system, model_dir, device, quantization, budget = argv
    try:
        probe = _Probe(system, Path(model_dir), device=device,
                       quantization=None if quantization == "none" else quantization,
                       budget_gib=None if budget == "none" else float(budget))  # fmt: skip
    except SystemSkipped as exc:
        print(json.dumps({"system": system, "skipped": str(exc)}), flush=True)
        return
    for line in sys.stdin:
        if line.strip():
            print(json.dumps(probe.step(int(line))), flush=True)


if __name__ == "__main__":  # the probes of one system (see Prober)
    _serve(sys.argv[1:])
