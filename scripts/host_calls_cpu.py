"""How much Python one sloth training step runs, counted on the CPU: a proxy for the host
time of a host-bound GPU step (llama-1b's), to compare two commits without a GPU.

A llama of tiny widths and 16 layers (so the arithmetic is nothing), sloth's model with
its checkpointing offloaded as on a GPU (on the CPU sloth would not offload), one
training step after two warm-up steps under cProfile: the Python calls by package, and
sloth's own by function (``--dump`` writes them as JSON, to diff two commits). Under
``TRITON_INTERPRET=1`` the kernels' launches are skipped (``--no-launch``: what the
interpreter runs is not host work a GPU sees), so the numbers are garbage and the calls
are what counts. Another commit: a ``git worktree`` of it first on ``PYTHONPATH``
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument(
        "--no-launch",
        action="store_true",
        help="skip the Triton kernels' launches (TRITON_INTERPRET=1)",
    )
    parser.add_argument("--top", type=int, default=25)
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
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
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
    if args.dump:
        args.dump.write_text(json.dumps(sloth, indent=1))


if __name__ == "__main__":
    main()
