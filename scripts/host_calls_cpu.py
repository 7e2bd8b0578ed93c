"""How much Python one sloth training step runs, counted on the CPU: a proxy for the host
time of a host-bound GPU step (llama-1b's), to compare two commits without a GPU.

A llama of tiny widths and 16 layers (so the arithmetic is nothing), sloth's model with
its checkpointing offloaded as on a GPU (on the CPU sloth would not offload), one
training step after two warm-up steps under cProfile: the Python calls by package, and
sloth's own by function (``--dump`` writes them as JSON, to diff two commits). Under
``TRITON_INTERPRET=1`` the kernels' launches are skipped (``--no-launch``: what the
interpreter runs is not host work a GPU sees), so the numbers are garbage and the calls
are what counts. A second step runs under a dispatch mode that counts the aten ops that
would launch a kernel on a GPU (views, allocations and other metadata ops left out), by
name. Another commit: a ``git worktree`` of it first on ``PYTHONPATH``
(its root, ``kernels/src`` and each ``plugins/*/src``).

    HF_HUB_OFFLINE=1 TRITON_INTERPRET=1 python scripts/host_calls_cpu.py --no-launch [--dump FILE]
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import json
import pstats
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

import sloth_core
from sloth_core.bench.train import _load
from sloth_core.checkpointing import enable_checkpointing
from sloth_core.testing.tokenizer import build_tokenizer
from sloth_core.train.step import train_step


def _package(filename: str) -> str:
    for name in ("triton", "sloth", "torch", "transformers", "peft"):
        if name in filename:
            return name
    return "other"  # the standard library and builtins


#: aten ops that launch nothing on a GPU: views, allocations, metadata.
_NO_LAUNCH = frozenset({
    "view", "_unsafe_view", "t", "transpose", "reshape", "slice", "select", "expand",
    "as_strided", "unsqueeze", "squeeze", "permute", "detach", "alias", "split",
    "split_with_sizes", "chunk", "narrow", "empty", "empty_like", "empty_strided",
    "new_empty", "new_empty_strided", "unbind", "lift_fresh", "_reshape_alias",
    "view_as", "is_same_size", "_to_copy_meta", "sym_size", "sym_stride", "set_",
    "resize_", "_has_compatible_shallow_copy_type", "record_stream", "is_pinned",
})  # fmt: skip


class _Launches(TorchDispatchMode):
    """Counts the aten ops that would launch a kernel on a GPU, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name not in _NO_LAUNCH:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument(
        "--no-launch",
        action="store_true",
        help="skip the Triton kernels' launches (TRITON_INTERPRET=1)",
    )
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--timed", type=int, default=21, help="unprofiled steps timed")
    parser.add_argument("--dump", type=Path, default=None)
    args = parser.parse_args()
    if args.no_launch:
        import triton.runtime.interpreter as interpreter

        interpreter.InterpretedFunction.__getitem__ = lambda self, grid: lambda *a, **k: None
    print(f"sloth_core from {Path(sloth_core.__file__).parent}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as root:
        torch.manual_seed(0)
        config = LlamaConfig(hidden_size=64, intermediate_size=128,
                             num_hidden_layers=args.layers, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=256, max_position_embeddings=256,
                             tie_word_embeddings=False)  # fmt: skip
        LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(root)
        build_tokenizer().save_pretrained(root)
        model, _ = _load("sloth", Path(root), "cpu")
    enable_checkpointing(model, offload=True)
    model.train()
    optimizer = torch.optim.AdamW(  # foreach, as on a GPU
        [p for p in model.parameters() if p.requires_grad], lr=2e-4, foreach=True
    )
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    rows = {"input_ids": ids, "labels": ids}
    for _ in range(2):
        train_step(model, optimizer, [rows])
    profile = cProfile.Profile()
    start = time.perf_counter()
    profile.enable()
    train_step(model, optimizer, [rows])
    profile.disable()
    wall = time.perf_counter() - start
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    by_package: collections.Counter[str] = collections.Counter()
    sloth: collections.Counter[str] = collections.Counter()
    for (filename, _, name), entry in stats.items():
        by_package[_package(filename)] += entry[1]
        if "sloth" in filename:
            sloth[f"{Path(filename).parent.name}/{Path(filename).name}:{name}"] += entry[1]
    total = sum(by_package.values())
    print(f"{args.layers} layers, one step: {wall * 1e3:.1f} ms, {total} Python calls: "
          + ", ".join(f"{k} {v}" for k, v in by_package.most_common()))  # fmt: skip
    for name, count in sloth.most_common(args.top):
        print(f"  {count:6d} {name}")
    times = []
    for _ in range(args.timed):  # without the profiler: the step's host time, as a proxy
        start = time.perf_counter()
        train_step(model, optimizer, [rows])
        times.append(time.perf_counter() - start)
    times.sort()
    print(f"unprofiled step, median of {args.timed}: {times[len(times) // 2] * 1e3:.1f} ms "
          f"(fastest {times[0] * 1e3:.1f})")  # fmt: skip
    with _Launches() as launches:
        train_step(model, optimizer, [rows])
    ops = launches.counts
    print(f"aten ops that launch on a GPU, one step: {sum(ops.values())}")
    for name, count in ops.most_common(args.top):
        print(f"  {count:6d} {name}")
    if args.dump:
        args.dump.write_text(json.dumps({"python": sloth, "aten": ops}, indent=1))


if __name__ == "__main__":
    main()
