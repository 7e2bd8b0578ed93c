"""``sloth bench``: measured speed and memory, against baselines in the same run."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sloth_core.io import write_text_atomically

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def add_parser(commands: argparse._SubParsersAction) -> None:
    bench = commands.add_parser("bench", help="benchmark ops (and, later, training)")
    sub = bench.add_subparsers(dest="bench_command", metavar="WHAT")
    kernels = sub.add_parser("kernels", help="every op, fwd+bwd, vs torch eager and compile")
    for name, default in (("tokens", 8192), ("hidden", 4096), ("intermediate", 14336),
                          ("heads", 32), ("kv-heads", 8), ("head-dim", 128),
                          ("vocab", 128256), ("rank", 16), ("runs", 20),
                          ("warmup", 5)):  # fmt: skip
        kernels.add_argument(f"--{name}", type=int, default=default)
    kernels.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    kernels.add_argument("--device", default=None, help="default: cuda if present, else cpu")
    kernels.add_argument("--ops", default="", help="comma-separated case names (default: all)")
    kernels.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    kernels.add_argument(
        "--no-graph",
        action="store_true",
        help="time calls as issued, host overhead included, not graph replays",
    )
    kernels.add_argument("--json", type=Path, help="write the full report here")
    kernels.add_argument("--markdown", type=Path, help="write the docs table here")
    kernels.set_defaults(run=run_kernels)
    train = sub.add_parser("train", help="LoRA training: sloth vs HF + PEFT (and other "
                                         "baselines), each in its own process")  # fmt: skip
    train.add_argument("--shape", default="llama-8b",
                       help="named model shape (llama-1b, llama-8b, qwen3-8b, gemma2-9b, "
                            "qwen3-30b-a3b, llama-tiny)")  # fmt: skip
    train.add_argument("--seq", type=int, default=2048)
    train.add_argument("--batch", type=int, default=4)
    train.add_argument("--steps", type=int, default=10)
    train.add_argument("--warmup", type=int, default=3)
    train.add_argument("--systems", default="sloth,hf",
                       help="comma-separated: sloth (sloth:on, sloth:off name its "
                            "checkpointing), hf, liger; or all (every installed one). "
                            "NAME[VAR=VALUE] runs NAME with VAR set in its process: "
                            "sloth,sloth[SLOTH_KEEP_PROJECTIONS=1],hf measures a switch "
                            "both ways in one run")  # fmt: skip
    train.add_argument("--quantization", choices=("nf4", "fp4", "int8", "fp8"), default=None,
                       help="QLoRA: base weights quantized while loading (sloth: sloth-bnb; "
                            "hf: transformers' BitsAndBytesConfig); fp8: sloth's base weights "
                            "in FP8 (sloth-fp8) against hf in bf16")  # fmt: skip
    train.add_argument("--nproc", default="1", type=_world_sizes,
                       help="comma-separated world sizes each system runs at, one GPU per "
                            "process through torchrun (1,2: one GPU, then two)")  # fmt: skip
    train.add_argument("--full", action="store_true",
                       help="full fine-tuning instead of LoRA (sloth systems; FSDP2 on "
                            "several processes)")  # fmt: skip
    train.add_argument("--device", default=None, help="default: cuda if present, else cpu")
    train.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="where the random-init model is written once (default: a cache dir)",
    )
    train.add_argument("--loss-tolerance", type=float, default=None,
                       help="flag systems whose first loss differs from hf's by more "
                            "(default 0.05)")  # fmt: skip
    train.add_argument("--targets", nargs="?", const="all", default=None, metavar="ROWS",
                       help="the performance targets, sloth vs hf, every row in one run "
                            "(all, or comma-separated: bf16, bf16-40g, nf4, bf16-8k, 1b, "
                            "context-nf4, fp8, moe); "
                            "--shape, --seq, --batch, --systems unused")  # fmt: skip
    context = train.add_argument_group(
        "max context", "--max-context: the longest sequence each system trains one step "
        "at, batch 1, each probe in its own process (--seq, --batch, --steps unused)")  # fmt: skip
    context.add_argument("--max-context", action="store_true")
    context.add_argument("--memory-budget-gib", type=float, default=None,
                         help="training: sloth plans its checkpointing per layer for it "
                              "(sloth train --memory-budget-gib); --max-context: CUDA: default "
                              "the device's total; CPU: default none (a probe fits if it runs), "
                              "else measured as peak RSS growth")  # fmt: skip
    context.add_argument("--context-start", type=int, default=1024, help="first length probed")
    context.add_argument("--context-cap", type=int, default=262144, help="longest length probed")
    context.add_argument(
        "--context-granularity", type=int, default=256, help="bisection stops at this many tokens"
    )
    context.add_argument("--journal", type=Path, default=None,
                         help="keep every probe's answer in this JSON-lines file, and reuse "
                              "the answers of earlier runs of the same search (same shape, "
                              "quantization, budget, device and versions): a search cut "
                              "short goes on where it stopped (also for --targets' context "
                              "rows)")  # fmt: skip
    context.add_argument("--time-limit-s", type=float, default=None,
                         help="start no probe after this many seconds and stop the one "
                              "running; the search reports how far it got (with --journal, "
                              "the next run goes on from there)")  # fmt: skip
    train.add_argument("--json", type=Path, help="write the full report here")
    train.add_argument("--markdown", type=Path, help="write the docs table here")
    train.add_argument("--plot", type=Path,
                       help="write a bar chart here (tokens/s and peak memory per "
                            "system; with --max-context the longest sequence); needs "
                            "matplotlib")  # fmt: skip
    train.set_defaults(run=run_train)
    for name, what in (
        ("dpo", "DPO training: sloth vs TRL's DPOTrainer (hf + PEFT)"),
        ("generate", "GRPO generation: sloth's sampling vs HF generate"),
    ):
        other = sub.add_parser(name, help=f"{what}, each in its own process")
        module = importlib.import_module(f"sloth_core.bench.{name}")
        module.add_options(other)
        other.set_defaults(run=lambda args, module=module: _run_module(module, args))
    plot = sub.add_parser(
        "plot",
        help="the bar chart of a saved --json report "
        "(train, --targets, --max-context, dpo, generate)",
    )
    plot.add_argument("report", type=Path, help="a report written by --json")
    plot.add_argument("out", type=Path, help="the image to write (format from its suffix)")
    plot.add_argument("--force", action="store_true", help="replace OUT if it exists")
    plot.set_defaults(run=_run_plot)
    bench.set_defaults(run=lambda args: bench.print_help() or 2)


def _run_module(module: Any, args: argparse.Namespace) -> int:
    """``sloth bench dpo|generate``: the module's bench, its table printed and the reports
    written as ``--json``/``--markdown`` ask; 1 when a system failed."""
    from sloth_core.bench.plot import PlotUnavailable, plot_report, require_matplotlib

    if args.plot:  # before anything is measured
        try:
            require_matplotlib()
        except PlotUnavailable as exc:
            raise SystemExit(f"sloth: {exc}") from None
    report = module.run(args)
    write_reports(args, report, module.markdown)
    if args.plot:
        plot_report(report, args.plot)
    Console().print(module.markdown(report, report["command"]), markup=False)
    return 1 if any(r.get("error") for r in report["results"]) else 0


def _run_plot(args: argparse.Namespace) -> int:
    """``sloth bench plot REPORT.json OUT.png``: the chart of a saved ``--json`` report."""
    from sloth_core.bench.plot import PlotUnavailable, plot_report

    if args.out.exists() and not args.force:
        raise SystemExit(f"sloth: {args.out} exists; pass --force to replace it")
    try:
        report = json.loads(args.report.read_text())
        path = plot_report(report, args.out)
    except (OSError, ValueError, PlotUnavailable) as exc:
        raise SystemExit(f"sloth: {args.report}: {exc}") from None
    except KeyError as exc:
        raise SystemExit(f"sloth: {args.report}: not a sloth bench report (no {exc})") from None
    Console().print(f"wrote {path}")
    return 0


def _world_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give world sizes like 1,2")
    return sizes


def write_reports(args: argparse.Namespace, report: dict, markdown) -> None:
    """Record the exact command in ``report``; write ``--json`` and ``--markdown``."""
    # `sloth ...` and `python -m sloth_core ...` take the same arguments after the program.
    report["command"] = "sloth " + shlex.join(sys.argv[1:])
    if args.json:
        write_text_atomically(args.json, json.dumps(report, indent=2))
    if args.markdown:
        write_text_atomically(args.markdown, markdown(report, report["command"]))


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

        def cell(system, key="median_ms", spec=".3f", by=by):
            value = by.get(system, {}).get(key)
            return "-" if value is None else format(value, spec)

        table.add_row(case["name"], cell("sloth"), cell("eager"), cell("compile"),
                      _ratio(case["speedup_vs_eager"]), _ratio(case["speedup_vs_compile"]),
                      cell("sloth", "gbps", ".0f"))  # fmt: skip
    Console().print(table)
    return 0


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def run_train(args: argparse.Namespace) -> int:
    import torch

    from sloth_core.bench import train as bench_train
    from sloth_core.bench.plot import PlotUnavailable, plot_report, require_matplotlib

    if args.shape not in bench_train.SHAPES:
        shapes = ", ".join(bench_train.SHAPES)
        raise SystemExit(f"sloth: unknown shape {args.shape!r}; shapes: {shapes}")
    try:
        run, _ = bench_train.resolve_systems(args.systems)
        if args.full and any(not system.startswith("sloth") for system in run):
            raise ValueError("--full is benchmarked for sloth systems only (--systems sloth)")
        if args.plot:  # before anything is measured
            require_matplotlib()
    except (ValueError, PlotUnavailable) as exc:
        raise SystemExit(f"sloth: {exc}") from None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cache = Path(os.environ.get("SLOTH_CACHE", Path.home() / ".cache" / "sloth"))
    model_dir = args.model_dir or cache / "bench-models" / args.shape
    if args.targets:
        return _run_targets(args, device, cache / "bench-models")
    if args.max_context:
        return _run_max_context(args, device, model_dir)
    tolerance = bench_train.LOSS_TOLERANCE if args.loss_tolerance is None else args.loss_tolerance
    report = bench_train.run_bench(
        args.shape, seq=args.seq, batch=args.batch, steps=args.steps, warmup=args.warmup,
        systems=args.systems, model_dir=model_dir, device=device,
        quantization=args.quantization, loss_tolerance=tolerance, nproc=args.nproc,
        full=args.full, budget_gib=args.memory_budget_gib,
    )  # fmt: skip
    write_reports(args, report, bench_train.markdown)
    if args.plot:
        plot_report(report, args.plot)
    quant = f", {args.quantization}" if args.quantization else ""
    table = Table(title=f"sloth bench train: {args.shape}, seq {args.seq} x batch {args.batch}"
                        f"{quant} on {report.get('device_name') or device}")  # fmt: skip
    columns = ("system", "attention", "tokens/s", "step ms", "peak GiB", "MFU %", "first loss",
               "last loss", "x hf speed", "x hf memory", "x 1 process")  # fmt: skip
    for column in columns:
        table.add_column(column)

    def num(value, spec):
        return "-" if value is None else format(value, spec)

    for r in report["results"]:
        if r.get("skipped") or r.get("error"):
            what = _status(r)
            table.add_row(r["system"], "", what, *[""] * (len(columns) - 3))
            continue
        first = f"{r['first_loss']:.4f}"
        if not r.get("same_start", True):
            first = f"[red]{first} (!)[/]"
        table.add_row(
            r["system"], r.get("attention") or "-", f"{r['tokens_per_s']:.0f}",
            f"{r['median_step_s'] * 1000:.1f}", num(r["peak_gib"], ".2f"),
            num(r["mfu"] and r["mfu"] * 100, ".1f"), first,
            f"{r['last_loss']:.4f}" + ("" if r.get("same_end", True) else " (!)"),
            num(r.get("speed_vs_hf"), ".2f"), num(r.get("memory_vs_hf"), ".2f"),
            num(r.get("speed_vs_1"), ".2f"),
        )  # fmt: skip
    _print_table(table, report["results"])
    if not report["losses_agree"]:
        Console(stderr=True).print(
            f"[red]sloth: first or last losses differ by more than "
            f"{report['loss_tolerance']} (the last: and a share of the reference's drop or "
            "last loss; marked (!)): the systems do not train the same model[/]")  # fmt: skip
    failed = any(r.get("error") for r in report["results"]) or not report["losses_agree"]
    return 1 if failed else 0


def _status(result: dict) -> str:
    """A skipped or failed system's table cell; the reason follows the table."""
    return "[yellow]skipped[/]" if result.get("skipped") else "[red]error[/]"


def _print_table(table: Table, results: list[dict]) -> None:
    """The table, then why each skipped or failed system did not run (full width)."""
    console = Console()
    console.print(table)
    for r in results:
        if r.get("skipped"):
            console.print(f"[yellow]{r['system']}: skipped: {escape(r['skipped'])}[/]")
        elif r.get("error"):
            console.print(f"[red]{r['system']}: error: {escape(r['error'])}[/]")


def _run_targets(args: argparse.Namespace, device: str, model_root: Path) -> int:
    from sloth_core.bench import targets as bench_targets

    try:
        rows = bench_targets.select(args.targets)
    except ValueError as exc:
        raise SystemExit(f"sloth: {exc}") from None
    console = Console(stderr=True)

    def progress(row):
        status = "met" if row["met"] else f"missed ({row.get('error') or row['checks']})"
        console.print(f"{row['name']}: {escape(status)}")

    report = bench_targets.run_targets(
        rows, model_root=args.model_dir or model_root, device=device, steps=args.steps,
        warmup=args.warmup, progress=progress, journal=args.journal,
        time_limit_s=args.time_limit_s, probe_progress=_probe_progress(console),
        # the rows so far, after each: a run stopped later still leaves those it finished
        on_report=lambda so_far: write_reports(args, so_far, bench_targets.markdown),
    )  # fmt: skip
    write_reports(args, report, bench_targets.markdown)
    if args.plot:
        from sloth_core.bench.plot import plot_report

        plot_report(report, args.plot)
    table = Table(title=f"sloth bench train --targets on {report.get('device_name') or device}")
    for column in ("workload", "speed vs hf", "memory vs hf", "MFU", "context vs hf", "met"):
        table.add_column(column)
    for row in report["rows"]:
        if row.get("error"):
            table.add_row(row["workload"], "[red]error[/]", "", "", "", "no")
            continue

        def cell(key, sign, row=row, pct=False):
            if key not in row["target"]:
                return "-"
            value, goal = row.get(key), row["target"][key]
            if pct:
                return f"{'-' if value is None else f'{value:.1%}'} ({sign} {goal:.0%})"
            return f"{'-' if value is None else f'{value:.2f}x'} ({sign} {goal:g}x)"

        met = "[green]yes[/]" if row["met"] else "[red]no[/]"
        table.add_row(row["workload"], cell("speed", ">="), cell("memory", "<="),
                      cell("mfu", ">=", pct=True), cell("context", ">="), met)  # fmt: skip
    Console().print(table)
    for row in report["rows"]:
        if row.get("error"):
            Console().print(f"[red]{row['name']}: {escape(row['error'])}[/]")
    return 1 if any(row.get("error") for row in report["rows"]) else 0


def _probe_progress(console: Console):
    """Each probe's answer as it comes (a search of a large model runs for minutes)."""

    def show(system: str, answer: dict) -> None:
        peak = answer.get("peak_gib")
        what = "fits" if answer["fits"] else f"does not fit ({answer.get('reason', '')[:80]})"
        console.print(escape(
            f"{system}: {answer['seq']} tokens: {what}"
            + (f", peak {peak:.2f} GiB" if peak is not None else "")
            + (" (journal)" if answer.get("journal") else "")))  # fmt: skip

    return show


def _run_max_context(args: argparse.Namespace, device: str, model_dir: Path) -> int:
    from sloth_core.bench.context import length_cell, markdown, run_max_context
    from sloth_core.bench.plot import plot_report

    if not device.startswith("cuda") and args.memory_budget_gib is not None:
        Console(stderr=True).print(
            "sloth: on the CPU the memory budget is checked against the growth of the "
            "probe process's peak RSS (model, activations, optimizer, allocator slack)"
        )  # fmt: skip
    report = run_max_context(
        args.shape, systems=args.systems, model_dir=model_dir, device=device,
        quantization=args.quantization, budget_gib=args.memory_budget_gib,
        start=args.context_start, cap=args.context_cap, granularity=args.context_granularity,
        journal=args.journal, time_limit_s=args.time_limit_s,
        progress=_probe_progress(Console(stderr=True)),
    )  # fmt: skip
    write_reports(args, report, markdown)
    if args.plot:
        plot_report(report, args.plot)
    budget = "device total" if args.memory_budget_gib is None else f"{args.memory_budget_gib:g} GiB"
    if not device.startswith("cuda") and args.memory_budget_gib is None:
        budget = "none (fits = runs)"
    table = Table(title=f"sloth bench train --max-context: {args.shape}, batch 1, "
                        f"{args.quantization or 'bf16'}, budget {budget}, {device}")  # fmt: skip
    for column in ("system", "max context", "x hf", "probes (seq: fits)"):
        table.add_column(column)
    for r in report["results"]:
        if r.get("skipped") or r.get("error"):
            what = _status(r)
            table.add_row(r["system"], what, "", "")
            continue
        probes = " ".join(f"{p['seq']}:{'y' if p['fits'] else 'n'}" for p in r["probes"])
        ratio = "-" if "context_vs_hf" not in r else f"{r['context_vs_hf']:.2f}"
        table.add_row(r["system"], length_cell(r, r.get("start", report["start"])), ratio,
                      probes)  # fmt: skip
    _print_table(table, report["results"])
    return 1 if any(r.get("error") for r in report["results"]) else 0
