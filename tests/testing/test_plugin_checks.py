"""What architecture plugins' tests share (sloth_core.testing.plugin_checks and the
``single_thread`` fixture): the installed plugins with the asked-for ones active, the
batch under Triton's interpreter, and a parity run with the report's checks."""

from __future__ import annotations

import pytest
import torch

from sloth_core import hookimpl
from sloth_core.patches import patch_architecture
from sloth_core.plugins import SlothPluginManager
from sloth_core.testing import (
    check_plugin_parity,
    installed_manager,
    parity_shape,
    plugin_checks,
    tiny_config,
)
from sloth_core.testing.parity import ParityReport, ParitySkipped

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.usefixtures("single_thread")


class _LlamaNorms:
    """Routes llama's RMSNorms through ``ops.rms_norm``, as an architecture plugin does."""

    @hookimpl
    def patch_layers(self, model, ops):
        from transformers.models.llama import modeling_llama as modeling

        return patch_architecture(
            model, ops, plugin="llama-norms", model_types="llama", rms_norm=modeling.LlamaRMSNorm
        )


def test_single_thread_runs_the_module_on_one_thread_and_restores_the_count(pytester):
    assert torch.get_num_threads() == 1
    pytester.makepyfile(
        """
        import pytest, torch

        pytestmark = pytest.mark.usefixtures("single_thread")

        def test_one():
            assert torch.get_num_threads() == 1
        """
    )
    torch.set_num_threads(2)
    try:
        pytester.runpytest_inprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)


def test_installed_manager_names_what_is_not_active(monkeypatch):
    manager = installed_manager("builtin:hf_loader", "builtin:exporters")
    assert isinstance(manager, SlothPluginManager)
    assert manager.records["builtin:hf_loader"].status == "active"
    with pytest.raises(AssertionError, match=r"sloth-nowhere is not installed \(installed: .*"):
        installed_manager("sloth-nowhere")
    monkeypatch.setenv("SLOTH_DISABLE_PLUGINS", "builtin:exporters")
    with pytest.raises(AssertionError, match="builtin:exporters is disabled: blocked by SLOTH_"):
        installed_manager("builtin:hf_loader", "builtin:exporters")


def test_parity_shape(monkeypatch):
    assert parity_shape("torch") == {"batch_size": 2, "seq_len": 24}
    assert parity_shape("torch", 3, seq_len=40) == {"batch_size": 3, "seq_len": 40}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert parity_shape("triton", batch_size=3) == {"batch_size": 3, "seq_len": 24}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert parity_shape("triton", batch_size=3) == {"batch_size": 2, "seq_len": 12}
    assert parity_shape("triton", interpreted=(1, 18)) == {"batch_size": 1, "seq_len": 18}
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ParitySkipped, match="TRITON_INTERPRET=1"):
        parity_shape("triton")


def test_check_plugin_parity_runs_the_harness_and_prints_the_report(capsys):
    manager = SlothPluginManager(entry_points=False)
    manager.register(_LlamaNorms(), name="llama-norms")
    config = tiny_config("llama")
    report = check_plugin_parity(manager, config, kernels="torch", rms_norms=5, seq_len=12)
    assert report.ok and report.patched == {"rms_norm": 5}
    assert str(report) in capsys.readouterr().out


@pytest.mark.parametrize(
    ("kernels", "providers", "rms_norms", "message"),
    [
        ("triton", {"rms_norm": "torch"}, None, "'rms_norm': 'torch'"),  # no kernel served
        ("torch", {"rms_norm": "torch"}, 4, "'rms_norm': 5"),  # a norm too many, or too few
    ],
    ids=["kernels-unused", "rms-norm-count"],
)
def test_check_plugin_parity_checks_the_report(monkeypatch, kernels, providers, rms_norms, message):
    report = ParityReport("llama", torch.float32, "cpu", kernels, packed=False)
    report.patched, report.providers = {"rms_norm": 5}, providers
    monkeypatch.setattr(plugin_checks, "assert_parity", lambda config, **kwargs: report)
    with pytest.raises(AssertionError, match=message):
        check_plugin_parity(None, None, kernels=kernels, rms_norms=rms_norms)
    report.providers = {"rms_norm": "sloth-kernels"}
    assert check_plugin_parity(None, None, kernels=kernels, rms_norms=5) is report
