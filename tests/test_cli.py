"""The ``sloth`` command line: plugins list and doctor."""

from __future__ import annotations

import json

import pytest

from sloth_core import hookimpl
from sloth_core.cli import main


class _ArchPlugin:
    @hookimpl
    def register_architectures(self, register):
        register("toy_arch")


def test_plugins_list_json_all_includes_builtins(plugin_manager, capsys):
    plugin_manager.register(_ArchPlugin(), name="toy")
    assert main(["plugins", "list", "--json", "--all"]) == 0
    records = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert {"builtin:hf_loader", "builtin:torch_loss", "builtin:exporters", "toy"} <= set(records)
    assert records["toy"]["architectures"] == ["toy_arch"]
    assert records["builtin:exporters"]["exporters"] == ["lora", "merged_16bit"]
    for record in records.values():
        assert {"name", "version", "kind", "source", "hooks", "status", "reason"} <= set(record)


def test_plugins_list_without_all_hides_builtins(plugin_manager, capsys):
    plugin_manager.register(_ArchPlugin(), name="toy")
    assert main(["plugins", "list", "--json"]) == 0
    assert [r["name"] for r in json.loads(capsys.readouterr().out)] == ["toy"]


def test_plugins_list_hook_filter(plugin_manager, capsys):
    plugin_manager.register(_ArchPlugin(), name="toy")
    assert main(["plugins", "list", "--all", "--json", "--hook", "export"]) == 0
    assert [r["name"] for r in json.loads(capsys.readouterr().out)] == ["builtin:exporters"]
    with pytest.raises(SystemExit, match="unknown hook 'exprot'"):
        main(["plugins", "list", "--hook", "exprot"])


def test_plugins_list_table_shows_failures(plugin_manager, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")

    class Broken:
        @hookimpl
        def lod_model(self, spec):
            return None

    plugin_manager.register(Broken(), name="broken-one")
    assert main(["plugins", "list"]) == 0
    out = capsys.readouterr().out
    assert "broken-one" in out and "failed" in out and "lod_model" in out


def test_doctor_json_reports_versions_and_op_choices(plugin_manager, capsys):
    assert main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    for name in ("python", "torch", "triton", "transformers", "peft", "bitsandbytes"):
        assert name in report["versions"]
    assert report["versions"]["torch"]
    # Written out, not taken from the registry the doctor reads: no entry points, so no
    # kernels, and every op the core defines served by its torch reference.
    ops = [
        "rms_norm",
        "layer_norm",
        "rope",
        "swiglu",
        "geglu",
        "lora_linear",
        "lora_mlp",
        "lora_qkv",
        "lora_o",
        "cross_entropy",
        "fused_linear_cross_entropy",
        "dequantize_nf4",
        "moe_route",
        "moe_experts",
        "token_log_probs",
    ]
    assert report["ops"]["resolved"] == dict.fromkeys(ops, "torch")


def test_doctor_table(plugin_manager, capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "transformers" in out and "fused_linear_cross_entropy" in out


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "plugins" in capsys.readouterr().out
