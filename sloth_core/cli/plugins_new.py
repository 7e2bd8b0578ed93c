"""``sloth plugins new``: a new architecture plugin distribution from sloth-core's template.

The template (``sloth_core/templates/plugin/*.tmpl``, shipped as package data) is rendered
for one plugin name and one Hugging Face ``model_type``. The model's modules are checked
against what each of sloth's patchers assumes (:mod:`sloth_core.testing.patch_fit`: their
attributes and shapes, then each patched alone through the parity harness on the tiny and
the varied config), so the generated ``patch_layers`` names only the classes that are
computed exactly; every other one gets a comment saying why, and the command prints the
table. The generated tests run the parity harness on the tiny config and on
:func:`~sloth_core.testing.varied.varied_config`. ``plugins/_template`` of the repository
is this command's output for ``template`` and ``cwm`` (a test keeps them identical).
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
import textwrap
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from sloth_core.catalog import install_command
from sloth_core.errors import SlothError

if TYPE_CHECKING:
    from sloth_core.testing.patch_fit import Finding

#: Template file -> path in the new distribution (``{package}``, ``{short}`` filled in).
FILES = {
    "pyproject.toml.tmpl": "pyproject.toml",
    "README.md.tmpl": "README.md",
    "__init__.py.tmpl": "src/{package}/__init__.py",
    "plugin.py.tmpl": "src/{package}/plugin.py",
    "test_plugin.py.tmpl": "tests/test_{short}.py",
}
#: The full test command of a generated plugin (the Triton runs need the interpreter on a
#: CPU; HF_HUB_OFFLINE keeps transformers from asking the Hub about tiny local models).
TEST_COMMAND = "HF_HUB_OFFLINE=1 TRITON_INTERPRET=1 python -m pytest tests"
#: What installs the tests' requirements (pytest...) beside sloth-core, as the guide says it
#: (the hint names the clone's path in an editable install: catalog.install_command).
TEST_INSTALL = "pip install 'sloth-core[test]'"
_NAME = re.compile(r"[a-z][a-z0-9]*(-[a-z0-9]+)*")
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


@dataclass
class Architecture:
    """What the template needs to know of a ``model_type`` that transformers implements."""

    model_type: str
    module: str  # transformers.models.<module>.modeling_<module>
    prefix: str  # <prefix>ForCausalLM
    #: patch_architecture argument -> the classes that pass (rms_norm, mlp, causal_lm...).
    classes: dict[str, list[str]] = field(default_factory=dict)
    #: Every module kind found: class, patched or not, and why (the printed table).
    findings: list[Finding] = field(default_factory=list)
    sliding_window: bool = False  # the attention passes `sliding_window` to its function
    gemma_norm: bool = False  # the norms are Gemma's (1 + w)

    @property
    def unpatched(self) -> list[Finding]:
        return [row for row in self.findings if not row.patched]

    def table(self) -> str:
        """``module kind | class | patched | why``, one row per module class found."""
        from sloth_core.testing.patch_fit import ArchitectureFit

        return ArchitectureFit(self.findings).table()


def inspect_architecture(model_type: str) -> Architecture:
    """Find the module classes of ``model_type`` in transformers and check each against
    sloth's patchers (:func:`sloth_core.testing.patch_fit.fit_architecture`).

    Raises:
        SlothError: transformers has no causal LM for ``model_type``, or cannot build a
            tiny model of it to check the patchers on.
    """
    import importlib

    from transformers.models.auto.configuration_auto import model_type_to_module_name
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from sloth_core.testing.patch_fit import fit_architecture

    causal_lm = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    if not isinstance(causal_lm, str) or not causal_lm.endswith("ForCausalLM"):
        raise SlothError(
            f"transformers has no *ForCausalLM for model_type {model_type!r}, and the template "
            "names its classes; for a model transformers does not implement, write load_model "
            "and patch_layers yourself (docs/plugin-authors.md)"
        )
    module = model_type_to_module_name(model_type)
    modeling = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
    if not hasattr(modeling, causal_lm):
        raise SlothError(f"transformers.models.{module} has no {causal_lm} for {model_type!r}")
    prefix = causal_lm.removesuffix("ForCausalLM")
    arch = Architecture(model_type, module, prefix)
    attention = getattr(modeling, prefix + "Attention", None)
    if attention is not None:
        # Mistral, Qwen2/3, CWM...: the window reaches the attention function as an argument.
        arch.sliding_window = "sliding_window=" in inspect.getsource(attention.forward)
    try:
        fit = fit_architecture(model_type, arch.sliding_window)
    except Exception as exc:  # noqa: BLE001 - transformers' own error says what is missing
        raise SlothError(
            f"cannot build a tiny {model_type} model to check sloth's patchers on "
            f"({type(exc).__name__}: {exc}); write patch_layers by hand (docs/plugin-authors.md)"
        ) from exc
    arch.findings, arch.classes, arch.gemma_norm = fit.findings, fit.arguments, fit.gemma_norm
    return arch


def plugin_names(name: str) -> dict[str, str]:
    """``ministral`` or ``sloth-ministral`` -> the distribution, package and short names.

    Raises:
        SlothError: not lowercase letters, digits and single hyphens.
    """
    short = name.removeprefix("sloth-")
    if not _NAME.fullmatch(short):
        raise SlothError(
            f"plugin name {name!r}: use lowercase letters, digits and hyphens, e.g. 'mymodel'"
        )
    return {
        "distribution": f"sloth-{short}",
        "package": "sloth_" + short.replace("-", "_"),
        "short": short.replace("-", "_"),
    }


def _core_requirement(version: str) -> str:
    from packaging.version import Version

    release = Version(version).release
    return f">={version},<{release[0]}.{release[1] + 1}"


def _sdk_imports(functions: list[str]) -> str:
    """The plugin's one import of the SDK, as ruff formats it (classes first)."""
    names = ["ModelSpec", "PatchReport", *sorted({*functions, "model_type_of"})]
    return "from sloth_core.sdk import (\n" + "".join(f"    {n},\n" for n in names) + ")"


def _argument(kind: str, classes: list[str]) -> str:
    names = [f"modeling.{cls}" for cls in classes]
    value = names[0] if len(names) == 1 else "(" + ", ".join(names) + ")"
    return f"        {kind}={value},"


def _why_comments(arch: Architecture) -> list[str]:
    """A comment for each module class left unpatched, and what to do about it."""
    lines = []
    for row in arch.unpatched:
        text = f"{row.cls} ({row.kind}) is not patched: {row.why}"
        lines += textwrap.wrap(text, 90, initial_indent="# ", subsequent_indent="#   ")
    if lines:
        lines.append(
            '# A patcher for those: docs/plugin-authors.md, "Modules that are not Llama-like".'
        )
    return [f"        {line}" for line in lines]


def template_values(name: str, arch: Architecture) -> dict[str, str]:
    """Every ``{{placeholder}}`` of the template, for plugin ``name`` and ``arch``."""
    from sloth_core import __version__
    from sloth_core.testing.patch_fit import tiny_arguments

    names = plugin_names(name)
    arguments = [_argument(kind, classes) for kind, classes in arch.classes.items()]
    if arch.gemma_norm and "rms_norm" in arch.classes:
        arguments.append("        gemma_norm=True,")
    imports = ["load_with_sloth_attention", "patch_architecture"]
    configs = {"default": "{}", "varied": '{"varied": True}'}
    if arch.sliding_window:
        if {"attention", "fused_attention"} & set(arch.classes):
            arguments.append("        attention_kwargs=sliding_window_kwargs,")
            imports.append("sliding_window_kwargs")
        configs["window"] = '{"sliding_window": 6}'  # bites in the harness's 24-token rows
    arguments += _why_comments(arch)
    tiny, tiny_type = tiny_arguments(arch.model_type)
    config_arguments = "MODEL_TYPE" if tiny_type is None else f'"{tiny}", model_type=MODEL_TYPE'
    patched = ", ".join(arch.classes) or "nothing"
    return {
        **names,
        "model_type": arch.model_type,
        "module": arch.module,
        "title": arch.prefix,
        "causal_lm": arch.prefix + "ForCausalLM",
        "description": f"{arch.prefix}: {patched} patched",
        "version": __version__,
        "core_requirement": _core_requirement(__version__),
        "sdk_imports": _sdk_imports(imports),
        "class_arguments": "\n".join(arguments),
        "configs": "{\n" + "".join(f'    "{k}": {v},\n' for k, v in configs.items()) + "}",
        "config_arguments": config_arguments,
        "other_arch": "mistral" if arch.model_type == "llama" else "llama",
    }


def render(name: str, model_type: str, arch: Architecture | None = None) -> dict[str, str]:
    """The files of plugin ``name`` for ``model_type``: relative path -> text."""
    values = template_values(name, arch or inspect_architecture(model_type))
    # One name per joinpath: Python 3.10's Traversable takes a single child.
    template = resources.files("sloth_core").joinpath("templates").joinpath("plugin")
    out = {}
    for source, target in FILES.items():
        text = template.joinpath(source).read_text(encoding="utf-8")
        out[target.format(**values)] = _PLACEHOLDER.sub(lambda m: values[m.group(1)], text)
    return out


def write(files: dict[str, str], directory: Path, *, force: bool = False) -> list[Path]:
    """Write ``files`` under ``directory``; refuse a non-empty directory unless ``force``."""
    if directory.exists() and any(directory.iterdir()) and not force:
        raise SlothError(f"{directory} is not empty; --force writes into it anyway")
    written = []
    for relative, text in files.items():
        path = directory / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def add_parser(sub: argparse._SubParsersAction) -> None:
    new = sub.add_parser(
        "new", help="create an architecture plugin distribution from sloth's template"
    )
    new.add_argument("name", help="the plugin's name: 'mymodel' makes sloth-mymodel")
    new.add_argument(
        "--model-type", required=True, help="the Hugging Face model_type it makes fast"
    )
    new.add_argument("--directory", type=Path, help="where to write it (default: ./sloth-NAME)")
    new.add_argument("--force", action="store_true", help="write into a non-empty directory")
    new.set_defaults(run=run_new)


def _claimed_by(model_type: str, distribution: str) -> list[str]:
    """Other active plugins that patch ``model_type`` (two would conflict)."""
    from sloth_core.plugins import get_plugin_manager

    return [
        record.name
        for record in get_plugin_manager().plugins()
        if record.status == "active"
        and model_type in record.architectures
        and record.name != distribution
    ]


def run_new(args: argparse.Namespace) -> int:
    names = plugin_names(args.name)
    arch = inspect_architecture(args.model_type)
    directory = args.directory or Path(names["distribution"])
    write(render(args.name, args.model_type, arch), directory, force=args.force)
    patched = ", ".join(cls for classes in arch.classes.values() for cls in classes) or "nothing"
    attention = {"attention", "fused_attention"} & set(arch.classes)
    window = " (sliding_window_kwargs)" if arch.sliding_window and attention else ""
    print(f"created {names['distribution']} in {directory}: {patched}{window}")
    print(arch.table())
    if arch.unpatched:
        print(
            "not patched: each is left to transformers, with a comment in plugin.py saying "
            "why; write a patcher for it (docs/plugin-authors.md)"
        )
    claimed = _claimed_by(args.model_type, names["distribution"])
    if claimed:
        print(
            f"note: {', '.join(claimed)} already patches {args.model_type}; disable it while "
            f"you test: SLOTH_DISABLE_PLUGINS={','.join(claimed)}",
            file=sys.stderr,
        )
    print(
        f"next:\n  cd {directory}\n  python -m pip install --no-deps --no-build-isolation -e .\n"
        f"  sloth plugins list\n  {TEST_COMMAND}\n"
        f"({install_command('sloth-core', 'test', run_from=directory)} installs what the tests "
        "need)"
    )
    return 0
