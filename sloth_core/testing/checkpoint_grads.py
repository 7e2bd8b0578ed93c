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
                        device: str | torch.device | None = None) -> Grads:  # fmt: skip
    """Per step, every trainable parameter's gradient (float32) of the loss on the same
    random batch (seed 1, ``shape`` token ids; ``padded``: the second row's first three
    tokens masked), without an optimizer, so every step should give the same gradients.
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
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                    labels=ids.to(device))  # fmt: skip
        out.loss.backward()
        grads.append({n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad})
    return grads
