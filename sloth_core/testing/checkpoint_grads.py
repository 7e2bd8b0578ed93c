"""The gradients of a few identical training steps of a causal LM, each layer run through
a given checkpoint function: what the checkpointing tests compare with the gradients of
no checkpointing (:func:`repeated_step_grads`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

Grads = list[dict[str, torch.Tensor]]


def repeated_step_grads(model: Any, checkpoint: Callable | None = None, *, steps: int = 2,
                        shape: tuple[int, int] = (2, 11), padded: bool = False,
                        packed: bool = False,
                        device: str | torch.device | None = None) -> Grads:  # fmt: skip
    """Per step, every trainable parameter's gradient (float32) of the loss on the same
    random batch (seed 1, ``shape`` token ids; ``padded``: the second row's first three
    tokens masked; ``packed``: two sequences in each row, told by ``position_ids`` that
    restart, no mask), without an optimizer, so every step should give the same gradients.
    With ``checkpoint`` (say ``offloaded_checkpoint``) every decoder layer of the (PEFT)
    ``model`` is checkpointed through it; the first step runs each layer's first pass, the
    later ones what the first taught it (the recompute's probes). The batch goes to
    ``device``, else where the model's first parameter is (a quantized model loads onto the
    GPU where there is one)."""
    from sloth_core.checkpointing import enable_checkpointing

    if checkpoint is not None:
        enable_checkpointing(model, offload=True)
        for layer in model.get_base_model().model.layers:
            layer._gradient_checkpointing_func = checkpoint
    model.train()  # checkpointing runs in training only
    device = device or next(model.parameters()).device
    generator = torch.Generator().manual_seed(1)
    grads = []
    for _ in range(steps):
        ids = torch.randint(0, model.config.vocab_size, shape, generator=generator)
        mask = torch.ones_like(ids)
        if padded:
            mask[1, :3] = 0
        model.zero_grad(set_to_none=True)
        inputs = dict(input_ids=ids.to(device), labels=ids.to(device))
        if packed:  # the rows cut unevenly: sequences of different lengths
            cut = [shape[1] // 3 + row % 2 for row in range(shape[0])]
            positions = [torch.cat([torch.arange(c), torch.arange(shape[1] - c)]) for c in cut]
            inputs["position_ids"] = torch.stack(positions).to(device)
        else:
            inputs["attention_mask"] = mask.to(device)
        out = model(**inputs)
        out.loss.backward()
        grads.append({n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad})
    return grads


def assert_same_grads(got: Grads, want: Grads, rtol: float = 1e-5) -> None:
    """Every step's gradients of :func:`repeated_step_grads` in ``got`` as in ``want``: the
    same parameters (some), each within ``rtol`` of its largest magnitude in ``want``."""
    assert len(got) == len(want)
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.keys() == w.keys() and g
        for name in w:
            scale = w[name].abs().max().clamp(min=1e-12)
            error = ((g[name] - w[name]).abs().max() / scale).item()
            assert error <= rtol, (step, name, error)


def sloth_attention_lora_model(
    arch: str, targets: list[str], *, seed: int, device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Any:  # fmt: skip
    """A tiny ``arch`` on :func:`~sloth_core.testing.varied.varied_config` (every float
    field off its default) with ``sloth_attention``, PEFT LoRA on ``targets`` (B not zero),
    in training mode: what the kept-attention tests feed :func:`repeated_step_grads`."""
    from peft import LoraConfig, get_peft_model

    from sloth_core.patches import SLOTH_ATTENTION, register_sloth_attention
    from sloth_core.testing.models import init_tiny_model
    from sloth_core.testing.varied import varied_config

    register_sloth_attention()
    config = varied_config(arch, tie_word_embeddings=False)
    config._attn_implementation = SLOTH_ATTENTION
    model: Any = init_tiny_model(config, seed=seed)
    model = model.to(device=device, dtype=dtype)
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=targets)
    return get_peft_model(model, lora).train()
