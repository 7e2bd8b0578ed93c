"""``sloth plugins new`` cannot generate a plugin that passes its tests while wrong.

For five transformers architectures sloth ships no plugin for, each breaking a different
assumption of the patchers (OLMo 2: q/k norms over the whole projection; StarCoder 2:
LayerNorm, a plain MLP with biases, a residual dropout; Granite: four multipliers; Cohere:
LayerNorm without bias, interleaved rotary, ``logit_scale``; OLMo: ``clip_qkv``), the
plugin is generated into tmp_path, its plugin module imported from there (no install),
and the generated parity test itself run on its tiny and varied configs (fp32, torch
references: the patches alone). Each passes exact parity on what it patches and leaves the
rest alone, saying why; forcing what it left alone back in fails the generated test with
the harness's table, or with a clear message, never a raw shape error.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import sys
import types
from pathlib import Path

import pytest

from sloth_core.cli import main
from sloth_core.cli.plugins_new import TEST_COMMAND

pytestmark = pytest.mark.usefixtures("single_thread")

#: model type -> (kinds patched, {class left alone: what the reason says}).
EXPECTED = {
    "olmo2": (
        {"rms_norm", "mlp", "causal_lm"},
        {"Olmo2Attention": "q_norm spans the whole projection"},
    ),
    "starcoder2": (
        {"causal_lm"},
        {
            "LayerNorm": "a LayerNorm",
            "Starcoder2MLP": "not gated (projections: c_fc, c_proj)",
            "Starcoder2Attention": "ignores residual_dropout",
        },
    ),
    "granite": (
        {"rms_norm", "mlp", "attention"},
        {"GraniteForCausalLM": "differs once logits_scaling=1.5"},
    ),
    "cohere": (
        {"mlp"},
        {
            "CohereLayerNorm": "differs on the tiny config",
            "CohereAttention": "differs on the tiny config",
            "CohereForCausalLM": "differs on the tiny config",
        },
    ),
    "olmo": (
        {"mlp", "causal_lm"},
        {"OlmoLayerNorm": "no weight", "OlmoAttention": "differs once clip_qkv=0.5"},
    ),
}


class Generated(types.SimpleNamespace):
    """A generated plugin: its folder, the command's output, its modules, a manager."""


def _import(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def generate(model_type: str, root: Path, edit=None) -> Generated:
    """Run ``sloth plugins new`` into ``root``; import its plugin module (``plugin.py``
    through ``edit`` first) and its generated test module; a manager with the plugin alone."""
    from sloth_core.plugins import SlothPluginManager

    directory = root / f"sloth-{model_type}"
    argv = ["plugins", "new", model_type, "--model-type", model_type, "--directory", str(directory)]
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert main([*argv, "--force"]) == 0
    package = f"sloth_{model_type}"
    source = directory / "src" / package / "plugin.py"
    if edit is not None:
        source.write_text(edit(source.read_text()))
    # A fresh package each time: the generated test does `from sloth_x import plugin`.
    for name in [n for n in sys.modules if n == package or n.startswith(package + ".")]:
        del sys.modules[name]
    sys.path.insert(0, str(directory / "src"))
    try:
        plugin = importlib.import_module(f"{package}.plugin")
        tests = _import(
            f"generated_test_{model_type}", directory / "tests" / f"test_{model_type}.py"
        )
    finally:
        sys.path.remove(str(directory / "src"))
    manager = SlothPluginManager(entry_points=False)
    manager.register(plugin, name=plugin.PLUGIN)
    return Generated(
        directory=directory,
        out=out.getvalue(),
        plugin=plugin,
        tests=tests,
        manager=manager,
        source=source.read_text(),
    )


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """Each architecture's plugin, generated once for the module's tests."""
    cache: dict[str, Generated] = {}
    root = tmp_path_factory.mktemp("plugins")

    def get(model_type: str) -> Generated:
        if model_type not in cache:
            cache[model_type] = generate(model_type, root)
        return cache[model_type]

    return get


def run_generated_parity(plugin: Generated, name: str) -> None:
    """The generated ``test_parity`` itself, for config ``name``: fp32, torch references."""
    plugin.tests.test_parity(plugin.manager, name, "fp32", "torch")


@pytest.mark.parametrize("model_type", list(EXPECTED))
def test_generated_plugin_patches_only_what_matches(generated, model_type):
    plugin = generated(model_type)
    kinds, left_alone = EXPECTED[model_type]
    rows = {line.split(" | ")[1].strip(): line for line in plugin.out.splitlines() if " | " in line}
    assert rows.pop("class").startswith("module kind")
    for cls, why in left_alone.items():
        assert "| no " in rows[cls] and why in rows[cls], plugin.out
        assert f"# {cls} (" in plugin.source  # the comment in plugin.py says why
    patched = {cls for cls, line in rows.items() if "| yes " in line}
    assert len(patched) == len(kinds), plugin.out
    for kind in ("rms_norm", "mlp", "attention", "causal_lm"):
        assert (f"        {kind}=modeling." in plugin.source) is (kind in kinds), plugin.source
    assert TEST_COMMAND in plugin.out and "[test]' installs what the tests need" in plugin.out
    # The generated test's configs: the tiny one and the varied one (window where it has one).
    assert {"default", "varied"} <= set(plugin.tests.CONFIGS)
    for name in plugin.tests.CONFIGS:
        run_generated_parity(plugin, name)
    report = plugin.plugin.patch_layers(model=_tiny_model(plugin), ops=plugin.manager.ops)
    assert set(report.patched) == kinds and all(report.patched.values()), report.patched


def _tiny_model(plugin: Generated):
    from sloth_core.testing import init_tiny_model

    return init_tiny_model(plugin.tests.config())


def _force(argument: str, cls: str):
    """An edit of plugin.py that hands ``cls`` to patch_architecture as ``argument``."""

    def edit(text: str) -> str:
        anchor = "        model_types=MODEL_TYPES,\n"
        assert anchor in text
        return text.replace(anchor, anchor + f"        {argument}={cls},\n")

    return edit


def test_a_wrong_patch_fails_the_generated_test_with_the_table(tmp_path):
    """Granite's causal LM patched anyway: its logits_scaling (1.0 by default) is ignored.
    The tiny config cannot see it; the varied one fails with the parity table."""
    plugin = generate("granite", tmp_path, _force("causal_lm", "modeling.GraniteForCausalLM"))
    assert plugin.tests.varied_config("llama", model_type="granite").logits_scaling == 1.5
    run_generated_parity(plugin, "default")  # what the user's first plugin was tested on
    with pytest.raises(AssertionError, match=r"parity failed \(logits \(eval\)") as failure:
        run_generated_parity(plugin, "varied")
    assert "patched: attention=2, causal_lm=1, mlp=2, rms_norm=5" in str(failure.value)
    assert "NO" in str(failure.value)


@pytest.mark.parametrize(
    ("model_type", "argument", "cls", "message"),
    [
        # A plain MLP: the gated patcher leaves it alone; the test names the kind.
        ("starcoder2", "mlp", "modeling.Starcoder2MLP", "never patched: .*'mlp': 0"),
        # Full-width q/k norms: patch_attention leaves it alone, no shape error.
        ("olmo2", "attention", "modeling.Olmo2Attention", "never patched: .*'attention': 0"),
        # A LayerNorm as an RMSNorm: a clear error.
        ("starcoder2", "rms_norm", "modeling.nn.LayerNorm", "has a bias: a LayerNorm"),
    ],
)
def test_a_forced_mismatch_fails_clearly(tmp_path, model_type, argument, cls, message):
    plugin = generate(model_type, tmp_path, _force(argument, cls))
    with pytest.raises((AssertionError, ValueError), match=message) as failure:
        run_generated_parity(plugin, "default")
    assert "shape" not in str(failure.value)


def test_sloth_attention_needs_no_registration_by_hand(generated, monkeypatch):
    """A plugin that patches no attention still runs under sloth_attention (the generated
    tests' attn_implementation): patch_architecture registers it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from sloth_core.patches import SLOTH_ATTENTION

    plugin = generated("starcoder2")
    for interface in (AttentionInterface, AttentionMaskInterface):
        monkeypatch.delitem(interface._global_mapping, SLOTH_ATTENTION, raising=False)
    run_generated_parity(plugin, "default")


def test_a_model_without_a_tiny_config_is_refused_plainly(tmp_path, capsys):
    """Falcon's config has no settable head_dim, so no tiny Llama-sized Falcon: nothing can
    be checked, and a plugin that was never checked is not written."""
    argv = ["plugins", "new", "falcon", "--model-type", "falcon"]
    assert main([*argv, "--directory", str(tmp_path / "falcon")]) == 1
    assert "cannot build a tiny falcon model" in capsys.readouterr().err
    assert not (tmp_path / "falcon").exists()
