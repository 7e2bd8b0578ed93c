"""The op registry: definition, registration, and how an implementation is chosen."""

from __future__ import annotations

import pytest
import torch

from sloth_core.ops import REFERENCE_OPS, OpRegistry, default_registry

DESIGN_OPS = {
    "rms_norm", "layer_norm", "rope", "swiglu", "geglu", "lora_mlp", "lora_qkv", "lora_o",
    "cross_entropy", "fused_linear_cross_entropy", "dequantize_nf4",
}  # fmt: skip


def _double(x):
    return x * 2


def _triple(x):
    return x * 3


@pytest.fixture
def registry() -> OpRegistry:
    registry = OpRegistry()
    registry.define("scale", lambda x: x * 1, doc="scale x")
    return registry


def test_every_design_op_is_defined_with_a_documented_reference():
    registry = default_registry()
    assert DESIGN_OPS <= set(registry.names())
    for name in registry.names():
        assert registry.definition(name).doc, f"op {name} has no docstring"
        assert registry.reference(name) is REFERENCE_OPS[name]


def test_reference_serves_when_nothing_is_registered(registry):
    impl = registry.resolve("scale", "cuda", torch.bfloat16)
    assert impl.provider == "torch"
    assert registry.scale(torch.ones(2)).tolist() == [1.0, 1.0]


def test_highest_priority_serving_implementation_wins(registry):
    registry.register("scale", _double, provider="a", devices=("cpu",), priority=1)
    registry.register("scale", _triple, provider="b", devices=("cpu",), priority=5)
    registry.register("scale", _triple, provider="c", devices=("cuda",), priority=99)
    assert registry.resolve("scale", "cpu").provider == "b"
    assert registry.scale(torch.ones(1)).item() == 3.0
    assert registry.resolve("scale", "cuda").provider == "c"


def test_dtype_and_availability_filter_implementations(registry):
    registry.register("scale", _double, provider="bf16-only", devices=("cpu",),
                      dtypes=(torch.bfloat16,))  # fmt: skip
    registry.register("scale", _triple, provider="absent", devices=None,
                      priority=9, available=lambda: False)  # fmt: skip
    assert registry.resolve("scale", "cpu", torch.float32).provider == "torch"
    assert registry.resolve("scale", "cpu", torch.bfloat16).provider == "bf16-only"
    out = registry("scale", torch.ones(2, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and out.float().tolist() == [2.0, 2.0]


def test_sloth_kernels_env_forces_references_or_one_provider(registry, monkeypatch):
    registry.register("scale", _double, provider="a", devices=None, priority=1)
    registry.register("scale", _triple, provider="b", devices=None, priority=2)
    monkeypatch.setenv("SLOTH_KERNELS", "torch")
    assert registry.resolve("scale", "cpu").provider == "torch"
    monkeypatch.setenv("SLOTH_KERNELS", "a")
    assert registry.resolve("scale", "cpu").provider == "a"
    monkeypatch.delenv("SLOTH_KERNELS")
    assert registry.resolve("scale", "cpu").provider == "b"


def test_bad_registrations_fail_clearly(registry):
    with pytest.raises(KeyError, match="unknown op 'sacle'.*known ops: scale"):
        registry.register("sacle", _double, provider="x")
    with pytest.raises(ValueError, match="reserved"):
        registry.register("scale", _double, provider="torch")
    with pytest.raises(ValueError, match="already defined"):
        registry.define("scale", _double)
    with pytest.raises(AttributeError):
        registry.no_such_op  # noqa: B018


def test_table_reports_the_choice_per_op():
    registry = default_registry()
    registry.register("swiglu", lambda g, u: g, provider="k", devices=("cuda",))
    table = registry.table("cuda", torch.bfloat16)
    assert table["swiglu"] == "k" and table["rms_norm"] == "torch"
    assert registry.table("cpu")["swiglu"] == "torch"
