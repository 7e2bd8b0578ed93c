"""``sloth doctor``: versions, the GPU, and which implementation every op resolves to."""

from __future__ import annotations

import argparse
import json
import platform
from importlib import metadata
from typing import Any

from rich.console import Console
from rich.table import Table

from sloth_core.plugins import get_plugin_manager

LIBRARIES = ("torch", "triton", "transformers", "peft", "bitsandbytes", "accelerate", "pluggy")


def add_parser(commands: argparse._SubParsersAction) -> None:
    doctor = commands.add_parser("doctor", help="show versions, the GPU and op choices")
    doctor.add_argument("--json", action="store_true", help="print JSON instead of tables")
    doctor.set_defaults(run=run)


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def gather() -> dict[str, Any]:
    """Everything ``sloth doctor`` reports, as plain data."""
    import torch

    manager = get_plugin_manager()
    versions = {"python": platform.python_version(), "sloth-core": _version("sloth-core")}
    versions.update({name: _version(name) for name in LIBRARIES})
    gpus = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            gpus.append(
                {
                    "index": index,
                    "name": props.name,
                    "memory_gib": round(props.total_memory / 2**30, 1),
                    "capability": f"{props.major}.{props.minor}",
                    "bf16": torch.cuda.is_bf16_supported(),
                }
            )
    device = "cuda" if gpus else "cpu"
    dtype = torch.bfloat16 if gpus else torch.float32
    return {
        "versions": versions,
        "cuda": torch.version.cuda,
        "gpus": gpus,
        "ops": {
            "device": device,
            "dtype": str(dtype),
            "resolved": manager.ops.table(device, dtype),
        },
        "plugins": {r.name: r.status for r in manager.plugins(include_builtins=True)},
    }


def run(args: argparse.Namespace) -> int:
    report = gather()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    console = Console()
    versions = Table(title="versions")
    versions.add_column("package")
    versions.add_column("version")
    for name, version in report["versions"].items():
        versions.add_row(name, version or "[dim]not installed[/]")
    console.print(versions)
    if report["gpus"]:
        for gpu in report["gpus"]:
            console.print(
                f"GPU {gpu['index']}: {gpu['name']}, {gpu['memory_gib']} GiB, "
                f"compute capability {gpu['capability']}, CUDA {report['cuda']}"
            )
    else:
        console.print("GPU: none found (CPU only: kernels fall back to the torch references)")
    ops = Table(title=f"ops on {report['ops']['device']} ({report['ops']['dtype']})")
    ops.add_column("op")
    ops.add_column("implementation")
    for op, provider in report["ops"]["resolved"].items():
        ops.add_row(op, provider)
    console.print(ops)
    failed = [name for name, status in report["plugins"].items() if status == "failed"]
    if failed:
        console.print(
            f"[bold red]failed plugins:[/] {', '.join(failed)} (see `sloth plugins list`)"
        )
    return 0
