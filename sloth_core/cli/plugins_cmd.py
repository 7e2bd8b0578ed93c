"""``sloth plugins list``: what is installed, what each plugin does, and what failed."""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.table import Table

from sloth_core.cli import plugins_new
from sloth_core.plugins import PluginRecord, SlothPluginManager, get_plugin_manager


def add_parser(commands: argparse._SubParsersAction) -> None:
    plugins = commands.add_parser("plugins", help="list installed plugins, or create one")
    sub = plugins.add_subparsers(dest="plugins_command", metavar="COMMAND")
    listing = sub.add_parser("list", help="list plugins, their hooks and their status")
    listing.add_argument("--all", action="store_true", help="include the core's built-ins")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.add_argument("--hook", metavar="NAME", help="only plugins implementing hook NAME")
    listing.set_defaults(run=run_list)
    plugins_new.add_parser(sub)
    plugins.set_defaults(run=lambda args: plugins.print_help() or 2)


def select(manager: SlothPluginManager, *, include_builtins: bool, hook: str | None):
    if hook is not None and hook not in manager.hook_names():
        raise SystemExit(f"sloth: unknown hook {hook!r}; hooks: {', '.join(manager.hook_names())}")
    records = manager.plugins(include_builtins=include_builtins)
    return [r for r in records if hook is None or hook in r.hooks]


def _format_label(manager: SlothPluginManager, name: str) -> str:
    declared = manager.export_format(name)
    types = declared.quantization_label() if declared else ""
    return f"{name} ({types})" if types else name


def _provides(record: PluginRecord, manager: SlothPluginManager) -> str:
    parts = []
    for label, values in (
        ("models", sorted(set(record.architectures))),
        ("ops", sorted(set(record.ops))),
        ("quantizers", sorted(set(record.quantizers))),
        ("formats", [_format_label(manager, f) for f in dict.fromkeys(record.exporters)]),
    ):
        if values:
            parts.append(f"{label}: {', '.join(values)}")
    return "\n".join(parts)


def _as_dict(record: PluginRecord, manager: SlothPluginManager) -> dict:
    """The record, with each format's names and weight types as its plugin declared them."""
    formats = {}
    for name in dict.fromkeys(record.exporters):
        declared = manager.export_format(name)
        if declared is not None:
            formats[name] = {
                "aliases": list(declared.aliases),
                "quantizations": declared.quantization_names(),
                "default_quantization": declared.default_quantization,
                "wraps": declared.wraps,
                "verifies": declared.verify is not None,
            }
    return {**record.as_dict(), "formats": formats}


def run_list(args: argparse.Namespace) -> int:
    manager = get_plugin_manager()
    records = select(manager, include_builtins=args.all, hook=args.hook)
    if args.json:
        print(json.dumps([_as_dict(r, manager) for r in records], indent=2))
        return 0
    table = Table(title="sloth plugins", show_lines=True)
    for column in ("name", "version", "kind", "source", "hooks", "provides", "status"):
        table.add_column(column, overflow="fold")
    style = {"active": "green", "failed": "bold red", "disabled": "yellow"}
    for r in records:
        status = f"[{style[r.status]}]{r.status}[/]" + (f"\n{r.reason}" if r.reason else "")
        table.add_row(
            r.name, r.version or "-", r.kind, r.source, ", ".join(r.hooks) or "-",
            _provides(r, manager), status,
        )  # fmt: skip
    console = Console()
    if records:
        console.print(table)
    else:
        console.print("no plugins installed" + ("" if args.all else " (--all shows built-ins)"))
    return 0
