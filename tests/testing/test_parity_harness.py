"""The parity harness itself, with fake llama plugins: it passes a faithful patch and
catches wrong ones (forward, backward, LoRA, packing), in fp32 and bf16."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

from sloth_core import hookimpl
from sloth_core.patching import replace_forward, restorer
from sloth_core.plugins import SlothPluginManager
from sloth_core.testing import tiny_config
from sloth_core.testing.parity import (
    ParityError,
    ParitySkipped,
    assert_parity,
    check_parity,
    kernels_mode,
)
from sloth_core.types import PatchReport


class _GradTimes(torch.autograd.Function):
    """Identity forward, backward scaled: a bug only gradients can see."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


class FakeLlama:
    """Routes llama's RMSNorms through ``ops.rms_norm`` and its MLP's activation through
    ``ops.swiglu``, like an architecture plugin; ``bug`` names a mistake to make."""

    def __init__(self, bug: str | None = None) -> None:
        self.bug = bug

    def _norm(self, module, ops):
        eps = 1e-5 if self.bug == "eps" else module.variance_epsilon  # the config's is 3e-3

        def forward(x):
            y = ops.rms_norm(x, module.weight, eps)
            return _GradTimes.apply(y, 1.01) if self.bug == "backward" else y

        return forward

    def _mlp(self, module, ops):
        scale = 1.001 if self.bug == "mlp" else None

        def forward(x):
            out = module.down_proj(ops.swiglu(module.gate_proj(x), module.up_proj(x)))
            return out * scale if scale else out

        return forward

    def _lora(self, module, ops):
        def forward(x, *args, **kwargs):
            base = module.base_layer(x)
            if self.bug == "lora_dropped":  # adapters left out of the graph
                return base
            a, b = module.lora_A["default"], module.lora_B["default"]
            adapter = b(a(x.to(a.weight.dtype)))
            return (base + adapter).to(base.dtype)  # "lora_scaling": scaling (2) forgotten

        return forward

    def _model(self, module, ops):
        def forward(*args, position_ids=None, **kwargs):  # packing ignored
            return type(module).forward(module, *args, **kwargs)

        return forward

    @hookimpl
    def patch_layers(self, model, ops):
        if getattr(getattr(model, "config", None), "model_type", None) != "llama":
            return None
        patched = []
        for module in model.modules():
            name = type(module).__name__
            if name == "LlamaRMSNorm":
                forward = self._norm(module, ops)
            elif name == "LlamaMLP":
                forward = self._mlp(module, ops)
            elif name == "LlamaModel" and self.bug == "packing":
                forward = self._model(module, ops)
            elif hasattr(module, "base_layer") and self.bug in ("lora_scaling", "lora_dropped"):
                forward = self._lora(module, ops)
            else:
                continue
            if replace_forward(module, forward):
                patched.append(module)
        return PatchReport("fake-llama", "llama", {"modules": len(patched)}, restorer(patched))


def _manager(*plugins) -> SlothPluginManager:
    manager = SlothPluginManager(entry_points=False)
    for i, plugin in enumerate(plugins):
        assert manager.register(plugin, name=f"plugin-{i}").status == "active"
    return manager


def _failed(report) -> set[str]:
    return {check.name.split()[0] for check in report.failures}


CONFIG = tiny_config("llama")


def test_faithful_patch_passes_and_reports():
    report = assert_parity(CONFIG, manager=_manager(FakeLlama()))
    assert report.patched == {"modules": 2 * 2 + 1 + 2}  # norms, MLPs; the re-patch adds none
    assert report.providers == {"rms_norm": "torch", "swiglu": "torch"}
    assert report.worst("logits") <= 1e-6 and report.worst("grad") <= 1e-6
    names = [check.name for check in report.checks]
    assert names[:3] == ["logits (eval)", "loss (train)", "loss (num_items)"]
    assert "grad q_proj.lora_A" in names and "grad down_proj.lora_B" in names
    assert "kernels=torch" in str(report) and "grad v_proj.lora_B" in str(report)


@pytest.mark.parametrize(
    ("bug", "caught_by"),
    [
        ("mlp", {"logits", "loss", "grad"}),  # a 1e-3 relative error in a forward
        ("eps", {"logits", "loss", "grad"}),  # 1e-5 where the config says 1e-6
        ("backward", {"grad"}),  # forward exact, backward 1 % off
        ("lora_scaling", {"loss", "grad"}),  # only wrong once adapters exist
        ("lora_dropped", {"loss", "grad"}),  # LoRA parameters get no gradient
    ],
)
def test_wrong_patches_fail(bug, caught_by):
    report = check_parity(CONFIG, manager=_manager(FakeLlama(bug)))
    assert _failed(report) == caught_by, str(report)
    with pytest.raises(AssertionError, match="parity failed"):
        assert_parity(CONFIG, manager=_manager(FakeLlama(bug)))


def test_packed_rows_pass_and_ignoring_packing_fails():
    report = assert_parity(CONFIG, manager=_manager(FakeLlama()), packed=True, batch_size=3)
    assert report.packed and "packed" in str(report)
    with pytest.raises(AssertionError, match="logits"):
        assert_parity(CONFIG, manager=_manager(FakeLlama("packing")), packed=True)


def test_bf16_is_measured_against_fp32():
    report = assert_parity(CONFIG, manager=_manager(FakeLlama()), dtype=torch.bfloat16)
    assert all(check.baseline is not None and check.baseline > 0 for check in report.checks)
    # Same ops as the unpatched model (torch references): the same bf16 error exactly.
    assert all(check.error == check.baseline for check in report.checks)
    with pytest.raises(AssertionError):  # loose, but not blind
        assert_parity(CONFIG, manager=_manager(FakeLlama("lora_scaling")), dtype=torch.bfloat16)


def test_no_patch_or_a_global_patch_is_an_error():
    with pytest.raises(ParityError, match="no plugin patched"):
        check_parity(CONFIG, manager=_manager())

    from transformers.models.llama import modeling_llama

    class ClassPatcher:
        @hookimpl
        def patch_layers(self, model, ops):
            modeling_llama.LlamaRMSNorm.forward = lambda self, x: ops.rms_norm(
                x, self.weight, self.variance_epsilon
            )
            return PatchReport("class-patcher", "llama", {"rms_norm": 1})

    original = modeling_llama.LlamaRMSNorm.forward
    try:
        with pytest.raises(ParityError, match="LlamaRMSNorm.forward"):
            check_parity(CONFIG, manager=_manager(ClassPatcher()))
    finally:
        modeling_llama.LlamaRMSNorm.forward = original


def test_kernels_mode_sets_and_restores(monkeypatch):
    monkeypatch.setenv("SLOTH_KERNELS", "someone")
    with kernels_mode("torch"):
        assert os.environ["SLOTH_KERNELS"] == "torch"
    with kernels_mode("triton"):
        assert "SLOTH_KERNELS" not in os.environ
    assert os.environ["SLOTH_KERNELS"] == "someone"


def test_triton_without_kernels_is_a_skip():
    with pytest.raises(ParitySkipped, match="kernel"):
        check_parity(CONFIG, manager=_manager(FakeLlama()), kernels="triton", device="cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_kernels(dtype):
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on the CPU needs TRITON_INTERPRET=1 set before Python starts")
    kernels = pytest.importorskip("sloth_kernels.plugin")
    report = assert_parity(
        CONFIG, manager=_manager(FakeLlama(), kernels), dtype=dtype, kernels="triton"
    )
    assert report.providers == {"rms_norm": "plugin-1", "swiglu": "plugin-1"}
    assert report.op_table["rms_norm"] == "plugin-1"


def test_bundled_instructions_tokenize_with_assistant_labels():
    from sloth_core.testing import build_tokenizer
    from sloth_core.testing.convergence import tokenize_rows
    from sloth_core.testing.datasets import load_tiny_instructions

    rows = load_tiny_instructions()
    assert 150 <= len(rows) <= 300
    assert all(set(row) == {"instruction", "input", "output"} and row["output"] for row in rows)
    tokenizer = build_tokenizer()
    for ids, labels in tokenize_rows(rows[:20], tokenizer):
        learned = [t for t in labels if t != -100]
        assert 0 < len(learned) < len(ids)
        assert tokenizer.decode(learned).endswith("<|im_end|>")


def test_convergence_passes_a_faithful_patch_and_catches_a_drift():
    from sloth_core.testing.convergence import assert_converges_alike

    unpatched, patched = assert_converges_alike(CONFIG, manager=_manager(FakeLlama()))
    assert unpatched == patched  # the torch references: bit for bit
    with pytest.raises(AssertionError, match="drift apart"):
        assert_converges_alike(CONFIG, manager=_manager(FakeLlama("mlp")))


# -- mutations of the real attention path: the parity runs must catch each ---------------
@contextlib.contextmanager
def _attention_without(what: str):
    """``sloth_attention`` losing one of its arguments: the softcap, the query scale (then
    SDPA's default 1/sqrt(head_dim)), or the window. transformers' masks carry the window
    already, so a window lost in a patch shows where the patch builds its own mask (as
    sloth's packed path does): the mutation drops both, leaving plain causal attention
    within each packed sequence. That fails only if some sequence is longer than the
    window, which is what the check is for."""
    from transformers import AttentionInterface

    from sloth_core.patches import SLOTH_ATTENTION, register_sloth_attention
    from sloth_core.patches.attention import sloth_attention

    def mutated(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kw):
        if what == "scaling":
            scaling = None
        if what == "sliding_window":
            attention_mask = None
        kw.pop(what, None)
        return sloth_attention(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kw
        )

    register_sloth_attention()
    AttentionInterface.register(SLOTH_ATTENTION, mutated)
    try:
        yield
    finally:
        AttentionInterface.register(SLOTH_ATTENTION, sloth_attention)


@pytest.mark.parametrize(
    ("what", "plugin", "arch", "overrides", "packed"),
    [
        ("sliding_window", "sloth-mistral", "mistral", {}, True),
        ("sliding_window", "sloth-gemma", "gemma2", {}, True),
        ("softcap", "sloth-gemma", "gemma2", {}, False),
        ("scaling", "sloth-gemma", "gemma2", {"query_pre_attn_scalar": 20}, False),
        ("scaling", "sloth-gemma", "gemma3_text", {"query_pre_attn_scalar": 20}, False),
    ],
)
def test_parity_catches_an_attention_that_drops(what, plugin, arch, overrides, packed):
    """The harness on the plugins' tiny configs fails when the window, the softcap or the
    attention scale is lost (and passes with it: the plugin's own tests)."""
    from sloth_core.patches import SLOTH_ATTENTION
    from sloth_core.testing import installed_manager

    manager = installed_manager(plugin)
    config = tiny_config(arch, **overrides)
    options = dict(manager=manager, kernels="torch", attn_implementation=SLOTH_ATTENTION,
                   packed=packed, batch_size=2, seq_len=24)  # fmt: skip
    assert_parity(config, **options)  # the unmutated path passes on the same inputs
    with _attention_without(what), pytest.raises(AssertionError, match="parity failed"):
        assert_parity(config, **options)
