"""The ``sloth`` command line."""

from __future__ import annotations

import argparse
import sys

from sloth_core import __version__
from sloth_core.cli import (
    bench_cmd,
    chat_cmd,
    doctor,
    export_cmd,
    generate_cmd,
    plugins_cmd,
    train_cmd,
)
from sloth_core.errors import SlothError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sloth", description="Fast, memory-lean fine-tuning of large language models."
    )
    parser.add_argument("--version", action="version", version=f"sloth {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    plugins_cmd.add_parser(commands)
    doctor.add_parser(commands)
    bench_cmd.add_parser(commands)
    train_cmd.add_parser(commands)
    export_cmd.add_parser(commands)
    generate_cmd.add_parser(commands)
    chat_cmd.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except SlothError as exc:
        print(f"sloth: error: {exc}", file=sys.stderr)
        return 1
