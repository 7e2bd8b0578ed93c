"""The fused-projection patchers (``sloth_core.patches.fused``) on Phi-3's modules, one
module at a time, against the same module unpatched: PEFT LoRA on the fused ``qkv_proj``
and ``gate_up_proj`` (one adapter spanning the fused output), with LoRA dropout, through
the torch references of the ops; the fallbacks (DoRA, unknown activations, q/k norms);
undo and idempotence; and how ``patch_architecture`` counts them.
"""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from transformers.models.phi3 import modeling_phi3 as phi3

from sloth_core.ops import default_registry
from sloth_core.patches import patch_architecture, patch_fused_attention, patch_fused_mlp
from sloth_core.patching import is_patched, restore_forward
from sloth_core.testing import init_tiny_model, tiny_config

#: Every fused projection of Phi-3 and the unfused ones around them.
TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: tiny matrices, and a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _peft_pair(config, **lora):
    """Two identical PEFT-wrapped tiny Phi-3 models: the reference and the one to patch.

    ``init_lora_weights=False`` draws a non-zero ``lora_B``, so adapters change outputs.
    """
    from peft import LoraConfig, get_peft_model

    options = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    base = init_tiny_model(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = get_peft_model(base, LoraConfig(**{**options, **lora}))
    return model, copy.deepcopy(model)


def _counting(ops):
    """``ops`` whose calls are counted by name (``lora_linear+lora`` when it has an adapter)."""
    calls: Counter[str] = Counter()
    resolve = ops.resolve

    def recording(name, *args):
        impl = resolve(name, *args)

        def fn(*a, **kw):
            adapted = [x for x in a if getattr(x, "has_lora", False)]
            calls[name + ("+lora" if adapted else "")] += 1
            if name == "rope":
                calls[f"rope R={a[2].shape[-1]} D={a[0].shape[-1]}"] += 1
            return impl.fn(*a, **kw)

        return type(impl)(**{**impl.__dict__, "fn": fn})

    ops.resolve = recording
    return calls


def _run(module, inputs, train: bool, seed: int = 3):
    """Output and input/LoRA gradients of ``module(**inputs)`` (first output if a tuple)."""
    module.train(train)
    hidden = inputs["hidden_states"].detach().clone().requires_grad_(True)
    inputs = {**inputs, "hidden_states": hidden}
    for p in module.parameters():
        p.grad = None
    torch.manual_seed(seed)  # the same LoRA dropout masks in both runs
    out = module(**inputs)
    out = out[0] if isinstance(out, tuple) else out
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    (out * weights).sum().backward()
    grads = {n: p.grad for n, p in module.named_parameters() if "lora_" in n}
    assert grads and all(g is not None for g in grads.values())
    return out.detach(), hidden.grad, grads


def _assert_same(ref, got):
    out_ref, dx_ref, grads_ref = ref
    out, dx, grads = got
    torch.testing.assert_close(out, out_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-6, atol=1e-6)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-5, atol=1e-6, msg=name)


def _hidden(config, seq: int = 7):
    return torch.randn(2, seq, config.hidden_size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("dropout", [0.0, 0.25])
@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh"])
def test_fused_mlp_with_lora_equals_peft(act, dropout):
    config = tiny_config("phi3", hidden_act=act)
    ref_model, model = _peft_pair(config, lora_dropout=dropout)
    ref = ref_model.base_model.model.model.layers[0].mlp
    mlp = model.base_model.model.model.layers[0].mlp
    ops = default_registry()
    assert patch_fused_mlp(mlp, ops)
    calls = _counting(ops)
    inputs = {"hidden_states": _hidden(config)}
    _assert_same(_run(ref, inputs, train=True), _run(mlp, inputs, train=True))
    activation = "swiglu" if act == "silu" else "geglu"
    assert calls == {"lora_linear+lora": 2, activation: 1}  # gate_up_proj, down_proj


@pytest.mark.parametrize("dropout", [0.0, 0.25])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("heads", [(4, 2), (4, 4)], ids=["gqa", "mha"])
def test_fused_attention_with_lora_equals_peft(heads, attn, dropout):
    """Partial rotary (R = 8 of head_dim 16): only the first R dims go through rope."""
    config = tiny_config("phi3", num_attention_heads=heads[0], num_key_value_heads=heads[1])
    config._attn_implementation = attn
    ref_model, model = _peft_pair(config, lora_dropout=dropout)
    rotary = ref_model.base_model.model.model.rotary_emb
    ref = ref_model.base_model.model.model.layers[1].self_attn
    attention = model.base_model.model.model.layers[1].self_attn
    ops = default_registry()
    assert patch_fused_attention(attention, ops)
    calls = _counting(ops)
    hidden = _hidden(config)
    position_embeddings = rotary(hidden, torch.arange(hidden.shape[1])[None])
    inputs = {"hidden_states": hidden, "position_embeddings": position_embeddings}
    inputs["attention_mask"] = None
    if attn == "eager":  # eager needs the causal mask; sdpa runs is_causal without one
        causal = torch.full((7, 7), float("-inf")).triu(1)
        inputs["attention_mask"] = causal[None, None].expand(2, 1, 7, 7)
    _assert_same(_run(ref, inputs, train=True), _run(attention, inputs, train=True))
    assert calls == {"lora_linear+lora": 1, "lora_o+lora": 1, "rope": 1, "rope R=8 D=16": 1}


def test_dora_falls_back_to_the_original_forward():
    """An adapter the LoRA ops do not compute (DoRA) runs PEFT's own forward, still equal."""
    config = tiny_config("phi3")
    ref_model, model = _peft_pair(config, use_dora=True)
    ref = ref_model.base_model.model.model.layers[0].mlp
    mlp = model.base_model.model.model.layers[0].mlp
    ops = default_registry()
    assert patch_fused_mlp(mlp, ops)
    calls = _counting(ops)
    inputs = {"hidden_states": _hidden(config)}
    _assert_same(_run(ref, inputs, train=False), _run(mlp, inputs, train=False))
    assert calls == {}


def test_patches_are_idempotent_and_reversible():
    model = init_tiny_model(tiny_config("phi3"))
    layer, ops = model.model.layers[0], default_registry()
    hidden = _hidden(model.config)
    with torch.no_grad():
        expected = layer.mlp(hidden)
    assert patch_fused_mlp(layer.mlp, ops) and patch_fused_attention(layer.self_attn, ops)
    assert not patch_fused_mlp(layer.mlp, ops) and not patch_fused_attention(layer.self_attn, ops)
    with torch.no_grad():
        torch.testing.assert_close(layer.mlp(hidden), expected, rtol=0, atol=0)
    assert restore_forward(layer.mlp) and restore_forward(layer.self_attn)
    assert not is_patched(layer.mlp) and "forward" not in vars(layer.mlp)


def test_unsupported_modules_are_left_alone():
    model = init_tiny_model(tiny_config("phi3"))
    layer, ops = model.model.layers[0], default_registry()
    assert not patch_fused_mlp(layer.mlp, ops, activation="geglu")  # activation_fn is silu
    assert not patch_fused_mlp(layer.mlp, ops, activation="relu")  # no such op
    layer.self_attn.q_norm = torch.nn.Identity()  # per-head norms: not what this patch runs
    assert not patch_fused_attention(layer.self_attn, ops)
    assert not any(is_patched(m) for m in model.modules())


def test_patch_architecture_counts_fused_modules_as_mlp_and_attention():
    model = init_tiny_model(tiny_config("phi3"))
    report = patch_architecture(
        model, default_registry(), plugin="test", model_types="phi3",
        fused_mlp=phi3.Phi3MLP, fused_attention=phi3.Phi3Attention,
    )  # fmt: skip
    assert report.patched == {"mlp": 2, "attention": 2}
    report.undo()
    assert not any(is_patched(m) for m in model.modules())
