"""The op registry: definition, registration, and how an implementation is chosen."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sloth_core.ops import OpRegistry, default_registry, reference

#: The ops of DESIGN.md section 3 that the core defines, written out here rather than read
#: from ``REFERENCE_OPS`` (the table the registry is built from, which would agree with
#: itself whatever it held).
CORE_OPS = {
    "rms_norm", "layer_norm", "rope", "swiglu", "geglu", "lora_linear", "lora_mlp",
    "lora_qkv", "lora_o", "cross_entropy", "fused_linear_cross_entropy", "token_log_probs",
    "dequantize_nf4", "moe_route", "moe_experts",
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
    assert set(registry.names()) == CORE_OPS
    for name in registry.names():
        assert registry.definition(name).doc, f"op {name} has no docstring"
        # The reference of that name in sloth_core.ops.reference, not another one's.
        assert registry.reference(name) is getattr(reference, name), name


def test_the_registry_computes_what_each_op_is():
    """Ops called through the registry against formulas written here, so a table entry
    pointing at the wrong function fails (rms_norm's for layer_norm, geglu's for swiglu)."""
    registry = default_registry()
    g = torch.Generator().manual_seed(0)  # fixed: this checks dispatch, not numerics
    x, w, b, gate, up = (
        torch.randn(shape, generator=g) for shape in [(3, 8), 8, 8, (3, 8), (3, 8)]
    )
    rms = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    close = torch.testing.assert_close
    close(registry.rms_norm(x, w, 1e-6), rms)
    close(registry.layer_norm(x, w, b, 1e-5), F.layer_norm(x, (8,), w, b, 1e-5))
    close(registry.swiglu(gate, up), F.silu(gate) * up)
    close(registry.geglu(gate, up), F.gelu(gate) * up)
    logits, labels = torch.randn(5, 11, generator=g), torch.tensor([1, 2, -100, 4, 10])
    close(registry.cross_entropy(logits, labels), F.cross_entropy(logits, labels))


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
