"""Whether a CUDA graph of a whole LoRA step pays on a host-bound row (GPU only).

llama-1b's sloth step is bound by the host (its launches and Python take about as long as
the GPU's work, and longer on a slow host). A graph replays the forward and backward with
no host work at all: this measures what that would buy before a trainer path is built.
For each system (``sloth`` offloads the layer inputs to pinned host memory, ``sloth:on``
keeps them on the device): eager steps timed as ``sloth bench train`` times them (a
synchronisation around each), then the forward and backward captured once
(``torch.cuda.graph``, after warm-up steps on a side stream, as torch's whole-network
example does) and replayed, the optimizer step eager after each replay. A replay's loss
and LoRA gradients are checked against an eager step's on the same weights. A capture
that fails prints its error: what a graph path would have to change (run one system a
process: a failed capture may leave the next one a spoilt context).

    python3 scripts/graph_step_gpu.py [--shape llama-1b] [--systems sloth:on] > graph.txt
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import traceback
from pathlib import Path

import torch

from sloth_core.bench.train import _load, make_model
from sloth_core.train.optim import default_adamw


def _timed(run, steps: int) -> float:
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _grads(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.grad.detach().float().clone() for p in params]


def _rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    num = sum(float((x - y).norm() ** 2) for x, y in zip(a, b, strict=True)) ** 0.5
    den = sum(float(y.norm() ** 2) for y in b) ** 0.5
    return num / max(den, 1e-30)


def one(system: str, model_dir: Path, seq: int, batch: int, steps: int) -> None:
    model, _ = _load(system, model_dir, "cuda")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = default_adamw(params, lr=2e-4)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device="cuda")

    def eager() -> torch.Tensor:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for _ in range(3):
        eager()
    torch.cuda.reset_peak_memory_stats()
    wall = _timed(eager, steps)
    peak = torch.cuda.max_memory_allocated() / 2**30
    tokens = seq * batch
    print(f"{system} eager: {wall * 1e3:.1f} ms a step, {tokens / wall:.0f} tok/s, "
          f"peak {peak:.2f} GiB")  # fmt: skip

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            eager()
    torch.cuda.current_stream().wait_stream(side)
    optimizer.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    try:
        start = time.perf_counter()
        with torch.cuda.graph(graph):
            static_loss = model(input_ids=ids, labels=ids).loss
            static_loss.backward()
        print(f"{system} captured in {time.perf_counter() - start:.1f} s")
    except Exception as exc:  # what a graph path would have to change
        print(f"{system} capture failed: {type(exc).__name__}: {exc}")
        traceback.print_exc(limit=12)
        return
    # The same weights: a replay's loss and gradients against an eager step's.
    graph.replay()
    torch.cuda.synchronize()
    replayed, replayed_grads = float(static_loss.detach()), _grads(params)
    kept = [p.grad for p in params]  # the graph's own gradient tensors: put back after
    for p in params:
        p.grad = None
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    eager_grads = _grads(params)
    for p, g in zip(params, kept, strict=True):
        p.grad = g
    print(f"{system} replay against eager: loss {replayed:.5f} / {float(loss.detach()):.5f}, "
          f"gradients' relative difference {_rel(replayed_grads, eager_grads):.2e}")  # fmt: skip

    def replay() -> None:
        graph.replay()
        optimizer.step()  # the graph writes the same .grad tensors every replay

    torch.cuda.reset_peak_memory_stats()
    wall_graph = _timed(replay, steps)
    peak_graph = torch.cuda.max_memory_allocated() / 2**30
    print(f"{system} graphed: {wall_graph * 1e3:.1f} ms a step, {tokens / wall_graph:.0f} "
          f"tok/s, peak {peak_graph:.2f} GiB: {wall / wall_graph:.3f}x eager")  # fmt: skip
    losses = []
    for _ in range(3):
        replay()
        losses.append(float(static_loss.detach()))
    print(f"{system} graphed losses go on: {', '.join(f'{x:.4f}' for x in losses)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-1b")
    parser.add_argument("--systems", default="sloth:on,sloth")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    cache = Path(os.environ.get("SLOTH_CACHE", Path.home() / ".cache" / "sloth"))
    model_dir = make_model(args.shape, cache / "bench-models" / args.shape, device="cuda")
    print(torch.cuda.get_device_name(), torch.__version__)
    for system in args.systems.split(","):
        one(system, model_dir, args.seq, args.batch, args.steps)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
