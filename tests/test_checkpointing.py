"""Offloaded activation checkpointing gives exactly the gradients of no checkpointing."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from sloth_core.api import enable_checkpointing
from sloth_core.testing import init_tiny_model, tiny_config


def _lora_grads(mode: str, dropout: float) -> tuple[float, dict[str, torch.Tensor]]:
    model = init_tiny_model(tiny_config("llama", tie_word_embeddings=False), seed=3)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, init_lora_weights=False,
                        target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"])  # fmt: skip
    torch.manual_seed(0)
    model = get_peft_model(model, config)
    if mode != "none":
        enable_checkpointing(model, offload=mode == "offload")
    model.train()
    ids = torch.randint(
        0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1)
    )
    torch.manual_seed(5)  # the same dropout masks in every mode
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_offloaded_checkpointing_matches_no_checkpointing(dropout):
    loss_ref, grads_ref = _lora_grads("none", dropout)
    for mode in ("plain", "offload"):
        loss, grads = _lora_grads(mode, dropout)
        assert abs(loss - loss_ref) <= 1e-6, mode
        assert grads.keys() == grads_ref.keys() and grads
        for name, grad in grads.items():
            assert torch.allclose(grad, grads_ref[name], atol=1e-6, rtol=1e-5), (mode, name)


def test_offload_is_used_by_the_layers():
    model = init_tiny_model(tiny_config("llama"), seed=0)
    model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    enable_checkpointing(model, offload=True)
    layers = model.get_base_model().model.layers
    assert all(layer.gradient_checkpointing for layer in layers)
    assert all(
        layer._gradient_checkpointing_func.__name__ == "offloaded_checkpoint" for layer in layers
    )


def test_one_vocabulary_and_one_offload_rule(monkeypatch):
    from sloth_core.api import _checkpointing
    from sloth_core.checkpointing import Checkpointing, apply_checkpointing

    # Unsloth's spellings, mapped in FastLanguageModel alone; the enum's names too.
    assert [_checkpointing(v) for v in (False, True, "sloth", "unsloth", "on", "offload")] == [
        Checkpointing.OFF, Checkpointing.ON, Checkpointing.OFFLOAD, Checkpointing.OFFLOAD,
        Checkpointing.ON, Checkpointing.OFFLOAD,
    ]  # fmt: skip
    with pytest.raises(ValueError, match="use_gradient_checkpointing='sometimes'"):
        _checkpointing("sometimes")

    def layers_after(mode, *, cuda=False, sharded=False):
        model = init_tiny_model(tiny_config("llama"), seed=0)
        # The rule reads where the weights are: pretend they are on a GPU.
        monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: cuda))
        offloaded = apply_checkpointing(model, mode, sharded=sharded)
        monkeypatch.undo()
        funcs = {
            getattr(layer, "_gradient_checkpointing_func", None) for layer in model.model.layers
        }
        on = all(getattr(layer, "gradient_checkpointing", False) for layer in model.model.layers)
        return offloaded, on, {getattr(f, "__name__", None) for f in funcs}

    assert layers_after(Checkpointing.OFF)[:2] == (False, False)
    assert layers_after("on")[:2] == (False, True)
    # On the CPU the inputs are in host memory already; under FSDP2 they stay on the device.
    assert layers_after("offload")[:2] == (False, True)
    assert layers_after("offload", cuda=True, sharded=True)[:2] == (False, True)
    offloaded, on, names = layers_after("offload", cuda=True)
    assert offloaded and on and names == {"offloaded_checkpoint"}


@pytest.mark.parametrize("why", ["limit", "pinning"])
def test_past_the_host_limit_the_inputs_stay_on_the_device(why, monkeypatch):
    """A long sequence's offloaded inputs must not take the machine's memory: past the
    limit (or where pinning fails) the layer inputs stay on the device, one warning says
    so, and the gradients are the same."""
    from sloth_core import checkpointing

    loss_ref, grads_ref = _lora_grads("none", 0.0)
    monkeypatch.setattr(checkpointing, "_warned_host_full", False)
    if why == "limit":
        monkeypatch.setattr(checkpointing, "_offload_limit", 0)
        expected = "past its limit of 0.0 GiB"
    else:

        def no_pinned_memory(self, t):
            raise RuntimeError("CUDA error: out of memory (cudaHostAlloc)")

        monkeypatch.setattr(checkpointing._Slot, "_to_host", no_pinned_memory)
        expected = "pinning failed"
    stayed = []
    take = checkpointing._Slot.take

    def spy(self):
        stayed.append(self.host is None and self.kept is not None)
        return take(self)

    monkeypatch.setattr(checkpointing._Slot, "take", spy)
    with pytest.warns(UserWarning, match=expected) as record:
        loss, grads = _lora_grads("offload", 0.0)
    assert len([w for w in record if "offloaded checkpointing" in str(w.message)]) == 1
    assert stayed and all(stayed)
    assert abs(loss - loss_ref) <= 1e-6
    for name, grad in grads.items():
        assert torch.allclose(grad, grads_ref[name], atol=1e-6, rtol=1e-5), name
