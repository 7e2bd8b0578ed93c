"""What a training step's peak device memory is made of, per system (GPU only).

    python3 scripts/memory_peak_gpu.py [--shape qwen3-30b-a3b] [--systems sloth]
                                       [--seq 2048] [--batch 2] [--rows 25] > memory.txt

Loads each system as ``sloth bench train`` does and runs two of its steps (the optimizer's
state exists after the first), then records the allocator's history (``torch.cuda.memory``) over
a third step. What was allocated before it (weights, adapters, the optimizer's moments) is
one figure; of the allocations the step makes, those live at its highest point are grouped
by where they were made: the innermost Python frame outside torch's own modules (sloth,
transformers, peft or the bench), and the operation that made them (the innermost frame).
The two are printed beside ``torch.cuda.max_memory_allocated()``, which they should sum to.
"""

from __future__ import annotations

import argparse
import gc
import os
from collections import Counter
from pathlib import Path

import torch

from sloth_core.bench.train import _load, make_model
from sloth_core.train.optim import default_adamw


def _site(frames: list[dict], torch_too: bool) -> str:
    """``file:line name`` of the innermost frame (``torch_too``), else of the innermost one
    outside torch's package (the optimizer's and checkpointing's modules count as outside:
    they are where their buffers are asked for)."""
    for frame in frames:
        name = frame.get("filename", "?")
        inside = "/torch/" in name and not any(k in name for k in ("/optim/", "/checkpoint"))
        if torch_too or not inside:
            short = "/".join(name.split("/")[-2:])
            return f"{short}:{frame.get('line', '?')} {frame.get('name', '?')}"
    return "(no Python frame)"


def live_at_peak(trace: list[dict]) -> tuple[int, dict[int, dict]]:
    """The highest total of the trace's live allocations and those allocations (``addr`` to
    the ``alloc`` event), replaying ``alloc`` and ``free_completed`` in order."""
    live: dict[int, dict] = {}
    total = best = best_at = 0
    for i, event in enumerate(trace):
        if event["action"] == "alloc":
            live[event["addr"]] = event
            total += event["size"]
        elif event["action"] == "free_completed" and event["addr"] in live:
            total -= live.pop(event["addr"])["size"]
        if total > best:
            best, best_at = total, i
    live = {}
    for event in trace[: best_at + 1]:
        if event["action"] == "alloc":
            live[event["addr"]] = event
        elif event["action"] == "free_completed":
            live.pop(event["addr"], None)
    return best, live


def report(
    system: str, before: int, peak: int, best: int, live: dict[int, dict], rows: int
) -> None:
    gib = 2**30
    print(f"==== {system}: max_memory_allocated {peak / gib:.2f} GiB = held before the step "
          f"{before / gib:.2f} GiB + the step's own at its highest {best / gib:.2f} GiB "
          f"(sum {(before + best) / gib:.2f})")  # fmt: skip
    for torch_too, title in ((False, "made in"), (True, "by the operation")):
        sizes: Counter[str] = Counter()
        counts: Counter[str] = Counter()
        for event in live.values():
            key = _site(event.get("frames", []), torch_too)
            sizes[key] += event["size"]
            counts[key] += 1
        print(f"-- live at the peak, {title}:")
        for key, size in sizes.most_common(rows):
            print(f"{size / gib:9.3f} GiB {counts[key]:6d} blocks  {key}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="qwen3-30b-a3b")
    parser.add_argument("--systems", default="sloth")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()
    cache = Path(os.environ.get("SLOTH_CACHE", Path.home() / ".cache" / "sloth"))
    model_dir = make_model(args.shape, cache / "bench-models" / args.shape, device="cuda")
    for system in args.systems.split(","):
        measure(system, model_dir, args)
        gc.collect()
        torch.cuda.empty_cache()


def measure(system: str, model_dir: Path, args: argparse.Namespace) -> None:
    """Two steps of ``system`` as the bench runs them, then a third recorded."""
    from sloth_core.train.step import train_step

    model, _ = _load(system, model_dir, "cuda")
    model.train()
    optimizer = default_adamw([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device="cuda")
    rows = [{"input_ids": ids, "labels": ids}]
    for _ in range(2):
        train_step(model, optimizer, rows)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    train_step(model, optimizer, rows)
    torch.cuda.synchronize()
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    best, live = live_at_peak(snapshot["device_traces"][torch.cuda.current_device()])
    report(system, before, torch.cuda.max_memory_allocated(), best, live, args.rows)


if __name__ == "__main__":
    main()
