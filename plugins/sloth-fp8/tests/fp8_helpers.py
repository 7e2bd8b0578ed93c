"""What sloth-fp8's test modules share (a module of its own: ``conftest`` is not importable
by name when several test folders have one)."""

from __future__ import annotations

from typing import Any

import torch


def train_losses(model: Any, batch: dict, steps: int = 4, lr: float = 1e-2) -> list[float]:
    """``steps`` AdamW steps of ``model`` on ``batch`` (labels: its input ids); the losses."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr)
    losses = []
    for _ in range(steps):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses
