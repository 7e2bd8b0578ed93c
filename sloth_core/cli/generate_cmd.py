"""``sloth generate MODEL --prompt TEXT [--system TEXT] [--json]``: one reply, then exit.

MODEL is a model directory, a LoRA adapter directory, a ``sloth train`` output directory,
a ``.gguf`` file (with llama-cpp-python installed) or a hub id. The reply streams to
standard output as it comes; ``--json`` prints one JSON object instead. The options that
load a model and pick tokens are shared with ``sloth chat``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """MODEL, the loading options and the sampling options (``sloth chat`` too)."""
    parser.add_argument(
        "model",
        help="a model dir, LoRA adapter dir, sloth train output dir, .gguf file or hub id",
    )
    parser.add_argument("--system", default=None, help="a system prompt")
    sampling = parser.add_argument_group("generation (greedy unless --temperature > 0)")
    sampling.add_argument(
        "--max-new-tokens",
        type=int,
        default=256,
        metavar="N",
        help="the most tokens to generate (cut to the context; default 256)",
    )
    sampling.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        metavar="T",
        help="0 (default): greedy; above 0: sample at this temperature",
    )
    sampling.add_argument(
        "--top-p",
        type=float,
        default=1.0,
        metavar="P",
        help="nucleus sampling: keep the most likely tokens up to P",
    )
    sampling.add_argument(
        "--top-k",
        type=int,
        default=0,
        metavar="K",
        help="sample among the K most likely tokens (0: all)",
    )
    sampling.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        metavar="R",
        help="above 1 discourages repeating tokens (default 1: off)",
    )
    sampling.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    loading = parser.add_argument_group("model")
    loading.add_argument(
        "--chat-template",
        default=None,
        metavar="NAME|FILE",
        help="a built-in template (chatml, llama-3, ...), a .jinja file, or "
        "'none' for plain text; default: the one the model was trained "
        "with, else its tokenizer's",
    )
    loading.add_argument(
        "--load-in-4bit", action="store_true", help="load the weights in 4-bit (needs sloth-bnb)"
    )
    loading.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                         help="where the model runs (default: cuda if there is one)")  # fmt: skip
    add_trust_arguments(loading)


def add_trust_arguments(parser: argparse._ActionsContainer) -> None:
    """``--trust-remote-code`` and ``--allow-pickle``: what runs only when the user says so
    (``sloth train`` has them as options of its config)."""
    parser.add_argument(
        "--trust-remote-code", action="store_true",
        help="run the model folder's own Python code (auto_map): only for sources you trust",
    )  # fmt: skip
    parser.add_argument(
        "--allow-pickle", action="store_true",
        help="load pickled .bin weights, which can run code: only from sources you trust",
    )  # fmt: skip


def sampling_options(args: argparse.Namespace) -> Any:
    from sloth_core.inference.generation import SamplingOptions

    return SamplingOptions(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed,
    ).check()  # fmt: skip


def open_engine(args: argparse.Namespace) -> Any:
    """Load ``args.model``; say on standard error when it has no chat template."""
    from sloth_core.inference.engines import open_engine as open_
    from sloth_core.inference.prompt import no_template_notice
    from sloth_core.quiet import progress_bars

    with progress_bars(False):  # the weight-loading bars would bury the reply
        engine = open_(
            args.model, chat_template=args.chat_template, load_in_4bit=args.load_in_4bit,
            device=args.device, trust_remote_code=args.trust_remote_code,
            allow_pickle=args.allow_pickle,
        )  # fmt: skip
    if engine.format.plain and engine.format.origin == "none" and args.chat_template is None:
        print(no_template_notice(str(args.model)), file=sys.stderr)
    return engine


def messages_for(system: str | None, history: list[dict[str, str]], prompt: str) -> list:
    head = [{"role": "system", "content": system}] if system else []
    return [*head, *history, {"role": "user", "content": prompt}]


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "generate",
        help="generate one reply to a prompt (a model, adapter, train output or GGUF file)",
        description="Generate one reply to --prompt with the model's chat template, "
        "streamed to standard output, or printed as JSON with --json.",
    )
    add_model_arguments(parser)
    parser.add_argument("--prompt", required=True,
                        help="the user message ('-': read it from standard input)")  # fmt: skip
    parser.add_argument(
        "--json", action="store_true",
        help='print {"prompt", "completion", "tokens", ...} instead of streaming the text',
    )  # fmt: skip
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read().rstrip("\n") if args.prompt == "-" else args.prompt
    options = sampling_options(args)
    engine = open_engine(args)
    messages = messages_for(args.system, [], prompt)
    stream = None if args.json else sys.stdout
    prompt_ids, completion = engine.reply(messages, options, stream=stream)
    if args.json:
        record = {
            "model": str(args.model),
            "source": engine.source.describe(),
            "backend": engine.backend,
            "prompt": prompt,
            "system": args.system,
            "completion": completion.text,
            "tokens": completion.ids,
            "finish_reason": completion.finish_reason,
            "stop_id": completion.stop_id,
            "prompt_tokens": len(prompt_ids),
            "completion_tokens": len(completion.ids),
            "prompt_ids": prompt_ids,
            "chat_template": engine.format.origin,
            "options": options.as_dict(),
        }
        print(json.dumps(record, ensure_ascii=False))
    return 0
