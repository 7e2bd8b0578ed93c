"""The output head's side of the losses: labels aligned with the positions that predict
them, the head's plain weight (for the chunked ops), and per-token log-probabilities."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def shift_labels(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Labels aligned with the positions that predict them (the last predicts nothing)."""
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def plain_weight(module: Any) -> torch.Tensor | None:
    # A quantized or adapter-wrapped lm_head has no dense weight to fuse with.
    weight = getattr(module, "weight", None)
    if isinstance(module, torch.nn.Linear) and type(weight) in (torch.Tensor, torch.nn.Parameter):
        return weight
    return None


def causal_lm_log_probs(
    *,
    model: Any,
    hidden_states: torch.Tensor,
    labels: torch.Tensor,
    ops: Any,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Per-position log-probabilities of the next label, ``[batch, seq]`` fp32, 0 where it
    is ignored: through the chunked ``token_log_probs`` op (never the full logits) on a
    plain lm_head, through the full logits on a quantized or adapter-wrapped one."""
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    targets = shift_labels(labels, ignore_index).to(hidden_states.device)
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    flat = targets.reshape(-1)
    weight = plain_weight(head)
    if weight is not None:
        token = ops.token_log_probs(
            hidden, weight, flat, bias=head.bias, softcap=softcap, temperature=temperature,
            ignore_index=ignore_index,
        )  # fmt: skip
    else:
        logits = head(hidden).float()
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        keep = flat != ignore_index
        picked = torch.log_softmax(logits / temperature, dim=-1).gather(
            1, torch.where(keep, flat, 0).unsqueeze(1)
        )
        token = picked.squeeze(1) * keep
    return token.reshape(targets.shape)
