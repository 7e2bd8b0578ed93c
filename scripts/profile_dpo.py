"""Where sloth's DPO step's time goes, the prompt shared against the rows apart (GPU only).

    python3 scripts/profile_dpo.py [--shape llama-8b] [--seq 1024] [--batch 4] [--rows 25] \
        [--budget-gib 20] > profile-dpo.txt

Builds the step ``sloth bench dpo`` times (:func:`sloth_core.bench.dpo.sloth_dpo_step`, on
the shape's random-init model written once under $SLOTH_CACHE), once with the prompt
shared and once with the rows apart. For each: the median of a few timed steps (wall clock
between synchronisations) against the device time of one profiled step, that step's
device time inside the policy's forward, the reference's forward and the rest (backward,
recompute, optimizer), and the kernels taking the most device time. Last, the kernels
whose device time differs most between the two layouts: sharing runs 3/4 of the tokens at
this bench's shape, so a kernel that did not shrink by about a quarter is where the gain
went missing.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from sloth_core.bench import dpo
from sloth_core.bench.train import make_model, shape_config
from sloth_core.train import preference

RANGES = ("policy forward", "reference forward")


def _ranged(fn, name):
    def wrapper(*args, **kwargs):
        with record_function(name):
            return fn(*args, **kwargs)

    return wrapper


def _mark_ranges() -> None:
    """The policy's and the reference's forwards as named profiler ranges."""
    for attr in ("pair_log_probs", "sequence_log_probs"):
        setattr(preference, attr, _ranged(getattr(preference, attr), RANGES[0]))
    method = preference.PreferenceMethod
    method._reference = _ranged(method._reference, RANGES[1])


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def _profile_layout(args, model_dir: Path, pairs, share: bool) -> dict[str, float]:
    cuda = args.device == "cuda"
    model, _, step, plan = dpo.sloth_dpo_step(model_dir, pairs, seq=args.seq,
                                              device=args.device, budget_gib=args.budget_gib,
                                              share_prompt=share)  # fmt: skip
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        _sync(cuda)
        start = time.perf_counter()
        step()
        _sync(cuda)
        times.append(time.perf_counter() - start)
    wall = statistics.median(times)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step()
        _sync(cuda)
    events = prof.key_averages()
    # On the CPU (a dry run of this script) operators stand in for kernels.
    kind, attr = (DeviceType.CUDA, "self_device_time_total") if cuda else (
        DeviceType.CPU, "self_cpu_time_total")  # fmt: skip
    kernels: dict[str, float] = defaultdict(float)
    for event in events:
        if event.device_type == kind and event.key not in RANGES:
            kernels[event.key] += getattr(event, attr) / 1000
    device_ms = sum(kernels.values())
    total = "device_time_total" if cuda else "cpu_time_total"
    ranges = {e.key: getattr(e, total) / 1000 for e in events if e.key in RANGES}
    name = "prompt shared" if share else "rows apart"
    tokens = 2 * args.batch * args.seq
    peak = f", peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if cuda else ""
    print(f"==== {name}: {args.shape}, {args.batch} pairs of {args.seq} tokens: step "
          f"{wall * 1000:.1f} ms wall, {device_ms:.1f} ms device (profiled step), "
          f"{tokens / wall:.0f} workload tokens/s{peak}")  # fmt: skip
    if plan:
        print(f"plan: {plan}")
    rest = device_ms - sum(ranges.values())
    print("  " + ", ".join(f"{k} {v:.1f} ms" for k, v in ranges.items())
          + f", the rest (backward, recompute, optimizer) {rest:.1f} ms")  # fmt: skip
    print(events.table(sort_by=attr, row_limit=args.rows, max_name_column_width=70))
    del model, step
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return dict(kernels, **{f"[{k}]": v for k, v in ranges.items()}, **{"[step wall]": wall * 1e3})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="llama-8b")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--budget-gib", type=float, default=None)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    cache = Path(os.environ.get("SLOTH_CACHE", Path.home() / ".cache" / "sloth"))
    model_dir = make_model(args.shape, cache / "bench-models" / args.shape, device=args.device)
    pairs = dpo.make_pairs(args.batch, args.seq, shape_config(args.shape).vocab_size)
    _mark_ranges()
    shared = _profile_layout(args, model_dir, pairs, share=True)
    apart = _profile_layout(args, model_dir, pairs, share=False)
    # A pair's tokens: prompt + 2 completions shared, 2 (prompt + completion) apart.
    prompt, completion = args.seq // 2, args.seq - args.seq // 2
    expected = (prompt + 2 * completion) / (2 * args.seq)
    print(f"==== shared against apart (ms of device time in one step; ranges in brackets); "
          f"the tokens' ratio is {expected:.3f}, the kernels furthest from it first")  # fmt: skip
    print(f"{'kernel':<90} {'shared':>9} {'apart':>9} {'ratio':>7}")

    def missing(name: str) -> float:  # ms above (or below) what the tokens predict
        return abs(shared.get(name, 0.0) - expected * apart.get(name, 0.0))

    names = sorted(set(shared) | set(apart), key=missing, reverse=True)
    for name in names[: args.rows]:
        a, b = shared.get(name, 0.0), apart.get(name, 0.0)
        print(f"{name[:90]:<90} {a:9.2f} {b:9.2f} {a / b if b else float('inf'):7.2f}")


if __name__ == "__main__":
    main()
