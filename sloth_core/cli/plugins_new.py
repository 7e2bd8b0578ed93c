"""``sloth plugins new``: a new architecture plugin distribution from sloth-core's template.

The template (``sloth_core/templates/plugin/*.tmpl``, shipped as package data) is rendered
for one plugin name and one Hugging Face ``model_type``: the model's module classes are
looked up in transformers (its causal LM class, then ``<Prefix>RMSNorm``, ``<Prefix>MLP``
and ``<Prefix>Attention`` beside it), so the generated ``patch_layers`` names them and the
generated tests run the parity harness on them. ``plugins/_template`` of the repository is
this command's output for ``template`` and ``cwm`` (a test keeps them identical).
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from sloth_core.errors import SlothError

#: Template file -> path in the new distribution (``{package}``, ``{short}`` filled in).
FILES = {
    "pyproject.toml.tmpl": "pyproject.toml",
    "README.md.tmpl": "README.md",
    "__init__.py.tmpl": "src/{package}/__init__.py",
    "plugin.py.tmpl": "src/{package}/plugin.py",
    "test_plugin.py.tmpl": "tests/test_{short}.py",
}
#: ``patch_architecture`` argument -> the class-name suffix transformers' modeling files use.
KINDS = {"rms_norm": "RMSNorm", "mlp": "MLP", "attention": "Attention"}
_NAME = re.compile(r"[a-z][a-z0-9]*(-[a-z0-9]+)*")
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


@dataclass
class Architecture:
    """What the template needs to know of a ``model_type`` that transformers implements."""

    model_type: str
    module: str  # transformers.models.<module>.modeling_<module>
    prefix: str  # <prefix>ForCausalLM
    classes: dict[str, str] = field(default_factory=dict)  # patch_architecture kwarg -> class
    missing: list[str] = field(default_factory=list)  # <prefix><suffix> names not found
    sliding_window: bool = False  # the attention passes `sliding_window` to its function


def inspect_architecture(model_type: str) -> Architecture:
    """Find the module classes of ``model_type`` in transformers.

    Raises:
        SlothError: transformers has no causal LM for ``model_type``.
    """
    import importlib

    from transformers.models.auto.configuration_auto import model_type_to_module_name
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

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
    for kind, suffix in KINDS.items():
        if hasattr(modeling, prefix + suffix):
            arch.classes[kind] = prefix + suffix
        else:
            arch.missing.append(prefix + suffix)
    arch.classes["causal_lm"] = causal_lm
    attention = getattr(modeling, arch.classes.get("attention", ""), None)
    if attention is not None:
        # Mistral, Qwen2/3, CWM...: the window reaches the attention function as an argument.
        arch.sliding_window = "sliding_window=" in inspect.getsource(attention.forward)
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


def template_values(name: str, arch: Architecture) -> dict[str, str]:
    """Every ``{{placeholder}}`` of the template, for plugin ``name`` and ``arch``."""
    from sloth_core import __version__
    from sloth_core.testing.models import TINY_CONFIGS

    names = plugin_names(name)
    arguments = [f"        {kind}=modeling.{cls}," for kind, cls in arch.classes.items()]
    arguments += [
        f"        # no {cls} in modeling_{arch.module}: see docs/plugin-authors.md"
        for cls in arch.missing
    ]
    imports = ["load_with_sloth_attention", "patch_architecture"]
    configs = {"default": "{}", "tied": '{"tie_word_embeddings": True}'}
    if arch.sliding_window:
        arguments.append("        attention_kwargs=sliding_window_kwargs,")
        imports.append("sliding_window_kwargs")
        configs["window"] = '{"sliding_window": 6}'  # bites in the harness's 24-token rows
    if arch.model_type in TINY_CONFIGS:
        config_arguments = "MODEL_TYPE"
    else:  # the tiny Llama's sizes, as a config of this model type
        config_arguments = '"llama", model_type=MODEL_TYPE'
    return {
        **names,
        "model_type": arch.model_type,
        "module": arch.module,
        "title": arch.prefix,
        "causal_lm": arch.classes["causal_lm"],
        "description": f"{arch.prefix}: {', '.join(arch.classes)} patched",
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
    patched = ", ".join(arch.classes.values())
    window = " (sliding_window_kwargs)" if arch.sliding_window else ""
    print(f"created {names['distribution']} in {directory}: {patched}{window}")
    for cls in arch.missing:
        print(f"  no {cls}: write a patcher for that module (docs/plugin-authors.md)")
    claimed = _claimed_by(args.model_type, names["distribution"])
    if claimed:
        print(
            f"note: {', '.join(claimed)} already patches {args.model_type}; disable it while "
            f"you test: SLOTH_DISABLE_PLUGINS={','.join(claimed)}",
            file=sys.stderr,
        )
    print(
        f"next:\n  cd {directory}\n  python -m pip install --no-deps --no-build-isolation -e .\n"
        "  sloth plugins list\n  python -m pytest tests"
    )
    return 0
