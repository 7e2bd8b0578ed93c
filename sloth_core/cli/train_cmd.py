"""``sloth train [CONFIG] [--option value ...] [--demo]``.

Options come from a TOML/YAML/JSON file and/or flags (flags win); every option of
:class:`sloth_core.train.TrainConfig` is a flag, spelled with dashes or underscores
(``--model-name``, ``--model_name``), booleans as ``--packing`` / ``--no-packing``.
"""

from __future__ import annotations

import argparse
import dataclasses

from sloth_core.train.config import TrainConfig


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "train",
        help="fine-tune a model (LoRA, QLoRA or full) on a data file",
        description="Fine-tune a model. Options from CONFIG (TOML, YAML or JSON) and flags; "
        "flags win. `sloth train --demo` trains a tiny bundled model on bundled data.",
    )
    parser.add_argument("config", nargs="?", help="a .toml, .yaml or .json file of options")
    parser.add_argument(
        "--demo", action="store_true",
        help="the bundled demo: a tiny model and data set, under a minute on a CPU (its "
        "base model is built once first, about 15 s)",
    )  # fmt: skip
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    group = parser.add_argument_group("training options (see the docs for each)")
    for f in dataclasses.fields(TrainConfig):
        names = {f"--{f.name.replace('_', '-')}", f"--{f.name}"}
        if "alias" in f.metadata:
            names |= {f"--{f.metadata['alias'].replace('_', '-')}", f"--{f.metadata['alias']}"}
        options = dict(dest=f.name, default=None, help=f.metadata.get("help"))
        if isinstance(f.default, bool):
            group.add_argument(*sorted(names), action=argparse.BooleanOptionalAction, **options)
        elif isinstance(f.default, (int, float)):
            group.add_argument(*sorted(names), type=type(f.default), metavar="N", **options)
        elif f.default is dataclasses.MISSING:  # a list: repeatable, each maybe comma-separated
            group.add_argument(*sorted(names), metavar="VALUE", action="append", **options)
        else:
            group.add_argument(*sorted(names), metavar="VALUE", **options)
    parser.set_defaults(run=run)


def build_config(args: argparse.Namespace) -> TrainConfig:
    """The options of ``args``: demo defaults, then the config file, then the flags."""
    from sloth_core.train.config import read_config_file

    values: dict = {}
    source = "options"
    if args.config:
        values.update(read_config_file(args.config))
        source = args.config
    if args.demo:
        from sloth_core.train.demo import demo_options

        # The demo's base model is built (once) only when no other model is named.
        named = getattr(args, "model_name", None) or "model_name" in values
        method = getattr(args, "method", None) or values.get("method", "sft")
        values = {**demo_options(with_model=not named, method=method), **values}
    config = TrainConfig.from_mapping(values, source=source)
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    flags = {k: v for k, v in flags.items() if v is not None}
    return _merge(config, flags)


def _merge(config: TrainConfig, flags: dict) -> TrainConfig:
    coerced = TrainConfig.from_mapping(flags, source="command line")
    return dataclasses.replace(config, **{name: getattr(coerced, name) for name in flags})


def run(args: argparse.Namespace) -> int:
    from sloth_core.quiet import progress_bars

    # --quiet: transformers' bars too, the demo's base model being built and saved included.
    with progress_bars(not args.quiet):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from sloth_core.train import distributed, train

    config = build_config(args)
    if (config.nproc > 1 or config.nnodes > 1) and not distributed.launched():
        config.validate()  # a bad option fails here, not once per process
        return distributed.relaunch(_argv_without_launch(args), config)
    result = train(config, show_progress=not args.quiet)
    return 0 if result.steps else 1


#: Options torchrun acts on (:func:`sloth_core.train.distributed.launch_command`): the
#: processes it starts are not given them.
LAUNCH_OPTIONS = ("nproc", "nnodes", "node_rank", "rdzv_endpoint")


def _argv_without_launch(args: argparse.Namespace) -> list[str]:
    """The ``sloth train`` command line of ``args``, less the launch options, for each
    process."""
    argv = ["train", *([args.config] if args.config else [])]
    argv += ["--demo"] * args.demo + ["--quiet"] * args.quiet
    for f in dataclasses.fields(TrainConfig):
        value = getattr(args, f.name)
        if value is None or f.name in LAUNCH_OPTIONS:
            continue
        if isinstance(value, bool):
            argv.append(f"--{'' if value else 'no-'}{f.name}")
        else:
            argv += [f"--{f.name}", str(value)]
    return argv
