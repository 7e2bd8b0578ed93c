"""sloth-kernels as a plugin: found through its entry point, serving every core op."""

from __future__ import annotations

import torch
from sloth_kernels import plugin
from sloth_kernels._utils import kernel_devices

from sloth_core.plugins import SlothPluginManager

#: Every op the core defines, written out (not the core's ``REFERENCE_OPS``, from which the
#: registry is built): a kernel dropped from sloth-kernels, or an op dropped from the core
#: along with it, fails here. ``moe_route`` (a softmax and a top-k) has no kernel.
CORE_OPS = {
    "rms_norm", "layer_norm", "rope", "swiglu", "geglu", "lora_linear", "lora_mlp",
    "lora_qkv", "lora_o", "cross_entropy", "fused_linear_cross_entropy", "token_log_probs",
    "dequantize_nf4", "moe_experts",
}  # fmt: skip


def test_entry_point_registers_a_kernel_for_every_core_op(monkeypatch):
    monkeypatch.delenv("SLOTH_DISABLE_PLUGINS", raising=False)
    manager = SlothPluginManager(entry_points=True)
    record = {r.name: r for r in manager.plugins()}["sloth-kernels"]
    assert record.status == "active", record.reason
    assert set(record.ops) == CORE_OPS
    device = kernel_devices()[0]
    for op in CORE_OPS:
        assert manager.ops.resolve(op, device, torch.bfloat16).provider == "sloth-kernels", op


def test_forced_references_bypass_the_kernels(monkeypatch, register_plugin, plugin_manager):
    register_plugin(plugin, name="sloth-kernels")
    device = kernel_devices()[0]
    monkeypatch.setenv("SLOTH_KERNELS", "torch")
    assert set(plugin_manager.ops.table(device, torch.bfloat16).values()) == {"torch"}
    monkeypatch.setenv("SLOTH_KERNELS", "sloth-kernels")
    table = plugin_manager.ops.table(device, torch.bfloat16)
    assert {table[op] for op in CORE_OPS} == {"sloth-kernels"}
