"""``sloth export SOURCE --format F --output PATH [--quantization Q] [--verify] [--force]``.

SOURCE is anything the model-source service reads (:mod:`sloth_core.sources`): a model
directory (or hub id), a PEFT adapter directory, a ``sloth train`` output directory (its
``final/``, else its newest checkpoint), one ``checkpoint-N`` directory, or a GGUF file
(re-exported from its dequantized weights). Nothing is overwritten without
``--force``; the export is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import argparse
import difflib
from pathlib import Path
from typing import Any

from sloth_core.errors import PluginMissingError, SlothError
from sloth_core.sources import DTYPES, ModelSource, load_source, resolve_source


class _FormatsHelp(argparse.HelpFormatter):
    """Fills ``{formats}`` in a help text with the installed formats, only when help is
    printed: the formats are what the installed plugins declare."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = super()._get_help_string(action)
        if text and "{formats}" in text:
            from sloth_core.plugins import get_plugin_manager

            formats = "; ".join(describe_formats(get_plugin_manager())) or "none installed"
            text = text.replace("{formats}", formats.replace("%", "%%"))
        return text


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "export",
        formatter_class=_FormatsHelp,
        help="export a model, adapter or training run (merged safetensors, GGUF, Ollama, ...)",
        description="Export SOURCE in a format served by an installed plugin; "
        "`sloth plugins list --all` shows which. --verify reloads the result and compares "
        "its logits and tokenizer with the model in memory.",
    )
    parser.add_argument(
        "source", metavar="SOURCE",
        help="a model directory or hub id, a LoRA adapter directory, a `sloth train` "
        "output directory or one of its checkpoint-N directories, a .gguf file",
    )  # fmt: skip
    parser.add_argument("--format", "-f", required=True, help="one of the installed: {formats}")
    parser.add_argument("--output", "-o", required=True, metavar="PATH", help="where to write")
    parser.add_argument(
        "--quantization", "-q", metavar="Q",
        help="the format's weight type (see --format: each format's quantizations)",
    )  # fmt: skip
    parser.add_argument(
        "--dtype", choices=DTYPES, default="auto",
        help="dtype the model loads in (auto: the one its config.json names)",
    )  # fmt: skip
    parser.add_argument("--device", help="where the model loads: cpu (default), cuda, auto")
    parser.add_argument("--max-shard-size", metavar="SIZE", help="e.g. 2GB (safetensors formats)")
    parser.add_argument("--verify", action="store_true", help="reload the export and compare")
    parser.add_argument("--force", action="store_true", help="replace an existing output")
    from sloth_core.cli.generate_cmd import add_trust_arguments

    add_trust_arguments(parser)
    parser.set_defaults(run=run)


# -- the format -----------------------------------------------------------------------------
def describe_formats(manager: Any) -> list[str]:
    """One line per installed format: its names, weight types and plugin."""
    lines = []
    for name, declared in manager.formats.items():
        if name != declared.name:
            continue  # an alias: listed with its format
        resolved = manager.export_format(name)
        label = ", ".join(declared.names())
        types = resolved.quantization_label()
        if types:
            label += f" (quantization: {types})"
        lines.append(f"{label} [{declared.plugin}]")
    return lines


def check_format(manager: Any, name: str) -> None:
    """Raise, listing the installed formats and the plugin to install, unless ``name`` is served."""
    from sloth_core.catalog import distribution_for, install_command, not_installed

    if name in manager.exporters:
        return
    elsewhere = sorted(
        f"{fmt} (`{install_command(dist)}`)"
        for fmt, dist in not_installed("formats", manager.exporters).items()
    )
    listing = f"installed formats: {'; '.join(describe_formats(manager)) or 'none'}"
    if elsewhere:
        listing += f"; formats of plugins not installed: {', '.join(elsewhere)}"
    dist = distribution_for("formats", name)
    if dist:
        raise PluginMissingError(
            f"export format {name!r} needs the plugin {dist}, which is not installed: "
            f"`{install_command(dist)}` ({listing})"
        )
    known = [*manager.exporters, *not_installed("formats", manager.exporters)]
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise PluginMissingError(f"unknown export format {name!r}{hint} ({listing})")


# -- the command ----------------------------------------------------------------------------
def _refuse_overlap(source: ModelSource, output: Path) -> None:
    """Even with ``--force``, never replace what the export reads: the source, or the base
    model an adapter or checkpoint was trained on (the adapter would lose its base)."""
    out = output.expanduser().resolve()
    for path in source.inputs():
        resolved = path.resolve()
        if resolved == out or resolved.is_relative_to(out):
            what = "the source" if str(path) == str(source.path) else "the base model of the source"
            raise SlothError(
                f"--output {output} would replace {what}, {path}: pick another output path"
            )


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from sloth_core.api import export
    from sloth_core.io import refuse_existing
    from sloth_core.plugins import get_plugin_manager

    console = Console(stderr=True, soft_wrap=True)  # paths stay whole, for copying
    manager = get_plugin_manager()
    check_format(manager, args.format)
    source = resolve_source(args.source)
    output = Path(args.output).expanduser()
    refuse_existing(output, args.force)
    _refuse_overlap(source, output)

    console.print(f"loading {source.describe()}")
    model, tokenizer = load_source(
        source, dtype=args.dtype, device=args.device, manager=manager,
        trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle,
    )  # fmt: skip
    if source.trained_chat_template:
        console.print(f"chat template: {source.trained_chat_template!r}, as the run trained with")
    options = {"max_shard_size": args.max_shard_size} if args.max_shard_size else {}
    try:
        result = export(
            model, tokenizer, output, format=args.format, quantization=args.quantization,
            force=args.force, manager=manager, **options,
        )  # fmt: skip
    except ValueError as exc:  # an exporter refusing this model or an option: no traceback
        raise SlothError(f"{args.format}: {exc}") from exc
    console.print(
        f"exported {result.format} to {result.path} "
        f"({len(result.files)} files, {_size(Path(result.path)) / 2**20:.1f} MiB)"
    )
    if args.format == "vllm":
        console.print(
            "note: vllm is an alias of merged_16bit (the same directory); "
            f"serve it with `vllm serve {result.path}`"
        )
    if not args.verify:
        return 0
    from sloth_core.verify import print_report, verify_export

    report = verify_export(
        result.path, model, tokenizer, format=args.format, quantization=args.quantization,
        manager=manager,
    )  # fmt: skip
    print_report(report, console)
    if not report.passed:
        console.print(f"[bold red]verification failed[/]; the export is kept at {result.path}")
        return 1
    return 0
