"""Where a LoRA training step's time goes, per system (GPU only).

    python3 scripts/profile_train.py [--shape llama-8b] [--systems sloth,hf] [--seq 2048]
                                     [--batch 4] [--rows 30] [--quantization fp8]
                                     [--python-rows 40] [--shapes 40] > profile.txt

Loads each system as ``sloth bench train`` does (the shape's random-init model, written
once under $SLOTH_CACHE), runs warm-up steps, times a few (wall clock between
synchronisations, against the device time the profiler sees: a step whose wall time is
well above its device time waits on the host), then profiles one and prints the
operators and kernels that take the most device time, and those that take the most host
time; then one more step under cProfile: the Python functions the host spends it in.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import os
import pstats
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from sloth_core.bench.train import _load, make_model
from sloth_core.train.optim import default_adamw


def step(model, optimizer, ids):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def python_profile(model, optimizer, ids, rows: int) -> str:
    """Where the host's Python goes in one step: the functions that take the most own
    time (cProfile; its overhead inflates every call alike), then the most cumulative."""
    # The torch profiler's events, garbage by now, would otherwise be collected inside the
    # step (session 25's llama-1b profile put 350 ms there, in whatever allocated next).
    gc.collect()
    collections: list[tuple[int, float]] = []  # (generation, seconds) of each collection
    started: list[float] = []

    def timing(phase: str, info: dict) -> None:
        if phase == "start":
            started.append(time.perf_counter())
        elif started:
            collections.append((info["generation"], time.perf_counter() - started.pop()))

    gc.callbacks.append(timing)
    profiler = cProfile.Profile()
    profiler.enable()
    step(model, optimizer, ids)
    torch.cuda.synchronize()
    profiler.disable()
    gc.callbacks.remove(timing)
    text = io.StringIO()
    text.write(
        f"garbage collections in the step: {len(collections)} "
        f"({sum(g == 2 for g, _ in collections)} of generation 2), "
        f"{sum(t for _, t in collections) * 1000:.1f} ms\n"
    )
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(rows)
    stats.sort_stats("cumulative").print_stats(rows)
    return text.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="llama-8b")
    parser.add_argument("--systems", default="sloth,hf")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rows", type=int, default=30)
    # sloth's base weights so (fp8: the fp8 row; hf stays bf16 there, as in the bench)
    parser.add_argument("--quantization", choices=("nf4", "fp8"), default=None)
    # the host side: one more step under cProfile, its Python functions by own time (0: none)
    parser.add_argument("--python-rows", type=int, default=40)
    # the operators again, grouped by their inputs' shapes: which tensors a kernel that
    # many layers launch works on (an elementwise pass over [8192, 14336], say)
    parser.add_argument("--shapes", type=int, default=0, metavar="ROWS")
    args = parser.parse_args()
    cache = Path(os.environ.get("SLOTH_CACHE", Path.home() / ".cache" / "sloth"))
    model_dir = make_model(args.shape, cache / "bench-models" / args.shape, device="cuda")
    for system in args.systems.split(","):
        model, _ = _load(system, model_dir, "cuda", args.quantization)
        model.train()
        optimizer = default_adamw([p for p in model.parameters() if p.requires_grad], lr=2e-4)
        ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device="cuda")
        for _ in range(3):
            step(model, optimizer, ids)
        times = []
        for _ in range(5):
            torch.cuda.synchronize()
            start = time.perf_counter()
            step(model, optimizer, ids)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        wall = statistics.median(times)
        activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
        with profile(activities=activities, record_shapes=bool(args.shapes)) as prof:
            step(model, optimizer, ids)
            torch.cuda.synchronize()
        events = prof.key_averages()
        device_us = sum(e.self_device_time_total for e in events)
        print(
            f"==== {system}: {args.shape} {args.quantization or 'bf16'} seq {args.seq} x batch "
            f"{args.batch}: step "
            f"{wall * 1000:.1f} ms wall, {device_us / 1000:.1f} ms device time (profiled "
            f"step), {args.seq * args.batch / wall:.0f} tokens/s, peak "
            f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
        )
        print(
            events.table(
                sort_by="self_device_time_total", row_limit=args.rows, max_name_column_width=70
            )
        )
        print(events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=70))
        if args.shapes:
            by_shape = prof.key_averages(group_by_input_shape=True)
            print(by_shape.table(sort_by="self_device_time_total", row_limit=args.shapes,
                                 max_name_column_width=40, max_shapes_column_width=90))  # fmt: skip
            del by_shape
        if args.python_rows:
            del prof, events
            print(python_profile(model, optimizer, ids, args.python_rows))
        del model, optimizer
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


if __name__ == "__main__":
    main()
