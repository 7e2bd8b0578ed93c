"""The LoRA configurations users write, beyond the parity harness's (every projection,
no dropout): a model patched through the installed plugins (sloth-kernels' LoRA ops where
they serve, the references where they do not) trains as the same PEFT model unpatched:
the same loss and every trainable gradient, on configs whose every field is varied."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from sloth_core.testing import init_tiny_model, installed_manager
from sloth_core.testing.varied import varied_config

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

VARIANTS = {
    # PEFT's common recipe; dropout makes every op take its reference path, which draws
    # the same masks in the same order as PEFT
    "dropout": dict(target_modules=ALL, lora_dropout=0.1),
    "rslora": dict(target_modules=ALL, use_rslora=True),
    # other ranks and alphas per module: each op's layers scale differently
    "patterns": dict(
        target_modules=ALL,
        rank_pattern={"k_proj": 2, "down_proj": 6},
        alpha_pattern={"q_proj": 3.0, "up_proj": 24.0},
    ),  # fmt: skip
    "all-linear": dict(target_modules="all-linear"),
    # a trainable head beside the adapters (and a trainable embedding, not kept on host)
    "modules_to_save": dict(
        target_modules=["q_proj", "v_proj", "down_proj"],
        modules_to_save=["lm_head", "embed_tokens"],
    ),  # fmt: skip
    # trainable biases of the adapted projections (the fused path does not serve them)
    "lora_only_bias": dict(target_modules=ALL, bias="lora_only"),
    "k_only": dict(target_modules=["k_proj"]),
}


def _peft(arch: str, variant: dict, *, patched: bool):
    config = varied_config(arch, tie_word_embeddings=False, attention_bias=True)
    model = init_tiny_model(config, seed=5)
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **variant)
    model = get_peft_model(model, lora)
    if patched:
        manager = installed_manager("sloth-llama", "sloth-qwen")
        manager.patch_layers(model=model)
    return model.train()


def _step(model, seed: int = 3):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (2, 10), generator=generator)
    torch.manual_seed(seed)  # dropout's masks: the same draws on both models
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_parity_of_the_lora_configs_users_write(arch, variant, monkeypatch, single_thread):
    # sloth-kernels' LoRA projections are plain torch products (no interpreter needed);
    # its Triton ops (norms, rope, the activation) have their own parity tests.
    monkeypatch.setenv("SLOTH_KERNELS", "torch")
    want_loss, want = _step(_peft(arch, VARIANTS[variant], patched=False))
    monkeypatch.setenv("SLOTH_KERNELS", "sloth-kernels")
    got_loss, got = _step(_peft(arch, VARIANTS[variant], patched=True))
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    assert got.keys() == want.keys() and len(got) > 0
    for name, grad in want.items():
        assert got[name] is not None, name
        # float32, summed in another order (fused products, the kernels' norms): judged
        # against each gradient's own scale, as the parity harness does
        scale = grad.abs().max().clamp(min=1e-12)
        error = ((got[name] - grad).abs().max() / scale).item()
        assert error <= 1e-4, (name, error)
