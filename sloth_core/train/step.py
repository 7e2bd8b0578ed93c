"""One optimizer step, and one evaluation: what ``sloth train`` runs and ``sloth bench
train`` times, so the benchmark measures the trainer users run.

Each optimizer step consumes its micro-batches; the loss of every micro-batch is its
summed token loss divided by the label tokens of the whole step (``num_items_in_batch``),
so the accumulated gradient is exactly the gradient of one big batch's mean token loss,
not a mean of per-batch means.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from . import distributed, step_graph

Autocast = Callable[[], Any]


def label_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Label tokens that count in the loss (the model shifts labels: the first never does)."""
    return int((batch["labels"][:, 1:] != -100).sum())


def accumulate(
    model: Any,
    micro_batches: list[dict[str, torch.Tensor]],
    *,
    autocast: Autocast = contextlib.nullcontext,
    group: Any = None,
) -> float:
    """Forward and backward every micro-batch of one optimizer step; the step's token-mean loss.

    Each loss is summed over its tokens and divided by the label tokens of all micro-batches
    together, so the gradients add up to those of one batch holding them all. Under DDP
    (``group``) the count is that of every rank's micro-batches, gradients are summed over
    the ranks once, at the last micro-batch, and the loss returned is this rank's share.
    """
    device = next(p for p in model.parameters()).device
    counts = [label_tokens(b) for b in micro_batches]
    total = sum(counts)
    if group is not None and group.active:
        total = int(group.all_sum([total])[0])
    items = torch.tensor(max(total, 1), device=device)
    losses = []
    graphed = step_graph.enabled() and len(micro_batches) == 1
    for number, batch in enumerate(micro_batches):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}

        def eager(batch: dict[str, torch.Tensor] = batch) -> torch.Tensor:
            with autocast():
                loss = model(**batch, num_items_in_batch=items).loss
            loss.backward()
            return loss.detach()

        with distributed.no_sync(model, last=number == len(micro_batches) - 1):
            if graphed:  # opt-in: one micro-batch's step replayed as a CUDA graph
                loss = step_graph.forward_backward(
                    model, batch, items, counts[number], eager, group=group, autocast=autocast
                )
            else:
                loss = eager()
        losses.append(loss)
    # Read back once, after every micro-batch is queued: a read per micro-batch would
    # let the GPU idle while the host launches the next one's forward.
    return float(torch.stack(losses).sum()) if losses else 0.0


@dataclass
class StepResult:
    """One optimizer step: the token-mean loss and the tokens of every rank, the learning
    rate it stepped with, the gradient norm before clipping (``None``: not clipped)."""

    loss: float
    tokens: int
    lr: float
    grad_norm: float | None
    metrics: dict[str, float] = field(default_factory=dict)  # the method's (DPO's rewards...)


def train_step(
    model: Any,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[dict[str, torch.Tensor]],
    *,
    scheduler: Any = None,
    autocast: Autocast = contextlib.nullcontext,
    group: Any = None,
    max_grad_norm: float = 0.0,
    forward_backward: Callable[..., tuple[float, dict[str, float]]] | None = None,
) -> StepResult:
    """Forward and backward ``micro_batches`` (:func:`accumulate`, or a method's
    ``forward_backward``, which returns metrics too), clip the gradients' norm to
    ``max_grad_norm`` (0: no clipping), step the optimizer and the scheduler."""
    if forward_backward is None:
        metrics: dict[str, float] = {}
        loss = accumulate(model, micro_batches, autocast=autocast, group=group)
    else:
        loss, metrics = forward_backward(model, micro_batches, autocast=autocast, group=group)
    grad_norm = None
    if max_grad_norm > 0:
        params = [p for group_ in optimizer.param_groups for p in group_["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        # Sharded, the norm is a DTensor (replicated: every rank has it whole).
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    lr = float(optimizer.param_groups[0]["lr"])
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    tokens = sum(int(b["input_ids"].numel()) for b in micro_batches)
    if group is not None and group.active:
        loss, tokens = group.all_sum([loss, tokens])  # as they are in one process
    return StepResult(float(loss), int(tokens), lr, grad_norm, metrics)


@torch.no_grad()
def evaluate(model: Any, batches: Any, *, autocast: Autocast) -> dict[str, float]:
    """Token-mean loss and next-token accuracy on the label tokens of every eval batch."""
    was_training = model.training
    model.eval()
    device = next(p for p in model.parameters()).device
    loss_sum, correct, count = 0.0, 0, 0
    try:
        for index in range(batches.num_batches()):
            batch = {k: v.to(device) for k, v in batches.batch(0, index).items()}
            labels = batch.pop("labels")
            with autocast():
                logits = model(**batch, use_cache=False).logits
            logits, targets = logits[:, :-1].float(), labels[:, 1:]
            keep = targets != -100
            losses = torch.nn.functional.cross_entropy(
                logits[keep], targets[keep], reduction="sum"
            )  # fmt: skip
            loss_sum += float(losses)
            correct += int((logits[keep].argmax(-1) == targets[keep]).sum())
            count += int(keep.sum())
    finally:
        model.train(was_training)
    count = max(count, 1)
    return {"eval_loss": loss_sum / count, "eval_accuracy": correct / count}
