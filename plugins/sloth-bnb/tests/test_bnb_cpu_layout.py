"""The CPU trap: bitsandbytes repacks 4-bit weights for inference in an eval + no-grad
forward (on AVX512-BF16 processors), and training afterwards gets wrong gradients unless
the weights are put back; sloth-bnb's guard (:mod:`sloth_bnb.cpu_layout`) does that.

``test_eval_pass_does_not_change_training`` runs the real repacking where the processor
has it; the ``forced`` tests make bitsandbytes take the repacking path on any CPU (its
fused kernel stubbed, as its output is not what they check), so CI runs the restore too.
"""

from __future__ import annotations

import bitsandbytes as bnb
import bitsandbytes.functional as bnb_functional
import pytest
import torch
from sloth_bnb import guard_cpu_layout, restore_cpu_layout
from sloth_bnb.cpu_layout import CpuLayoutGuard

from sloth_core import FastLanguageModel
from sloth_core.plugins import using_plugin_manager
from sloth_core.testing.parity import attach_lora

IDS = torch.randint(0, 500, (2, 12), generator=torch.Generator().manual_seed(0))


def _load(path, *, lora=True):
    model, _ = FastLanguageModel.from_pretrained(
        str(path), load_in_4bit=True, max_seq_length=None, device_map="cpu"
    )
    return attach_lora(model, r=4, seed=0) if lora else model


def _layers(model):
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def _packed(model):
    return sum(
        bool(m.weight.quant_state.__dict__.get("packing_format_for_cpu")) for m in _layers(model)
    )


def _snapshot(model):
    """Every 4-bit weight and its quant_state tensors, as they are now."""
    out = {}
    for i, layer in enumerate(_layers(model)):
        state = layer.weight.quant_state
        out[i] = (layer.weight.data.clone(), state.absmax.clone(), state.state2.absmax.clone(),
                  state.offset.clone(), state.dtype, state.nested)  # fmt: skip
    return out


def _assert_same(before, after):
    assert before.keys() == after.keys()
    for key in before:
        for a, b in zip(before[key], after[key], strict=True):
            assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, key


def _train_step(model):
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads.values())
    return loss.item(), grads


def _eval_pass(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _assert_same_training(reference, model):
    ref_loss, ref_grads = _train_step(reference)
    loss, grads = _train_step(model)
    assert loss == ref_loss
    for name, grad in ref_grads.items():
        assert torch.equal(grads[name], grad), name


@pytest.fixture
def forced(monkeypatch):
    """Make ``Linear4bit.forward`` repack on this CPU, and stub the packed kernel."""

    def fused(A, B, out=None, state=None, **kwargs):  # noqa: N803 - bitsandbytes' names
        return torch.zeros(*A.shape[:-1], state.shape[0], dtype=A.dtype)

    monkeypatch.setattr(bnb_functional, "gemv_4bit", fused)

    def force(model):
        for layer in _layers(model):
            monkeypatch.setattr(layer, "support_avx512bf16_for_cpu", True)

    return force


@pytest.mark.skipif(not bnb_functional.has_avx512bf16(),
                    reason="this CPU has no AVX512-BF16: bitsandbytes never repacks here "
                           "(the forced tests below cover the restore)")  # fmt: skip
def test_eval_pass_does_not_change_training(bnb_only, llama_dir):
    """As users hit it: evaluate under no_grad, then train; unpatched model, real kernel."""
    reference, model = _load(llama_dir), _load(llama_dir)
    before = _snapshot(model)
    with torch.no_grad():
        expected = reference.eval()(input_ids=IDS).logits
    logits = _eval_pass(model)
    assert _packed(model) == 14, "bitsandbytes did not repack: the trap is not exercised"
    torch.testing.assert_close(logits, expected, atol=5e-2, rtol=5e-2)  # bf16 fused kernel
    _assert_same_training(reference, model)
    assert _packed(model) == 0
    _assert_same(before, _snapshot(model))


def test_forced_repack_is_undone_bit_exactly(bnb_only, llama_dir, forced):
    reference, model = _load(llama_dir), _load(llama_dir)
    forced(model)
    before = _snapshot(model)
    _eval_pass(model)
    assert _packed(model) == 14
    _assert_same_training(reference, model)
    assert _packed(model) == 0
    _assert_same(before, _snapshot(model))
    # Evaluating again repacks, and training again restores.
    _eval_pass(model)
    assert _packed(model) == 14
    _assert_same_training(reference, model)
    _assert_same(before, _snapshot(model))


def test_state_dict_after_an_eval_pass_is_the_loaded_one(bnb_only, llama_dir, forced):
    model = _load(llama_dir, lora=False)
    forced(model)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    _eval_pass(model)
    assert _packed(model) == 14
    state = model.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


def test_patched_model_restores_before_its_lora_ops(installed, llama_dir, forced):
    """sloth's LoRA ops read the 4-bit weight without calling ``Linear4bit.forward``; a
    weight repacked by a call of the layer itself is restored by the model's hook."""
    with using_plugin_manager(installed):
        reference, model = _load(llama_dir), _load(llama_dir)
        assert model.sloth_patches and reference.sloth_patches
        forced(model)
        layer = model.get_base_model().model.layers[0].mlp.down_proj.base_layer
        with torch.no_grad():
            layer.eval()(torch.randn(3, layer.in_features))
        assert _packed(model) == 1
        _assert_same_training(reference, model)
        assert _packed(model) == 0


def test_restore_without_the_guard_uses_bitsandbytes_inverse(bnb_only, llama_dir, forced):
    model = _load(llama_dir, lora=False)
    forced(model)
    layer = model.model.layers[0].mlp.up_proj
    weight = layer.weight.data.clone()
    with torch.no_grad():
        layer.forward(torch.randn(3, layer.in_features))  # no hooks: bitsandbytes alone
    assert _packed(model) == 1
    with pytest.warns(UserWarning, match="bf16-rounded block scales"):
        assert restore_cpu_layout(model) == 1
    assert torch.equal(layer.weight.data, weight)  # the nibbles are a lossless permutation
    assert restore_cpu_layout(model) == 0


def test_guard_is_installed_once(bnb_only, llama_dir):
    model = _load(llama_dir, lora=False)
    guard = guard_cpu_layout(model)
    assert isinstance(guard, CpuLayoutGuard) and guard_cpu_layout(model) is guard
    hooks = model.model.layers[0].mlp.up_proj._forward_pre_hooks
    assert len(hooks) == 1
    assert guard_cpu_layout(torch.nn.Sequential(torch.nn.Linear(4, 4))) is None
