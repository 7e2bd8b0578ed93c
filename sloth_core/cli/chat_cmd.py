"""``sloth chat MODEL [--system TEXT]``: talk to a model in the terminal.

One line is one user message; the reply streams to standard output as it comes, and the
conversation so far goes into every prompt. ``/reset`` forgets it (the system prompt
stays), ``/exit`` (or end of input) quits. Banners and notices go to standard error, so a
script that pipes lines in reads only the replies on standard output.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

from sloth_core.cli.generate_cmd import (
    add_model_arguments,
    messages_for,
    open_engine,
    sampling_options,
)

COMMANDS = {
    "/reset": "forget the conversation (the system prompt stays)",
    "/exit": "quit (also /quit, or end of input)",
    "/help": "list these commands",
}


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "chat",
        help="chat with a model in the terminal (a model, adapter, train output or GGUF file)",
        description="Interactive chat: one line per message, replies streamed. "
        + "; ".join(f"{name}: {what}" for name, what in COMMANDS.items()),
    )
    add_model_arguments(parser)
    parser.set_defaults(run=run)


def chat(
    engine: Any,
    options: Any,
    *,
    system: str | None = None,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Run the conversation loop on ``engine`` until ``/exit`` or end of input; exit status."""
    from sloth_core.inference.prompt import PromptTooLongError

    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    interactive = stdin.isatty()
    history: list[dict[str, str]] = []
    print(
        f"chatting with {engine.source.describe()} through {engine.backend}; "
        "/reset forgets the conversation, /exit quits",
        file=stderr,
    )
    if interactive:
        try:
            import readline  # noqa: F401 - line editing and history for input()
        except ImportError:
            pass
    while True:
        try:  # a terminal gets input() for line editing; it reads sys.stdin
            line = input(">>> ") if interactive else stdin.readline()
        except (EOFError, KeyboardInterrupt):
            stdout.write("\n")
            break
        if not interactive and not line:  # end of input
            break
        text = line.strip()
        if not text:
            continue
        command = text.lower()
        if command in ("/exit", "/quit"):
            break
        if command == "/reset":
            history.clear()
            print("(conversation reset)", file=stderr)
            continue
        if command == "/help":
            for name, what in COMMANDS.items():
                print(f"{name}  {what}", file=stderr)
            continue
        if command.startswith("/") and " " not in command:
            print(f"unknown command {text}; /help lists them", file=stderr)
            continue
        messages = messages_for(system, history, text)
        try:
            _, completion = engine.reply(messages, options, stream=stdout)
        except PromptTooLongError as exc:
            what = "the conversation" if history else "this message"
            print(f"{what} does not fit: {exc}. /reset starts over", file=stderr)
            continue
        except KeyboardInterrupt:  # Ctrl-C stops the reply, not the chat
            print("\n(interrupted: the reply is dropped)", file=stderr)
            continue
        history += [messages[-1], {"role": "assistant", "content": completion.text}]
    return 0


def run(args: argparse.Namespace) -> int:
    import dataclasses

    options = sampling_options(args)
    if options.seed is not None:  # seeded once: each reply draws on, not the same again
        import torch

        torch.manual_seed(options.seed)
        options = dataclasses.replace(options, seed=None)
    engine = open_engine(args)
    return chat(engine, options, system=args.system)
