"""The ``sloth`` command line."""

from __future__ import annotations

import argparse
import difflib
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
from sloth_core.errors import Interrupted, SlothError


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


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parser.parse_args``, except that a flag no command has is reported by the
    subcommand it was given to (its usage, not the top level's), with the nearest flags."""
    args, unknown = parser.parse_known_args(argv)
    if not unknown:
        return args
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    command = commands.choices.get(getattr(args, "command", None) or "", parser)
    flags = [s for action in command._actions for s in action.option_strings]
    hints = []
    for arg in unknown:
        close = difflib.get_close_matches(arg.split("=", 1)[0], flags, n=1, cutoff=0.7)
        hints.append(f"{arg} (did you mean {close[0]}?)" if close else arg)
    command.error(f"unrecognized arguments: {' '.join(hints)}")
    raise AssertionError("unreachable: argparse's error() exits")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = _parse(parser, argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except Interrupted as exc:
        print(f"sloth: {exc}", file=sys.stderr)
        return exc.exit_code
    except SlothError as exc:
        print(f"sloth: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:  # one line, not a traceback: nothing half-written is kept
        print("sloth: interrupted", file=sys.stderr)
        return 130
