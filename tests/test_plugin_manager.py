"""The plugin manager: built-ins, isolation of broken plugins, blocking and tracing."""

from __future__ import annotations

import types

import pytest
import torch

from sloth_core import hookimpl
from sloth_core.plugins import BUILTIN_PLUGINS, SlothPluginManager, unmet_requirements


def _plugin(**hooks) -> types.SimpleNamespace:
    return types.SimpleNamespace(**{name: hookimpl(fn) for name, fn in hooks.items()})


def test_builtins_register_first_and_are_active():
    manager = SlothPluginManager(entry_points=False)
    builtins = manager.plugins(include_builtins=True)
    assert [r.name for r in builtins] == [
        "builtin:" + m.rsplit(".", 1)[-1] for m in BUILTIN_PLUGINS
    ]
    assert all(r.status == "active" and r.source == "builtin" for r in builtins)
    assert manager.plugins() == []  # built-ins are hidden unless asked for
    assert {"lora", "merged_16bit", "merged"} <= set(manager.exporters)
    assert manager.implementers("load_model") == ["builtin:hf_loader"]


def test_misspelt_hook_fails_that_plugin_only():
    manager = SlothPluginManager(entry_points=False)
    record = manager.register(_plugin(laod_model=lambda spec: None), name="typo")
    assert record.status == "failed"
    assert "unknown hook 'laod_model'" in record.reason and "'load_model'" in record.reason
    assert "typo" not in [name for name, _ in manager.pm.list_name_plugin()]
    good = manager.register(_plugin(register_architectures=lambda register: register("x")))
    assert good.status == "active" and manager.architectures == {"x": good.name}


def test_wrong_hook_arguments_fail_validation():
    manager = SlothPluginManager(entry_points=False)
    record = manager.register(_plugin(load_model=lambda specification: None), name="args")
    assert record.status == "failed" and "invalid hooks" in record.reason
    assert "specification" in record.reason


def test_failing_registration_is_rolled_back():
    def register_kernels(register):
        register("swiglu", lambda g, u: g * u, devices=None, priority=100)
        raise RuntimeError("no GPU driver")

    manager = SlothPluginManager(entry_points=False)
    record = manager.register(_plugin(register_kernels=register_kernels), name="flaky")
    assert record.status == "failed"
    assert "registration failed: RuntimeError: no GPU driver" in record.reason
    assert manager.ops.resolve("swiglu", "cpu").provider == "torch"
    assert "flaky" not in [name for name, _ in manager.pm.list_name_plugin()]


def test_register_hooks_credit_the_plugin_that_declared():
    def register_kernels(register):
        register("rms_norm", lambda x, w, eps=1e-6, **kw: x, devices=("cuda",))

    manager = SlothPluginManager(entry_points=False)
    record = manager.register(
        _plugin(
            register_kernels=register_kernels,
            register_quantizers=lambda register: register("nf4", description="4-bit"),
            register_exporters=lambda register: register("gguf", aliases=("llama.cpp",)),
        ),
        name="multi",
    )
    assert record.ops == ["rms_norm"] and record.quantizers == ["nf4"]
    assert record.exporters == ["gguf"]
    assert manager.exporters["llama.cpp"] == "multi" and manager.quantizers["nf4"] == "multi"
    assert manager.ops.resolve("rms_norm", "cuda", torch.bfloat16).provider == "multi"
    assert record.kind == "kernels, quantizer, exporter"


def test_disable_env_blocks_builtins_and_entry_points(monkeypatch):
    monkeypatch.setenv("SLOTH_DISABLE_PLUGINS", "builtin:torch_loss, sloth-kernels")
    manager = SlothPluginManager(entry_points=True)
    records = {r.name: r for r in manager.plugins(include_builtins=True)}
    assert records["builtin:torch_loss"].status == "disabled"
    assert "SLOTH_DISABLE_PLUGINS" in records["builtin:torch_loss"].reason
    assert manager.implementers("compute_loss") == []
    if "sloth-kernels" in records:  # installed in the test environment
        assert records["sloth-kernels"].status == "disabled"


def test_trace_env_writes_hook_calls(monkeypatch, capsys):
    monkeypatch.setenv("SLOTH_TRACE_PLUGINS", "1")
    manager = SlothPluginManager(entry_points=False)
    manager.pm.hook.quantize(spec=None)
    assert "quantize" in capsys.readouterr().err


def test_installed_plugin_wins_firstresult_over_builtin():
    calls = []

    def load_model(spec):
        calls.append(spec)
        return ("model", "tokenizer")

    manager = SlothPluginManager(entry_points=False)
    manager.register(_plugin(load_model=load_model), name="fast")
    assert manager.load_model(spec="SPEC") == ("model", "tokenizer")
    assert calls == ["SPEC"]
    assert manager.implementers("load_model") == ["fast", "builtin:hf_loader"]


class _FakeDist:
    def __init__(self, requires):
        self.requires = requires


@pytest.mark.parametrize(
    ("requires", "problem"),
    [
        (["pluggy>=1.0"], None),
        (["pluggy>=999"], "pluggy>=999 (installed:"),
        (["surely-absent-package"], "surely-absent-package (not installed)"),
        (['surely-absent-package; extra == "dev"'], None),
        (['surely-absent-package; python_version < "3"'], None),
    ],
)
def test_unmet_requirements(requires, problem):
    unmet = unmet_requirements(_FakeDist(requires))
    if problem is None:
        assert unmet == []
    else:
        assert len(unmet) == 1 and unmet[0].startswith(problem)
