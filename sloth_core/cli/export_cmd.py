"""``sloth export SOURCE --format F --output PATH [--quantization Q] [--verify] [--force]``.

SOURCE is a model directory (or hub id), a PEFT adapter directory (its base comes from
``adapter_config.json``), a ``sloth train`` output directory (its ``final/``, else its
newest checkpoint) or one ``checkpoint-N`` directory. Nothing is overwritten without
``--force``; the export is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import argparse
import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sloth_core.errors import ModelNotFoundError, PluginMissingError, SlothError

DTYPES = ("auto", "float32", "float16", "bfloat16")


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
        "output directory or one of its checkpoint-N directories",
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
        types = resolved.quantization_names()
        if types:
            default = resolved.default_quantization
            label += f" (quantization: {', '.join(types)}" + (
                f"; default {default})" if default else ")"
            )
        lines.append(f"{label} [{declared.plugin}]")
    return lines


def check_format(manager: Any, name: str) -> None:
    """Raise, listing the installed formats and the plugin to install, unless ``name`` is served."""
    from sloth_core.catalog import distribution_for, not_installed

    if name in manager.exporters:
        return
    elsewhere = sorted(
        f"{fmt} (`pip install {dist}`)"
        for fmt, dist in not_installed("formats", manager.exporters).items()
    )
    listing = f"installed formats: {'; '.join(describe_formats(manager)) or 'none'}"
    if elsewhere:
        listing += f"; formats of plugins not installed: {', '.join(elsewhere)}"
    dist = distribution_for("formats", name)
    if dist:
        raise PluginMissingError(
            f"export format {name!r} needs the plugin {dist}, which is not installed: "
            f"`pip install {dist}` ({listing})"
        )
    known = [*manager.exporters, *not_installed("formats", manager.exporters)]
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise PluginMissingError(f"unknown export format {name!r}{hint} ({listing})")


# -- the source -----------------------------------------------------------------------------
@dataclass
class Source:
    """What SOURCE holds: ``kind`` is "model", "adapter" or "full" (a full fine-tune's
    checkpoint: base model plus ``trainable.safetensors``)."""

    kind: str
    path: Path | str
    base: str | None = None
    chat_template: str | None = None  # the template the run trained with, by name
    description: str = ""


def _training_template(run_dir: Path) -> str | None:
    from sloth_core.train.checkpoint import STATE_FILE, list_checkpoints

    states = [c / STATE_FILE for c in list_checkpoints(run_dir)] or [run_dir / STATE_FILE]
    if not states[-1].is_file():
        return None
    config = json.loads(states[-1].read_text()).get("config", {})
    return config.get("chat_template") or None


def _adapter(path: Path, what: str) -> Source:
    config = json.loads((path / "adapter_config.json").read_text())
    base = config.get("base_model_name_or_path")
    if not base:
        raise ModelNotFoundError(f"{path}/adapter_config.json names no base_model_name_or_path")
    return Source("adapter", path, base=str(base), description=f"{what} {path} on base {base}")


def resolve_source(source: str) -> Source:
    """Find out what ``source`` holds (see the module docstring)."""
    from sloth_core.train.checkpoint import STATE_FILE, TRAINABLE_FILE, list_checkpoints

    path = Path(source).expanduser()
    if not path.exists():
        if source.count("/") == 1 and not source.startswith((".", "/", "~")):
            return Source("model", source, description=f"hub model {source}")
        raise ModelNotFoundError(f"{path} does not exist")
    if not path.is_dir():
        raise ModelNotFoundError(f"{path} is not a directory")
    if (path / "adapter_config.json").is_file():
        return _adapter(path, "LoRA adapter")
    if (path / "config.json").is_file():
        return Source("model", path, description=f"model {path}")
    if (path / STATE_FILE).is_file():  # one checkpoint-N of `sloth train`
        template = _training_template(path)
        if (path / "adapter" / "adapter_config.json").is_file():
            found = _adapter(path / "adapter", "checkpoint adapter")
        elif (path / TRAINABLE_FILE).is_file():
            config = json.loads((path / STATE_FILE).read_text()).get("config", {})
            if not config.get("model_name"):
                raise ModelNotFoundError(f"{path}/{STATE_FILE} names no model_name")
            found = Source(
                "full", path, base=config["model_name"],
                description=f"checkpoint {path} (full fine-tune of {config['model_name']})",
            )  # fmt: skip
        else:
            raise ModelNotFoundError(f"{path} is a checkpoint without adapter/ or {TRAINABLE_FILE}")
        found.chat_template = template
        return found
    if (path / "final").is_dir() or list_checkpoints(path):
        inner = path / "final" if (path / "final").is_dir() else list_checkpoints(path)[-1]
        found = resolve_source(str(inner))
        found.chat_template = found.chat_template or _training_template(path)
        found.description += f" (from the training run {path})"
        return found
    raise ModelNotFoundError(
        f"{path} holds no model: expected config.json (a model), adapter_config.json (a "
        f"LoRA adapter), {STATE_FILE} (a checkpoint) or final/ or checkpoint-N/ (a `sloth "
        "train` output directory)"
    )


def _dtype(choice: str, model_dir: Path | str) -> Any:
    import torch

    if choice != "auto":
        return getattr(torch, choice)
    config_file = Path(model_dir) / "config.json"
    if not config_file.is_file():
        return None
    config = json.loads(config_file.read_text())
    name = str(config.get("dtype") or config.get("torch_dtype") or "")
    value = getattr(torch, name.removeprefix("torch."), None) if name else None
    return value if isinstance(value, torch.dtype) else None


def load_source(
    source: Source, *, dtype: str = "auto", device: str | None = None,
    trust_remote_code: bool = False, allow_pickle: bool = False,
):  # fmt: skip
    """Load ``source`` as the model and tokenizer to export."""
    from sloth_core.api import load_model
    from sloth_core.trust import check_remote_code
    from sloth_core.types import ModelSpec

    model_dir = source.path if source.kind == "model" else source.base
    spec = ModelSpec(
        model_name=str(model_dir), dtype=_dtype(dtype, model_dir), device_map=device,
        trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
    )  # fmt: skip
    try:
        model, tokenizer, _ = load_model(spec)
    except ModelNotFoundError as exc:
        if source.kind == "model":
            raise
        raise ModelNotFoundError(f"the base model of {source.path}: {exc}") from None
    if source.kind == "adapter":
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(source.path))
        if (Path(source.path) / "tokenizer_config.json").is_file():
            from transformers import AutoTokenizer

            check_remote_code(source.path, trust_remote_code)
            tokenizer = AutoTokenizer.from_pretrained(
                str(source.path), trust_remote_code=trust_remote_code
            )
    elif source.kind == "full":
        _load_trainable(model, Path(source.path))
    if source.chat_template:
        from sloth_core.data import resolve_chat_template

        tokenizer.chat_template = resolve_chat_template(tokenizer, source.chat_template)
    return model, tokenizer


def _load_trainable(model: Any, checkpoint: Path) -> None:
    import torch
    from safetensors.torch import load_file

    from sloth_core.train.checkpoint import TRAINABLE_FILE

    tensors = load_file(str(checkpoint / TRAINABLE_FILE))
    params = dict(model.named_parameters())
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise SlothError(f"{checkpoint}: tensors the model does not have: {unknown[:3]}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)


# -- the command ----------------------------------------------------------------------------
def _refuse_overlap(source: Source, output: Path) -> None:
    """Even with ``--force``, never replace what the export reads: the source, or the base
    model an adapter or checkpoint was trained on (the adapter would lose its base)."""
    out = output.expanduser().resolve()
    inputs = [(source.path, "the source"), (source.base, "the base model of the source")]
    for path, what in inputs:
        if path is None or not Path(path).expanduser().exists():
            continue  # a hub id: nothing on this disk to replace
        resolved = Path(path).expanduser().resolve()
        if resolved == out or resolved.is_relative_to(out):
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

    console.print(f"loading {source.description}")
    model, tokenizer = load_source(
        source, dtype=args.dtype, device=args.device,
        trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle,
    )  # fmt: skip
    if source.chat_template:
        console.print(f"chat template: {source.chat_template!r}, as the run trained with")
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
