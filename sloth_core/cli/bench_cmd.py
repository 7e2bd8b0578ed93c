"""``sloth bench``: measured speed and memory, against baselines in the same run."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def add_parser(commands: argparse._SubParsersAction) -> None:
    bench = commands.add_parser("bench", help="benchmark ops (and, later, training)")
    sub = bench.add_subparsers(dest="bench_command", metavar="WHAT")
    kernels = sub.add_parser("kernels", help="every op, fwd+bwd, vs torch eager and compile")
    for name, default in (("tokens", 8192), ("hidden", 4096), ("intermediate", 14336),
                          ("heads", 32), ("kv-heads", 8), ("head-dim", 128),
                          ("vocab", 128256), ("rank", 16), ("runs", 20), ("warmup", 5)):  # fmt: skip
        kernels.add_argument(f"--{name}", type=int, default=default)
    kernels.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    kernels.add_argument("--device", default=None, help="default: cuda if present, else cpu")
    kernels.add_argument("--ops", default="", help="comma-separated case names (default: all)")
    kernels.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    kernels.add_argument("--no-graph", action="store_true",
                         help="time calls as issued, host overhead included, not graph replays")
    kernels.add_argument("--json", type=Path, help="write the full report here")
    kernels.add_argument("--markdown", type=Path, help="write the docs table here")
    kernels.set_defaults(run=run_kernels)
    train = sub.add_parser("train", help="LoRA training: sloth vs HF + PEFT, each in its own process")
    train.add_argument("--shape", default="llama-8b", help="named model shape (llama-1b, llama-8b, qwen3-8b, gemma2-9b, llama-tiny)")
    train.add_argument("--seq", type=int, default=2048)
    train.add_argument("--batch", type=int, default=4)
    train.add_argument("--steps", type=int, default=10)
    train.add_argument("--warmup", type=int, default=3)
    train.add_argument("--systems", default="sloth,hf")
    train.add_argument("--quantization", choices=("nf4", "fp4", "int8"), default=None,
                       help="QLoRA: base weights quantized while loading (sloth: sloth-bnb; "
                            "hf: transformers' BitsAndBytesConfig)")  # fmt: skip
    train.add_argument("--device", default=None, help="default: cuda if present, else cpu")
    train.add_argument("--model-dir", type=Path, default=None,
                       help="where the random-init model is written once (default: a cache dir)")
    train.add_argument("--json", type=Path, help="write the full report here")
    train.add_argument("--markdown", type=Path, help="write the docs table here")
    train.set_defaults(run=run_train)
    bench.set_defaults(run=lambda args: bench.print_help() or 2)


def write_reports(args: argparse.Namespace, report: dict, markdown) -> None:
    """Record the exact command in ``report``; write ``--json`` and ``--markdown``."""
    # `sloth ...` and `python -m sloth_core ...` take the same arguments after the program.
    report["command"] = "sloth " + shlex.join(sys.argv[1:])
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if args.markdown:
        args.markdown.write_text(markdown(report, report["command"]))


def run_kernels(args: argparse.Namespace) -> int:
    import torch

    from sloth_core.bench.kernel_cases import Shapes
    from sloth_core.bench.kernels import markdown, run_kernel_bench
    from sloth_core.plugins import get_plugin_manager

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    shapes = Shapes(
        tokens=args.tokens, hidden=args.hidden, intermediate=args.intermediate,
        heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim, vocab=args.vocab,
        rank=args.rank, dtype=getattr(torch, DTYPES[args.dtype]), device=device,
    )  # fmt: skip
    console = Console(stderr=True)

    def progress(name, entry):
        status = entry.error or f"{entry.median_ms:.3f} ms"
        console.print(f"{name:<28} {entry.system:<13} {entry.provider:<16} {status}")

    only = {o.strip() for o in args.ops.split(",") if o.strip()} or None
    report = run_kernel_bench(
        get_plugin_manager().ops, shapes, runs=args.runs, warmup=args.warmup,
        compile=not args.no_compile, only=only, progress=progress, graph=not args.no_graph,
    )  # fmt: skip
    write_reports(args, report, markdown)
    table = Table(title=f"sloth bench kernels on {report['device']}")
    for column in ("case", "sloth ms", "eager ms", "compile ms", "x eager", "x compile", "GB/s"):
        table.add_column(column)
    for case in report["cases"]:
        by = {r["system"]: r for r in case["results"]}

        def cell(system, key="median_ms", spec=".3f"):
            value = by.get(system, {}).get(key)
            return "-" if value is None else format(value, spec)

        table.add_row(case["name"], cell("sloth"), cell("eager"), cell("compile"),
                      "-" if case["speedup_vs_eager"] is None else f"{case['speedup_vs_eager']:.2f}",
                      "-" if case["speedup_vs_compile"] is None else f"{case['speedup_vs_compile']:.2f}",
                      cell("sloth", "gbps", ".0f"))  # fmt: skip
    Console().print(table)
    return 0


def run_train(args: argparse.Namespace) -> int:
    import torch

    from sloth_core.bench.train import SHAPES, markdown, run_bench

    if args.shape not in SHAPES:
        raise SystemExit(f"sloth: unknown shape {args.shape!r}; shapes: {', '.join(SHAPES)}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cache = Path(os.environ.get("SLOTH_CACHE", Path.home() / ".cache" / "sloth"))
    model_dir = args.model_dir or cache / "bench-models" / args.shape
    systems = tuple(s.strip() for s in args.systems.split(",") if s.strip())
    from sloth_core.bench.train import KNOWN_SYSTEMS

    if not systems or set(systems) - set(KNOWN_SYSTEMS):
        raise SystemExit(f"sloth: --systems {args.systems!r}; choose from {', '.join(KNOWN_SYSTEMS)}")
    report = run_bench(args.shape, seq=args.seq, batch=args.batch, steps=args.steps,
                       warmup=args.warmup, systems=systems, model_dir=model_dir, device=device,
                       quantization=args.quantization)  # fmt: skip
    write_reports(args, report, markdown)
    table = Table(title=f"sloth bench train: {args.shape}, seq {args.seq} x batch {args.batch}")
    for column in ("system", "attention", "tokens/s", "peak GiB", "MFU %", "first loss", "last loss", "x hf speed", "x hf memory"):
        table.add_column(column)
    for r in report["results"]:
        if r.get("error"):
            table.add_row(r["system"], "", f"[red]{r['error'][:200]}[/]", *[""] * 6)
            continue
        table.add_row(
            r["system"], r.get("attention") or "-", f"{r['tokens_per_s']:.0f}",
            "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}",
            "-" if r["mfu"] is None else f"{r['mfu'] * 100:.1f}",
            f"{r['first_loss']:.4f}", f"{r['last_loss']:.4f}",
            f"{r.get('speed_vs_hf', 0):.2f}", "-" if "memory_vs_hf" not in r else f"{r['memory_vs_hf']:.2f}",
        )  # fmt: skip
    Console().print(table)
    return 0 if not any(r.get("error") for r in report["results"]) else 1
