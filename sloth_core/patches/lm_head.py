"""The output head's side of the losses: labels aligned with the positions that predict
them, how many of them count (read back without draining the GPU's queue), the head's
plain weight (for the chunked ops), and per-token log-probabilities."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .tensor_memo import memo


def shift_labels(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Labels aligned with the positions that predict them (the last predicts nothing)."""
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]


class CountedLabels:
    """How many labels count once shifted, queued on the labels' device and copied to
    pinned host memory behind an event: :meth:`value` waits for that event alone, which
    the GPU passed long before the loss asks (the forward's first kernels), where reading
    the count then, or finding the counted rows with ``nonzero``, would wait for the
    whole forward and leave the backward's launches no lead over the GPU."""

    def __init__(self, labels: torch.Tensor, ignore_index: int) -> None:
        count = (labels[..., 1:] != ignore_index).sum()
        self._event: Any = None
        self._value: int | None = None
        if count.device.type == "cuda":
            self._host = torch.empty((), dtype=count.dtype, pin_memory=True)
            self._host.copy_(count, non_blocking=True)
            self._event = torch.cuda.Event()
            # On the stream the copy ran on: the labels' device's, not the current one's.
            self._event.record(torch.cuda.current_stream(count.device))
        else:
            # On the CPU it is ready; another device's is read here, at the forward's start.
            self._value = int(count)

    @classmethod
    def known(cls, value: int) -> CountedLabels:
        """A count the caller knows already (read on the host before the step)."""
        counted = cls.__new__(cls)
        counted._event, counted._value = None, int(value)
        return counted

    def value(self) -> int:
        if self._value is None:
            self._event.synchronize()
            self._value = int(self._host)
        return self._value


def counted_labels(labels: torch.Tensor, ignore_index: int = -100) -> CountedLabels:
    """The count of ``labels`` that the shifted loss counts (not ``ignore_index``, the
    first of each row never), started once per labels tensor and kept on it: the causal
    LM's forward starts it on entry and the loss reads the same one (see
    :class:`CountedLabels`). Ops take it as ``counted=`` to skip the ignored rows without
    a host sync."""
    return memo(
        labels, "_sloth_counted", (ignore_index,), lambda: CountedLabels(labels, ignore_index)
    )


def preset_counted_labels(labels: torch.Tensor, value: int, ignore_index: int = -100) -> None:
    """Give ``labels`` the count :func:`counted_labels` would start, as known already: a
    captured step (:mod:`sloth_core.train.step_graph`) may not read the device back."""
    memo(labels, "_sloth_counted", (ignore_index,), lambda: CountedLabels.known(value))


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
            ignore_index=ignore_index, counted=counted_labels(labels, ignore_index).value(),
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
