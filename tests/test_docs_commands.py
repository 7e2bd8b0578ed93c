"""Every ``sloth ...`` command the README and the docs show is one sloth accepts as
written: its subcommand exists and so does each of its options, with a value where one is
needed. Commands are taken from code blocks (fenced or indented) and from inline code;
synopses with placeholders (``DIR``, ``[--json]``, ``...``) are left to the help text."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from sloth_core.cli import _parse, build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
        *sorted(ROOT.glob("plugins/*/README.md")), ROOT / "kernels" / "README.md"]  # fmt: skip
_SUBCOMMANDS = ("plugins", "doctor", "bench", "train", "export", "generate", "chat")
#: A command starts a line (a code block's, or after a shell prompt) or inline code.
_COMMAND = re.compile(rf"(?:^\s*(?:\$ )?|`)(sloth (?:{'|'.join(_SUBCOMMANDS)})\b[^`\n#|]*)")
_PLACEHOLDER = re.compile(r"\.\.\.|\[|\]|\b[A-Z]{1,6}\b(?![-\w])|<\w+>|/")


def _commands() -> list[tuple[str, str]]:
    found = {}
    for doc in DOCS:
        for line in doc.read_text(encoding="utf-8").splitlines():
            for match in _COMMAND.finditer(line):
                text = match.group(1).strip().rstrip(".,;:)")
                # A synopsis (placeholders) or prose that names a command in passing.
                words = text.split()
                if _PLACEHOLDER.search(text.replace("/", " ")) and not _concrete(words):
                    continue
                found.setdefault(text, f"{doc.relative_to(ROOT)}")
    return sorted((where, text) for text, where in found.items())


def _concrete(words: list[str]) -> bool:
    """No placeholder word: each is lowercase, a flag, a number, a path or a quoted value."""
    return not any(w in ("...", "DIR", "F", "Q", "PATH", "NAME", "T", "N", "SOURCE", "CONFIG")
                   or w.startswith("[") for w in words)  # fmt: skip


COMMANDS = _commands()


def test_the_docs_show_commands():
    assert len(COMMANDS) > 40, COMMANDS  # the extraction found them


def _options(argv: list[str]) -> set[str]:
    """Every option string of the (sub)command ``argv`` starts with (``bench train``...)."""
    parser = build_parser()
    for word in argv:
        actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not actions or word not in actions[0].choices:
            break
        parser = actions[0].choices[word]
    return {s for action in parser._actions for s in action.option_strings}


@pytest.mark.parametrize(("where", "command"), COMMANDS, ids=[c for _, c in COMMANDS])
def test_every_command_in_the_docs_parses(where, command, capsys):
    argv = shlex.split(command.replace("$OUT", "out"))[1:]
    # Each option it shows exists (``--a/--b`` names two).
    flags = {f.split("=")[0] for w in argv if w.startswith("--") for f in w.split("/")}
    unknown = flags - _options(argv)
    assert not unknown, f"{where}: `{command}`: sloth has no {sorted(unknown)}"
    try:
        args = _parse(build_parser(), argv)
    except SystemExit as exc:
        err = capsys.readouterr().err
        if exc.code == 0 or "arguments are required" in err:
            return  # --help; or a command named in prose ("see `sloth export --verify`")
        raise AssertionError(f"{where}: `{command}` is not accepted: {err.strip()}") from exc
    assert args.command == argv[0], f"{where}: `{command}`"
