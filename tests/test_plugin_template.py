"""The plugin template and docs/plugin-authors.md cannot rot.

``plugins/_template`` must be what ``sloth plugins new`` renders from the template shipped
in sloth-core; the guide's renaming table must turn it into another plugin; the code the
guide quotes must be the template's; the guide's own patcher must pass the parity harness;
and the guide's quick start must work: a plugin generated for a model type no other plugin
covers is built into a wheel, installed into a temporary ``--target`` directory (used
through ``PYTHONPATH`` in subprocesses, as in test_entry_points.py, so the test
environment is never changed), listed active by ``sloth plugins list``, and passes its own
generated tests, the parity harness among them.
"""

from __future__ import annotations

import fnmatch
import inspect
import json
import os
import re
import shlex
import subprocess
import sys
import types
from pathlib import Path

import pytest
import tomllib

from sloth_core import hookimpl
from sloth_core.cli import main
from sloth_core.cli.plugins_new import FILES, render

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "plugin-authors.md"
TEMPLATE = ROOT / "plugins" / "_template"
REGENERATE = "sloth plugins new template --model-type cwm --directory plugins/_template --force"
#: What the guide's quick start runs (checked against its first bash block).
QUICK_START = [
    "sloth plugins new ministral --model-type ministral",
    "cd sloth-ministral",
    "python -m pip install --no-deps --no-build-isolation -e .",
    "sloth plugins list",
    "HF_HUB_OFFLINE=1 TRITON_INTERPRET=1 python -m pytest tests",
]
PUBLISH = "python -m pip wheel --no-deps --no-build-isolation --wheel-dir dist ."
_BUILD_OUTPUTS = {"__pycache__", ".pytest_cache", "build", "dist"}


def _section(title: str) -> str:
    """The text of the guide's ``##``/``###`` section ``title``, up to the next heading."""
    text = GUIDE.read_text()
    match = re.search(rf"^#+ {re.escape(title)}\n(.*?)(?=^#+ |\Z)", text, re.M | re.S)
    assert match, f"docs/plugin-authors.md has no section {title!r}"
    return match.group(1)


def _blocks(section: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", _section(section), re.S)


def _tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` but build outputs, by relative path."""
    return {
        path.relative_to(root).as_posix(): path.read_text()
        for path in sorted(root.rglob("*"))
        if path.is_file()
        and not _BUILD_OUTPUTS.intersection(path.relative_to(root).parts)
        and not any(part.endswith(".egg-info") for part in path.parts)
    }


def test_template_is_what_plugins_new_renders(tmp_path, capsys):
    """The guide's command for maintainers, writing to tmp_path instead."""
    assert REGENERATE in GUIDE.read_text()
    args = shlex.split(REGENERATE.replace("plugins/_template", str(tmp_path / "out")))
    assert main(args[1:]) == 0
    assert "created sloth-template" in capsys.readouterr().out
    rendered, tree = _tree(tmp_path / "out"), _tree(TEMPLATE)
    assert sorted(tree) == sorted(rendered), f"plugins/_template is stale: {REGENERATE}"
    for path, text in rendered.items():
        assert tree[path] == text, f"plugins/_template/{path} is stale: {REGENERATE}"


def test_template_ships_in_the_sloth_core_wheel():
    """``sloth plugins new`` works from an installed sloth-core: the .tmpl files are data."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = project["tool"]["setuptools"]["package-data"]["sloth_core"]
    sources = sorted((ROOT / "sloth_core" / "templates" / "plugin").iterdir())
    assert [path.name for path in sources] == sorted(FILES)
    for path in sources:
        relative = path.relative_to(ROOT / "sloth_core").as_posix()
        assert any(fnmatch.fnmatch(relative, glob) for glob in globs), relative


def test_guide_renaming_table_makes_another_plugin():
    rows = re.findall(r"^\| `([^`]+)` \| `([^`]+)` \|", _section("By hand"), re.M)
    assert [old for old, _ in rows] == ["sloth-template", "sloth_template", "test_template.py"]

    def rename(text: str) -> str:
        for old, new in rows:
            text = text.replace(old, new.replace("yourname", "mymodel"))
        return text

    renamed = {rename(path): rename(text) for path, text in _tree(TEMPLATE).items()}
    assert renamed == render("mymodel", "cwm")


def test_guide_quotes_the_templates_patch_layers():
    (quoted,) = _blocks("The plugin module", "python")
    assert quoted in (TEMPLATE / "src" / "sloth_template" / "plugin.py").read_text()


def test_guide_documents_every_argument():
    from sloth_core.patches import patch_architecture
    from sloth_core.testing.parity import check_parity

    for function, section in [
        (patch_architecture, "patch_architecture's arguments"),
        (check_parity, "Testing: the parity harness"),
    ]:
        text = _section(section)
        for name in inspect.signature(function).parameters:
            assert f"`{name}`" in text, f"the guide's {section!r} lacks `{name}`"


def test_guides_own_patcher_passes_the_parity_harness():
    """The Arcee plugin of "Modules that are not Llama-like", run as a module."""
    from sloth_core.plugins import SlothPluginManager
    from sloth_core.testing import assert_parity, tiny_config

    (source,) = _blocks("Modules that are not Llama-like", "python")
    module = types.ModuleType("guide_sloth_arcee")
    exec(compile(source, str(GUIDE), "exec"), module.__dict__)
    manager = SlothPluginManager(entry_points=False)
    manager.register(module, name=module.PLUGIN)
    config = tiny_config("llama", model_type="arcee")
    assert config.hidden_act == "relu2"  # not gated: patch_gated_mlp leaves it alone
    report = assert_parity(config, manager=manager, kernels="torch")
    assert report.patched == {"rms_norm": 5, "attention": 2, "causal_lm": 1, "mlp": 2}
    assert "lora_linear" in report.providers


@pytest.mark.parametrize(
    ("model_type", "module", "classes", "window"),
    [
        ("llama", "llama", ["LlamaRMSNorm", "LlamaMLP", "LlamaAttention"], False),
        ("gemma3_text", "gemma3", ["Gemma3RMSNorm", "Gemma3MLP", "Gemma3Attention"], True),
        # A LayerNorm without weight, and clip_qkv, which patch_attention ignores.
        ("olmo", "olmo", ["OlmoMLP", "OlmoForCausalLM"], False),
    ],
)
def test_plugins_new_names_the_models_classes(model_type, module, classes, window):
    files = render("some-model", model_type)
    plugin = files["src/sloth_some_model/plugin.py"]
    assert f"from transformers.models.{module} import modeling_{module} as modeling" in plugin
    for cls in classes:
        assert f"=modeling.{cls}," in plugin
    assert ("attention_kwargs=sliding_window_kwargs" in plugin) is window
    left_alone = ["OlmoLayerNorm (norm) is not patched", "OlmoAttention (attention) is not"]
    assert all(f"# {text}" in plugin for text in left_alone) is (model_type == "olmo")
    assert ("gemma_norm=True" in plugin) is (model_type == "gemma3_text")  # (1 + w) norms
    assert "tests/test_some_model.py" in files
    assert "{{" not in "".join(files.values())
    for path, text in files.items():
        if path.endswith(".py"):
            compile(text, path, "exec")
    assert 'sloth-some-model = "sloth_some_model.plugin"' in files["pyproject.toml"]
    assert render("sloth-some-model", model_type) == files  # the prefix is optional


def test_plugins_new_refuses_what_it_cannot_make(tmp_path, capsys):
    assert main(["plugins", "new", "Bad_Name", "--model-type", "llama"]) == 1
    assert "lowercase letters, digits and hyphens" in capsys.readouterr().err
    assert main(["plugins", "new", "x", "--model-type", "bert"]) == 1
    assert "no *ForCausalLM for model_type 'bert'" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("mine")
    args = ["plugins", "new", "x", "--model-type", "llama", "--directory", str(tmp_path)]
    assert main(args) == 1
    assert "is not empty; --force" in capsys.readouterr().err
    assert not (tmp_path / "pyproject.toml").exists()


class _LlamaPlugin:
    @hookimpl
    def register_architectures(self, register):
        register("llama")


def test_plugins_new_warns_of_a_plugin_that_patches_the_same_type(plugin_manager, tmp_path, capsys):
    plugin_manager.register(_LlamaPlugin(), name="sloth-otherllama")
    args = ["plugins", "new", "x", "--model-type", "llama", "--directory", str(tmp_path / "x")]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert "created sloth-x in" in out and "LlamaRMSNorm, LlamaMLP" in out
    assert "module kind | class" in out and "LlamaMLP" in out  # the table
    # The next steps: the full test command, and what installs pytest.
    assert "HF_HUB_OFFLINE=1 TRITON_INTERPRET=1 python -m pytest tests" in out
    assert "[test]' installs what the tests need" in out  # where the user is
    assert "sloth-otherllama already patches llama" in err
    assert "SLOTH_DISABLE_PLUGINS=sloth-otherllama" in err
    assert (tmp_path / "x" / "src" / "sloth_x" / "plugin.py").is_file()


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{shlex.join(args)}\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
    return done


@pytest.mark.slow
def test_guide_quick_start_builds_a_plugin_that_passes_its_tests(tmp_path, monkeypatch, capsys):
    """The quick start as written, but for what must not change the test environment:
    the plugin is built with the guide's publishing command and installed into a
    ``--target`` directory instead of ``pip install -e .``, and its tests run without
    the Triton runs (the template's own tests run those in CI)."""
    from sloth_core.plugins import SlothPluginManager

    (block,) = _blocks("Start from the template", "bash")[:1]
    assert block.strip().splitlines() == QUICK_START
    assert _blocks("Publishing", "bash") == [PUBLISH + "\n"]
    new, cd, _install, listing, pytest_line = QUICK_START
    model_type = "ministral"
    # A plugin added to the repository later may claim ministral too: keep it out of the way.
    others = [
        r.name for r in SlothPluginManager(entry_points=True).plugins()
        if model_type in r.architectures
    ]  # fmt: skip
    assert "sloth-ministral" not in others

    monkeypatch.chdir(tmp_path)
    assert main(shlex.split(new)[1:]) == 0
    assert "created sloth-ministral" in capsys.readouterr().out
    plugin_dir = tmp_path / cd.split()[1]
    site = tmp_path / "site"
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    env["SLOTH_DISABLE_PLUGINS"] = ",".join(others)
    _run([sys.executable, *shlex.split(PUBLISH)[1:]], plugin_dir, env)
    (wheel,) = (plugin_dir / "dist").glob("sloth_ministral-*.whl")
    install = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps"]
    _run([*install, "--target", str(site), str(wheel)], tmp_path, env)

    sloth = [sys.executable, "-m", "sloth_core", *shlex.split(listing)[1:]]
    records = {r["name"]: r for r in json.loads(_run([*sloth, "--json"], tmp_path, env).stdout)}
    record = records["sloth-ministral"]
    assert (record["status"], record["kind"], record["source"]) == (
        "active", "architecture", "entrypoint",
    )  # fmt: skip
    assert record["architectures"] == [model_type]
    assert set(record["hooks"]) == {"register_architectures", "load_model", "patch_layers"}
    where = [sys.executable, "-c", "import sloth_ministral; print(sloth_ministral.__file__)"]
    assert _run(where, tmp_path, env).stdout.startswith(str(site))  # the wheel, not the source

    words = shlex.split(pytest_line)
    assert words[:2] == ["HF_HUB_OFFLINE=1", "TRITON_INTERPRET=1"]
    command = [sys.executable, *words[3:], "-k", "not triton", "-p", "no:cacheprovider", "-q"]
    done = _run(command, plugin_dir, {**env, "TRITON_INTERPRET": "1"})
    summary = done.stdout.strip().splitlines()[-1]
    passed = int(re.search(r"(\d+) passed", summary).group(1))
    assert passed >= 14 and "failed" not in summary and "error" not in summary, done.stdout
