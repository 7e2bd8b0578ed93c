"""The core's causal-LM loss: chunked through the op registry, never the full logits."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from sloth_core import hookimpl


def shift_labels(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Labels aligned with the positions that predict them (the last predicts nothing)."""
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def _plain_weight(module: Any) -> torch.Tensor | None:
    # A quantized or adapter-wrapped lm_head has no dense weight to fuse with.
    weight = getattr(module, "weight", None)
    if isinstance(module, torch.nn.Linear) and type(weight) in (torch.Tensor, torch.nn.Parameter):
        return weight
    return None


@hookimpl(trylast=True)
def compute_loss(model, hidden_states, labels, ops, num_items_in_batch, ignore_index):
    """Shifted causal-LM cross entropy over the lm_head, with final-logit softcapping."""
    head = model.get_output_embeddings()
    config = model.config
    softcap = getattr(config, "final_logit_softcapping", None)
    targets = shift_labels(labels, ignore_index).reshape(-1).to(hidden_states.device)
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    options = dict(ignore_index=ignore_index, softcap=softcap, num_items_in_batch=num_items_in_batch)
    weight = _plain_weight(head)
    if weight is not None:
        return ops.fused_linear_cross_entropy(hidden, weight, targets, bias=head.bias, **options)
    return ops.cross_entropy(head(hidden), targets, **options)
